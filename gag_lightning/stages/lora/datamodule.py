"""LoRA baseline data: the train QA rendered with the *base* model's plain prompt (no knowledge line).

The prompt is the one the eval ``lora`` (and ``base``) system answers with,

    user:      instruction \\n "Please answer the following question." \\n Question: q \\n
    assistant: answer <end-of-turn>

so the LoRA is trained on exactly what it is asked at evaluation; the loss covers the answer and its
end-of-turn token, with labels and masks set by position (``collate_sft``), never by the pad id.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from functools import partial
from typing import Any

import lightning as L
from torch.utils.data import DataLoader

from gag_lightning.data.loaders import train_loader
from gag_lightning.data.records import QARecord
from gag_lightning.errors import GAGError
from gag_lightning.prompts import (
    GENERAL_REQUEST_TEXT,
    PromptSettings,
    build_messages,
    render_completion,
    stop_token_ids,
)
from gag_lightning.stages.expert.qa import SFTDataset, SFTExample, collate_sft

log = logging.getLogger(__name__)


def encode_plain(record: QARecord, tokenizer: Any, instruction: str = "", request_text: str = GENERAL_REQUEST_TEXT,
                 max_length: int = 2048, enable_thinking: bool = False,
                 stop_ids: Sequence[int] | None = None) -> SFTExample | None:
    """Tokenise one record with the base-only prompt; None if the prompt alone does not fit ``max_length``.

    The prompt is ``prompts.build_messages("plain", ...)``, the eval ``lora`` / ``base`` systems' (the record's own
    instruction wins over ``instruction``, the domain's).
    """
    messages = build_messages("plain", record, PromptSettings(instruction=instruction, base_request_text=request_text))
    prompt, completion = render_completion(tokenizer, messages, record.answer, enable_thinking, stop_ids)
    if len(prompt) >= max_length:
        return None
    return SFTExample((prompt + completion)[:max_length], len(prompt))


class LoRADataModule(L.LightningDataModule):
    """Training batches only: the records are chosen by the runner (Stage III's own training records)."""

    def __init__(self, records: Sequence[QARecord], tokenizer: Any, instruction: str = "",
                 request_text: str = GENERAL_REQUEST_TEXT, max_length: int = 2048, batch_size: int = 1,
                 num_workers: int = 0, enable_thinking: bool = False, seed: int = 0) -> None:
        super().__init__()
        self.records = list(records)
        self.seed = seed  # the training order is a function of (seed, epoch)
        self.tokenizer = tokenizer
        self.instruction = instruction
        self.request_text = request_text
        self.max_length = max_length
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.enable_thinking = enable_thinking
        self.train_set: SFTDataset | None = None
        self.skipped = 0

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        stops = stop_token_ids(self.tokenizer)
        examples = [encode_plain(r, self.tokenizer, self.instruction, self.request_text, self.max_length,
                                 self.enable_thinking, stops) for r in self.records]
        kept = [ex for ex in examples if ex is not None]
        self.skipped = len(examples) - len(kept)
        if self.skipped:
            log.warning("LoRA data: %d record(s) skipped: prompt longer than max_length=%d", self.skipped,
                        self.max_length)
        if not kept:
            raise GAGError("no trainable LoRA record (none given, or every prompt is longer than max_length)")
        self.train_set = SFTDataset(kept)
        log.info("LoRA data: %d training records", len(kept))

    def train_dataloader(self) -> DataLoader:
        pad = self.tokenizer.pad_token_id
        if pad is None:
            pad = self.tokenizer.eos_token_id
        return train_loader(self.train_set, self.batch_size, self.seed, partial(collate_sft, pad_id=pad),
                            self.num_workers, trainer=self.trainer)


__all__ = ["LoRADataModule", "encode_plain"]
