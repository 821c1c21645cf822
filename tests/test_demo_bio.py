"""The second bundled domain (data/demo_bio): deterministic generator, split logic, presets, three-route set."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter

import pytest

from gag_lightning.data.records import read_knowledge_base, read_mixed, read_qa, read_router_pool
from tests.conftest import ROOT

BIO = ROOT / "data" / "demo_bio"
FILES = ["knowledge_base.jsonl", "train.jsonl", "test_seen_fact.jsonl", "test_kb_only.jsonl", "test.jsonl",
         "router/demo_bio.jsonl", "mixed_online.jsonl", "mixed_online_3routes.jsonl", "README.md"]


def test_generator_reproduces_the_bundled_files(tmp_path) -> None:
    for out in (tmp_path / "a", tmp_path / "b"):
        proc = subprocess.run([sys.executable, str(BIO / "make_demo_bio.py"), "--out-dir", str(out)],
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr
    for name in FILES:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
        assert (tmp_path / "a" / name).read_bytes() == (BIO / name).read_bytes(), f"{name} is stale: regenerate it"


def test_splits_mirror_the_demo() -> None:
    train, seen, kb_only, test = (read_qa(BIO / f) for f in ("train.jsonl", "test_seen_fact.jsonl",
                                                                "test_kb_only.jsonl", "test.jsonl"))
    assert (len(train), len(seen), len(kb_only), len(test)) == (112, 32, 24, 56)
    assert [r.question for r in test] == [r.question for r in seen + kb_only]
    assert all(r.answers and any(a in r.answer for a in r.answers) for r in train + test)
    assert not {r.question for r in train} & {r.question for r in test}
    instruction = {r.instruction for r in train + test}
    assert instruction == {"Answer the question about the Tesselmoor Adjuvant Institute's vaccine adjuvants concisely."}
    kb = " ".join(read_knowledge_base(BIO / "knowledge_base.jsonl"))
    assert all(r.answers[0] in kb for r in test)  # every asked fact is stated in the knowledge base
    # seen facts are taught by train (same fact, other phrasing); KB-only facts never are
    taught = {(a, r.answer) for r in train for a in r.answers[:1]}
    assert all((r.answers[0], r.answer) in taught for r in seen)
    assert not any((r.answers[0], r.answer) in taught for r in kb_only)


def test_three_route_online_set_and_pools() -> None:
    mixed = read_mixed(BIO / "mixed_online_3routes.jsonl")
    counts = Counter(r.dataset_name for r in mixed)
    assert counts["demo"] == counts["demo_bio"] == 56 and len(mixed) == 172
    assert sum(counts[k] for k in ("webqa", "tqa", "popqa", "freebase_qa", "hotpot_qa", "nq")) == 60
    assert all(r.fact_answers for r in mixed if r.dataset_name in ("demo", "demo_bio"))
    assert all(r.answers for r in mixed)
    demo_test = [r.question for r in read_qa(ROOT / "data" / "demo" / "test.jsonl")]
    assert [r.question for r in mixed if r.dataset_name == "demo"] == demo_test
    pools = {name: {q for path in paths for q in read_router_pool(path)} for name, paths in {
        "general": [ROOT / "data" / "demo" / "router" / "general.jsonl"],
        "demo": [ROOT / "data" / "demo" / "router" / "demo.jsonl", ROOT / "data" / "demo" / "train.jsonl"],
        "demo_bio": [BIO / "router" / "demo_bio.jsonl", BIO / "train.jsonl"]}.items()}
    assert len(pools["demo_bio"]) == 152 + 112
    online = {r.question for r in mixed}
    assert all(not online & pool for pool in pools.values())
    two = read_mixed(BIO / "mixed_online.jsonl")
    assert Counter(r.dataset_name for r in two)["demo_bio"] == 56 and len(two) == 116


@pytest.mark.parametrize("model", ["smollm2", "tiny"])
def test_demo_bio_preset_composes(compose_cfg, model) -> None:
    from pathlib import Path

    from gag_lightning.keys import memory_splits

    cfg = compose_cfg(["domain=demo_bio", f"model={model}"])
    assert cfg.domain.name == "demo_bio" and list(cfg.domain.dataset_names) == ["demo_bio"]
    for key in ("knowledge_base", "train", "test", "test_seen_fact", "test_kb_only", "general_pool", "mixed_test"):
        assert Path(cfg.domain[key]).is_file(), key
    assert [Path(p).name for p in cfg.domain.router_pool] == ["demo_bio.jsonl", "train.jsonl"]
    assert memory_splits(cfg) == ["train", "test_seen_fact", "test_kb_only"]
    assert cfg.memory.generation.max_new_tokens == 40 and cfg.eval.decoding.max_new_tokens == 28
    assert cfg.memory.generation.system_prompt.startswith("You are an expert of the Tesselmoor Adjuvant Institute")
    assert cfg.memory.compression.slots == 16 and cfg.gag.init == "token_alignment"
    # experiment=smoke keeps a domain given on the command line
    smoke = compose_cfg(["experiment=smoke", "domain=demo_bio"])
    assert smoke.domain.name == "demo_bio" and smoke.model.name == "tiny"
    assert json.loads(json.dumps(list(smoke.domain.eval_splits))) == ["test_seen_fact", "test_kb_only"]
