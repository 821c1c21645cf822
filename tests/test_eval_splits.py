"""Eval splits: the domain preset lists them, the memory stage builds their banks, the eval stage evaluates and
reports each one separately (`<artifact>/<split>/...`, `eval/<split>/<system>/<metric>`)."""

from __future__ import annotations

import json
from pathlib import Path

from gag_lightning.keys import artifact_dir, eval_splits, memory_splits

DEMO_SPLITS = ["test_seen_fact", "test_kb_only"]


def test_eval_splits_come_from_the_domain_and_a_legacy_split_still_works(compose_cfg) -> None:
    demo = compose_cfg(["stage=eval"])
    assert eval_splits(demo) == DEMO_SPLITS and list(demo.eval.splits) == DEMO_SPLITS
    assert eval_splits(compose_cfg(["stage=eval", "domain=materials"])) == ["test"]
    # `eval.split=<name>` (the old single-split key) evaluates that split, under the same artifact key
    legacy = compose_cfg(["stage=eval", "eval.split=test_kb_only"])
    assert eval_splits(legacy) == ["test_kb_only"]
    assert artifact_dir(legacy, "eval") == artifact_dir(compose_cfg(["stage=eval", "eval.splits=[test_kb_only]"]),
                                                        "eval")
    assert artifact_dir(legacy, "eval") != artifact_dir(demo, "eval")
    # the sweeps optimise a key the eval stage writes: fact_acc on the first eval split
    assert compose_cfg(["experiment=smoke", "sweep=slots"]).optimized_metric == "eval/test_seen_fact/gag/fact_acc"
    assert compose_cfg(["domain=materials", "sweep=rag_k"]).optimized_metric == "eval/test/rag/fact_acc"


def test_smoke_evaluates_both_demo_splits_separately(compose_cfg, capsys) -> None:
    """experiment=smoke on the demo: memory banks for train + both eval splits, then one eval artifact holding
    each split's predictions, metrics and report, a top-level report and metrics, and split-keyed flat metrics."""
    from gag_lightning.stages import run

    systems = ["base", "rag", "gag", "gag_shuffled", "lora"]
    sizes = {"train": 24, "test_seen_fact": 6, "test_kb_only": 5}
    overrides = ["experiment=smoke", "stage=pipeline", "run_stages=[memory,gag,lora,eval]", "memory.expert=base",
                 "memory.progress=false", "memory.max_records={train: 24, test_seen_fact: 6, test_kb_only: 5}",
                 "domain.background_max_new_tokens=4", "domain.answer_max_new_tokens=4", "gag.max_steps=2",
                 "lora.max_steps=2", f"eval.systems=[{','.join(systems)}]"]
    cfg = compose_cfg(overrides)
    assert memory_splits(cfg) == list(sizes) and eval_splits(cfg) == DEMO_SPLITS
    results = run(cfg)

    memory = Path(results["memory"]["artifact"])
    assert {p.name for p in memory.iterdir() if p.is_dir()} == set(sizes)
    assert {s: results["memory"][f"{s}/records"] for s in sizes} == sizes

    out = Path(results["eval"]["artifact"])
    top = json.loads((out / "metrics.json").read_text())
    assert list(top) == DEMO_SPLITS
    report = (out / "report.md").read_text()
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["splits"] == DEMO_SPLITS
    for split in DEMO_SPLITS:
        folder = out / split
        assert {p.name for p in folder.iterdir()} == {"predictions.jsonl", "metrics.json", "report.md"}
        metrics = json.loads((folder / "metrics.json").read_text())
        assert metrics == top[split] and list(metrics["systems"]) == systems
        assert metrics["settings"]["split"] == split and metrics["settings"]["num_records"] == sizes[split]
        assert all(s["n"] == sizes[split] for s in metrics["systems"].values())
        assert all(s["fact_acc_n"] == sizes[split] for s in metrics["systems"].values())  # demo: gold answers
        rows = [json.loads(x) for x in (folder / "predictions.jsonl").read_text().splitlines()]
        prefix = {"test_seen_fact": "demo-seen-", "test_kb_only": "demo-kbonly-"}[split]
        assert len(rows) == len(systems) * sizes[split] and all(r["id"].startswith(prefix) for r in rows)
        assert set(metrics["settings"]["rag"]["passage_ids"]) == {r["id"] for r in rows}
        title = f"tiny / demo / {split} ({sizes[split]} records)"
        assert (folder / "report.md").read_text().startswith(f"# {title}\n") and f"# {title}\n" in report
        for system in systems:
            for source in (manifest["metrics"], results["eval"]):
                assert source[f"eval/{split}/{system}/fact_acc"] == metrics["systems"][system]["fact_acc"]
        assert f"eval/{split}/base/gag_minus_fact_acc" in manifest["metrics"]
    assert all(k.split("/")[1] in DEMO_SPLITS for k in manifest["metrics"])  # no split-less eval/<system>/... keys
    assert report.index("test_seen_fact (6 records)") < report.index("test_kb_only (5 records)")

    # a rerun skips the artifact and still prints every split's table
    capsys.readouterr()
    again = run(compose_cfg(overrides))
    assert again["eval"]["skipped"] and again["eval"]["eval/test_kb_only/gag/fact_acc"] is not None
    printed = capsys.readouterr().out
    assert "test_seen_fact (6 records)" in printed and "test_kb_only (5 records)" in printed
