"""Stage III: train the injection adapter against a frozen base model (METHOD.md section 4).

The base is reached only through ``inputs_embeds``: its embedding output is computed as usual and the
S ``<GAG>`` positions are overwritten by the adapter's projected memory slots. The base is frozen
(``requires_grad=False``, eval mode, any dtype) and gradients flow *through* it to the slots; only the
adapter (layer mix, projector, semantic head) trains, in fp32.

Two recipe switches of METHOD.md section 5b, both off by default: KL self-distillation (``kl_weight > 0``:
the same frozen base reading the background as text is the teacher of the injected student) and the
reconstruction warm-up (``phase = "recon"`` for a first, separate ``trainer.fit``; see ``fit_with_recon``).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import lightning as L
import torch
from torch import Tensor
from torchmetrics import MeanMetric

from gag_lightning.errors import GAGError
from gag_lightning.eval.generation import prefix_cache
from gag_lightning.models.adapter import GAGAdapter, injected_embeddings
from gag_lightning.models.losses import (
    DEFAULT_LOSS_WEIGHTS,
    IGNORE_INDEX,
    answer_kl,
    answer_nll,
    diversity_loss,
    gag_loss,
    masked_mean,
    semantic_loss,
)
from gag_lightning.stages._common.clipping import ShardAwareClipping
from gag_lightning.stages.expert.module import adamw_with_warmup, require_fp32

log = logging.getLogger(__name__)

LOSS_PARTS = ("loss", "nll", "sem", "div", "kl")


def loss_weights_tuple(weights: Mapping[str, float] | Sequence[float] | None) -> tuple[float, float, float]:
    """``{"nll", "sem", "div"[, "kl"]}`` (or a 3-sequence) -> ``(a_nll, a_sem, a_div)``; ``kl_weight`` reads kl."""
    if weights is None:
        return DEFAULT_LOSS_WEIGHTS
    if isinstance(weights, Mapping):
        unknown = set(weights) - {"nll", "sem", "div", "kl"}
        if unknown:
            raise ValueError(f"unknown loss weight(s) {sorted(unknown)}; expected nll, sem, div, kl")
        d = dict(zip(("nll", "sem", "div"), DEFAULT_LOSS_WEIGHTS, strict=True))
        d.update({k: float(v) for k, v in weights.items() if k != "kl"})
        return d["nll"], d["sem"], d["div"]
    values = tuple(float(w) for w in weights)
    if len(values) != 3:
        raise ValueError(f"loss weights must be (nll, sem, div), got {values}")
    return values  # type: ignore[return-value]


def kl_weight(weights: Mapping[str, float] | Sequence[float] | None) -> float:
    """``a_kl`` of a loss-weight mapping (0 when absent: the distillation term is off by default)."""
    return float(weights.get("kl", 0.0)) if isinstance(weights, Mapping) else 0.0


class GAGModule(ShardAwareClipping):
    """Frozen base + trainable ``GAGAdapter``; loss = a_nll NLL + a_sem L_sem + a_div L_div (+ a_kl L_kl).

    A weight of 0 skips its term (no hidden states are kept when a_sem = 0, no teacher forward when
    a_kl = 0); NLL is still computed for logging when a_nll = 0, but without a graph. Every logged value is
    a mean over the micro-batches of one optimizer step, never multiplied by the accumulation factor
    (METHOD.md section 8). In the ``recon`` phase the loss is the NLL of the background alone (logged as
    ``train/recon_nll``).
    """

    def __init__(
        self,
        base: Any,
        adapter: GAGAdapter,
        gag_token_id: int,
        loss_weights: Mapping[str, float] | Sequence[float] | None = None,
        lr: float = 1e-4,
        warmup_ratio: float = 0.1,
        weight_decay: float = 0.0,
        betas: Sequence[float] = (0.9, 0.999),
        gradient_checkpointing: bool = False,
        log_mix: bool = True,
        share_prefix: bool = True,
        kl_temperature: float = 1.0,
    ) -> None:
        super().__init__()
        self.base = base
        self.adapter = adapter.float()
        self.gag_token_id = int(gag_token_id)
        self.weights = loss_weights_tuple(loss_weights)
        self.kl_weight = kl_weight(loss_weights)
        self.kl_temperature = float(kl_temperature)
        if self.kl_temperature <= 0:
            raise GAGError(f"gag.kl_temperature must be > 0, got {kl_temperature}")
        self.phase = "qa"
        self.save_hyperparameters(ignore=["base", "adapter"])
        self.gradient_checkpointing = bool(gradient_checkpointing)
        self.log_mix = log_mix
        self.share_prefix = bool(share_prefix)
        if self.weights[1] > 0 and self.adapter.semantic_head is None:
            raise GAGError("loss_weights.sem > 0 needs an adapter with a semantic head (AdapterConfig.semantic_dim)")
        self.base.requires_grad_(False)
        if self.gradient_checkpointing:
            # non-reentrant checkpointing lets the gradient reach inputs_embeds without enable_input_require_grads
            enable = getattr(self.base, "activation_checkpointing_enable", None)
            if enable is not None:
                enable(activation_checkpointing_kwargs={"use_reentrant": False})
            else:  # transformers < 5
                self.base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self._set_base_mode(False)
        self.val_metrics = torch.nn.ModuleDict({k: MeanMetric() for k in LOSS_PARTS})
        self._window: dict[str, list[Tensor]] = {}
        self._last_logged_step = -1

    # ------------------------------------------------------------------ modes and checkpoints
    def _set_base_mode(self, training: bool) -> None:
        """The base always runs in eval mode (no dropout), except that Hugging Face activates gradient
        checkpointing only on layers in training mode: then those layer modules alone are flagged
        training, their children (attention, MLP, dropout) stay in eval mode."""
        self.base.eval()
        if training and self.gradient_checkpointing:
            for module in self.base.modules():
                if getattr(module, "gradient_checkpointing", False) is True:
                    module.training = True

    def train(self, mode: bool = True) -> GAGModule:
        super().train(mode)
        self._set_base_mode(mode)
        return self

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """A Lightning checkpoint holds the adapter only: never a copy of the frozen base (16 GB for an 8B base)."""
        state = checkpoint.get("state_dict", {})
        for key in [k for k in state if k.startswith("base.")]:
            del state[key]

    strict_loading = False  # checkpoints lack the (frozen, separately loaded) base

    # ------------------------------------------------------------------ forward and loss
    def shared_prefix_len(self, input_ids: Tensor, attention_mask: Tensor) -> int:
        """Leading positions every row shares (system prompt, instruction, request): no slot, no padding.

        The base is frozen and these positions precede every injected slot, so their keys and values do
        not depend on anything trained: they are computed once per batch on one row, without a graph.
        """
        if not self.share_prefix or self.gradient_checkpointing or input_ids.shape[0] < 2:
            return 0
        same = (input_ids == input_ids[:1]).all(dim=0) & (attention_mask == 1).all(dim=0)
        same &= ~(input_ids == self.gag_token_id).any(dim=0)
        shared = int(torch.cumprod(same.long(), dim=0).sum())
        return min(shared, input_ids.shape[1] - 1)

    def forward(self, input_ids: Tensor, attention_mask: Tensor, memory: Tensor,
                output_hidden_states: bool = False) -> tuple[Any, Tensor]:
        """Base outputs with the memory injected, and the projected slots ``[B, S, H_b]`` (fp32).

        With a shared prompt prefix (``shared_prefix_len``), the base runs only the positions after it on
        top of the prefix's KV cache; logits and hidden states of the prefix positions come back as zeros
        (they precede every answer token, so no loss reads them). Same numbers up to float rounding, about
        half the compute on the demo's prompts.
        """
        embeds, slots = injected_embeddings(self.base, self.adapter, input_ids, memory, self.gag_token_id)
        shared = self.shared_prefix_len(input_ids, attention_mask)
        if not shared:
            out = self.base(inputs_embeds=embeds, attention_mask=attention_mask, use_cache=False,
                            output_hidden_states=output_hidden_states)
            return out, slots
        with torch.no_grad():
            cache = prefix_cache(self.base, embeds.detach(), attention_mask, shared)
        out = self.base(inputs_embeds=embeds[:, shared:], attention_mask=attention_mask, use_cache=True,
                        output_hidden_states=output_hidden_states, **cache)
        pad = out.logits.new_zeros((out.logits.shape[0], shared, out.logits.shape[-1]))
        out.logits = torch.cat([pad, out.logits], dim=1)
        if output_hidden_states:
            h = out.hidden_states[-1]
            out.hidden_states = (*out.hidden_states[:-1], torch.cat([h.new_zeros((h.shape[0], shared, h.shape[-1])), h], 1))
        return out, slots

    def teacher_logits(self, batch: Mapping[str, Tensor]) -> Tensor:
        """The KL teacher's logits ``[B, T_t, V]``: the frozen base on the expert_context prompt, no graph."""
        if "teacher_input_ids" not in batch:
            raise GAGError("loss_weights.kl > 0 but the batch has no teacher sequence (GAGDataModule(teacher_context="
                           "True) builds it from the bank's backgrounds)")
        with torch.no_grad():
            return self.base(input_ids=batch["teacher_input_ids"], attention_mask=batch["teacher_attention_mask"],
                             use_cache=False).logits

    def compute_losses(self, batch: Mapping[str, Tensor]) -> tuple[Tensor, dict[str, Tensor], int]:
        """(weighted total, unweighted detached parts incl. ``loss``, number of answer tokens)."""
        if self.phase == "recon":
            return self._recon_losses(batch)
        a_nll, a_sem, a_div = self.weights
        use_sem = a_sem > 0
        out, slots = self(batch["input_ids"], batch["attention_mask"], batch["memory"],
                          output_hidden_states=use_sem)
        teacher = self.teacher_logits(batch) if self.kl_weight > 0 else None
        labels = batch["labels"]
        # the losses in fp32 even under mixed precision: autocast would run bmm / matmul in bf16, which
        # rounds a slot cosine of 0.998 to 1.0 and blurs the semantic cosine
        with torch.autocast(device_type=slots.device.type, enabled=False):
            nll = answer_nll(out.logits, labels)
            if a_nll == 0:
                nll = nll.detach()
            sem = None
            if use_sem:
                if "semantic_target" not in batch:
                    raise GAGError("loss_weights.sem > 0 but the batch has no semantic_target (no semantic encoder?)")
                pooled = masked_mean(out.hidden_states[-1], batch["answer_mask"])
                sem = semantic_loss(self.adapter.semantic(pooled), batch["semantic_target"])
            div = diversity_loss(slots.float()) if a_div > 0 else None
            kl = None
            if teacher is not None:
                kl = answer_kl(out.logits, batch["kl_mask"], teacher, batch["teacher_kl_mask"], self.kl_temperature)
            total, parts = gag_loss(nll, sem, div, self.weights, kl=kl, kl_weight=self.kl_weight)
        parts = {"loss": parts.pop("total"), **parts}
        n_tokens = int((labels[:, 1:] != IGNORE_INDEX).sum())
        return total, parts, n_tokens

    def _recon_losses(self, batch: Mapping[str, Tensor]) -> tuple[Tensor, dict[str, Tensor], int]:
        """Reconstruction warm-up: NLL of the background given only the slots (no auxiliary term)."""
        out, slots = self(batch["input_ids"], batch["attention_mask"], batch["memory"])
        with torch.autocast(device_type=slots.device.type, enabled=False):
            nll = answer_nll(out.logits, batch["labels"])
        return nll, {"recon_nll": nll.detach()}, int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())

    @contextmanager
    def recon_phase(self) -> Iterator[GAGModule]:
        """Within: the recon objective, and the semantic head frozen (it has no term there; under DDP an
        unused trainable parameter would fail the gradient reduction). Restored on exit."""
        head = self.adapter.semantic_head
        flags = [p.requires_grad for p in head.parameters()] if head is not None else []
        if head is not None:
            head.requires_grad_(False)
        self.phase = "recon"
        try:
            yield self
        finally:
            self.phase = "qa"
            if head is not None:
                for p, flag in zip(head.parameters(), flags, strict=True):
                    p.requires_grad_(flag)

    # ------------------------------------------------------------------ steps
    def training_step(self, batch: Mapping[str, Tensor], batch_idx: int) -> Tensor:
        total, parts, _ = self.compute_losses(batch)
        for name, value in parts.items():
            self._window.setdefault(name, []).append(value)
        return total

    def optimizer_step(self, epoch: int, batch_idx: int, optimizer: Any, optimizer_closure: Any = None) -> None:
        super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        self.adapter.clamp_()  # after the step, as METHOD.md section 4 says

    def on_train_start(self) -> None:
        self._last_logged_step = self.trainer.global_step
        self._window = {}

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        """Log once per optimizer step: the mean of that step's micro-batch values, and the layer mix."""
        step = self.trainer.global_step
        if step == self._last_logged_step or not self._window:
            return
        self._last_logged_step = step
        means = {f"train/{k}": torch.stack(v).float().mean() for k, v in self._window.items()}
        self._window = {}
        for name, value in means.items():
            self.log(name, value, on_step=True, on_epoch=False, prog_bar=name == "train/loss", batch_size=1)
        if self.log_mix and self.phase == "qa":  # the recon fit logs train/recon_nll only: its steps restart at 0
            self.log_dict(self.mix_metrics(), on_step=True, on_epoch=False, batch_size=1)

    def mix_metrics(self) -> dict[str, float]:
        """``mix/slot{s}_{layer key}``: the learned per-slot softmax weights over the expert layers."""
        weights = self.adapter.layer_weights()
        keys = self.adapter.config.layer_keys or [str(k) for k in range(weights.shape[1])]
        return {f"mix/slot{s}_{key}": float(weights[s, k]) for s in range(weights.shape[0])
                for k, key in enumerate(keys)}

    def validation_step(self, batch: Mapping[str, Tensor], batch_idx: int) -> None:
        _, parts, n_tokens = self.compute_losses(batch)
        bsz = int(batch["input_ids"].shape[0])
        n_kl = int(batch["kl_mask"].sum()) if "kl_mask" in batch else 0
        for name, value in parts.items():
            # token-weighted NLL and KL, like their training means
            weight = n_tokens if name == "nll" else n_kl if name == "kl" else bsz
            self.val_metrics[name].update(value, max(weight, 1))
            self.log(f"val/{name}", self.val_metrics[name], on_step=False, on_epoch=True,
                     prog_bar=name == "loss", batch_size=bsz)

    # ------------------------------------------------------------------ optimisation
    def configure_optimizers(self) -> dict[str, Any]:
        params = [p for p in self.adapter.parameters() if p.requires_grad]
        return adamw_with_warmup(self, params, weight_decay=self.hparams.weight_decay)

    def on_fit_start(self) -> None:
        require_fp32(self.adapter.parameters(), "the adapter must train in fp32 but holds", "gag")


