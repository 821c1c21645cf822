"""Stage dispatch: `run_stages` from the config, in order, each reading its upstream artifacts."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from omegaconf import DictConfig

log = logging.getLogger(__name__)


def _registry() -> dict[str, Callable[[DictConfig], dict[str, Any]]]:
    from gag_lightning.stages.eval.runner import run_eval
    from gag_lightning.stages.expert.runner import run_dapt, run_sft
    from gag_lightning.stages.gag.runner import run_gag
    from gag_lightning.stages.lora.runner import run_lora
    from gag_lightning.stages.memory.runner import run_memory

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
            from gag_lightning.stages._common.trainer import log_reused_stage

            log_reused_stage(cfg, stage, results[stage])
    return results
