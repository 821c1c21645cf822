"""Data loaders whose batches a resumed run can reproduce exactly.

A training epoch's order is a pure function of ``(seed, epoch)`` (``torch.randperm`` seeded with ``seed + epoch``,
Lightning's own ``DistributedSampler`` recipe), and each rank takes every ``world_size``-th index of it. When a run
resumes from a checkpoint saved in the middle of an epoch, the sampler draws that epoch's order again and skips
the batches the trainer's restored progress says were already trained, so the run continues with exactly the
batches an uninterrupted run would have seen. Nothing is read from the global RNG (the loaders carry their own
generator), so restoring the RNG state of a checkpoint reproduces dropout too.

Under DDP Lightning keeps a ``DistributedSampler`` it is given (it only injects one when there is none), so the
sharding below is the one every rank uses; ``len(loader)`` is this rank's number of batches.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler


def _world(trainer: Any) -> tuple[int, int]:
    if trainer is None:
        return 1, 0
    return int(getattr(trainer, "world_size", 1) or 1), int(getattr(trainer, "global_rank", 0) or 0)


class EpochSampler(DistributedSampler):
    """This rank's share of a ``(seed, epoch)``-seeded permutation; on a resumed fit, the trained batches skipped.

    ``trainer`` (optional) is read when an epoch's iteration starts: its fit loop's restored progress gives the
    epoch and the number of batches of it already trained. Without a trainer (or outside ``fit``) the epoch is
    the one ``set_epoch`` gave and nothing is skipped.
    """

    def __init__(self, dataset: Dataset, seed: int, shuffle: bool = True, trainer: Any = None) -> None:
        replicas, rank = _world(trainer)
        super().__init__(dataset, num_replicas=replicas, rank=rank, shuffle=shuffle, seed=int(seed), drop_last=False)
        self.trainer = trainer
        self.skip = 0  # samples of this rank to skip at the next iteration (set by `prepare`)

    def prepare(self, batch_size: int) -> None:
        """Take the epoch and the number of trained batches from the trainer, just before an epoch is iterated."""
        from lightning.pytorch.trainer.states import TrainerFn

        trainer = self.trainer
        self.skip = 0
        if trainer is None or trainer.state.fn != TrainerFn.FITTING:
            return
        loop = trainer.fit_loop
        self.set_epoch(int(loop.epoch_progress.current.processed))
        # at the first fetch of an epoch, `ready` counts the batches of this epoch already trained (0 unless the
        # fit was restored from a checkpoint saved mid-epoch); Lightning adds it to its own batch count too
        done = int(loop.epoch_loop.batch_progress.current.ready)
        if 0 < done * batch_size < self.num_samples:
            self.skip = done * batch_size

    def __iter__(self) -> Iterator[int]:
        skip, self.skip = self.skip, 0
        return itertools.islice(super().__iter__(), skip, None)


class ResumableLoader(DataLoader):
    """A ``DataLoader`` whose sampler (an ``EpochSampler``) is prepared when iteration actually starts.

    ``__iter__`` is a generator: Lightning creates the epoch's iterator before it restores or resets its loop
    progress, and only the first ``next`` (with worker processes, the first index draw) comes after, so the
    sampler reads the progress then. ``state_dict`` marks the loader as resumable for Lightning; the state itself
    is the trainer's progress, restored by Lightning with the rest of the checkpoint.
    """

    def __iter__(self) -> Iterator[Any]:  # type: ignore[override]
        if isinstance(self.sampler, EpochSampler) and self.batch_size:
            self.sampler.prepare(int(self.batch_size))
        yield from super().__iter__()

    def state_dict(self) -> dict[str, Any]:
        sampler = self.sampler
        return {"seed": getattr(sampler, "seed", None), "batch_size": self.batch_size,
                "samples": getattr(sampler, "num_samples", None)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        mine = self.state_dict()
        differ = {k: (v, mine.get(k)) for k, v in state.items() if k in mine and v != mine.get(k)}
        if differ:
            from gag_lightning.errors import GAGError

            raise GAGError(f"the checkpoint's training loader differs from this run's ({differ}, checkpoint vs now): "
                           "the skipped batches would not be the trained ones; delete the stage's checkpoint "
                           "folder to start over")


def train_loader(dataset: Dataset, batch_size: int, seed: int, collate_fn: Callable[[list[Any]], Any],
                 num_workers: int = 0, trainer: Any = None, shuffle: bool = True) -> ResumableLoader:
    """The training loader of every stage: ``(seed, epoch)`` order, this rank's share, resumable mid-epoch."""
    sampler = EpochSampler(dataset, seed, shuffle=shuffle, trainer=trainer)
    return ResumableLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers,
                           collate_fn=collate_fn, generator=torch.Generator().manual_seed(int(seed)))


def eval_loader(dataset: Dataset, batch_size: int, collate_fn: Callable[[list[Any]], Any],
                num_workers: int = 0) -> DataLoader:
    """A validation / test loader in file order that leaves the global RNG alone (its own generator)."""
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers, collate_fn=collate_fn,
                      generator=torch.Generator().manual_seed(0))


__all__ = ["EpochSampler", "ResumableLoader", "eval_loader", "train_loader"]
