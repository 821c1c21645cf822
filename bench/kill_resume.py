"""kill -9 during dapt, sft and gag at random steps: the rerun resumes from the last checkpoint and its artifact is
bit-identical to an uninterrupted run's.

    python bench/kill_resume.py                       # 3 kills per stage (tiny models, CPU, one thread)
    python bench/kill_resume.py --stages gag --kills 5 --seed 7

Every run is `train.py experiment=smoke` in a subprocess with one thread. A killed run gets a SIGKILL from inside,
at a randomly drawn optimizer step, either right after that step's batch (`train`) or in the middle of the
validation that follows it (`val`); nothing is flushed or cleaned up. The rerun (same command, same artifact root)
must log `resuming <stage> from <path> at step N` with N the step of the `last.ckpt` the kill left, and its exported
weights (`model.safetensors`; the adapter and its `last/` copy for gag) must equal the uninterrupted run's
tensor for tensor. `tests/test_resume.py` runs one kill per stage with the same helpers.
"""

from __future__ import annotations

import argparse
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# Each stage: overrides (a few epochs / validations / checkpoints in a handful of steps), its optimizer steps, and
# the steps after which it validates. checkpoint_every_n_steps=2 leaves last.ckpt behind most kill points.
COMMON = ["experiment=smoke", "print_config=false", "checkpoint_every_n_steps=2"]
MEMORY = ["memory.expert=base", "memory.max_records=24", "memory.splits=[train]", "memory.progress=false"]
STAGES: dict[str, dict] = {
    # 20 blocks of 128 tokens, batch 4: 5 steps an epoch, 2 epochs, validated at each epoch's end
    "dapt": {"args": ["stage=dapt", "dapt.datamodule.max_blocks=20", "domain.budget.dapt.max_steps=-1",
                      "domain.budget.dapt.max_epochs=2"], "steps": 10, "val": [5, 10]},
    # 24 records, batch 4: 6 steps an epoch; 1.5 epochs = 9 steps, validated at the end of epoch 1 and at step 9
    "sft": {"args": ["stage=sft", "sft.init_from=base", "sft.datamodule.max_train_records=24",
                     "sft.report_before_after=false", "domain.budget.sft.max_steps=-1",
                     "domain.budget.sft.max_epochs=1.5"], "steps": 9, "val": [6, 9]},
    # on a tiny memory artifact (24 records by the preset's expert): 18 train records, batch 2, accumulation 2, so
    # 9 batches (5 steps, the last one on a single batch) an epoch; 9 steps, validated every 3 steps and at step 9
    "gag": {"args": ["stage=gag", "gag.max_steps=9", "gag.batch_size=2", "gag.accumulate_grad_batches=2",
                     "gag.val_every_n_steps=3", "gag.val_fraction=0.25", *MEMORY], "steps": 9, "val": [3, 6, 9]},
    # the same with 4 steps of reconstruction warm-up first (its own fit and checkpoints): a kill at step <= 4 may
    # land in the warm-up, whose steps count from 1 again
    "gag_recon": {"args": ["stage=gag", "gag.max_steps=9", "gag.batch_size=2", "gag.accumulate_grad_batches=2",
                           "gag.val_every_n_steps=3", "gag.val_fraction=0.25", "gag.recon_steps=4", *MEMORY],
                  "steps": 9, "val": [3, 6, 9], "folder": "gag"},
    # the LoRA baseline on gag's 18 training records (dropout 0.05: the restored RNG state matters), no validation
    "lora": {"args": ["stage=lora", "gag.max_steps=9", "gag.batch_size=2", "gag.accumulate_grad_batches=2",
                      "gag.val_fraction=0.25", "memory.max_records=24", "memory.splits=[train]"], "steps": 9,
             "val": []},
}

# Runs train.py in this process after patching the checkpoint callback to SIGKILL the process at a step.
WRAPPER = """
import os, runpy, signal, sys
sys.path.insert(0, {repo!r})
sys.argv = ["train.py", *{args!r}]
where, step = {where!r}, {step!r}
if where:
    from gag_lightning.callbacks import StageCheckpoint

    def die():
        os.kill(os.getpid(), signal.SIGKILL)

    if where == "train":
        original = StageCheckpoint.on_train_batch_end

        def on_train_batch_end(self, trainer, *args, **kwargs):
            original(self, trainer, *args, **kwargs)
            if trainer.global_step == step and not trainer.sanity_checking:
                die()

        StageCheckpoint.on_train_batch_end = on_train_batch_end
    else:
        def on_validation_batch_end(self, trainer, *args, **kwargs):
            if trainer.global_step == step and trainer.state.fn == "fit" and not trainer.sanity_checking:
                die()

        StageCheckpoint.on_validation_batch_end = on_validation_batch_end
runpy.run_path({train!r}, run_name="__main__")
"""

