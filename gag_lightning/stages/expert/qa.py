"""Stage II data: domain QA rendered with the expert's chat template (METHOD.md section 2)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

from gag_lightning.data.loaders import eval_loader, train_loader
from gag_lightning.data.records import QARecord, read_qa
from gag_lightning.prompts import PromptSettings, build_messages, render_completion, stop_token_ids

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SFTExample:
    input_ids: list[int]
    num_prompt: int  # labels start here: positions >= num_prompt are the answer (and its end-of-turn)


def encode_sft(record: QARecord, tokenizer: Any, instruction: str | None = None, max_length: int = 2048,
               enable_thinking: bool = False, stop_ids: list[int] | None = None) -> SFTExample:
    """User turn = instruction + question, assistant turn = answer (``prompts.build_messages("sft", ...)``: the
    record's own instruction wins over ``instruction``, the domain's)."""
    messages = build_messages("sft", record, PromptSettings(instruction=instruction or ""))
    prompt, completion = render_completion(tokenizer, messages, record.answer, enable_thinking, stop_ids)
    ids = (prompt + completion)[:max_length]
    return SFTExample(ids, min(len(prompt), len(ids)))


class SFTDataset(Dataset):
    def __init__(self, examples: list[SFTExample]) -> None:
        self.examples = examples

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> SFTExample:
        return self.examples[i]


def collate_sft(batch: list[SFTExample], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad; the attention mask and labels come from lengths, so pad == eos never hides a stop token."""
    width = max(len(e.input_ids) for e in batch)
    input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(batch), width), dtype=torch.long)
    labels = torch.full((len(batch), width), -100, dtype=torch.long)
    for row, ex in enumerate(batch):
        n = len(ex.input_ids)
        ids = torch.tensor(ex.input_ids)
        input_ids[row, :n] = ids
        attention[row, :n] = 1
        labels[row, ex.num_prompt: n] = ids[ex.num_prompt:]
    return {"input_ids": input_ids, "attention_mask": attention, "labels": labels}


class SFTDataModule(L.LightningDataModule):
    """Train on `train`, validate on `dev` (or a seeded split of train), test on the held-out `test` file."""

    def __init__(self, train: str, tokenizer: Any, test: str | None = None, dev: str | None = None,
                 instruction: str = "", max_length: int = 2048, val_fraction: float = 0.05, batch_size: int = 1,
                 eval_batch_size: int = 8, num_workers: int = 0, seed: int = 42, max_train_records: int | None = None,
                 enable_thinking: bool = False) -> None:
        super().__init__()
        self.paths = {"train": train, "dev": dev, "test": test}
        self.tokenizer = tokenizer
        self.instruction = instruction
        self.max_length = max_length
        self.val_fraction = val_fraction
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size
        self.num_workers = num_workers
        self.seed = seed
        self.max_train_records = max_train_records
        self.enable_thinking = enable_thinking
        self.sets: dict[str, SFTDataset] = {}
        self.records: dict[str, list[QARecord]] = {}

    def _encode(self, records: list[QARecord]) -> SFTDataset:
        stops = stop_token_ids(self.tokenizer)
        return SFTDataset([encode_sft(r, self.tokenizer, self.instruction, self.max_length, self.enable_thinking,
                                      stops) for r in records])

    def setup(self, stage: str | None = None) -> None:
        if self.sets:
            return
        train = read_qa(self.paths["train"])
        if self.paths["dev"]:
            val = read_qa(self.paths["dev"])
        else:
            order = torch.randperm(len(train), generator=torch.Generator().manual_seed(self.seed)).tolist()
            n_val = max(1, int(round(len(train) * self.val_fraction))) if self.val_fraction > 0 else 0
            val = [train[i] for i in order[:n_val]]
            train = [train[i] for i in sorted(order[n_val:])]
        if self.max_train_records:
            train = train[: self.max_train_records]
        self.records = {"train": train, "val": val}
        if self.paths["test"] and Path(self.paths["test"]).is_file():
            self.records["test"] = read_qa(self.paths["test"])
        self.sets = {k: self._encode(v) for k, v in self.records.items()}
        log.info("SFT data: %s", {k: len(v) for k, v in self.sets.items()})

    def _loader(self, split: str, shuffle: bool, batch_size: int) -> DataLoader:
        collate = partial(collate_sft, pad_id=self.tokenizer.pad_token_id)
        if shuffle:
            return train_loader(self.sets[split], batch_size, self.seed, collate, self.num_workers, trainer=self.trainer)
        return eval_loader(self.sets[split], batch_size, collate, self.num_workers)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", True, self.batch_size)

    def val_dataloader(self) -> DataLoader | list:
        return self._loader("val", False, self.eval_batch_size) if self.sets.get("val") else []

    def test_dataloader(self) -> DataLoader | list:
        return self._loader("test", False, self.eval_batch_size) if "test" in self.sets else []
