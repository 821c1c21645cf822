"""LoRA baseline (METHOD.md section 7: "LoRA fine-tuning of B"): low-rank adapters on the frozen base.

GAG leaves the base untouched and brings knowledge in through ``<GAG>`` slots; the obvious alternative is to
teach the base the training answers directly with a parameter-efficient fine-tune. This module trains a
``peft`` LoRA on the same answer-only loss (``answer_nll``), with the optimizer, schedule, clipping and
per-optimizer-step logging of Stage III, so the two differ only in how knowledge reaches the base.
Only ``lora_`` weights train, in fp32; the base's own tensors are never updated.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from gag_lightning.errors import GAGError
from gag_lightning.models.losses import token_nll
from gag_lightning.models.shared_prefix import answer_token_logits
from gag_lightning.stages._common.clipping import ShardAwareClipping
from gag_lightning.stages.expert.module import adamw_with_warmup, require_fp32


def trainable_names(model: torch.nn.Module) -> list[str]:
    return [name for name, p in model.named_parameters() if p.requires_grad]


class LoRAModule(ShardAwareClipping):
    """A ``peft`` LoRA model (the base wrapped by ``get_peft_model``): training step and optimizer only."""

    def __init__(self, model: Any, lr: float = 2e-4, warmup_ratio: float = 0.1, weight_decay: float = 0.0,
                 betas: Sequence[float] = (0.9, 0.999), gradient_checkpointing: bool = False,
                 share_prefix: bool = True) -> None:
        super().__init__()
        self.share_prefix = bool(share_prefix) and not gradient_checkpointing
        names = trainable_names(model)
        if not names or any("lora_" not in n for n in names):
            others = [n for n in names if "lora_" not in n][:5]
            raise GAGError(f"the LoRA stage trains lora_ weights only; trainable: {others or 'none'}")
        self.model = model
        self.save_hyperparameters(ignore=["model"])
        if gradient_checkpointing:
            hf = model.get_base_model()
            enable = getattr(hf, "activation_checkpointing_enable", None)
            if enable is not None:
                enable(activation_checkpointing_kwargs={"use_reentrant": False})
            else:  # transformers < 5
                hf.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            hf.config.use_cache = False
        # train mode for LoRA dropout (and Hugging Face's checkpointing); from_pretrained returns eval mode
        self.model.train()
        self._window: list[Tensor] = []
        self._last_logged_step = -1

    def training_step(self, batch: Mapping[str, Tensor], batch_idx: int) -> Tensor:
        logits, targets = answer_token_logits(self.model, batch["input_ids"], batch["attention_mask"],
                                              batch["labels"], self.share_prefix)
        with torch.autocast(device_type=logits.device.type, enabled=False):
            loss = token_nll(logits, targets)
        self._window.append(loss.detach())
        return loss

    def on_train_start(self) -> None:
        self._last_logged_step = self.trainer.global_step
        self._window = []

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        """Log once per optimizer step the mean of its micro-batch losses (never x accumulation)."""
        step = self.trainer.global_step
        if step == self._last_logged_step or not self._window:
            return
        self._last_logged_step = step
        value = torch.stack(self._window).float().mean()
        self._window = []
        self.log("train/loss", value, on_step=True, on_epoch=False, prog_bar=True, batch_size=1)

    def configure_optimizers(self) -> dict[str, Any]:
        params = [p for p in self.model.parameters() if p.requires_grad]
        return adamw_with_warmup(self, params, weight_decay=self.hparams.weight_decay)

    def on_fit_start(self) -> None:
        require_fp32([p for p in self.model.parameters() if p.requires_grad], "the LoRA weights must train in fp32 but hold", "lora")

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """A Lightning checkpoint holds the LoRA weights only, never the frozen base."""
        state = checkpoint.get("state_dict", {})
        for key in [k for k in state if "lora_" not in k]:
            del state[key]

    strict_loading = False  # checkpoints lack the (frozen, separately loaded) base


__all__ = ["LoRAModule", "trainable_names"]
