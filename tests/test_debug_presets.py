"""conf/debug presets: each composes, its Trainer flags reach every training stage's Trainer and its artifact key,
debug runs write into their own artifact folder, and `experiment=smoke debug=fast_dev_run` runs every stage."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from gag_lightning.artifacts import read_manifest
from gag_lightning.keys import STAGES, artifact_dir, stage_hashes

ROOT = Path(__file__).resolve().parents[1]
PRESETS = {
    "fast_dev_run": {"fast_dev_run": True},
    "limit_batches": {"limit_train_batches": 3, "limit_val_batches": 2, "max_epochs": 2},
    "overfit_batches": {"overfit_batches": 1, "max_epochs": 30, "max_steps": -1},
}
TRAINED = ("dapt", "sft", "gag", "lora")


@pytest.fixture(autouse=True)
def _restore_determinism(monkeypatch):
    """The presets' `trainer.deterministic=true` switches torch's global deterministic mode (and cudnn.benchmark, and
    CUBLAS_WORKSPACE_CONFIG) on in this process: put them back for the tests that follow."""
    import torch

    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", "")  # records the old value (or its absence) for the teardown
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG")
    state = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled())
    benchmark = torch.backends.cudnn.benchmark
    yield
    torch.use_deterministic_algorithms(state[0], warn_only=state[1])
    torch.backends.cudnn.benchmark = benchmark


def test_presets_compose_with_their_own_artifact_folder(tmp_path):
    from conftest import compose

    for preset in ("default", *PRESETS):
        cfg = compose([f"debug={preset}", "experiment=smoke", f"paths.log_dir={tmp_path}", "paths.output_dir=/tmp"])
        assert Path(cfg.paths.artifacts) == tmp_path / "debug" / "artifacts"
        assert cfg.task_name == "debug" and cfg.print_config is True
        assert list(cfg.logger) == ["csv"] and cfg.hardware.num_workers == 0 and cfg.trainer.deterministic is True
        assert all(cfg[stage].get("num_workers", cfg.hardware.num_workers) == 0 for stage in ("gag", "lora"))
        assert dict(cfg.debug.trainer) == PRESETS.get(preset, {})
        # a stage composed alone gets no stray nodes of the others
        alone = compose([f"debug={preset}", "stage=dapt", "paths.output_dir=/tmp"])
        assert "sft" not in alone and "gag" not in alone and "lora" not in alone


@pytest.mark.parametrize("preset", list(PRESETS))
def test_preset_reaches_every_training_trainer_and_key(compose_cfg, preset):
    from gag_lightning.stages._common.trainer import build_trainer

    plain = stage_hashes(compose_cfg(["experiment=smoke"]))
    default = stage_hashes(compose_cfg(["experiment=smoke", "debug=default"]))
    cfg = compose_cfg(["experiment=smoke", f"debug={preset}"])
    hashes = stage_hashes(cfg)
    assert default == plain  # the common settings change speed and places only; the folder is another one
    # the training stages' flags are in their keys, and through the upstream hashes in every later stage's
    assert {s for s in STAGES if hashes[s] != plain[s]} == set(STAGES)
    for stage in TRAINED:
        trainer = build_trainer(cfg, stage, [], [])
        if preset == "fast_dev_run":
            assert trainer.fast_dev_run is True and trainer.max_steps == 1
        elif preset == "limit_batches":
            assert (trainer.limit_train_batches, trainer.limit_val_batches, trainer.max_epochs) == (3, 2, 2)
        else:
            assert (trainer.overfit_batches, trainer.max_epochs, trainer.max_steps) == (1, 30, -1)


def test_fast_dev_run_runs_every_stage(compose_cfg):
    """The whole smoke pipeline under fast_dev_run: one batch per training stage, exported without checkpoints."""
    from gag_lightning.stages import run

    cfg = compose_cfg(["experiment=smoke", "debug=fast_dev_run"])
    results = run(cfg)
    assert list(results) == ["dapt", "sft", "memory", "gag", "lora", "eval"]
    for stage in ("dapt", "sft", "backgrounds", "memory", "gag", "lora", "eval"):
        folder = artifact_dir(cfg, stage)
        manifest = read_manifest(folder)
        assert manifest is not None, f"{stage}: no manifest in {folder}"
        assert not folder.with_name(folder.name + ".ckpt").exists()  # fast_dev_run writes no checkpoints
        if stage in TRAINED:
            assert manifest["global_step"] == 1, stage
    assert read_manifest(artifact_dir(cfg, "gag"))["kept"] == "last"  # the final adapter: no best checkpoint
    assert (artifact_dir(cfg, "sft") / "model.safetensors").is_file()
    metrics = json.loads((artifact_dir(cfg, "eval") / "metrics.json").read_text())
    assert metrics and all(len(split["systems"]) == 7 for split in metrics.values())
    # the same command again reuses every artifact
    again = run(cfg)
    assert all(again[s].get("skipped") for s in ("dapt", "sft", "gag", "lora", "eval")), again