RESUME_RE = re.compile(r"resuming ([\w-]+) from (\S+) at step (\d+)")


def train(args: list[str], artifacts: Path, run_dir: Path, kill: tuple[str, int] | None = None,
          timeout: int = 600) -> subprocess.CompletedProcess:
    """One `train.py` run (one thread); `kill=(where, step)` SIGKILLs it there."""
    where, step = kill if kill else ("", 0)
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONWARNINGS="ignore", HYDRA_FULL_ERROR="1",
               HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    full = [*COMMON, *args, f"paths.artifacts={artifacts}", f"hydra.run.dir={run_dir}"]
    script = WRAPPER.format(repo=str(REPO), args=full, where=where, step=step, train=str(REPO / "train.py"))
    return subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout)


def run_here(args: list[str], artifacts: Path, run_dir: Path) -> str:
    """The same run as `train` in this process, on one thread (faster than a new interpreter); returns its log."""
    import io
    import logging

    import lightning as L
    import torch
    from hydra import compose, initialize_config_dir

    from gag_lightning.stages import run

    os.environ.setdefault("PROJECT_ROOT", str(REPO))
    with initialize_config_dir(version_base="1.3", config_dir=str(REPO / "conf")):
        cfg = compose("train", overrides=[*COMMON, *args, f"paths.artifacts={artifacts}", f"paths.output_dir={run_dir}"])
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    logger = logging.getLogger("gag_lightning")
    level, threads = logger.level, torch.get_num_threads()
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    torch.set_num_threads(1)
    try:
        L.seed_everything(cfg.seed, workers=True)  # as train.py
        run(cfg)
    finally:
        torch.set_num_threads(threads)
        logger.removeHandler(handler)
        logger.setLevel(level)
    return stream.getvalue()


def run_checked(args: list[str], artifacts: Path, run_dir: Path, here: bool) -> str:
    """A run that must succeed (in this process or in a subprocess); its log."""
    if here:
        return run_here(args, artifacts, run_dir)
    proc = train(args, artifacts, run_dir)
    if proc.returncode != 0:
        raise AssertionError(proc.stdout[-2000:] + proc.stderr[-4000:])
    return proc.stdout + proc.stderr


def stage_folder(artifacts: Path, stage: str) -> Path:
    found = sorted(p for p in (artifacts / "tiny" / "demo").glob(f"{stage}-*") if not p.name.endswith(".ckpt"))
    if len(found) != 1:
        raise AssertionError(f"expected one {stage} artifact in {artifacts}, found {found}")
    return found[0]


def exported_tensors(folder: Path) -> dict[str, object]:
    """Every tensor of the artifact's safetensors files, keyed by file and name."""
    from safetensors.torch import load_file

    out = {}
    for path in sorted(folder.rglob("*.safetensors")):
        for name, tensor in load_file(path).items():
            out[f"{path.relative_to(folder)}:{name}"] = tensor
    return out


def max_difference(a: dict[str, object], b: dict[str, object]) -> float:
    """inf when the files or names differ; else the largest absolute difference (0.0: bit-identical)."""
    if sorted(a) != sorted(b):
        return float("inf")
    return max((float((a[k].float() - b[k].float()).abs().max()) for k in a), default=0.0)


def left_checkpoints(artifacts: Path, stage: str) -> tuple[dict[str, int], bool | None]:
    """({fit: step} of the last.ckpt files a killed run left, whether any holds frozen-base weights). The fit is the
    stage's name, `<stage>-recon` for gag's reconstruction warm-up."""
    import torch

    left, base = {}, None
    for path in sorted((artifacts / "tiny" / "demo").glob(f"{stage}-*.ckpt/**/last.ckpt")):
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        name = stage if path.parent.name.endswith(".ckpt") else f"{stage}-{path.parent.name}"
        left[name] = int(checkpoint["global_step"])
        base = bool(base) or any(k.startswith("base.") for k in checkpoint["state_dict"])
    return left, base


