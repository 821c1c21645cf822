"""The memory stage: backgrounds, teacher-forced extraction, banks; batching, resume, DDP and the CLI end to end.

The library tests run a tiny Qwen3 expert whose weights are re-drawn with a larger spread (a freshly
initialised model repeats one token forever) and extra stop ids picked from a probe generation, so
the records stop at different lengths, one of them before generating anything (L = 0).
"""

from __future__ import annotations

import collections
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gag_lightning.data.records import QARecord, read_qa
from gag_lightning.errors import SchemaMismatchError
from gag_lightning.eval.generation import DecodingConfig, generate_batched
from gag_lightning.keys import memory_splits
from gag_lightning.memory.background import (
    BackgroundConfig,
    background_prompt_ids,
    background_settings,
    generate_backgrounds,
    plan_batches,
)
from gag_lightning.memory.bank import BackgroundStore, MemoryBank, MemorySchema
from gag_lightning.memory.compression import build_memory, layer_indices
from gag_lightning.memory.extract import (
    CompressionConfig,
    build_memory_bank,
    extract_memories,
    teacher_forced_states,
)
from gag_lightning.models.loading import load_causal_lm, load_tokenizer
from gag_lightning.prompts import stop_token_ids

REPO = Path(__file__).resolve().parents[1]
KEYS = ("last", "minus2", "minus4", "minus6")
MAX_NEW = 12
CONFIG = BackgroundConfig(system_prompt="Write the background knowledge for the question.", max_new_tokens=MAX_NEW)
COMPRESSION = CompressionConfig(layer_keys=KEYS, slots=4, dtype="float32")


class Killed(Exception):
    """Stands for a kill in the middle of a run."""


@pytest.fixture(scope="module")
def expert(tiny_expert_dir: Path):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: one thread is fastest and immune to a busy machine
    path = tiny_expert_dir
    model = load_causal_lm(path, "float32").eval()
    torch.manual_seed(123)
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() == 2:
                param.normal_(0.0, 0.15)
    tokenizer = load_tokenizer(path)
    yield model, tokenizer
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def records() -> list[QARecord]:
    recs = read_qa(REPO / "data/demo/train.jsonl")[:20]
    return recs + [QARecord(index=20, id="blank", question="  ", answer="no question")]


@pytest.fixture(scope="module")
def stops(expert, records) -> list[int]:
    """Real end ids + the most common first token (some record has L = 0) + the most common token."""
    model, tokenizer = expert
    real = stop_token_ids(tokenizer, model.generation_config)
    prompts = background_prompt_ids(tokenizer, records, CONFIG)
    probe = generate_batched(model, tokenizer, prompts, DecodingConfig(max_new_tokens=MAX_NEW, batch_size=32), real)
    first = collections.Counter(g.token_ids[0] for g in probe if g.token_ids).most_common(1)[0][0]
    common = collections.Counter(t for g in probe for t in g.token_ids[1:] if t != first).most_common(1)[0][0]
    return sorted(set(real) | {first, common})


def settings(stops: list[int], **extra) -> dict:
    return background_settings(CONFIG, "tiny-perturbed", stops, split="train", **extra)


def schema(store: BackgroundStore, **overrides) -> MemorySchema:
    values = dict(expert_fingerprint="tiny-perturbed", layer_keys=list(KEYS), slots=4, hidden_size=64,
                  dtype="float32", background_fingerprint=store.fingerprint)
    values.update(overrides)
    return MemorySchema(**values)


def make_store(tmp: Path, expert, records, stops, batch_size: int, **kw) -> BackgroundStore:
    model, tokenizer = expert
    generate_backgrounds(model, tokenizer, records, tmp, settings(stops), CONFIG, stops, batch_size=batch_size,
                         progress=False, **kw)
    return BackgroundStore.open(tmp)


def rows(store: BackgroundStore) -> list[tuple]:
    return [(r["index"], r["id"], r["question"], r["background"], r["token_ids"], r["finished"], r["prompt_ids"])
            for r in store.read_all()]


def assert_same_bank(a: MemoryBank, b: MemoryBank, atol: float = 1e-4) -> None:
    assert a.schema == b.schema
    assert a.metas() == b.metas()
    torch.testing.assert_close(a.memories(), b.memories(), atol=atol, rtol=0)


# ---------------------------------------------------------------- planning


