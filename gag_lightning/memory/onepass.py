"""`memory.extract=during_generation`: backgrounds and memories out of one decoding pass.

With `teacher_forced` (memory/extract.py) the expert decodes every background, then runs a second forward pass
over prompt + background to read the configured layers: about a third of the stage's time on a CPU. Here the
`StreamingDecoder` captures those layers' states at the generated positions while decoding; each finished row is
compressed at once, its background appended to the `BackgroundStore` and its memory queued for the `MemoryBank`
(`shard_size` records per shard). Under causal attention the captured states are those the teacher-forced pass
reads (tests/test_memory_onepass.py: memories within 1e-4 in float32, identical backgrounds), so both stores hold
what the two-pass build would; `teacher_forced` stays the way to rebuild memories from stored backgrounds with
another S, pooling or layer set.

Resume: the background is appended before its memory is banked, so after a kill the store may be ahead of the
bank. Every record missing from the bank is decoded again (greedy decoding gives the same tokens; a record whose
new tokens differ from its stored background is refused rather than banked against another text) and only what
is missing is written. Rows are batched with whatever else is in flight, so a resumed run's memories equal an
uninterrupted run's up to float rounding (the two-pass build, planned over every record, is bit-identical).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from torch import Tensor

from gag_lightning.data.records import QARecord
from gag_lightning.errors import GAGError
from gag_lightning.memory.background import (
    BackgroundConfig,
    BatchHook,
    JobStats,
    ProgressBar,
    account_batch,
    background_prompt_ids,
    empty_question_indices,
    end_job,
    plan_batches,
)
from gag_lightning.memory.bank import BackgroundStore, MemoryBank, MemorySchema, ShardBuffer
from gag_lightning.memory.compression import build_memories, layer_indices
from gag_lightning.memory.decode import Finished, StreamingDecoder
from gag_lightning.memory.extract import CompressionConfig, memory_metadata

__all__ = ["EXTRACT_MODES", "OnePassJob", "build_in_one_pass"]

log = logging.getLogger(__name__)

#: `memory.extract`: read the layers while decoding (one pass), or in a second pass over the stored backgrounds.
EXTRACT_MODES: tuple[str, ...] = ("during_generation", "teacher_forced")


class OnePassJob:
    """Generate the backgrounds and bank the memories of `records` missing from the bank at `mem_folder`.

    Same `open / run_batch / close` shape as the two-pass jobs; `open` returns one "batch" holding every pending
    record of this rank, which `run_batch` streams through the decoder (rows are written as they finish).
    """

    def __init__(self, tokenizer: Any, records: Sequence[QARecord], bg_folder: str | Path,
                 settings: Mapping[str, Any], config: BackgroundConfig, stop_ids: Sequence[int],
                 mem_folder: str | Path, schema: MemorySchema | None, compression: CompressionConfig,
                 batch_size: int = 64, shard_size: int = 256, progress: bool = True, desc: str = "memories",
                 on_batch: BatchHook | None = None) -> None:
        if config.do_sample:
            raise GAGError("memory.extract=during_generation decodes greedily; with memory.generation.do_sample="
                           "true use memory.extract=teacher_forced")
        if shard_size < 1:
            raise ValueError(f"shard_size must be >= 1, got {shard_size}")
        self.tokenizer = tokenizer
        self.records = {r.index: r for r in records}
        if len(self.records) != len(records):
            raise ValueError("records carry duplicate indices")
        self.bg_folder, self.mem_folder = Path(bg_folder), Path(mem_folder)
        self.settings = dict(settings)
        self.config = config
        self.stop_ids = [int(i) for i in stop_ids]
        if not self.stop_ids:
            raise ValueError("stop_ids is empty: the expert would never stop; pass the generation config's eos ids")
        self.schema = schema  # None: filled in by `with_schema` once the store's fingerprint is known
        self.compression = compression
        self.batch_size, self.shard_size = int(batch_size), int(shard_size)
        self.progress, self.desc, self.on_batch = progress, desc, on_batch
        self.prompts = dict(zip(self.records, background_prompt_ids(tokenizer, records, config), strict=True))
        self.empty_questions = empty_question_indices(records)
        self.store: BackgroundStore | None = None
        self.bank: MemoryBank | None = None
        self.stats = JobStats()
        self.bg_done_at_open: set[int] = set()
        self.done_at_open: set[int] = set()  # banked when this run started (all ranks)
        self._stored: dict[int, list[int]] = {}  # token ids of records in the store but not in the bank
        self._pending: ShardBuffer | None = None
        self._bar: ProgressBar | None = None
        self._t0 = 0.0
        self.decoder: StreamingDecoder | None = None

    def open(self, rank: int = 0, world_size: int = 1) -> list[list[int]]:
        """Open (or resume) this rank's store file and bank; one batch of this rank's pending records (or none)."""
        self.store = BackgroundStore.open_for_writing(self.bg_folder, self.settings, rank=rank)
        schema = self.schema
        if schema is None or not schema.background_fingerprint:
            raise ValueError("OnePassJob needs a MemorySchema whose background_fingerprint is the store's")
        if schema.background_fingerprint != self.store.fingerprint:
            raise GAGError(f"the memory schema names backgrounds {schema.background_fingerprint[:12]}, the store at "
                           f"{self.bg_folder} is {self.store.fingerprint[:12]}")
        self.bank = MemoryBank.open_for_writing(self.mem_folder, schema, rank=rank)
        self._pending = ShardBuffer(self.bank, self.shard_size)
        stored, banked = self.store.done_indices(), self.bank.done_indices()
        wanted = set(self.records)
        self.bg_done_at_open, self.done_at_open = stored & wanted, banked & wanted
        behind = (stored - banked) & wanted
        if behind:  # a kill between the store append and the bank shard: decoded again, checked against the store
            self._stored = {r["index"]: r["token_ids"] for r in self.store.read_all() if r["index"] in behind}
        if rank == 0:
            if self.empty_questions:
                log.warning("[%s] %d record(s) have an empty question (indices %s%s); generating on the bare prompt "
                            "and counting them", self.desc, len(self.empty_questions), self.empty_questions[:10],
                            " ..." if len(self.empty_questions) > 10 else "")
            if banked & wanted:
                log.info("[%s] resuming: %d of %d memories already banked", self.desc, len(banked & wanted),
                         len(wanted))
        lengths = {i: len(p) for i, p in self.prompts.items()}
        order = [i for batch in plan_batches(lengths, 1, rank, world_size) for i in batch if i not in banked]
        self._bar = ProgressBar(len(order), f"{self.desc} r{rank}" if world_size > 1 else self.desc,
                                self.progress and rank == 0)
        self._t0 = time.perf_counter()
        return [order] if order else []

    def run_batch(self, model: Any, indices: Sequence[int]) -> None:
        """Decode `indices` (this rank's pending records) in one stream, writing rows as they finish."""
        if self.store is None or self.bank is None:
            raise RuntimeError("call open() before run_batch()")
        pad = self.tokenizer.pad_token_id
        self.decoder = StreamingDecoder(
            model, {int(i): self.prompts[int(i)] for i in indices}, self.stop_ids, self.config.max_new_tokens,
            self.batch_size, capture=layer_indices(self.compression.layer_keys),
            pad_id=pad if pad is not None else self.stop_ids[0])
        self._check_depth(model)
        self.decoder.run(indices, self._finish)

    def _check_depth(self, model: Any) -> None:
        depth = getattr(getattr(model, "config", None), "num_hidden_layers", None)
        if depth is None:
            return
        too_deep = [k for k in self.compression.layer_keys if -layer_indices([k])[0] > int(depth)]
        if too_deep:
            raise ValueError(f"layer key(s) {too_deep} reach below the first of the expert's {depth} layers")

    def _finish(self, ended: list[Finished], states: list[Tensor] | None) -> None:
        assert self.store is not None and states is not None
        spans = [(0, len(e.token_ids)) for e in ended]
        memories = build_memories(states, spans, self.compression.slots, self.compression.pooling,
                                  self.compression.temperature).cpu()
        rows = []
        for e in ended:
            record = self.records[e.index]
            row = {"index": e.index, "id": record.id, "question": record.question, "answer": record.answer,
                   "background": self.tokenizer.decode(e.token_ids, skip_special_tokens=True).strip(),
                   "token_ids": e.token_ids, "finished": e.finished, "prompt_ids": self.prompts[e.index]}
            if record.answers is not None:  # as BackgroundJob: rows of records without aliases stay as they were
                row["answers"] = list(record.answers)
            before = self._stored.get(e.index)
            if before is not None and before != e.token_ids:
                raise GAGError(f"record {e.index}: decoding again gave other tokens than its stored background in "
                               f"{self.bg_folder}; finish this split with memory.extract=teacher_forced")
            rows.append(row)
        self.store.append([r for r in rows if r["index"] not in self._stored])  # the store first, then the bank
        self._pending.add([memory_metadata(r) for r in rows], memories)
        account_batch(self, [len(e.token_ids) for e in ended])

    def close(self, flush: bool = True) -> JobStats:
        """Bank the last partial shard (not after an error: a resume decodes those records again)."""
        if flush and self._pending is not None:
            self._pending.flush()
        self._pending = None
        end_job(self)
        self.stats.extra["empty_questions"] = len(self.empty_questions)
        if self.decoder is not None:
            self.stats.extra["decoding_steps"] = self.decoder.steps
        return self.stats


def build_in_one_pass(model: Any, tokenizer: Any, records: Sequence[QARecord], bg_folder: str | Path,
                      settings: Mapping[str, Any], config: BackgroundConfig, stop_ids: Sequence[int],
                      mem_folder: str | Path, schema: MemorySchema, compression: CompressionConfig,
                      batch_size: int = 64, shard_size: int = 256, progress: bool = True,
                      on_batch: BatchHook | None = None) -> JobStats:
    """Generate the backgrounds and bank the memories of `records` (or finish doing so) in this process."""
    from gag_lightning.memory.background import run_job

    job = OnePassJob(tokenizer, records, bg_folder, settings, config, stop_ids, mem_folder, schema, compression,
                     batch_size, shard_size, progress, on_batch=on_batch)
    return run_job(job, model)
