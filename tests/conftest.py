"""Shared fixtures: Hydra composition against conf/ with per-test artifact folders and a shared model cache."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("PROJECT_ROOT", str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("WANDB_MODE", "offline")


def compose(overrides: list[str] | None = None, config_name: str = "train"):
    """Compose the project config like the entry points do (outside a Hydra run, so output_dir is set here)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(version_base="1.3", config_dir=str(ROOT / "conf")):
        return hydra_compose(config_name=config_name, overrides=list(overrides or []))


@pytest.fixture
def compose_cfg(tmp_path):
    """compose_cfg(overrides) -> DictConfig with artifacts and outputs under tmp_path."""

    def _compose(overrides: list[str] | None = None, config_name: str = "train"):
        base = [f"paths.artifacts={tmp_path / 'artifacts'}", f"paths.output_dir={tmp_path / 'out'}",
                f"paths.cache_dir={ROOT / '.cache'}", "print_config=false"]
        return compose(base + list(overrides or []), config_name)

    return _compose


@pytest.fixture(scope="session")
def tiny_expert_dir() -> Path:
    from gag_lightning.models.loading import resolve_path

    cfg = compose(["experiment=smoke", f"paths.cache_dir={ROOT / '.cache'}", "paths.output_dir=/tmp"])
    return resolve_path(cfg.model.expert, cfg.paths.cache_dir)


# the tiny base (no spare embedding row, no spare special token: its slots are marked, prompts.MARK_ID), the frozen
# model of the Stage III and recipe tests; loaded as published, nothing added
@pytest.fixture(scope="module")
def base_dir() -> Path:
    from gag_lightning.models.loading import resolve_path

    cfg = compose(["experiment=smoke", f"paths.cache_dir={ROOT / '.cache'}", "paths.output_dir=/tmp"])
    return resolve_path(cfg.model.base, cfg.paths.cache_dir)


@pytest.fixture(scope="module")
def tokenizer(base_dir):
    from gag_lightning.models.loading import load_tokenizer

    return load_tokenizer(base_dir)


@pytest.fixture
def base(base_dir):
    from gag_lightning.models.loading import load_causal_lm

    return load_causal_lm(base_dir, "float32")


@pytest.fixture(scope="module")
def gag_id(tokenizer) -> int:
    """The id marking the memory slots in the tiny base's prompts."""
    from gag_lightning.prompts import choose_placeholder

    return choose_placeholder(tokenizer).id


# two tiny specialist domains (the demo and demo_bio presets under experiment=smoke) trained on the one tiny base,
# dapt -> sft -> memory -> gag: the routing, three-route and serving tests answer with them
@pytest.fixture(scope="session")
def tiny_two_domains(tmp_path_factory) -> dict:
    from gag_lightning.stages import run as run_pipeline
    from gag_lightning.upstream import gag_adapter_dir, memory_expert_path

    root = tmp_path_factory.mktemp("two_domains")
    out: dict = {"artifacts": root / "artifacts", "cfg": {}, "adapter": {}, "expert": {}}
    for domain in ("demo", "demo_bio"):
        overrides = ["experiment=smoke", f"domain={domain}", "print_config=false", f"paths.artifacts={root / 'artifacts'}",
                     f"paths.output_dir={root / 'out' / domain}", f"paths.cache_dir={ROOT / '.cache'}",
                     "run_stages=[dapt,sft,memory,gag]"]
        cfg = compose(overrides)
        run_pipeline(cfg)
        out["cfg"][domain] = overrides
        out["adapter"][domain] = gag_adapter_dir(cfg)
        out["expert"][domain] = memory_expert_path(cfg)
    return out