def warm_model_cache() -> None:
    """Build the tiny models before any timed run.

    Building a tiny model re-seeds the global RNG, and (until the base stops being resized, issue 11 point 3) the
    row added to the tiny base for `<GAG>` is drawn from it: a gag run that builds the cache gets another row than
    one that reads it, and the adapters then differ by ~1e-6 for a reason that has nothing to do with resuming.
    """
    from hydra import compose, initialize_config_dir

    from gag_lightning.models.loading import resolve_path

    os.environ.setdefault("PROJECT_ROOT", str(REPO))
    with initialize_config_dir(version_base="1.3", config_dir=str(REPO / "conf")):
        cfg = compose("train", overrides=["experiment=smoke", "paths.output_dir=" + tempfile.gettempdir()])
    for spec in (cfg.model.expert, cfg.model.base, *cfg.model.encoders.values()):
        resolve_path(spec, cfg.paths.cache_dir)


def prepare(stage: str, root: Path, here: bool = False) -> Path:
    """An artifact root holding what the stage reads (gag: this config's tiny memory artifact)."""
    warm_model_cache()
    artifacts = root / "artifacts-upstream"
    if stage.startswith("gag") and not artifacts.exists():
        run_checked(["stage=memory", *MEMORY], artifacts, root / "run-memory", here)
    artifacts.mkdir(parents=True, exist_ok=True)
    return artifacts


def kill_and_resume(stage: str, root: Path, kill: tuple[str, int], reference: dict[str, object],
                    tag: str, here: bool = False) -> dict[str, object]:
    """Kill a run of `stage` at `kill` (always a subprocess), rerun it (`here`: in this process); the resume log and
    the artifact against `reference`."""
    artifacts = root / f"artifacts-{tag}"
    shutil.copytree(prepare(stage, root, here), artifacts)
    args = STAGES[stage]["args"]
    killed = train(args, artifacts, root / f"run-{tag}-killed", kill=kill)
    if killed.returncode != -9:
        raise AssertionError(f"{stage}: the run was not killed at {kill} (exit {killed.returncode})\n"
                             + killed.stderr[-3000:])
    folder = STAGES[stage].get("folder", stage)
    left, base_in_checkpoint = left_checkpoints(artifacts, folder)
    log = run_checked(args, artifacts, root / f"run-{tag}-rerun", here)
    resumed = {name: int(step) for name, _, step in RESUME_RE.findall(log)}
    tensors = exported_tensors(stage_folder(artifacts, folder))
    return {"stage": stage, "kill": f"{kill[0]}@{kill[1]}", "last_ckpt_step": left,
            "base_in_checkpoint": base_in_checkpoint,
            "resumed_at": resumed, "max_abs_diff": max_difference(tensors, reference),
            "checkpoints_left": sorted(p.name for p in (artifacts / "tiny" / "demo").glob("*.ckpt"))}


def reference_run(stage: str, root: Path, here: bool = False) -> dict[str, object]:
    """The uninterrupted run's exported tensors."""
    artifacts = root / "artifacts-reference"
    shutil.copytree(prepare(stage, root, here), artifacts)
    run_checked(STAGES[stage]["args"], artifacts, root / "run-reference", here)
    return exported_tensors(stage_folder(artifacts, STAGES[stage].get("folder", stage)))


def random_kills(stage: str, n: int, rng: random.Random) -> list[tuple[str, int]]:
    spec = STAGES[stage]
    kills = []
    for _ in range(n):
        if spec["val"] and rng.random() < 0.3:
            kills.append(("val", rng.choice(spec["val"])))
        else:
            kills.append(("train", rng.randint(1, spec["steps"])))
    return kills


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stages", nargs="+", default=list(STAGES), choices=list(STAGES))
    parser.add_argument("--kills", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    sys.path.insert(0, str(REPO))
    rng = random.Random(args.seed)
    rows = []
    with tempfile.TemporaryDirectory(prefix="kill-resume-") as tmp:
        for stage in args.stages:
            root = Path(tmp) / stage
            reference = reference_run(stage, root)
            for i, kill in enumerate(random_kills(stage, args.kills, rng)):
                row = kill_and_resume(stage, root, kill, reference, f"kill{i}")
                rows.append(row)
                print(f"{row['stage']:9s} kill at {row['kill']:9s} last.ckpt steps {row['last_ckpt_step']}  "
                      f"resumed at {row['resumed_at']}  max |diff| {row['max_abs_diff']:.3g}  "
                      f"checkpoints left {row['checkpoints_left']}", flush=True)
    bad = [r for r in rows if r["max_abs_diff"] != 0.0 or r["resumed_at"] != r["last_ckpt_step"]]
    print(f"{len(rows) - len(bad)} of {len(rows)} kills resumed from their last checkpoint to a bit-identical artifact")
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
