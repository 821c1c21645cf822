"""Evaluation as a predict loop: under DDP (2 gloo CPU processes) the planned batches are shared out, each rank decodes
about half, and the gathered predictions and metrics equal one process's."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from gag_lightning.errors import GAGError
from gag_lightning.eval.generation import Generation
from gag_lightning.stages.eval.datamodule import EvalBatch
from gag_lightning.stages.eval.module import EvalPrediction, assemble, decoded_per_rank

REPO = Path(__file__).resolve().parents[1]
SPLITS = ("test_seen_fact", "test_kb_only")


def _prediction(batch: EvalBatch, row: int, rank: int) -> EvalPrediction:
    return EvalPrediction(batch.index, batch.split, batch.system, row, Generation(f"{batch.system}-{row}"), rank)


def test_assemble_restores_record_order_drops_padding_repeats_and_refuses_gaps():
    plan = [EvalBatch(0, "s", "base", (2, 0)), EvalBatch(1, "s", "base", (1, 3)), EvalBatch(2, "s", "gag", (0, 1, 2, 3))]
    rank0 = [_prediction(plan[0], r, 0) for r in plan[0].rows] + [_prediction(plan[2], r, 0) for r in plan[2].rows]
    rank1 = [_prediction(plan[1], r, 1) for r in plan[1].rows]
    padded = rank1 + [_prediction(plan[0], r, 1) for r in plan[0].rows]  # a padding sampler repeats batch 0
    out = assemble(rank0 + padded, plan, {"s": 4})
    assert [g.text for g in out["s"]["base"]] == ["base-0", "base-1", "base-2", "base-3"]
    assert [g.text for g in out["s"]["gag"]] == ["gag-0", "gag-1", "gag-2", "gag-3"]
    assert decoded_per_rank(rank0 + rank1) == {0: 6, 1: 2}
    with pytest.raises(GAGError, match=r"s/base: no rank decoded record\(s\) \[1, 3\]"):
        assemble(rank0, plan, {"s": 4})


def _train(args: list[str], artifacts: Path, run_dir: Path) -> str:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", HYDRA_FULL_ERROR="1")
    cmd = [sys.executable, str(REPO / "train.py"), "experiment=smoke", "print_config=false",
           f"paths.artifacts={artifacts}", f"hydra.run.dir={run_dir}", "eval.decoding.batch_size=4", *args]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return proc.stdout + proc.stderr


def _eval_folder(artifacts: Path) -> Path:
    (folder,) = [f for f in (artifacts / "tiny" / "demo").glob("eval-*") if f.is_dir()]
    return folder


def test_eval_under_ddp_gives_one_process_predictions_and_metrics_each_rank_decoding_half(tmp_path):
    artifacts = tmp_path / "artifacts"
    _train([], artifacts, tmp_path / "run-single")  # the smoke pipeline, eval in one process
    single = _eval_folder(artifacts)
    kept = single.rename(tmp_path / "single")
    out = _train(["stage=eval", "trainer.accelerator=cpu", "trainer.devices=2", "trainer.strategy=ddp"], artifacts,
                 tmp_path / "run-ddp")
    assert "Starting with 2 processes" in out
    ddp = _eval_folder(artifacts)
    assert ddp.name == single.name  # devices are runtime-only: the same eval artifact
    for split in SPLITS:
        one = (kept / split / "predictions.jsonl").read_text().splitlines()
        two = (ddp / split / "predictions.jsonl").read_text().splitlines()
        assert two == one  # same answers, same scores, same order
        keys = [(row["system"], row["id"]) for row in map(json.loads, two)]
        assert len(keys) == len(set(keys)) == 7 * {"test_seen_fact": 32, "test_kb_only": 24}[split]
        metrics = {name: json.loads((folder / split / "metrics.json").read_text()) for name, folder in
                   (("one", kept), ("two", ddp))}
        assert metrics["two"]["systems"] == metrics["one"]["systems"]
        assert metrics["one"]["settings"]["decoded_per_rank"] == {"0": 392}
        shares = metrics["two"]["settings"]["decoded_per_rank"]
        # 98 planned batches of 4 (7 systems x (8 + 6)) dealt round-robin: each rank decoded half of the 392 answers
        assert shares == {"0": 196, "1": 196}, shares