def test_plan_batches_deals_each_record_once() -> None:
    lengths = {i: (i * 7) % 5 for i in range(23)}
    plans = [plan_batches(lengths, 4, rank, 3) for rank in range(3)]
    dealt = [i for plan in plans for batch in plan for i in batch]
    assert sorted(dealt) == list(range(23))
    assert all(len(batch) <= 4 for plan in plans for batch in plan)
    assert plan_batches(lengths, 4) == plan_batches(dict(sorted(lengths.items(), reverse=True)), 4)


# ---------------------------------------------------------------- extraction positions


def test_teacher_forced_states_equal_incremental_generation(expert, records, stops) -> None:
    model, tokenizer = expert
    prompts = background_prompt_ids(tokenizer, records, CONFIG)
    gens = generate_batched(model, tokenizer, prompts, DecodingConfig(max_new_tokens=MAX_NEW, batch_size=1), stops)
    picked = [i for i, g in enumerate(gens) if g.finished and len(g.token_ids) >= 2][:2]
    picked += [i for i, g in enumerate(gens) if not g.finished][:1]
    assert len(picked) == 3, "the probe should give finished and unfinished records"
    forced = teacher_forced_states(model, [prompts[i] + gens[i].token_ids for i in picked], KEYS)
    memories = extract_memories(model, [prompts[i] for i in picked], [gens[i].token_ids for i in picked], COMPRESSION)
    for row, i in enumerate(picked):
        ids = torch.tensor([prompts[i]])
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=MAX_NEW,
                             do_sample=False, eos_token_id=stops, pad_token_id=tokenizer.pad_token_id,
                             output_hidden_states=True, return_dict_in_generate=True)
        tokens, length = gens[i].token_ids, len(gens[i].token_ids)
        assert out.sequences[0, len(prompts[i]):len(prompts[i]) + length].tolist() == tokens
        # step t >= 1 of incremental decoding feeds generated token t-1: those are the memory's states
        steps = out.hidden_states[1:]
        covered = min(length, len(steps))
        assert covered == (length if gens[i].finished else length - 1)
        start = len(prompts[i])
        incremental = []
        for k, index in enumerate(layer_indices(KEYS)):
            seen = torch.stack([steps[t][index][0, -1] for t in range(covered)])
            torch.testing.assert_close(forced[k][row, start:start + covered], seen, atol=1e-4, rtol=0)
            incremental.append(seen)
        if gens[i].finished:  # every generated token (stop excluded) was fed back: the memory is the same
            torch.testing.assert_close(memories[row], build_memory(incremental, 4), atol=1e-4, rtol=0)
    # encoding the batch's common prompt prefix once (the default) changes nothing but the cost
    unshared = extract_memories(model, [prompts[i] for i in picked], [gens[i].token_ids for i in picked],
                                COMPRESSION, share_prefix=False)
    torch.testing.assert_close(memories, unshared, atol=1e-5, rtol=0)


# ---------------------------------------------------------------- batching


def test_batch_16_gives_the_same_backgrounds_and_memories_as_batch_1(tmp_path, expert, records, stops) -> None:
    model, _ = expert
    one = make_store(tmp_path / "bg1", expert, records, stops, batch_size=1)
    sixteen = make_store(tmp_path / "bg16", expert, records, stops, batch_size=16)
    assert rows(one) == rows(sixteen)
    assert len(rows(one)) == len(records)
    lengths = [len(r["token_ids"]) for r in one.read_all()]
    assert 0 in lengths and max(lengths) > 1 and len(set(lengths)) > 2  # stops at several lengths, L=0 included
    assert next(r for r in one.read_all() if r["index"] == 20)["question"] == "  "  # generated, not dropped

    build_memory_bank(model, one.read_all(), tmp_path / "m1", schema(one), COMPRESSION, batch_size=1,
                      shard_size=5, progress=False)
    build_memory_bank(model, sixteen.read_all(), tmp_path / "m16", schema(sixteen), COMPRESSION, batch_size=16,
                      shard_size=256, progress=False)
    a, b = MemoryBank.open(tmp_path / "m1"), MemoryBank.open(tmp_path / "m16")
    assert_same_bank(a, b)
    assert a.indices() == list(range(len(records)))
    empty = next(k for k, m in enumerate(a.metas()) if m["num_generated_tokens"] == 0)
    assert torch.count_nonzero(a.memories()[empty]) == 0  # L = 0: one zero vector, stabilised to zero


