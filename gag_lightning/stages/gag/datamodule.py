"""Stage III data: memory bank records joined with the base model's injection prompt (METHOD.md section 4).

A training example is the base's chat-template rendering of

    user:      instruction \\n request_text \\n Question: q \\n Knowledge: <GAG>*S \\n
    assistant: answer <end-of-turn>

built by ``prompts.build_messages("gag", ...)`` and tokenised by ``prompts.encode_prompt``, exactly as the eval
harness and routed answering build the prompt of the same record (the record's instruction wins over the
domain's; question stripped). ``<GAG>`` stands for the placeholder id (``prompts.choose_placeholder``), never
for a token added to the tokenizer.

with the loss on the answer and its end-of-turn token only, plus the record's memory ``[K, S, H_e]`` and
(optionally) its precomputed semantic target. Memories stay in the bank's storage dtype (fp16) in RAM and
are upcast per batch: the reference kept every raw per-token hidden state in RAM (METHOD.md section 8).
With KL self-distillation on (METHOD.md section 5b) each example also carries its teacher sequence: the
expert_context prompt (background as text on the Knowledge line) and the same answer tokens (stages/gag/distill.py).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from gag_lightning.data.loaders import eval_loader, train_loader
from gag_lightning.errors import GAGError, SchemaMismatchError
from gag_lightning.memory.bank import MemoryBank, MemorySchema
from gag_lightning.models.adapter import GAG_TOKEN, AdapterConfig, InjectionError
from gag_lightning.models.losses import IGNORE_INDEX
from gag_lightning.prompts import (
    DEFAULT_REQUEST_TEXT,
    Messages,
    PromptSettings,
    build_messages,
    choose_placeholder,
    render_completion,
    stop_token_ids,
)
from gag_lightning.stages.gag.distill import teacher_batch, with_teacher

log = logging.getLogger(__name__)

VAL_SOURCES = ("split", "test", "none")


@dataclass(frozen=True)
class GAGExample:
    input_ids: list[int]
    num_prompt: int  # labels start here
    num_answer: int  # answer-text tokens after the prompt (the end-of-turn excluded): the semantic pooling span
    row: int  # row of the record in the split's memory tensor
    teacher: GAGExample | None = None  # KL teacher sequence (same answer tokens); None: off, or it did not fit

    @property
    def num_completion(self) -> int:
        """Answer (+ end-of-turn) tokens kept after the prompt."""
        return len(self.input_ids) - self.num_prompt


def encode_turn(
    messages: Messages,
    answer: str,
    tokenizer: Any,
    max_length: int = 2048,
    enable_thinking: bool = False,
    stop_ids: Sequence[int] | None = None,
    row: int = 0,
    placeholder_id: int | None = None,
) -> GAGExample | None:
    """Tokenise one user turn + assistant answer; None if the prompt alone does not fit ``max_length`` (it is
    never cut: cutting it could drop ``<GAG>`` placeholders). A long answer is cut from the right."""
    stops = list(stop_ids) if stop_ids is not None else stop_token_ids(tokenizer)
    prompt, completion = render_completion(tokenizer, messages, answer, enable_thinking, stops, placeholder_id)
    if len(prompt) >= max_length:
        return None
    n_answer = len(completion)
    while n_answer > 0 and completion[n_answer - 1] in stops:
        n_answer -= 1
    ids = (prompt + completion)[:max_length]
    n_completion = len(ids) - len(prompt)
    return GAGExample(ids, len(prompt), min(n_answer, n_completion), row)


def encode_gag(
    record: Mapping[str, Any],
    tokenizer: Any,
    settings: PromptSettings,
    num_slots: int,
    placeholder_id: int,
    max_length: int = 2048,
    enable_thinking: bool = False,
    stop_ids: Sequence[int] | None = None,
    row: int = 0,
) -> GAGExample | None:
    """The injection prompt of one record (``question``, ``answer``, optional ``instruction``) + its answer."""
    return encode_turn(build_messages("gag", record, settings, num_slots=num_slots), str(record["answer"]),
                       tokenizer, max_length, enable_thinking, stop_ids, row, placeholder_id)


class GAGDataset(Dataset):
    """Examples of one split with their memories (storage dtype) and semantic targets."""

    def __init__(self, examples: list[GAGExample], memories: Tensor, targets: Tensor | None,
                 indices: list[int]) -> None:
        self.examples = examples
        self.memories = memories
        self.targets = targets
        self.indices = indices  # the bank's record index per memory row

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> dict[str, Any]:
        ex = self.examples[i]
        item = {"example": ex, "memory": self.memories[ex.row], "index": self.indices[ex.row]}
        if self.targets is not None:
            item["semantic_target"] = self.targets[ex.row]
        return item


class GAGCollator:
    """Right padding; every mask comes from lengths, never from comparing ids with the pad id.

    ``teacher=True`` adds the KL teacher batch: ``teacher_input_ids`` / ``teacher_attention_mask`` and two
    masks, ``kl_mask`` (student) and ``teacher_kl_mask``, marking the positions whose logits predict the
    common answer tokens (end-of-turn included), the same number per row in both. A record whose teacher
    prompt did not fit gets a one-token dummy teacher row and no KL positions.
    """

    def __init__(self, pad_id: int, teacher: bool = False) -> None:
        self.pad_id = int(pad_id)
        self.teacher = teacher

    def __call__(self, items: list[dict[str, Any]]) -> dict[str, Tensor]:
        width = max(len(it["example"].input_ids) for it in items)
        b = len(items)
        input_ids = torch.full((b, width), self.pad_id, dtype=torch.long)
        attention = torch.zeros((b, width), dtype=torch.long)
        labels = torch.full((b, width), IGNORE_INDEX, dtype=torch.long)
        answer_mask = torch.zeros((b, width), dtype=torch.bool)
        for row, it in enumerate(items):
            ex: GAGExample = it["example"]
            n = len(ex.input_ids)
            ids = torch.tensor(ex.input_ids, dtype=torch.long)
            input_ids[row, :n] = ids
            attention[row, :n] = 1
            labels[row, ex.num_prompt : n] = ids[ex.num_prompt :]
            answer_mask[row, ex.num_prompt : ex.num_prompt + ex.num_answer] = True
        batch = {
            "input_ids": input_ids,
            "attention_mask": attention,
            "labels": labels,
            "answer_mask": answer_mask,
            "memory": torch.stack([it["memory"] for it in items]).to(torch.float32),
            "index": torch.tensor([it["index"] for it in items], dtype=torch.long),
        }
        if "semantic_target" in items[0]:
            batch["semantic_target"] = torch.stack([it["semantic_target"] for it in items]).float()
        if self.teacher:
            batch.update(teacher_batch([it["example"] for it in items], width, self.pad_id))
        return batch


def check_bank_against_adapter(bank: MemoryBank, config: AdapterConfig) -> None:
    """Refuse memories an adapter was not built for (S, H_e, layer keys), naming both sides."""
    schema = bank.schema
    diffs = []
    if schema.slots != config.slots:
        diffs.append(f"slots: bank {schema.slots}, adapter {config.slots}")
    if schema.hidden_size != config.expert_hidden:
        diffs.append(f"hidden size H_e: bank {schema.hidden_size}, adapter {config.expert_hidden}")
    if len(schema.layer_keys) != config.layers or (config.layer_keys and list(schema.layer_keys)
                                                   != list(config.layer_keys)):
        diffs.append(f"layer keys: bank {schema.layer_keys}, adapter {config.layer_keys} (K={config.layers})")
    if diffs:
        raise SchemaMismatchError(
            f"memory bank at {bank.folder} does not fit the adapter: " + "; ".join(diffs)
            + ". Rebuild the memory with matching memory.compression settings or train a new adapter."
        )


def split_positions(n: int, val_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """(train, validation) positions of a seeded hold-out of ``n`` records, each sorted.

    One function so that a baseline trained on "the records Stage III trained on" (the LoRA stage) holds
    out exactly the records the adapter was validated on.
    """
    if val_fraction <= 0 or n < 2:
        return list(range(n)), []
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    n_val = min(n - 1, max(1, int(round(n * val_fraction))))
    return sorted(order[n_val:]), sorted(order[:n_val])


class GAGDataModule(L.LightningDataModule):
    """Train on a memory bank; validate on a seeded split of it (``split``), on another bank (``test``),
    or not at all (``none``).

    ``expect`` is checked against the bank schema on open (e.g. ``{"slots": 4, "layer_keys": [...]}``);
    ``check_adapter`` compares with an adapter config. Semantic targets are computed once in ``setup``
    with the frozen ``semantic_encoder`` (None when the semantic loss is off). ``teacher_context=True`` (KL
    self-distillation on) also encodes each record's teacher sequence from its bank ``background``; off, the
    batches are exactly what they were without it.
    """

    def __init__(
        self,
        train_bank: str | Path,
        tokenizer: Any,
        instruction: str = "",
        request_text: str = DEFAULT_REQUEST_TEXT,
        val_bank: str | Path | None = None,
        val_source: str = "split",
        val_fraction: float = 0.05,
        max_length: int = 2048,
        batch_size: int = 1,
        eval_batch_size: int = 8,
        num_workers: int = 0,
        seed: int = 42,
        max_train_records: int | None = None,
        max_val_records: int | None = None,
        enable_thinking: bool = False,
        semantic_encoder: Any = None,
        expect: Mapping[str, Any] | None = None,
        teacher_context: bool = False,
        placeholder_id: int | None = None,
    ) -> None:
        super().__init__()
        if val_source not in VAL_SOURCES:
            raise ValueError(f"val_source must be one of {VAL_SOURCES}, got {val_source!r}")
        if val_source == "test" and val_bank is None:
            raise GAGError("val_source=test needs val_bank (the test split's memory bank)")
        self.train_bank_path = Path(train_bank)
        self.val_bank_path = Path(val_bank) if val_bank is not None else None
        self.tokenizer = tokenizer
        self.instruction = instruction
        self.request_text = request_text
        self.settings = PromptSettings(instruction, request_text)
        # the slots' id in the prompt ids: the base's placeholder (load_base), by default this tokenizer's choice
        self.placeholder_id = int(placeholder_id if placeholder_id is not None else choose_placeholder(tokenizer).id)
        self.val_source = val_source
        self.val_fraction = val_fraction
        self.max_length = max_length
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size
        self.num_workers = num_workers
        self.seed = seed
        self.max_train_records = max_train_records
        self.max_val_records = max_val_records
        self.enable_thinking = enable_thinking
        self.semantic_encoder = semantic_encoder
        self.expect = dict(expect or {})
        self.teacher_context = teacher_context
        self.bank: MemoryBank | None = None
        self.sets: dict[str, GAGDataset] = {}
        self.positions: dict[str, list[int]] = {}  # bank rows per split: the recon warm-up reuses "train"
        self.skipped: dict[str, int] = {}
        self.no_teacher: dict[str, int] = {}

    # ------------------------------------------------------------------ setup
    def open_bank(self) -> MemoryBank:
        """The training bank (opened once, schema checked against ``expect``)."""
        if self.bank is None:
            self.bank = MemoryBank.open(self.train_bank_path, expect=self.expect or None)
        return self.bank

    @property
    def schema(self) -> MemorySchema:
        return self.open_bank().schema

    def check_adapter(self, config: AdapterConfig) -> None:
        check_bank_against_adapter(self.open_bank(), config)

    def _build(self, split: str, bank: MemoryBank, positions: list[int]) -> GAGDataset:
        metas = bank.metas()
        all_memories = bank.memories(dtype=None)
        indices = bank.indices()
        stops = stop_token_ids(self.tokenizer)
        gag_id = self.placeholder_id
        slots = bank.schema.slots
        examples: list[GAGExample] = []
        skipped = no_teacher = 0
        for row, pos in enumerate(positions):
            meta = metas[pos]
            ex = encode_gag(meta, self.tokenizer, self.settings, slots, gag_id, self.max_length,
                            self.enable_thinking, stops, row=row)
            if ex is None:
                skipped += 1
                continue
            if self.teacher_context:
                messages = build_messages("context", meta, self.settings, knowledge=str(meta.get("background") or ""))
                teacher = encode_turn(messages, meta["answer"], self.tokenizer, self.max_length,
                                      self.enable_thinking, stops, row=row)
                no_teacher += teacher is None
                ex = with_teacher(ex, teacher, str(meta.get("id", pos)))
            found = sum(1 for t in ex.input_ids[: ex.num_prompt] if t == gag_id)
            if found != slots:
                raise InjectionError(
                    f"{split} record {meta.get('id', pos)}: the rendered prompt holds {found} {GAG_TOKEN} "
                    f"tokens for {slots} memory slots (does the chat template alter the user text?)"
                )
            examples.append(ex)
        if skipped:
            log.warning("%s: %d record(s) skipped: prompt longer than max_length=%d", split, skipped,
                        self.max_length)
        self.skipped[split] = skipped
        if no_teacher:
            log.warning("%s: %d record(s) without KL teacher (expert_context prompt longer than max_length=%d)",
                        split, no_teacher, self.max_length)
        self.no_teacher[split] = no_teacher
        sel = torch.tensor(positions, dtype=torch.long)
        memories = all_memories[sel] if positions else all_memories[:0]
        targets = None
        if self.semantic_encoder is not None:
            targets = self.semantic_encoder.encode([str(metas[p]["answer"]) for p in positions])
        return GAGDataset(examples, memories, targets, [indices[p] for p in positions])

    def setup(self, stage: str | None = None) -> None:
        if self.sets:
            return
        train_bank = self.open_bank()
        if len(train_bank) == 0:
            raise GAGError(f"memory bank at {self.train_bank_path} is empty; rebuild it with the memory stage")
        n = len(train_bank)
        train_pos = list(range(n))
        val_bank, val_pos = None, []
        if self.val_source == "split" and self.val_fraction > 0 and n > 1:
            train_pos, val_pos = split_positions(n, self.val_fraction, self.seed)
            val_bank = train_bank
        elif self.val_source == "test":
            val_bank = MemoryBank.open(self.val_bank_path)
            diffs = val_bank.schema.diff(train_bank.schema)
            diffs = [d for d in diffs if d[0] != "background_fingerprint"]
            if diffs:
                raise SchemaMismatchError(
                    f"validation bank {self.val_bank_path} was built with other settings than the training "
                    f"bank: {diffs}"
                )
            val_pos = list(range(len(val_bank)))
        if self.max_train_records:
            train_pos = train_pos[: self.max_train_records]
        if self.max_val_records:
            val_pos = val_pos[: self.max_val_records]
        self.sets["train"] = self._build("train", train_bank, train_pos)
        self.positions["train"] = train_pos
        if val_bank is not None and val_pos:
            self.sets["val"] = self._build("val", val_bank, val_pos)
            self.positions["val"] = val_pos
        if not len(self.sets["train"]):
            raise GAGError(f"no trainable record in {self.train_bank_path} (all longer than max_length)")
        log.info("GAG data: %s", {k: len(v) for k, v in self.sets.items()})

    # ------------------------------------------------------------------ loaders
    def _loader(self, split: str, shuffle: bool, batch_size: int) -> DataLoader:
        pad = self.tokenizer.pad_token_id
        if pad is None:
            pad = self.tokenizer.eos_token_id
        collate = GAGCollator(pad, teacher=self.teacher_context)
        if shuffle:
            return train_loader(self.sets[split], batch_size, self.seed, collate, self.num_workers, trainer=self.trainer)
        return eval_loader(self.sets[split], batch_size, collate, self.num_workers)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", True, self.batch_size)

    def val_dataloader(self) -> DataLoader | list:
        return self._loader("val", False, self.eval_batch_size) if self.sets.get("val") else []


__all__ = [
    "GAGCollator",
    "GAGDataModule",
    "GAGDataset",
    "GAGExample",
    "check_bank_against_adapter",
    "encode_gag",
    "encode_turn",
    "split_positions",
]
