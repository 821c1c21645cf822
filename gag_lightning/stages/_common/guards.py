"""Numbers guarded: a NaN/inf training loss or gradient stops the stage with an error naming the step.

Without this, a NaN (a damaged memory bank, an lr that diverges) trains to the end: every later step is NaN,
the artifact is written with a manifest and evaluation decodes empty answers. Lightning's
``detect_anomaly`` finds the op but slows every step several-fold; these checks cost one reduction per
micro-batch (the loss) and one fused norm per optimizer step (the gradients). Every training module of
the project inherits them (``stages._common.clipping.ShardAwareClipping`` derives from ``FiniteGuard``).
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from torch import Tensor

from gag_lightning.errors import NonFiniteError

# precisions whose GradScaler expects inf gradients now and then and skips those steps itself
_SCALED = ("16-mixed", "16", "fp16")


def _any_rank(module: L.LightningModule, bad: bool) -> bool:
    """True on every rank when any rank saw a bad value, so all ranks stop together (none waits in a collective)."""
    try:
        return bool(module.trainer.strategy.reduce_boolean_decision(bad, all=False))
    except (AttributeError, RuntimeError):
        return bad


def _where(module: L.LightningModule) -> str:
    trainer = module.trainer
    batch = getattr(getattr(trainer, "fit_loop", None), "epoch_loop", None)
    batch_idx = getattr(batch, "batch_idx", None)
    where = f"optimizer step {trainer.global_step + 1} (epoch {trainer.current_epoch}"
    return where + (f", batch {batch_idx})" if batch_idx is not None else ")")


def check_finite_loss(module: L.LightningModule, loss: Tensor) -> None:
    """Raise `NonFiniteError` (on every rank) when the loss about to be back-propagated is NaN or inf."""
    bad = not bool(torch.isfinite(loss.detach()).all())
    if _any_rank(module, bad):
        value = float(loss.detach().float().mean()) if bad else "finite here, non-finite on another rank"
        raise NonFiniteError(
            f"{type(module).__name__}: the training loss is {value} at {_where(module)}; stopping instead of "
            "training on NaN. Check the inputs (a damaged memory bank or data file), or lower the learning rate "
            "/ use a wider precision."
        )


def nonfinite_gradients(module: L.LightningModule, optimizer: Any) -> list[str]:
    """Names of trainable parameters whose gradient holds NaN/inf ([] when all are finite; one fused check)."""
    params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
    if not params:
        return []
    grads = [p.grad.detach() for p in params]
    try:
        norms = torch._foreach_norm(grads)
        finite = bool(torch.isfinite(torch.stack([n.float().to(grads[0].device) for n in norms])).all())
    except (RuntimeError, AttributeError, TypeError):
        finite = all(bool(torch.isfinite(g).all()) for g in grads)
    if finite:
        return []
    names = {id(p): n for n, p in module.named_parameters()}
    return [names.get(id(p), "?") for p in params if not bool(torch.isfinite(p.grad).all())]


class FiniteGuard(L.LightningModule):
    """Stops training at the first NaN/inf loss (before backward) or gradient (before the optimizer step)."""

    def on_before_backward(self, loss: Tensor) -> None:
        check_finite_loss(self, loss)

    def on_before_optimizer_step(self, optimizer: Any) -> None:
        if str(self.trainer.precision) in _SCALED:
            return  # the GradScaler skips steps with inf gradients by design
        bad = nonfinite_gradients(self, optimizer)
        if _any_rank(self, bool(bad)):
            shown = ", ".join(bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
            raise NonFiniteError(
                f"{type(self).__name__}: NaN/inf gradient at {_where(self)} in {shown or 'another rank'}; stopping "
                "instead of applying it. Check the inputs, or lower the learning rate / use a wider precision."
            )


__all__ = ["FiniteGuard", "check_finite_loss", "nonfinite_gradients"]