def test_gold_answers_reach_the_bank_metas_only_when_given(tmp_path, expert, records, stops) -> None:
    """Aliases go store row -> bank meta -> EvalItem; records without them keep exactly the old rows and metas."""
    import dataclasses

    from gag_lightning.eval.harness import items_from_metas

    model, _ = expert
    plain = [dataclasses.replace(r, answers=None) for r in records[:6]]  # the demo's records carry answers
    aliased = [dataclasses.replace(r, answers=[f"alias {r.index}", "1,956"]) if r.index < 3 else r for r in plain]
    stores = {}
    for name, recs in (("plain", plain), ("aliased", aliased)):
        stores[name] = make_store(tmp_path / f"bg-{name}", expert, recs, stops, batch_size=4)
        build_memory_bank(model, stores[name].read_all(), tmp_path / f"m-{name}", schema(stores[name]), COMPRESSION,
                          batch_size=4, progress=False)
    old_row = {"index", "id", "question", "answer", "background", "token_ids", "finished", "prompt_ids"}
    old_meta = {"index", "id", "question", "answer", "background", "num_generated_tokens", "finished"}
    assert all(set(r) == old_row for r in stores["plain"].read_all())
    plain_metas = MemoryBank.open(tmp_path / "m-plain").metas()
    assert all(set(m) == old_meta for m in plain_metas)
    metas = MemoryBank.open(tmp_path / "m-aliased").metas()
    for meta, before in zip(metas, plain_metas, strict=True):
        if meta["index"] < 3:
            assert meta.pop("answers") == [f"alias {meta['index']}", "1,956"]
        assert meta == before  # nothing else changed
    items = items_from_metas(MemoryBank.open(tmp_path / "m-aliased").metas())
    assert [it.answers for it in items] == [["alias 0", "1,956"], ["alias 1", "1,956"], ["alias 2", "1,956"],
                                            None, None, None]


def test_continuous_batching_refills_rows_without_changing_tokens(expert, records, stops) -> None:
    model, tokenizer = expert
    prompts = background_prompt_ids(tokenizer, records, CONFIG)
    one = generate_batched(model, tokenizer, prompts, DecodingConfig(max_new_tokens=MAX_NEW, batch_size=1), stops)
    for width in (3, 16):  # 3 rows in flight over 21 prompts: stopped rows are replaced many times
        many = generate_batched(model, tokenizer, prompts, DecodingConfig(max_new_tokens=MAX_NEW, batch_size=width),
                                stops, share_prefix=True, continuous=True)
        assert [(g.token_ids, g.finished, g.text) for g in many] == [(g.token_ids, g.finished, g.text) for g in one]


def test_empty_question_is_counted(tmp_path, expert, records, stops) -> None:
    model, tokenizer = expert
    stats = generate_backgrounds(model, tokenizer, records[-3:], tmp_path / "bg", settings(stops), CONFIG, stops,
                                 batch_size=4, progress=False)
    assert stats.extra["empty_questions"] == 1
    assert stats.records == 3 and stats.as_dict()["records_per_s"] > 0


# ---------------------------------------------------------------- resume


def test_interrupt_and_resume_gives_the_same_bank(tmp_path, expert, records, stops) -> None:
    model, _ = expert
    whole = make_store(tmp_path / "bg-whole", expert, records, stops, batch_size=4)
    build_memory_bank(model, whole.read_all(), tmp_path / "m-whole", schema(whole), COMPRESSION, batch_size=4,
                      shard_size=3, progress=False)

    def kill_after(n: int):
        def hook(done: int) -> None:
            if done == n:
                raise Killed

        return hook

    with pytest.raises(Killed):  # one decoding batch per appended chunk: killed after 8 records
        make_store(tmp_path / "bg", expert, records, stops, batch_size=4, on_batch=kill_after(2), queue_batches=1)
    part = BackgroundStore.open(tmp_path / "bg")
    assert len(part) == 8
    with (tmp_path / "bg" / "backgrounds-r000.jsonl").open("ab") as handle:
        handle.write(b'{"index": 17, "id": "torn", "questi')  # a kill in the middle of an append
    resumed = make_store(tmp_path / "bg", expert, records, stops, batch_size=4, queue_batches=1)
    assert rows(resumed) == rows(whole)

    with pytest.raises(Killed):
        build_memory_bank(model, resumed.read_all(), tmp_path / "m", schema(resumed), COMPRESSION, batch_size=4,
                          shard_size=3, progress=False, on_batch=kill_after(3))
    assert 0 < len(MemoryBank.open(tmp_path / "m")) < len(records)
    (tmp_path / "m" / ".shard-r000-000099.safetensors.tmp").write_bytes(b"half a shard")  # killed mid-write
    build_memory_bank(model, resumed.read_all(), tmp_path / "m", schema(resumed), COMPRESSION, batch_size=4,
                      shard_size=3, progress=False)
    assert_same_bank(MemoryBank.open(tmp_path / "m"), MemoryBank.open(tmp_path / "m-whole"))
    assert not list((tmp_path / "m").glob(".*.tmp"))


