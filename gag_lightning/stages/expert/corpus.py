"""Stage I data: the knowledge base packed into fixed-size token blocks (METHOD.md section 1)."""

from __future__ import annotations

import logging
from functools import partial
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

from gag_lightning.data.loaders import eval_loader, train_loader
from gag_lightning.data.records import read_knowledge_base
from gag_lightning.errors import GAGError

log = logging.getLogger(__name__)


def pack_tokens(token_ids: list[int], block_size: int) -> list[list[int]]:
    """Cut a token stream into blocks; the last, shorter block is kept so every token is trained once."""
    if block_size < 2:
        raise ValueError(f"block_size must be >= 2, got {block_size}")
    return [token_ids[i: i + block_size] for i in range(0, len(token_ids), block_size)]


def tokenize_corpus(texts: list[str], tokenizer: Any, separator: str = "\n\n") -> list[int]:
    """Token stream of the texts joined by `separator`.

    Documents are tokenized one by one (with the separator appended) rather than as one huge
    string: byte-level pre-tokenizers split at the separator's whitespace anyway, and this keeps
    memory flat on a multi-GB corpus.
    """
    ids: list[int] = []
    last = len(texts) - 1
    for i, text in enumerate(texts):
        piece = text + separator if i < last else text
        ids.extend(tokenizer(piece, add_special_tokens=False)["input_ids"])
    return ids


def check_corpus_size(path: Path, n_texts: int, n_tokens: int, block_size: int, val_fraction: float) -> None:
    """Refuse a knowledge base too small for Stage I: it must fill one whole block to train on, and a second one
    when a validation split is asked for (the best checkpoint is chosen on it). A 3-word corpus would otherwise
    "train" on one short block and export an expert that learned nothing, with exit status 0."""
    need = block_size * (2 if val_fraction > 0 else 1)
    if n_tokens < need:
        what = "two blocks (one to train on, one to validate)" if val_fraction > 0 else "one block"
        raise GAGError(f"{path}: the knowledge base holds {n_tokens} tokens in {n_texts} text(s), fewer than {what} "
                       f"of dapt.datamodule.block_size={block_size} tokens ({need}); add text, or lower the block "
                       "size (domain.budget.dapt.block_size)")


class BlockDataset(Dataset):
    def __init__(self, blocks: list[list[int]]) -> None:
        self.blocks = blocks

    def __len__(self) -> int:
        return len(self.blocks)

    def __getitem__(self, i: int) -> list[int]:
        return self.blocks[i]


def collate_blocks(batch: list[list[int]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad; mask and labels come from lengths, never from comparing ids with the pad id."""
    width = max(len(b) for b in batch)
    input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(batch), width), dtype=torch.long)
    labels = torch.full((len(batch), width), -100, dtype=torch.long)
    for row, block in enumerate(batch):
        n = len(block)
        input_ids[row, :n] = torch.tensor(block)
        attention[row, :n] = 1
        labels[row, :n] = torch.tensor(block)
    return {"input_ids": input_ids, "attention_mask": attention, "labels": labels}


class KnowledgeBaseDataModule(L.LightningDataModule):
    """Knowledge base -> packed blocks, with a seeded block-level validation split."""

    def __init__(self, knowledge_base: str, tokenizer: Any, block_size: int = 1024, separator: str = "\n\n",
                 val_fraction: float = 0.03, batch_size: int = 1, num_workers: int = 0, seed: int = 42,
                 max_blocks: int | None = None) -> None:
        super().__init__()
        self.knowledge_base = Path(knowledge_base)
        self.tokenizer = tokenizer
        self.block_size = block_size
        self.separator = separator
        self.val_fraction = val_fraction
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.seed = seed
        self.max_blocks = max_blocks
        self.train_set: BlockDataset | None = None
        self.val_set: BlockDataset | None = None

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        texts = read_knowledge_base(self.knowledge_base)
        ids = tokenize_corpus(texts, self.tokenizer, self.separator)
        check_corpus_size(self.knowledge_base, len(texts), len(ids), self.block_size, self.val_fraction)
        blocks = pack_tokens(ids, self.block_size)
        order = torch.randperm(len(blocks), generator=torch.Generator().manual_seed(self.seed)).tolist()
        n_val = int(round(len(blocks) * self.val_fraction)) if len(blocks) > 1 else 0
        if self.val_fraction > 0 and n_val == 0 and len(blocks) > 1:
            n_val = 1
        val = [blocks[i] for i in order[:n_val]]
        train = [blocks[i] for i in order[n_val:]]
        if self.max_blocks:
            train = train[: self.max_blocks]
        log.info("knowledge base %s: %d texts, %d blocks of <= %d tokens (%d train, %d val)",
                 self.knowledge_base, len(texts), len(blocks), self.block_size, len(train), len(val))
        self.train_set, self.val_set = BlockDataset(train), BlockDataset(val)

    def _collate(self) -> Any:
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        return partial(collate_blocks, pad_id=pad)

    def train_dataloader(self) -> DataLoader:
        return train_loader(self.train_set, self.batch_size, self.seed, self._collate(), self.num_workers,
                            trainer=self.trainer)

    def val_dataloader(self) -> DataLoader | list:
        return eval_loader(self.val_set, self.batch_size, self._collate(), self.num_workers) if len(self.val_set) else []
