"""Sweep and experiment presets compose; a two-job sweep runs end to end sharing upstream artifacts; summaries."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from tests.conftest import ROOT

SWEEPS = sorted(p.stem for p in (ROOT / "conf" / "sweep").glob("*.yaml"))
EXPERIMENTS = sorted(p.stem for p in (ROOT / "conf" / "experiment").glob("*.yaml"))
PAPER = [e for e in EXPERIMENTS if e.startswith("paper_")]


def _compose_with_hydra(overrides: list[str], tmp_path: Path):
    """Compose like train.py does, keeping the hydra node (the sweeper params are plain config there)."""
    from hydra import compose, initialize_config_dir

    base = [f"paths.artifacts={tmp_path / 'artifacts'}", f"paths.output_dir={tmp_path / 'out'}", "print_config=false"]
    with initialize_config_dir(version_base="1.3", config_dir=str(ROOT / "conf")):
        return compose(config_name="train", overrides=base + overrides, return_hydra_config=True)


def _resolve(cfg) -> dict:
    node = OmegaConf.to_container(cfg, resolve=False)
    node.pop("hydra", None)  # hydra:* interpolations only resolve inside a Hydra run
    return OmegaConf.to_container(OmegaConf.create(node), resolve=True)


def _select(resolved: dict, dotted: str):
    node = resolved
    for part in dotted.split("."):
        assert isinstance(node, dict) and part in node, f"swept key {dotted} is not in the composed config"
        node = node[part]
    return node


def test_expected_presets_exist():
    assert set(SWEEPS) >= {"slots", "fusion", "projector", "loss_weights"}
    assert set(EXPERIMENTS) >= {"smoke", "paper_materials", "paper_adjuvant"}


@pytest.mark.parametrize("sweep", SWEEPS)
def test_sweep_composes_and_every_job_config_resolves(tmp_path, sweep):
    cfg = _compose_with_hydra(["experiment=smoke", f"sweep={sweep}"], tmp_path)
    assert str(cfg.hydra.mode).endswith("MULTIRUN")
    params = dict(cfg.hydra.sweeper.params)
    assert params, f"sweep/{sweep}.yaml sweeps nothing"
    resolved = _resolve(cfg)
    assert resolved["sweep_name"] == sweep
    stages = resolved["run_stages"]
    assert stages[-1] == "eval" and "gag" in stages
    assert ("lora" in stages) == ("lora" in resolved["eval"]["systems"])  # rag_k evaluates base and rag only
    for name in resolved["run_stages"]:
        assert name in resolved, f"no config node for stage '{name}'"
    choices = {key: [v.strip() for v in str(values).split(",")] for key, values in params.items()}
    for key, values in choices.items():
        _select(resolved, key)
        assert len(values) >= 2, f"{key}: a sweep needs at least two values"
    # the last job's config composes and carries its values
    last = [f"{key}={values[-1]}" for key, values in choices.items()]
    job = _resolve(_compose_with_hydra(["experiment=smoke", f"sweep={sweep}", *last], tmp_path))
    for key, values in choices.items():
        assert str(_select(job, key)) == values[-1]


def test_sweep_name_groups_wandb_runs(tmp_path):
    swept = _resolve(_compose_with_hydra(["experiment=smoke", "sweep=fusion", "logger=wandb"], tmp_path))
    assert swept["logger"]["wandb"]["group"] == "fusion" and swept["logger"]["wandb"]["offline"] is True
    plain = _resolve(_compose_with_hydra(["experiment=smoke", "logger=wandb"], tmp_path))
    assert plain["logger"]["wandb"]["group"] == plain["domain"]["name"]
    both = _resolve(_compose_with_hydra(["experiment=smoke", "logger=[csv,wandb]"], tmp_path))
    assert set(both["logger"]) == {"csv", "wandb"}


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_experiment_composes(tmp_path, experiment):
    resolved = _resolve(_compose_with_hydra([f"experiment={experiment}"], tmp_path))
    assert resolved["run_stages"] and all(s in resolved for s in resolved["run_stages"])


@pytest.mark.parametrize("experiment", PAPER)
def test_paper_experiments_carry_reference_setup(tmp_path, experiment):
    domain = experiment.removeprefix("paper_")
    r = _resolve(_compose_with_hydra([f"experiment={experiment}"], tmp_path))
    assert (r["model"]["name"], r["domain"]["name"], r["hardware"]["name"]) == ("qwen3", domain, "gpu")
    assert r["trainer"]["precision"] == "bf16-mixed"
    assert r["dapt"]["module"]["lr"] == 5e-5 and r["dapt"]["datamodule"]["block_size"] == 1024
    assert r["dapt"]["trainer"]["accumulate_grad_batches"] == 8
    assert r["memory"]["compression"]["slots"] == 4
    assert r["memory"]["compression"]["layer_keys"] == ["last", "minus2", "minus4", "minus6"]
    # the reference recipe: no KL self-distillation, no reconstruction warm-up (METHOD.md section 5b switches off)
    assert r["gag"]["loss_weights"] == {"nll": 1.0, "sem": 0.01, "div": 0.001, "kl": 0.0}
    assert r["gag"]["recon_steps"] == 0
    assert r["eval"]["decoding"]["repetition_penalty"] == 1.05
    reference = {"materials": dict(sft_lr=5e-6, sft_epochs=3, gag_lr=1e-4, steps=800, accum=4, bg=768),
                 "adjuvant": dict(sft_lr=4e-6, sft_epochs=1.5, gag_lr=5e-5, steps=1800, accum=8, bg=640)}[domain]
    assert r["sft"]["module"]["lr"] == reference["sft_lr"]
    assert r["sft"]["trainer"]["max_epochs"] == reference["sft_epochs"]
    assert (r["gag"]["lr"], r["gag"]["max_steps"]) == (reference["gag_lr"], reference["steps"])
    assert r["gag"]["accumulate_grad_batches"] == reference["accum"]
    assert r["memory"]["generation"]["max_new_tokens"] == reference["bg"]
    # the hardware stays a command-line choice
    ddp = _resolve(_compose_with_hydra([f"experiment={experiment}", "hardware=ddp", "trainer.devices=8"], tmp_path))
    assert ddp["trainer"]["strategy"] == "ddp" and ddp["trainer"]["devices"] == 8
    slurm = _compose_with_hydra([f"experiment={experiment}", "hardware=slurm", "hydra/launcher=submitit_slurm",
                                 "hardware.nodes=2"], tmp_path)
    assert _resolve(slurm)["trainer"]["num_nodes"] == 2
    assert "submitit" in slurm.hydra.launcher._target_


def _small_domain(tmp_path: Path) -> list[str]:
    """The demo domain cut down (same texts, fewer records) so the two-job sweep takes seconds."""
    demo = ROOT / "data" / "demo"
    sizes = {"knowledge_base": 40, "train": 24, "test": 6, "test_seen_fact": 3, "test_kb_only": 3}
    out = []
    for name, n in sizes.items():
        lines = (demo / f"{name}.jsonl").read_text(encoding="utf-8").splitlines()[:n]
        path = tmp_path / "data" / f"{name}.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")
        out.append(f"domain.{name}={path}")
    return out


# the smallest budgets that still run every stage (the sweep's job structure is what is tested here)
FAST = ["domain.budget.dapt.max_steps=2", "domain.budget.sft.max_steps=2", "domain.budget.gag.max_steps=2",
        "sft.report_before_after=false", "domain.background_max_new_tokens=8", "domain.answer_max_new_tokens=6",
        "eval.systems=[base,gag]"]


def test_two_job_sweep_shares_upstream_artifacts_and_summarizes(tmp_path, capsys):
    from gag_lightning.summarize import main as summarize

    artifacts, sweep_dir = tmp_path / "artifacts", tmp_path / "sweep"
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    cmd = [sys.executable, "train.py", "-m", "experiment=smoke", "sweep=slots", "memory.compression.slots=2,4",
           "logger=[csv,wandb]", *_small_domain(tmp_path), *FAST,
           f"paths.artifacts={artifacts}", f"hydra.sweep.dir={sweep_dir}", "print_config=false"]
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-4000:]

    jobs = sorted(p for p in sweep_dir.iterdir() if (p / ".hydra").is_dir())
    assert [p.name for p in jobs] == ["0", "1"]
    for job, slots in zip(jobs, ("2", "4"), strict=True):
        results = json.loads((job / "results.json").read_text())
        assert f"memory.compression.slots={slots}" in results["overrides"] and results["sweep_name"] == "slots"
        for split in ("test_seen_fact", "test_kb_only"):  # the demo's eval splits, each with its own metrics
            assert results["stages"]["eval"][f"eval/{split}/gag/bertscore_f1"] is not None
            assert results["stages"]["eval"][f"eval/{split}/gag/n"] == 3
        runs = list((job / "wandb").glob("offline-run-*"))
        assert len(runs) >= 2, "gag and eval leave offline wandb runs"
        # run names tell the jobs apart on a dashboard: job number and swept value
        label = f"job{job.name}-slots={slots}".encode()
        assert all(any(label in f.read_bytes() for f in run.glob("*.wandb")) for run in runs), label
    folders = [p.name.split("-")[0] for p in (artifacts / "tiny" / "demo").iterdir()]
    counts = {stage: folders.count(stage) for stage in ("dapt", "sft", "backgrounds", "memory", "gag", "eval")}
    assert counts == {"dapt": 1, "sft": 1, "backgrounds": 1, "memory": 2, "gag": 2, "eval": 2}, counts
    second = (jobs[1] / "train.log").read_text()
    assert "[dapt] artifact already complete" in second and "[sft] artifact already complete" in second
    assert "backgrounds already complete" in second

    capsys.readouterr()
    assert summarize([str(sweep_dir)]) == 0
    printed = capsys.readouterr().out
    rows = [line for line in printed.splitlines() if line.startswith("| ") and not line.startswith("| job")]
    assert len(rows) == 4 and [r[:10] for r in rows] == ["| 0 | 2 | ", "| 1 | 4 | "] * 2  # a table per split
    assert printed.index("Eval split test_seen_fact") < printed.index("Eval split test_kb_only")
    assert (sweep_dir / "summary.md").is_file() and (sweep_dir / "summary.png").stat().st_size > 0
    text = (sweep_dir / "summary.md").read_text()
    assert "gag-base" in text and "## Eval split `test_seen_fact`" in text and "## Eval split `test_kb_only`" in text


def test_summarize_reads_results_log_fallback_and_failed_jobs(tmp_path, capsys):
    """No models: job 0 has results.json, job 1 only a log naming its eval artifact, job 2 failed."""
    from gag_lightning.summarize import collect, main

    def metrics(gag: float) -> dict:
        return {"eval/base/bertscore_f1": 0.5, "eval/base/sts": 0.6, "eval/gag/bertscore_f1": gag,
                "eval/gag/sts": 0.7}

    root = tmp_path / "multirun"
    root.mkdir()
    (root / "multirun.yaml").write_text("hydra:\n  sweeper:\n    params:\n      gag.adapter.projector: a,b,c\n")
    for num, value in enumerate("abc"):
        hydra_dir = root / str(num) / ".hydra"
        hydra_dir.mkdir(parents=True)
        (hydra_dir / "overrides.yaml").write_text(f"- gag.adapter.projector={value}\n- experiment=smoke\n")
    results = {"sweep_name": "projector", "stages": {"gag": {"val/nll": 1.25}, "eval": {"artifact": "x", **metrics(0.55)}}}
    (root / "0" / "results.json").write_text(json.dumps(results))
    artifact = tmp_path / "eval-123"
    artifact.mkdir()
    (artifact / "manifest.json").write_text(json.dumps({"metrics": metrics(0.45)}))
    (root / "1" / "train.log").write_text(f"[x][INFO] - [eval] done: {artifact}/report.md\n")

    summary = collect(root)
    assert summary.swept == ["gag.adapter.projector"] and summary.systems == ["base", "gag"]
    assert summary.splits == ["test"]  # pre-split keys eval/<system>/<metric>: the old default eval split
    assert [j.status for j in summary.jobs] == ["ok", "ok (from log)", "no results (failed or unfinished)"]
    assert main([str(root)]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ")]
    assert lines[1].startswith("| 0 | a | 50.00 | 55.00 | +5.00 | 60.00 | 70.00 | +10.00 | 1.2500 | ok |")
    assert lines[2].startswith("| 1 | b | 50.00 | 45.00 | -5.00 |") and lines[3].startswith("| 2 | c | - |")
    assert (root / "summary.csv").is_file() and (root / "summary.png").is_file()


def test_a_skipped_stage_still_logs_its_recorded_metrics(compose_cfg, tmp_path):
    """A sweep job whose artifacts exist keeps its place on the dashboards: one run per stage, from the manifest."""
    import csv

    from gag_lightning.stages._common.trainer import log_reused_stage

    cfg = compose_cfg(["experiment=smoke", "logger=[csv,wandb]"])
    log_reused_stage(cfg, "eval", {"artifact": "/x/eval-1", "skipped": True, "eval/gag/bertscore_f1": 0.61,
                                   "eval/gag/empty": 0, "eval/base/sts": float("nan")})
    rows = list(csv.DictReader((tmp_path / "out" / "eval" / "metrics.csv").open()))
    assert len(rows) == 1 and float(rows[0]["eval/gag/bertscore_f1"]) == 0.61 and rows[0]["eval/gag/empty"] == "0.0"
    assert "eval/base/sts" not in rows[0] and "artifact" not in rows[0]
    runs = list((tmp_path / "out" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and any(b"-reused" in f.read_bytes() for f in runs[0].glob("*.wandb"))


def test_summarize_puts_fact_acc_first_and_pools_seeds(tmp_path, capsys):
    """No models: projector a/b x seed 1/2; fact_acc leads with its CI, and the seed pairs are pooled."""
    from gag_lightning.summarize import collect, main, mean_std, seed_groups

    root = tmp_path / "multirun"
    facts = {("a", "1"): (0.50, 0.70), ("a", "2"): (0.40, 0.80), ("b", "1"): (0.45, 0.60), ("b", "2"): (0.55, 0.65)}
    for num, ((projector, seed), (base, gag)) in enumerate(facts.items()):
        job = root / str(num)
        (job / ".hydra").mkdir(parents=True)
        (job / ".hydra" / "overrides.yaml").write_text(f"- gag.adapter.projector={projector}\n- seed={seed}\n")
        metrics = {}
        for split, shift in (("seen", 0.0), ("kb", -0.3)):  # a second split, gag 0.3 lower there
            metrics.update({
                f"eval/{split}/base/fact_acc": base, f"eval/{split}/base/fact_acc_lo": base - 0.1,
                f"eval/{split}/base/fact_acc_hi": base + 0.1, f"eval/{split}/gag/fact_acc": gag + shift,
                f"eval/{split}/gag/fact_acc_lo": gag + shift - 0.1, f"eval/{split}/gag/fact_acc_hi": gag + shift + 0.1,
                f"eval/{split}/base/gag_minus_fact_acc": gag + shift - base,
                f"eval/{split}/base/gag_minus_fact_acc_lo": gag + shift - base - 0.05,
                f"eval/{split}/base/gag_minus_fact_acc_hi": gag + shift - base + 0.05,
                f"eval/{split}/base/bertscore_f1": 0.9, f"eval/{split}/gag/bertscore_f1": 0.8})
        (job / "results.json").write_text(json.dumps({"stages": {"eval": {"artifact": "x", **metrics}}}))

    summary = collect(root)
    assert summary.swept == ["gag.adapter.projector", "seed"] and summary.metrics == ["fact_acc", "bertscore_f1"]
    assert summary.splits == ["seen", "kb"]
    assert [[r["seed"] for r in rows] for _, rows in seed_groups(summary)] == [["1", "2"], ["1", "2"]]
    assert main([str(root), "--no-plot"]) == 0
    printed = capsys.readouterr().out
    seen, kb = printed.split("Eval split kb:")
    lines = [line for line in seen.splitlines() if line.startswith("| ")]
    assert lines[0].startswith("| job | projector | seed | fact_acc base [95% CI] | fact_acc gag [95% CI] | "
                               "fact_acc gag-base | BERTScore F1 base |")
    assert lines[1].startswith("| 0 | a | 1 | 50.0 [40.0, 60.0] | 70.0 [60.0, 80.0] | +20.0 [+15.0, +25.0] | 90.00 |")
    pooled = lines[lines.index(next(x for x in lines if x.startswith("| projector | seeds"))) + 1:]
    # projector a: base 0.50, 0.40 -> 45.0 ± 7.1; gag 0.70, 0.80 -> 75.0 ± 7.1; gag-base 0.20, 0.40 -> +30.0 ± 14.1
    assert pooled[0] == "| a | 1, 2 | 45.0 ± 7.1 | 75.0 ± 7.1 | +30.0 ± 14.1 | 90.0 ± 0.0 | 80.0 ± 0.0 | -10.0 ± 0.0 |"
    assert pooled[1].startswith("| b | 1, 2 | 50.0 ± 7.1 | 62.5 ± 3.5 | +12.5 ± 3.5 |")
    kb_lines = [line for line in kb.splitlines() if line.startswith("| ")]
    assert kb_lines[1].startswith("| 0 | a | 1 | 50.0 [40.0, 60.0] | 40.0 [30.0, 50.0] | -10.0 [-15.0, -5.0] |")
    assert "| b | 1, 2 | 50.0 ± 7.1 | 32.5 ± 3.5 | -17.5 ± 3.5 |" in kb
    text = (root / "summary.md").read_text()
    assert "### Across seeds on `seen`" in text and "### Across seeds on `kb`" in text
    csv_rows = (root / "summary.csv").read_text().splitlines()
    assert csv_rows[0].startswith("job,split,") and len(csv_rows) == 1 + 2 * 4
    assert mean_std([0.2, None, 0.4]) == (pytest.approx(0.3), pytest.approx(0.02 ** 0.5), 2)
    assert mean_std([None]) == (None, None, 0) and mean_std([0.5]) == (0.5, None, 1)
    # seeds that are not repeated within a group: no pooled table
    single = tmp_path / "single"
    for num, seed in enumerate("12"):
        job = single / str(num)
        (job / ".hydra").mkdir(parents=True)
        (job / ".hydra" / "overrides.yaml").write_text(f"- gag.adapter.projector={'ab'[num]}\n- seed={seed}\n")
    assert seed_groups(collect(single)) == []