_KILL_MEMORY = """
import os, signal, sys
sys.path.insert(0, {repo!r})
from gag_lightning.memory.bank import BackgroundStore, MemorySchema
from gag_lightning.memory.extract import CompressionConfig, build_memory_bank
from gag_lightning.models.loading import load_causal_lm
import torch
torch.set_num_threads(1)

def die(done):
    if done == {kill_at}:
        os.kill(os.getpid(), signal.SIGKILL)

model = load_causal_lm({model!r}, "float32").eval()
store = BackgroundStore.open({store!r})
build_memory_bank(model, store.read_all(), {bank!r}, MemorySchema.from_dict({schema!r}),
                  CompressionConfig(**{compression!r}), batch_size=4, shard_size=5, progress=False, on_batch=die)
"""


def test_kill_9_mid_batch_resumes_a_bit_identical_float16_bank(tmp_path, expert, records, stops) -> None:
    """shard_size=5 with batch_size=4: a shard boundary falls inside a batch, so the records of a batch are committed
    in two shards. After a SIGKILL the resumed run plans the same batches over every record, runs the half-banked
    batch whole again and writes only its missing records: the float16 bank is bit-identical to an uninterrupted one."""
    model, _ = expert
    model.save_pretrained(tmp_path / "expert")  # the perturbed expert, for the killed process
    store = make_store(tmp_path / "bg", expert, records, stops, batch_size=4)
    half = CompressionConfig(layer_keys=KEYS, slots=4, dtype="float16")
    bank_schema = schema(store, dtype="float16")
    build_memory_bank(model, store.read_all(), tmp_path / "whole", bank_schema, half, batch_size=4, shard_size=5,
                      progress=False)
    whole = MemoryBank.open(tmp_path / "whole")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    for kill_at in (2, 4):  # after 8 records (5 banked, 3 in memory) and after 16 (15 banked, 1 in memory)
        folder = tmp_path / f"killed-{kill_at}"
        script = _KILL_MEMORY.format(repo=str(REPO), kill_at=kill_at, model=str(tmp_path / "expert"),
                                     store=str(tmp_path / "bg"), bank=str(folder), schema=bank_schema.to_dict(),
                                     compression={"layer_keys": list(KEYS), "slots": 4, "dtype": "float16"})
        proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == -9, proc.stderr[-3000:]
        banked = len(MemoryBank.open(folder))
        assert banked == 5 * (4 * kill_at // 5) and banked % 4, "the kill must leave a batch half banked"
        build_memory_bank(model, store.read_all(), folder, bank_schema, half, batch_size=4, shard_size=5,
                          progress=False)
        resumed = MemoryBank.open(folder)
        assert resumed.metas() == whole.metas()
        assert torch.equal(resumed.memories(None), whole.memories(None)), f"kill after batch {kill_at}"


# ---------------------------------------------------------------- schema


def test_mismatched_schema_is_refused(tmp_path, expert, records, stops) -> None:
    model, tokenizer = expert
    store = make_store(tmp_path / "bg", expert, records[:4], stops, batch_size=4)
    build_memory_bank(model, store.read_all(), tmp_path / "m", schema(store), COMPRESSION, progress=False)
    with pytest.raises(SchemaMismatchError, match="slots"):  # another S never appends to this bank
        build_memory_bank(model, store.read_all(), tmp_path / "m", schema(store, slots=2),
                          CompressionConfig(layer_keys=KEYS, slots=2, dtype="float32"), progress=False)
    with pytest.raises(SchemaMismatchError, match="expert_fingerprint"):
        MemoryBank.open_for_writing(tmp_path / "m", schema(store, expert_fingerprint="another-expert"))
    with pytest.raises(SchemaMismatchError, match="layer_keys"):  # what a later stage asks for is checked
        MemoryBank.open(tmp_path / "m", expect={"layer_keys": ["last", "minus2"], "hidden_size": 64})
    with pytest.raises(SchemaMismatchError, match="max_new_tokens"):  # other generation settings: refused
        longer = BackgroundConfig(system_prompt=CONFIG.system_prompt, max_new_tokens=MAX_NEW + 1)
        generate_backgrounds(model, tokenizer, records[:4], tmp_path / "bg",
                             background_settings(longer, "tiny-perturbed", stops, split="train"), longer, stops,
                             progress=False)
    assert len(MemoryBank.open(tmp_path / "m")) == 4


# ---------------------------------------------------------------- the stage from the command line


def _train(args: list[str], timeout: int = 240) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", HYDRA_FULL_ERROR="1")
    cmd = [sys.executable, str(REPO / "train.py"), "experiment=smoke", "print_config=false", "memory.progress=false",
           *args]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return proc


def _only_folder(root: Path, prefix: str) -> Path:
    found = sorted((root / "tiny" / "demo").glob(f"{prefix}-*"))
    assert len(found) == 1, found
    return found[0]


def test_memory_stage_end_to_end_and_under_ddp(tmp_path) -> None:
    single = tmp_path / "single"
    _train(["stage=memory", "run_stages=[dapt,sft,memory]", f"paths.artifacts={single}",
            f"hydra.run.dir={tmp_path / 'run-single'}"])
    memory = _only_folder(single, "memory")
    manifest = json.loads((memory / "manifest.json").read_text())
    # gag's train split and the demo's two eval splits (memory.splits: null), every record
    sizes = {"train": 112, "test_seen_fact": 32, "test_kb_only": 24}
    assert manifest["splits"] == list(sizes) and sorted(p.name for p in memory.iterdir() if p.is_dir()) == sorted(sizes)
    assert {k: v for k, v in manifest["metrics"].items() if k.endswith("/records")} == {
        f"{split}/records": n for split, n in sizes.items()}
    for split, n in sizes.items():
        bank = MemoryBank.open(memory / split, expect={"layer_keys": list(KEYS), "slots": 16, "hidden_size": 64})  # the demo preset's S
        assert len(bank) == n and bank.schema.dtype == "float16"
        assert bank.memories().shape == (n, 4, 16, 64)
    for path in single.rglob("*"):  # no pickle anywhere in the artifacts
        if path.is_file():
            assert path.suffix not in {".pt", ".pth", ".pkl", ".pickle", ".bin", ".ckpt"}, path
            assert not path.read_bytes()[:2].startswith(b"\x80"), f"{path} looks like a pickle"

    # the same stage with two gloo processes, in a second artifact root holding the same dapt/sft experts
    ddp = tmp_path / "ddp"
    for stage in ("dapt", "sft"):
        src = _only_folder(single, stage)
        shutil.copytree(src, ddp / "tiny" / "demo" / src.name)
    proc = _train(["stage=memory", "memory.splits=[test_kb_only]", f"paths.artifacts={ddp}", "trainer.accelerator=cpu",
                   "trainer.devices=2", "trainer.strategy=ddp", f"hydra.run.dir={tmp_path / 'run-ddp'}"])
    assert "Starting with 2 processes" in proc.stdout + proc.stderr
    ddp_memory = _only_folder(ddp, "memory")
    names = {p.name for p in (ddp_memory / "test_kb_only").iterdir()}
    assert {"shard-r000-000000.safetensors", "shard-r001-000000.safetensors"} <= names  # one shard per rank
    bg_single = BackgroundStore.open(_only_folder(single, "backgrounds") / "test_kb_only")
    bg_ddp = BackgroundStore.open(_only_folder(ddp, "backgrounds") / "test_kb_only")
    assert bg_ddp.fingerprint == bg_single.fingerprint
    assert bg_ddp.read_all() == bg_single.read_all()
    a, b = MemoryBank.open(memory / "test_kb_only"), MemoryBank.open(ddp_memory / "test_kb_only")
    assert a.schema == b.schema and a.metas() == b.metas()
    # float16 storage: equal up to the rounding of float32 values that differ in the last bits
    torch.testing.assert_close(a.memories(), b.memories(), atol=1e-2, rtol=0)
    assert (a.memories(None) == b.memories(None)).float().mean() > 0.99


def test_max_records_caps_each_split_and_keys_the_artifacts(compose_cfg) -> None:
    from gag_lightning.errors import GAGError
    from gag_lightning.keys import artifact_dir
    from gag_lightning.stages.memory.runner import split_limits

    full = compose_cfg(["experiment=smoke"])
    assert split_limits(full, ["train", "test"]) == {"train": None, "test": None}
    capped = compose_cfg(["experiment=smoke", "memory.max_records={train: 8}"])
    assert split_limits(capped, ["train", "test"]) == {"train": 8, "test": None}
    assert split_limits(compose_cfg(["experiment=smoke", "memory.max_records=5"]), ["train", "test"]) == {
        "train": 5, "test": 5}
    # the cap decides which records get a background, so it names its own artifact folders
    assert artifact_dir(capped, "backgrounds") != artifact_dir(full, "backgrounds")
    assert artifact_dir(capped, "memory") != artifact_dir(full, "memory")
    assert artifact_dir(capped, "sft") == artifact_dir(full, "sft")
    with pytest.raises(GAGError, match="dev"):
        split_limits(compose_cfg(["experiment=smoke", "memory.max_records={dev: 3}"]), ["train", "test"])
    with pytest.raises(GAGError, match="positive integer"):
        split_limits(compose_cfg(["experiment=smoke", "memory.max_records={train: 0}"]), ["train", "test"])
    # the demo preset and the smoke experiment keep every record; a cap may name the demo's eval splits
    demo = compose_cfg([])
    splits = memory_splits(demo)
    assert split_limits(demo, splits) == {s: None for s in splits}
    named = compose_cfg(["memory.max_records={train: 16, test_kb_only: 4}"])
    assert split_limits(named, memory_splits(named)) == {"train": 16, "test_seen_fact": None, "test_kb_only": 4}
    with pytest.raises(GAGError, match="does not build"):
        split_limits(compose_cfg(["memory.max_records={test: 4}"]), splits)


def test_memory_splits_follow_the_domain_eval_splits(compose_cfg) -> None:
    """memory.splits: null builds gag's train split + the domain's eval splits, for the runner and the keys alike."""
    from gag_lightning.keys import stage_key

    demo = compose_cfg([])
    assert list(demo.domain.eval_splits) == ["test_seen_fact", "test_kb_only"] and demo.memory.splits is None
    assert memory_splits(demo) == ["train", "test_seen_fact", "test_kb_only"]
    assert memory_splits(compose_cfg(["stage=memory"])) == ["train", "test_seen_fact", "test_kb_only"]
    assert set(stage_key(demo, "backgrounds")["data"]) == {"train", "test_seen_fact", "test_kb_only"}
    for domain in ("materials", "adjuvant"):
        cfg = compose_cfg([f"domain={domain}"])
        assert list(cfg.domain.eval_splits) == ["test"] and memory_splits(cfg) == ["train", "test"]
    # gag validating on a test bank adds it; an explicit list wins
    assert memory_splits(compose_cfg(["gag.val_source=test"]))[-1] == "test"
    assert memory_splits(compose_cfg(["memory.splits=[test]"])) == ["test"]
    assert memory_splits(compose_cfg(["domain=materials", "gag.train_split=dev", "domain.dev=/x.jsonl"])) == [
        "dev", "test"]


def test_whole_pipeline_under_ddp_with_two_processes(tmp_path) -> None:
    """After a DDP fit every rank runs the rest of the pipeline: manifests must be in place before any rank moves
    on (barriers), one rank removes the adapter's `last/` copy, and evaluation decodes on both ranks (a predict loop
    over planned batches) and is scored and written once, on rank 0."""
    artifacts = tmp_path / "artifacts"
    proc = _train(["hardware=ddp", "trainer.accelerator=cpu", "trainer.devices=2", f"paths.artifacts={artifacts}",
                   f"hydra.run.dir={tmp_path / 'run'}", "memory.max_records=16", "eval.systems=[base,gag]",
                   "sft.report_before_after=false"], timeout=420)
    out = proc.stdout + proc.stderr
    shares = re.findall(r"\[eval\] answers decoded per rank: \{0: (\d+), 1: (\d+)\}", out)
    assert len(shares) == 2 and shares[0] == shares[1], shares  # both ranks gathered the same predictions
    assert int(shares[0][0]) > 0 and int(shares[0][1]) > 0 and sum(map(int, shares[0])) == 2 * 16 * 2  # splits x systems
    assert out.count("[eval] done: ") == 1  # scored and written once, by rank 0
    for stage in ("dapt", "sft", "memory", "gag", "eval"):
        assert (_only_folder(artifacts, stage) / "manifest.json").is_file(), stage
    assert (_only_folder(artifacts, "gag") / "adapter.safetensors").is_file()
    assert (_only_folder(artifacts, "eval") / "report.md").is_file()
