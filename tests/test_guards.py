"""Numbers guarded: NaN/inf in a loaded memory bank, a training loss or a gradient stops the stage with a clear error."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader

from gag_lightning.errors import GAGError, NonFiniteError
from gag_lightning.memory.bank import MemoryBank, MemorySchema
from gag_lightning.stages._common.clipping import ShardAwareClipping
from gag_lightning.stages._common.guards import FiniteGuard


def _bank(folder: Path, layer_keys: list[str], slots: int, hidden: int, n: int = 4) -> Path:
    schema = MemorySchema(expert_fingerprint="e", layer_keys=layer_keys, slots=slots, hidden_size=hidden)
    bank = MemoryBank.open_for_writing(folder, schema)
    metas = [{"index": i, "id": f"rec-{i}", "question": f"Question {i}?", "answer": f"Answer {i}.",
              "background": f"Background {i}.", "num_generated_tokens": 3} for i in range(n)]
    shard = bank.write_shard(metas, torch.randn(n, len(layer_keys), slots, hidden).clamp(-3, 3))
    return shard


def _poison(shard: Path, row: int) -> None:
    """Overwrite one record's memory with NaN, keeping the file otherwise valid (as a damaged disk would)."""
    with safe_open(str(shard), framework="pt") as handle:
        metadata = handle.metadata()
    tensors = load_file(str(shard))
    tensors["memories"][row, 0, 0, 0] = float("nan")
    save_file(tensors, str(shard), metadata=metadata)


def test_nan_in_a_loaded_bank_names_the_shard_and_the_record(tmp_path):
    shard = _bank(tmp_path / "bank", ["last", "minus2"], 2, 8)
    _poison(shard, row=2)
    with pytest.raises(GAGError) as err:
        MemoryBank.open(tmp_path / "bank")
    message = str(err.value)
    assert str(shard) in message and "'rec-2'" in message and "NaN/inf" in message


def test_gag_stage_refuses_a_nan_bank_before_training(compose_cfg, tmp_path):
    from gag_lightning.stages.gag.runner import run_gag

    cfg = compose_cfg(["experiment=smoke", "stage=gag"])
    root = tmp_path / "memory-nan"
    comp = cfg.memory.compression
    shard = _bank(root / "train", list(comp.layer_keys), int(comp.slots), 64, n=8)  # the tiny expert: H_e = 64
    _poison(shard, row=5)
    (root / "manifest.json").write_text(json.dumps({"stage": "memory"}))
    with pytest.raises(GAGError, match=r"rec-5.*NaN/inf"):
        run_gag(compose_cfg(["experiment=smoke", "stage=gag", f"gag.memory_dir={root}"]))
    assert not any((tmp_path / "artifacts").rglob("manifest.json"))  # nothing was declared finished


class _Toy(ShardAwareClipping):
    """The shared base of every training module, on a linear layer: NaN in the loss or in the gradient at a step."""

    def __init__(self, nan_loss_at: int | None = None, nan_grad_at: int | None = None) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(2, 1)
        self.nan_loss_at, self.nan_grad_at = nan_loss_at, nan_grad_at

    def on_train_start(self) -> None:
        def hook(grad):
            return grad * float("nan") if self.trainer.global_step == self.nan_grad_at else grad

        self.layer.weight.register_hook(hook)

    def training_step(self, batch, batch_idx):
        loss = self.layer(batch).pow(2).mean()
        if self.trainer.global_step == self.nan_loss_at:
            loss = loss * float("inf")
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def train_dataloader(self):
        return DataLoader(torch.randn(32, 2), batch_size=4)


def _fit(module: L.LightningModule) -> L.Trainer:
    trainer = L.Trainer(max_steps=6, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, gradient_clip_val=1.0)
    trainer.fit(module)
    return trainer


def test_nonfinite_loss_stops_training_naming_the_step():
    with pytest.raises(NonFiniteError, match=r"training loss is inf at optimizer step 3 \(epoch 0, batch 2\)"):
        _fit(_Toy(nan_loss_at=2))


def test_nonfinite_gradient_stops_training_naming_the_step_and_parameter():
    module = _Toy(nan_grad_at=4)
    with pytest.raises(NonFiniteError, match=r"NaN/inf gradient at optimizer step 5 .* in layer.weight"):
        _fit(module)
    assert torch.isfinite(module.layer.weight).all()  # the bad step was not applied


def test_finite_training_runs_to_the_end_and_every_training_module_is_guarded():
    from gag_lightning.stages.expert.module import CausalLMModule
    from gag_lightning.stages.gag.module import GAGModule
    from gag_lightning.stages.lora.module import LoRAModule

    assert _fit(_Toy()).global_step == 6
    assert all(issubclass(m, FiniteGuard) for m in (CausalLMModule, GAGModule, LoRAModule))
