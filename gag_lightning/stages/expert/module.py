"""Stage I (DAPT) and Stage II (expert SFT): one causal-LM LightningModule, two DataModules.

Weights are kept in fp32 and Lightning's `bf16-mixed` precision autocasts the compute: the
reference release trains pure-bf16 weights with AdamW at lr 5e-6 and 93% of them never change
(METHOD.md section 8), because a 5e-6 update is below bf16's resolution for most weights.
"""

from __future__ import annotations

import math
from typing import Any

import lightning as L
import torch
from torchmetrics import MeanMetric

from gag_lightning.errors import GAGError
from gag_lightning.models.losses import token_nll
from gag_lightning.models.shared_prefix import answer_token_logits
from gag_lightning.stages._common.clipping import ShardAwareClipping


def linear_warmup_schedule(optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int,
                           ) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup to the peak lr, then linear decay to zero (the Hugging Face 'linear' schedule)."""
    total_steps = max(1, total_steps)

    def factor(step: int) -> float:
        if warmup_steps > 0 and step < warmup_steps:
            return (step + 1) / warmup_steps
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def adamw_with_warmup(module: L.LightningModule, params: Any, weight_decay: float | None = None) -> dict[str, Any]:
    """AdamW over ``params`` (tensors or param groups) + the linear warmup/decay schedule, stepped per optimizer
    step over the trainer's whole run: the one optimizer setup of every stage (hparams lr, betas, warmup_ratio)."""
    hp = module.hparams
    kwargs = {} if weight_decay is None else {"weight_decay": weight_decay}
    optimizer = torch.optim.AdamW(params, lr=hp.lr, betas=tuple(hp.betas), **kwargs)
    total = int(module.trainer.estimated_stepping_batches)
    scheduler = linear_warmup_schedule(optimizer, math.ceil(hp.warmup_ratio * total), total)
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def require_fp32(params: Any, what: str, stage: str) -> None:
    """Refuse trainable weights that are not fp32 masters (a 'true' half precision loses small updates).

    ``what`` names the weights with its verb, e.g. "the adapter must train in fp32 but holds".
    """
    dtypes = {p.dtype for p in params}
    if dtypes != {torch.float32}:
        raise GAGError(f"{what} {sorted(map(str, dtypes))}; use a mixed precision (e.g. bf16-mixed), not a 'true' "
                       f"half precision, for the {stage} stage")


class CausalLMModule(ShardAwareClipping):
    """Full fine-tuning of a causal LM on labelled token batches (labels = -100 where not trained)."""

    def __init__(self, model: Any, lr: float = 5e-5, weight_decay: float = 0.01, warmup_ratio: float = 0.03,
                 betas: tuple[float, float] = (0.9, 0.999), gradient_checkpointing: bool = False,
                 share_prefix: bool = True) -> None:
        super().__init__()
        self.model = model
        # a batch's common prompt prefix runs once (models/shared_prefix.py); not with activation checkpointing,
        # which recomputes without a cache
        self.share_prefix = bool(share_prefix) and not gradient_checkpointing
        self.model.train()  # from_pretrained returns eval mode; Lightning keeps sub-module modes as found
        self.save_hyperparameters(ignore=["model"])
        if gradient_checkpointing:
            self.model.gradient_checkpointing_enable()
            self.model.config.use_cache = False
        self.train_loss = MeanMetric()
        self.val_loss = MeanMetric()
        self.test_loss = MeanMetric()

    def _loss(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
        labels = batch["labels"]
        logits, targets = answer_token_logits(self.model, batch["input_ids"], batch["attention_mask"], labels,
                                              self.share_prefix)
        return token_nll(logits, targets), int(targets.numel())

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss, n_tokens = self._loss(batch)
        self.train_loss(loss.detach(), n_tokens)
        # The per-micro-batch mean loss: Lightning scales the backward by the accumulation factor
        # internally, so nothing logged here is multiplied by it (METHOD.md section 8).
        self.log("train/loss", loss.detach(), on_step=True, on_epoch=False, prog_bar=True,
                 batch_size=batch["input_ids"].shape[0])
        self.log("train/loss_epoch", self.train_loss, on_step=False, on_epoch=True)
        return loss

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        loss, n_tokens = self._loss(batch)
        self.val_loss(loss, n_tokens)
        self.log("val/loss", self.val_loss, on_step=False, on_epoch=True, prog_bar=True)

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        loss, n_tokens = self._loss(batch)
        self.test_loss(loss, n_tokens)
        self.log("test/loss", self.test_loss, on_step=False, on_epoch=True)

    def configure_optimizers(self) -> dict[str, Any]:
        decay, no_decay = [], []
        for name, param in self.model.named_parameters():
            if not param.requires_grad:
                continue
            (no_decay if param.ndim < 2 or "norm" in name.lower() else decay).append(param)
        return adamw_with_warmup(
            self, [{"params": decay, "weight_decay": self.hparams.weight_decay},
                   {"params": no_decay, "weight_decay": 0.0}])
