"""Reconstruction warm-up data (METHOD.md section 5b, after xRAG's paraphrase pre-training).

Before Stage III's QA objective, the base is given only the S injected slots and a fixed instruction

    user:      Repeat the background knowledge. \\n Knowledge: <GAG>*S \\n
    assistant: background <end-of-turn>

and the adapter is trained with NLL to regenerate the expert background the memory was read from. Nothing
else in the prompt (no question) carries the background, so the loss can only fall by reading the slots.
Examples reuse the QA path's ``GAGExample`` / ``GAGDataset`` / ``GAGCollator``; the source is the train
bank's records (their memories and ``background`` metas), restricted to the QA training rows so that
records held out for validation are not reconstructed.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader

from gag_lightning.data.loaders import train_loader
from gag_lightning.errors import GAGError
from gag_lightning.memory.bank import MemoryBank
from gag_lightning.prompts import choose_placeholder, recon_user_text, stop_token_ids
from gag_lightning.stages.gag.datamodule import GAGCollator, GAGDataset, GAGExample, encode_turn

log = logging.getLogger(__name__)


def encode_recon(background: str, tokenizer: Any, num_slots: int, placeholder_id: int, max_length: int = 2048,
                 enable_thinking: bool = False, stop_ids: Sequence[int] | None = None,
                 row: int = 0) -> GAGExample | None:
    """One warm-up example: repeat-instruction + slots -> the background (+ end-of-turn); None if empty."""
    if not background.strip():
        return None  # nothing to regenerate (and the memory of an empty generation is a zero vector)
    messages = [{"role": "user", "content": recon_user_text(num_slots)}]
    return encode_turn(messages, background, tokenizer, max_length, enable_thinking, stop_ids, row, placeholder_id)


class ReconDataModule(L.LightningDataModule):
    """Training batches of the reconstruction warm-up (no validation: the QA fit validates).

    ``positions`` are the bank rows to use (the QA datamodule's training rows); None uses every record.
    ``placeholder_id`` marks the slots (the QA fit's; by default this tokenizer's ``choose_placeholder``).
    """

    def __init__(self, bank: str | Path | MemoryBank, tokenizer: Any, positions: Sequence[int] | None = None,
                 max_length: int = 2048, batch_size: int = 1, num_workers: int = 0,
                 enable_thinking: bool = False, expect: Mapping[str, Any] | None = None,
                 placeholder_id: int | None = None, seed: int = 0) -> None:
        super().__init__()
        self.seed = seed  # the training order is a function of (seed, epoch)
        self.bank = bank if isinstance(bank, MemoryBank) else MemoryBank.open(bank, expect=dict(expect or {}) or None)
        self.tokenizer = tokenizer
        self.positions = list(positions) if positions is not None else None
        self.max_length = max_length
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.enable_thinking = enable_thinking
        self.placeholder_id = int(placeholder_id if placeholder_id is not None else choose_placeholder(tokenizer).id)
        self.dataset: GAGDataset | None = None

    def setup(self, stage: str | None = None) -> None:
        if self.dataset is not None:
            return
        metas = self.bank.metas()
        positions = self.positions if self.positions is not None else list(range(len(metas)))
        stops = stop_token_ids(self.tokenizer)
        slots = self.bank.schema.slots
        examples: list[GAGExample] = []
        for row, pos in enumerate(positions):
            ex = encode_recon(str(metas[pos].get("background") or ""), self.tokenizer, slots, self.placeholder_id,
                              self.max_length, self.enable_thinking, stops, row=row)
            if ex is not None:
                examples.append(ex)
        if not examples:
            raise GAGError(f"gag.recon_steps > 0 but no record of {self.bank.folder} has a background that fits "
                           f"max_length={self.max_length}")
        if len(examples) < len(positions):
            log.warning("recon warm-up: %d of %d record(s) skipped (empty background or prompt over max_length)",
                        len(positions) - len(examples), len(positions))
        sel = torch.tensor(positions, dtype=torch.long)
        indices = self.bank.indices()
        self.dataset = GAGDataset(examples, self.bank.memories(dtype=None)[sel], None, [indices[p] for p in positions])
        log.info("recon warm-up data: %d record(s)", len(examples))

    def train_dataloader(self) -> DataLoader:
        pad = self.tokenizer.pad_token_id
        if pad is None:
            pad = self.tokenizer.eos_token_id
        return train_loader(self.dataset, self.batch_size, self.seed, GAGCollator(pad), self.num_workers,
                            trainer=self.trainer)


__all__ = ["ReconDataModule", "encode_recon"]
