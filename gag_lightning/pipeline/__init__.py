"""Stage dispatch: `run_stages` from the config, in order, each reading its upstream artifacts."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from omegaconf import DictConfig

log = logging.getLogger(__name__)


def _registry() -> dict[str, Callable[[DictConfig], dict[str, Any]]]:
    from gag_lightning.pipeline.evaluate import run_eval
    from gag_lightning.pipeline.expert import run_dapt, run_sft
    from gag_lightning.pipeline.gag import run_gag
    from gag_lightning.pipeline.lora import run_lora
    from gag_lightning.pipeline.memory import run_memory

    return {"dapt": run_dapt, "sft": run_sft, "memory": run_memory, "gag": run_gag, "lora": run_lora,
            "eval": run_eval}


def run(cfg: DictConfig) -> dict[str, dict[str, Any]]:
    registry = _registry()
    unknown = [s for s in cfg.run_stages if s not in registry]
    if unknown:
        raise ValueError(f"unknown stage(s) {unknown}; available: {sorted(registry)}")
    results: dict[str, dict[str, Any]] = {}
    for stage in cfg.run_stages:
        log.info("=== stage %s ===", stage)
        results[stage] = registry[stage](cfg)
        if results[stage].get("skipped"):
            from gag_lightning.pipeline.trainer import log_reused_stage

            log_reused_stage(cfg, stage, results[stage])
    return results
