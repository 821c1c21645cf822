"""The eval stage's LightningModule: ``predict_step`` decodes one planned batch with the split's harness.

The frozen models (base, adapter, LoRA, expert) live in the harnesses, not as registered sub-modules: the runner
loads them once, in the dtype of ``hardware.base_dtype``, on this rank's device, so Lightning neither moves, casts
nor broadcasts them (under DDP every rank loaded the same files). ``gather`` brings every rank's predictions to
every rank and puts them back in record order, each (split, system, record) exactly once.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import lightning as L
import torch

from gag_lightning.errors import GAGError
from gag_lightning.eval.generation import Generation
from gag_lightning.stages.eval.datamodule import EvalBatch


@dataclass
class EvalPrediction:
    """One record's answer by one system, and which rank decoded it."""

    batch: int
    split: str
    system: str
    row: int
    generation: Generation
    rank: int = 0


class EvalModule(L.LightningModule):
    """Decodes planned batches; holds no trainable (nor registered) weights."""

    def __init__(self, harnesses: Mapping[str, Any], items: Mapping[str, Sequence[Any]]) -> None:
        super().__init__()
        self.harnesses = dict(harnesses)
        self.items = {split: list(its) for split, its in items.items()}

    def predict_step(self, batch: EvalBatch, batch_idx: int) -> list[EvalPrediction]:
        gens = self.harnesses[batch.split].generate(batch.system, self.items[batch.split], batch.rows)
        return [EvalPrediction(batch.index, batch.split, batch.system, row, gen, self.global_rank)
                for row, gen in zip(batch.rows, gens, strict=True)]


def all_gather_predictions(local: Sequence[EvalPrediction]) -> list[EvalPrediction]:
    """Every rank's predictions on every rank (``torch.distributed.all_gather_object``); this rank's alone when
    no process group is running."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return list(local)
    gathered: list[list[EvalPrediction] | None] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(gathered, list(local))
    return [p for part in gathered for p in (part or [])]


def assemble(predictions: Sequence[EvalPrediction], plan: Sequence[EvalBatch],
             n_items: Mapping[str, int]) -> dict[str, dict[str, list[Generation]]]:
    """``{split: {system: generations in record order}}`` from the predictions of all ranks.

    A (split, system, record) decoded twice (a sampler that pads the last rank's share with repeats) counts once:
    the first in plan order, and both are the same batch decoded the same way. One that no rank decoded is an
    error, never a silent gap in the table.
    """
    chosen: dict[tuple[str, str, int], EvalPrediction] = {}
    for pred in sorted(predictions, key=lambda p: p.batch):
        chosen.setdefault((pred.split, pred.system, pred.row), pred)
    out: dict[str, dict[str, list[Generation]]] = {}
    for batch in plan:
        out.setdefault(batch.split, {}).setdefault(batch.system, [])
    for split, systems in out.items():
        for system in systems:
            missing = [r for r in range(n_items[split]) if (split, system, r) not in chosen]
            if missing:
                raise GAGError(f"[eval] {split}/{system}: no rank decoded record(s) {missing[:10]}")
            systems[system] = [chosen[(split, system, r)].generation for r in range(n_items[split])]
    return out


def decoded_per_rank(predictions: Sequence[EvalPrediction]) -> dict[int, int]:
    """How many (record, system) answers each rank decoded: the evidence that the work was shared."""
    counts: dict[int, int] = {}
    for pred in predictions:
        counts[pred.rank] = counts.get(pred.rank, 0) + 1
    return dict(sorted(counts.items()))


__all__ = ["EvalModule", "EvalPrediction", "all_gather_predictions", "assemble", "decoded_per_rank"]