def fit_with_recon(module: GAGModule, trainer: L.Trainer, datamodule: L.LightningDataModule,
                   recon_trainer: L.Trainer | None = None,
                   recon_datamodule: L.LightningDataModule | None = None, ckpt_path: str | None = None,
                   recon_ckpt_path: str | None = None) -> None:
    """The reconstruction warm-up as a first fit of its own (when given), then the QA fit, on one adapter.

    Two fits rather than one loader switching at ``global_step == recon_steps``: each fit gets its own
    optimizer and LR schedule, so the QA fit's warm-up and linear decay cover exactly ``gag.max_steps`` as
    configured, and the QA trainer's step count, validation cadence and best-adapter selection never see a
    recon step (the recon steps are ``recon_trainer``'s ``max_steps``; its schedule is its own).

    ``ckpt_path`` / ``recon_ckpt_path``: the ``last.ckpt`` each fit resumes from after a kill (a finished recon fit
    restored from its last checkpoint takes no step; the QA checkpoint then restores the adapter it trained).
    """
    if recon_trainer is not None:
        if recon_datamodule is None:
            raise GAGError("a recon trainer needs its recon datamodule")
        with module.recon_phase():
            recon_trainer.fit(module, datamodule=recon_datamodule, ckpt_path=recon_ckpt_path, weights_only=True)
    trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)


__all__ = ["GAGModule", "fit_with_recon", "kl_weight",
           "loss_weights_tuple"]
