"""The eval stage's DataModule: one item per planned decoding batch of (split, system, records).

Batches are planned before the loop, as the harness decodes them in one process (each system's prompts sorted
by length, cut every ``eval.decoding.batch_size``), and a predict step decodes one whole batch. A batch's tokens
depend on its members (padding, the shared prompt prefix), so planning first and dealing whole batches to the
ranks is what makes the predictions the same on any number of processes. Under DDP Lightning deals the batches
round-robin (its predict sampler, ``UnrepeatedDistributedSamplerWrapper``: no padding duplicates); the batches
of a system go from short to long prompts, so round-robin gives every rank a like share of the work.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import lightning as L
from torch.utils.data import DataLoader


@dataclass(frozen=True)
class EvalBatch:
    """One decoding batch: records ``rows`` (indices into the split's items) of ``split``, answered by ``system``."""

    index: int  # position in the plan: predictions are put back in plan order, whatever rank decoded them
    split: str
    system: str
    rows: tuple[int, ...]


def plan_eval(harnesses: Mapping[str, Any], items: Mapping[str, Sequence[Any]],
              systems: Sequence[str]) -> list[EvalBatch]:
    """Every (split, system) batch in the order one process decodes them: split by split, system by system."""
    plan: list[EvalBatch] = []
    for split, harness in harnesses.items():
        for system in systems:
            for rows in harness.plan(system, items[split]):
                plan.append(EvalBatch(len(plan), split, system, tuple(rows)))
    return plan


def _only(batch: list[EvalBatch]) -> EvalBatch:
    return batch[0]


class EvalDataModule(L.LightningDataModule):
    """The planned batches as a predict dataloader (one batch per step; Lightning shards them under DDP)."""

    def __init__(self, plan: Sequence[EvalBatch]) -> None:
        super().__init__()
        self.plan = list(plan)

    def transfer_batch_to_device(self, batch: EvalBatch, device: Any, dataloader_idx: int) -> EvalBatch:
        return batch  # a plan entry (record indices): the harness moves what it decodes

    def predict_dataloader(self) -> DataLoader:
        return DataLoader(self.plan, batch_size=1, shuffle=False, num_workers=0, collate_fn=_only)


__all__ = ["EvalBatch", "EvalDataModule", "plan_eval"]
