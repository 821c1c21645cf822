"""Gradient clipping that also works under FSDP.

Lightning's FSDP precision plugin refuses `gradient_clip_algorithm="norm"` (Lightning issue #19235):
the global norm of sharded gradients has to come from the FSDP module's own `clip_grad_norm_`,
which all-reduces the shard norms. Every stage clips by norm (METHOD.md), so without this the
`hardware=fsdp` preset would fail at the first optimizer step.
"""

from __future__ import annotations

from typing import Any

from lightning.pytorch.strategies import FSDPStrategy

from gag_lightning.stages._common.guards import FiniteGuard


class ShardAwareClipping(FiniteGuard):
    """LightningModule base whose clipping by norm goes through FSDP when the strategy shards the model (and, from
    `FiniteGuard`, whose training stops at a NaN/inf loss or gradient)."""

    def configure_gradient_clipping(self, optimizer: Any, gradient_clip_val: float | None = None,
                                    gradient_clip_algorithm: str | None = None) -> None:
        by_norm = gradient_clip_algorithm is None or str(gradient_clip_algorithm) == "norm"
        if gradient_clip_val and by_norm and isinstance(self.trainer.strategy, FSDPStrategy):
            self.trainer.strategy.model.clip_grad_norm_(float(gradient_clip_val))
            return
        self.clip_gradients(optimizer, gradient_clip_val=gradient_clip_val,
                            gradient_clip_algorithm=gradient_clip_algorithm)
