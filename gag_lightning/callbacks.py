"""Lightning callbacks that hand a stage's result to the next stage."""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import lightning as L

from gag_lightning.artifacts import apply_umask

log = logging.getLogger(__name__)


class HFExportCallback(L.Callback):
    """Keep the best model (by `monitor`) as a Hugging Face directory in the stage's artifact folder.

    Saving `save_pretrained` safetensors on improvement (rather than Lightning checkpoints with
    optimizer state) keeps the hand-off small, pickle-free and loadable by any HF tool. Without
    validation, the final weights are exported.
    """

    def __init__(self, out_dir: str | Path, tokenizer: Any, monitor: str = "val/loss", mode: str = "min") -> None:
        self.out_dir = Path(out_dir)
        self.tokenizer = tokenizer
        self.monitor = monitor
        self.mode = mode
        self.best: float | None = None
        self.best_step: int | None = None

    def _export(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.is_global_zero:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            pl_module.model.save_pretrained(self.out_dir)
            self.tokenizer.save_pretrained(self.out_dir)
            apply_umask(self.out_dir)  # safetensors writes model.safetensors 0600
        trainer.strategy.barrier("hf_export")

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or trainer.state.fn != "fit":
            return
        value = trainer.callback_metrics.get(self.monitor)
        if value is None:
            return
        value = float(value)
        if math.isnan(value):
            return
        better = self.best is None or (value < self.best if self.mode == "min" else value > self.best)
        if better:
            self.best, self.best_step = value, trainer.global_step
            log.info("new best %s=%.4f at step %d: exporting to %s", self.monitor, value, trainer.global_step,
                     self.out_dir)
            self._export(trainer, pl_module)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.best is None:
            self.best_step = trainer.global_step
            self._export(trainer, pl_module)
