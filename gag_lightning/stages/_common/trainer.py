"""Trainer and logger construction from the composed config (hardware preset + stage budget)."""

from __future__ import annotations

import logging
import math
import shutil
import warnings
from pathlib import Path
from typing import Any

import lightning as L
from hydra.utils import instantiate
from lightning.pytorch.callbacks import ModelCheckpoint
from omegaconf import DictConfig, OmegaConf

from gag_lightning.callbacks import AtomicCheckpointIO, FractionalEpochs, StageCheckpoint, checkpoint_step
from gag_lightning.errors import GAGError

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


def _whole_epochs(kwargs: dict[str, Any]) -> float | None:
    """Lightning takes whole epochs: a fractional ``max_epochs`` becomes its ceiling here (and returns the fraction,
    which ``FractionalEpochs`` turns into ``max_steps`` once the sharded loader exists)."""
    epochs = kwargs.get("max_epochs")
    if epochs is None:
        return None
    if float(epochs) != int(float(epochs)):
        kwargs["max_epochs"] = math.ceil(float(epochs))
        return float(epochs)
    kwargs["max_epochs"] = int(float(epochs))
    return None


def debug_trainer(cfg: DictConfig) -> dict[str, Any]:
    """``debug.trainer`` of a debug preset (``debug=fast_dev_run``, ...): Trainer flags for every training stage."""
    node = OmegaConf.select(cfg, "debug.trainer", default=None)
    return OmegaConf.to_container(node, resolve=True) if node else {}


def build_trainer(cfg: DictConfig, stage: str, callbacks: list[L.Callback], loggers: list[Any],
                  **overrides: Any) -> L.Trainer:
    """The stage's Trainer: hardware preset + stage budget + a debug preset's ``debug.trainer`` (+ overrides); a
    fractional ``max_epochs`` (e.g. 1.5) is honoured per rank (``FractionalEpochs``); with a ``ModelCheckpoint``
    among the callbacks, checkpoints are written atomically (``AtomicCheckpointIO``)."""
    kwargs = trainer_kwargs(cfg, cfg[stage].get("trainer"))
    kwargs.update(debug_trainer(cfg))
    fraction = _whole_epochs(kwargs)
    callbacks = list(callbacks)
    if fraction is not None and "max_steps" not in overrides:
        callbacks.append(FractionalEpochs(fraction, kwargs.get("max_steps")))
    kwargs.update(overrides)
    checkpointing = any(isinstance(c, ModelCheckpoint) for c in callbacks)
    if checkpointing:
        kwargs["plugins"] = [*(kwargs.get("plugins") or []), AtomicCheckpointIO()]
    root = Path(cfg.paths.output_dir) / stage
    return L.Trainer(callbacks=callbacks, logger=loggers or False, default_root_dir=str(root),
                     enable_checkpointing=checkpointing, **kwargs)


# ---------------------------------------------------------------------------------------------- checkpoints
def checkpoint_dir(artifact: Path) -> Path:
    """``<artifact>.ckpt/``: the stage's Lightning checkpoints, beside its artifact folder.

    Named by the artifact's key (no timestamp), so a rerun of the same configuration finds them; outside the
    artifact folder, which counts as finished only once its manifest is written and is rebuilt from scratch
    otherwise.
    """
    return artifact.with_name(f"{artifact.name}.ckpt")


def stage_checkpoint(cfg: DictConfig, artifact: Path, monitor: str | None, subdir: str | None = None,
                     ) -> StageCheckpoint:
    """The ``StageCheckpoint`` of a stage writing ``artifact`` (``checkpoint_every_n_steps`` optimizer steps)."""
    folder = checkpoint_dir(artifact) / subdir if subdir else checkpoint_dir(artifact)
    return StageCheckpoint(folder, monitor=monitor, every_n_train_steps=int(cfg.get("checkpoint_every_n_steps", 50)))


def sharded_final_checkpoint(trainer: L.Trainer, checkpoint: StageCheckpoint, stage: str) -> Path:
    """``last.ckpt``, where an FSDP export reads the final weights (the full state dict Lightning gathered).

    The live parameters are shards; without that file (``fast_dev_run`` writes no checkpoint) there is nothing whole
    to export, and the stage says so instead of failing on a missing file.
    """
    last = checkpoint.last_path
    if not last.is_file():
        why = "fast_dev_run writes no checkpoints" if trainer.fast_dev_run else "no checkpoint was written"
        raise GAGError(f"[{stage}] under FSDP the export reads the final weights from {last}, and {why}: use "
                       "debug=limit_batches (or another strategy) to check this stage under FSDP")
    return last


def resume_path(checkpoint: StageCheckpoint, stage: str) -> str | None:
    """``last.ckpt`` of an interrupted earlier run of this configuration (logged with its step), or None."""
    last = checkpoint.last_path
    if not last.is_file():
        return None
    try:
        step = checkpoint_step(last)
    except Exception as exc:  # torch raises several error types for a damaged file
        raise GAGError(f"[{stage}] cannot read the checkpoint {last} ({exc}); delete {last.parent} to start the stage "
                       "over") from exc
    log.info("resuming %s from %s at step %d", stage, last, step)
    # ModelCheckpoint warns about a non-empty folder; here that is the point
    warnings.filterwarnings("ignore", message=r"Checkpoint directory .* exists and is not empty")
    return str(last)


def remove_checkpoints(cfg: DictConfig, artifact: Path) -> None:
    """Delete the stage's checkpoints once its artifact is finished, unless ``keep_checkpoints=true`` (rank 0)."""
    folder = checkpoint_dir(artifact)
    if cfg.get("keep_checkpoints", False) or global_rank() != 0 or not folder.exists():
        return
    shutil.rmtree(folder, ignore_errors=True)
    log.info("removed the checkpoints of %s (keep_checkpoints=false)", artifact.name)
