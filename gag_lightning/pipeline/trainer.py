"""Trainer and logger construction from the composed config (hardware preset + stage budget)."""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import lightning as L
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)


def global_rank() -> int:
    """This process's rank as Lightning knows it (0 outside distributed runs).

    After a multi-device fit every rank runs the rest of the pipeline; steps that must happen once
    (evaluation, the run summary) check this.
    """
    from lightning.fabric.utilities.rank_zero import rank_zero_only

    return int(getattr(rank_zero_only, "rank", 0) or 0)


def multirun_job_label() -> str:
    """`job<N>` plus the swept values of this multirun job (e.g. `job1-slots=2`); empty outside a multirun.

    wandb shows runs by name: without this, the jobs of a sweep would all be called the same.
    """
    try:
        from hydra.core.hydra_config import HydraConfig

        hydra_cfg = HydraConfig.get()
    except (ImportError, ValueError):
        return ""
    if "MULTIRUN" not in str(hydra_cfg.mode):
        return ""
    swept = set((hydra_cfg.sweeper.get("params") or {}).keys())
    values = []
    for override in hydra_cfg.overrides.task:
        key, _, value = override.partition("=")
        key = key.lstrip("+~")
        if key in swept:
            values.append(f"{key.split('.')[-1]}={value}")
    return "-".join([f"job{hydra_cfg.job.num}", *values])


def make_loggers(cfg: DictConfig, stage: str, reused: bool = False) -> list[Any]:
    """One logger set per stage: CSV/TensorBoard in a stage sub-folder, one wandb run per stage (job type).

    `reused=True` names the run `<...>-reused` and tags it: the stage was skipped and its metrics come
    from the artifact's manifest (see `log_reused_stage`).
    """
    loggers = []
    for node in (cfg.get("logger") or {}).values():
        if node is None or "_target_" not in node:
            continue
        node = OmegaConf.to_container(node, resolve=True)
        target = node["_target_"]
        if target.endswith("CSVLogger") or target.endswith("TensorBoardLogger"):
            node["name"] = stage
        elif target.endswith("WandbLogger"):
            node["job_type"] = stage
            label = multirun_job_label()
            node["name"] = f"{stage}-{cfg.model.name}-{cfg.domain.name}-seed{cfg.seed}" + (f"-{label}" if label else "")
            if reused:
                node["name"] += "-reused"
                node["tags"] = [*(node.get("tags") or []), "reused"]
        logger = instantiate(node)
        # the whole composed config, not instantiated (its nodes carry _target_ keys)
        config = OmegaConf.to_container(cfg, resolve=True)
        config.pop("hydra", None)
        logger.log_hyperparams(config)
        loggers.append(logger)
    return loggers


def log_reused_stage(cfg: DictConfig, stage: str, metrics: dict[str, Any]) -> None:
    """Give a skipped stage its logger run anyway, with the final metrics its manifest recorded.

    A sweep job whose gag/eval artifact already exists (another job or an earlier run built it) would
    otherwise be missing from the wandb dashboard and the CSV logs; curves are not replayed, only the
    recorded end values (metrics, losses, learned layer mix).
    """
    numeric = {k: float(v) for k, v in metrics.items()
               if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(float(v))}
    loggers = make_loggers(cfg, stage, reused=True)
    for logger in loggers:
        logger.log_metrics(numeric, step=0)
    finish_loggers(loggers)


def finish_loggers(loggers: list[Any]) -> None:
    """Close wandb runs so each multirun job / stage is its own finished run."""
    for logger in loggers:
        logger.finalize("success")
        if type(logger).__name__ == "WandbLogger":
            import wandb

            if wandb.run is not None:
                wandb.finish()


def trainer_kwargs(cfg: DictConfig, stage_trainer: DictConfig | dict | None) -> dict[str, Any]:
    kwargs = OmegaConf.to_container(cfg.trainer, resolve=True)
    kwargs.update(OmegaConf.to_container(stage_trainer, resolve=True) if stage_trainer else {})
    if isinstance(kwargs.get("strategy"), dict):
        kwargs["strategy"] = instantiate(kwargs["strategy"])
    return kwargs


def fractional_epochs(kwargs: dict[str, Any], steps_per_epoch: int) -> dict[str, Any]:
    """Lightning takes whole epochs; a budget like 1.5 epochs (METHOD.md, adjuvant SFT) becomes max_steps."""
    epochs = kwargs.get("max_epochs")
    if epochs is not None and float(epochs) != int(float(epochs)):
        accum = int(kwargs.get("accumulate_grad_batches", 1))
        steps = math.ceil(float(epochs) * steps_per_epoch / accum)
        if kwargs.get("max_steps", -1) in (-1, None) or steps < kwargs["max_steps"]:
            kwargs["max_steps"] = steps
        kwargs["max_epochs"] = math.ceil(float(epochs))
    elif epochs is not None:
        kwargs["max_epochs"] = int(float(epochs))
    return kwargs


def build_trainer(cfg: DictConfig, stage: str, callbacks: list[L.Callback], loggers: list[Any],
                  steps_per_epoch: int | None = None, **overrides: Any) -> L.Trainer:
    kwargs = trainer_kwargs(cfg, cfg[stage].get("trainer"))
    if steps_per_epoch is not None:
        kwargs = fractional_epochs(kwargs, steps_per_epoch)
    kwargs.update(overrides)
    root = Path(cfg.paths.output_dir) / stage
    return L.Trainer(callbacks=callbacks, logger=loggers or False, default_root_dir=str(root),
                     enable_checkpointing=False, **kwargs)
