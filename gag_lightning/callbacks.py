"""Lightning pieces of resumable training: checkpoints, their atomic writes, fractional epochs.

Every training stage (dapt, sft, gag, lora) checkpoints with ``StageCheckpoint``, a ``ModelCheckpoint`` writing
``best.ckpt`` (by the monitored validation metric) and ``last.ckpt`` into a stable folder next to the stage's
artifact (``stages._common.trainer.checkpoint_dir``); a rerun of the same configuration resumes from ``last.ckpt``.
The Lightning checkpoints are the trainer's own resume state (``torch.save`` files); the hand-off artifact stays a
safetensors export made from the best checkpoint after ``fit``.
"""

from __future__ import annotations

import math
import os
import random
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import ModelCheckpoint

from gag_lightning.artifacts import atomic_write


# ---------------------------------------------------------------------------------------------- RNG state
def rng_state() -> dict[str, Any]:
    """The global RNG states (torch CPU/CUDA, numpy, random) as tensors and plain values (``weights_only`` loadable)."""
    version, keys, gauss = random.getstate()
    name, np_keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {"name": str(name), "keys": torch.from_numpy(np.asarray(np_keys, dtype=np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "python": {"version": int(version), "keys": list(keys), "gauss": gauss},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np_state = state["numpy"]
    np.random.set_state((np_state["name"], np_state["keys"].numpy().astype(np.uint32), np_state["pos"],
                         np_state["has_gauss"], np_state["cached_gaussian"]))
    py = state["python"]
    random.setstate((py["version"], tuple(py["keys"]), py["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ---------------------------------------------------------------------------------------------- checkpoints
class AtomicCheckpointIO(TorchCheckpointIO):
    """``torch.save`` into a temp file beside the target, fsync, rename: a kill never leaves half a checkpoint.

    Lightning's own save goes through a temp file in the system temp dir and a cross-device copy (and holds the
    whole checkpoint in memory first); a kill during that copy would leave a truncated ``last.ckpt``.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options")

        def write(tmp: str) -> None:
            with open(tmp, "wb") as handle:
                torch.save(checkpoint, handle)
                handle.flush()
                os.fsync(handle.fileno())

        atomic_write(path, write)


class StageCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` of a resumable stage: ``best.ckpt`` by ``monitor`` and ``last.ckpt``, in ``dirpath``.

    * After every validation: ``best.ckpt`` when ``monitor`` improved, and ``last.ckpt`` (so the restored
      ``best_model_*`` state always matches the files).
    * Every ``every_n_train_steps`` optimizer steps, ``last.ckpt``, except at a step that is validated next: that
      step is saved after its validation, so a resumed run never skips a validation the checkpoint did not see.
    * At the end of every epoch (and so of training), ``last.ckpt`` when not saved at that step yet.
    * The final optimizer step (``max_steps``) is always validated (Lightning validates when asked to stop), so the
      best checkpoint is chosen among the same validations however the run was interrupted.
    * The global RNG states travel in the checkpoint (dropout continues as without a kill).

    ``monitor=None`` (no validation): only ``last.ckpt``; the final weights are the result.
    """

    def __init__(self, dirpath: str | Path, monitor: str | None = "val/loss", mode: str = "min",
                 every_n_train_steps: int = 50) -> None:
        super().__init__(dirpath=str(dirpath), filename="best", monitor=monitor, mode=mode,
                         save_top_k=1 if monitor else 0, save_last=True,
                         every_n_train_steps=max(1, int(every_n_train_steps)), auto_insert_metric_name=False,
                         enable_version_counter=False)

    @property
    def state_key(self) -> str:
        # the saving interval is not part of the key: a rerun with another interval still restores the best so far
        return f"StageCheckpoint{{'monitor': {self.monitor!r}, 'mode': {self.mode!r}}}"

    @property
    def last_path(self) -> Path:
        return Path(str(self.dirpath)) / f"{self.CHECKPOINT_NAME_LAST}{self.FILE_EXTENSION}"

    @property
    def best_path(self) -> Path | None:
        """The monitored best checkpoint, or None (no validation, or none improved on anything yet)."""
        path = Path(self.best_model_path) if self.monitor and self.best_model_path else None
        return path if path is not None and path.is_file() else None

    @property
    def best_score(self) -> float | None:
        score = self.best_model_score
        if score is None or self.best_path is None:
            return None
        score = float(score)
        return score if math.isfinite(score) else None

    # ---------------------------------------------------------------- triggers
    @staticmethod
    def _validation_follows(trainer: L.Trainer) -> bool:
        """Whether the training loop validates right after the batch that just ended (Lightning's own test)."""
        loop = trainer.fit_loop
        return bool(loop.epoch_loop._should_check_val_fx(loop._data_fetcher))

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if trainer.max_steps > 0 and trainer.global_step >= trainer.max_steps:
            trainer.should_stop = True  # the loop validates the final step before it stops
        if self._should_skip_saving_checkpoint(trainer) or trainer.global_step % self._every_n_train_steps:
            return
        if self._validation_follows(trainer):
            return  # saved by on_validation_end, with this step's validation in the state
        self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        from lightning.pytorch.trainer.states import TrainerFn

        if trainer.fast_dev_run or trainer.state.fn != TrainerFn.FITTING or trainer.sanity_checking:
            return
        candidates = self._monitor_candidates(trainer)
        if self.monitor is not None:
            self._save_topk_checkpoint(trainer, candidates)
        # Lightning validates every `val_check_interval` *batches*: with gradient accumulation and an epoch whose
        # batches are not a multiple of it, that can fall inside an accumulation window. The best weights are still
        # saved, but a resumable checkpoint must be taken at an optimizer step (the partial gradient is not in it)
        if not trainer.fit_loop.epoch_loop._should_accumulate():
            self._save_last_checkpoint(trainer, candidates)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self._should_skip_saving_checkpoint(trainer):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    # ---------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "rng": rng_state()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state = dict(state_dict)
        rng = state.pop("rng", None)
        super().load_state_dict(state)
        if rng is not None:
            set_rng_state(rng)


def trained_state(path: str | Path, prefix: str) -> dict[str, torch.Tensor]:
    """The weights under ``prefix`` (e.g. ``"model."``) of a Lightning checkpoint, prefix removed.

    Loaded with ``weights_only=True`` (no arbitrary unpickling) and memory-mapped, so an export reads only the
    tensors it copies.
    """
    checkpoint = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
    return {k[len(prefix):]: v for k, v in checkpoint["state_dict"].items() if k.startswith(prefix)}


def checkpoint_step(path: str | Path) -> int:
    """The optimizer step a Lightning checkpoint was saved at (``weights_only`` load, memory-mapped)."""
    return int(torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)["global_step"])


# ---------------------------------------------------------------------------------------------- epochs
class FractionalEpochs(L.Callback):
    """A budget like 1.5 epochs (METHOD.md, adjuvant SFT): ``max_steps`` from the batches *this rank* sees.

    Set in ``setup``, after the distributed sampler exists and before the optimizer's schedule reads
    ``trainer.estimated_stepping_batches``: under DDP each rank holds ``1 / world_size`` of an epoch, so computing
    the steps from the unsharded loader (as before) turned 1.5 epochs into 2.
    """

    def __init__(self, epochs: float, max_steps: int | None = None) -> None:
        self.epochs = float(epochs)
        self.cap = None if max_steps in (None, -1) else int(max_steps)
        self.steps: int | None = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        trainer.fit_loop.setup_data()
        batches = trainer.num_training_batches
        if not math.isfinite(batches):
            return
        steps = math.ceil(self.epochs * batches / trainer.accumulate_grad_batches)
        self.steps = min(steps, self.cap) if self.cap is not None else steps
        trainer.fit_loop.epoch_loop.max_steps = self.steps  # what trainer.max_steps reads


__all__ = ["AtomicCheckpointIO", "FractionalEpochs", "StageCheckpoint", "checkpoint_step", "rng_state",
           "set_rng_state", "trained_state"]
