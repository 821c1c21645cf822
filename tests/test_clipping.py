"""Clipping by norm under FSDP goes through the FSDP module (Lightning's FSDP plugin refuses it)."""

from __future__ import annotations

from types import SimpleNamespace

import torch
from lightning.pytorch.strategies import FSDPStrategy

from gag_lightning.stages._common.clipping import ShardAwareClipping


class _Module(ShardAwareClipping):
    def __init__(self, strategy) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(3, 1)
        self._fake_trainer = SimpleNamespace(strategy=strategy)
        self.default_calls: list[tuple] = []

    @property
    def trainer(self):  # a stand-in: only `.strategy` is read
        return self._fake_trainer

    def clip_gradients(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        self.default_calls.append((gradient_clip_val, gradient_clip_algorithm))


class _ShardedModel:
    def __init__(self) -> None:
        self.calls: list[float] = []

    def clip_grad_norm_(self, max_norm: float) -> None:
        self.calls.append(max_norm)


def _fsdp_strategy(model: _ShardedModel) -> FSDPStrategy:
    strategy = FSDPStrategy.__new__(FSDPStrategy)  # no process group needed to route the call
    strategy.__dict__["_model"] = model
    return strategy


def test_norm_clipping_under_fsdp_uses_the_fsdp_module() -> None:
    sharded = _ShardedModel()
    module = _Module(_fsdp_strategy(sharded))
    module.configure_gradient_clipping(None, gradient_clip_val=1.0, gradient_clip_algorithm="norm")
    assert sharded.calls == [1.0] and module.default_calls == []
    # clipping by value needs no all-reduce: Lightning's own path handles it
    module.configure_gradient_clipping(None, gradient_clip_val=0.5, gradient_clip_algorithm="value")
    assert sharded.calls == [1.0] and module.default_calls == [(0.5, "value")]


def test_other_strategies_keep_lightnings_clipping() -> None:
    module = _Module(SimpleNamespace())
    module.configure_gradient_clipping(None, gradient_clip_val=1.0, gradient_clip_algorithm="norm")
    assert module.default_calls == [(1.0, "norm")]
