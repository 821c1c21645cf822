"""Step 1 of the memory stage: the expert writes a "background" for every question (METHOD.md section 3).

The reference release generates one question at a time and crashes or silently mixes settings on
resume. Here a split is planned once into chunks of records of similar prompt length; each chunk goes
through the project's batched decoding path (`generate_batched`: left padding, KV cache, stop at any
end id) with continuous batching (`batch_size` sequences in flight, a stopped row is replaced at once
by the next prompt) and the shared system-prompt prefix encoded once, and is then appended durably
to a `BackgroundStore`, so a killed run resumes where it stopped and a run with other settings is
refused by the store's schema.

The work is a `BackgroundJob` with `open(rank, world_size) -> chunks`, `run_batch(model, indices)`
and `close()`: the pipeline drives it through Lightning's predict loop (one store file per rank),
`generate_backgrounds` drives it in-process; both run the same code, so they give the same records.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from gag_lightning.data.records import QARecord
from gag_lightning.eval.generation import DecodingConfig, generate_batched
from gag_lightning.memory.bank import BackgroundStore
from gag_lightning.prompts import background_messages, record_instruction, render_prompt

__all__ = [
    "BackgroundConfig",
    "BackgroundJob",
    "JobStats",
    "background_prompt_ids",
    "background_settings",
    "empty_question_indices",
    "generate_backgrounds",
    "pending_batches",
    "plan_batches",
]

log = logging.getLogger(__name__)

#: Called after every batch with the number of batches this job has finished (tests use it to simulate a kill).
BatchHook = Callable[[int], None]


@dataclass(frozen=True)
class BackgroundConfig:
    """Everything that decides what the expert writes (the store refuses to mix two of these)."""

    prompt_style: str = "reference"  # reference: [system prompt, question]; sft: the Stage II user turn
    system_prompt: str = ""
    instruction: str = ""  # used by the sft style when a record carries no instruction of its own
    max_new_tokens: int = 768
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    enable_thinking: bool = False
    seed: int = 0  # sampling only: each batch is seeded from (seed, its first record index)

    @classmethod
    def from_mapping(cls, node: Mapping[str, Any], seed: int = 0) -> BackgroundConfig:
        """Build from the `memory.generation` config node; unknown keys (dtype, ...) are ignored here."""
        names = {f for f in cls.__dataclass_fields__}
        values = {k: node[k] for k in names if k in node and node[k] is not None}
        values.setdefault("seed", seed)
        return cls(**values)


def background_settings(config: BackgroundConfig, expert_fingerprint: str, stop_ids: Sequence[int],
                        **extra: Any) -> dict[str, Any]:
    """The store schema: expert, prompts, length, decoding and stop ids (+ caller extras: split, data, dtype).

    The seed and sampling parameters only enter when sampling, so greedy stores do not depend on them.
    """
    settings: dict[str, Any] = {
        "kind": "gag-backgrounds",
        "expert_fingerprint": expert_fingerprint,
        "prompt_style": config.prompt_style,
        "system_prompt": config.system_prompt if config.prompt_style == "reference" else None,
        "instruction": config.instruction if config.prompt_style == "sft" else None,
        "max_new_tokens": int(config.max_new_tokens),
        "do_sample": bool(config.do_sample),
        "enable_thinking": bool(config.enable_thinking),
        "stop_ids": sorted(int(i) for i in stop_ids),
    }
    if config.do_sample:
        settings.update(temperature=float(config.temperature), top_p=float(config.top_p), seed=int(config.seed))
    settings.update(extra)
    return settings


def background_prompt_ids(tokenizer: Any, records: Sequence[QARecord], config: BackgroundConfig) -> list[list[int]]:
    """Token ids of each record's background prompt (chat template, generation prompt, thinking off)."""
    out = []
    for record in records:
        messages = background_messages(record.question, config.system_prompt,
                                       record_instruction(record, config.instruction), config.prompt_style)
        text = render_prompt(tokenizer, messages, config.enable_thinking)
        out.append(list(tokenizer(text, add_special_tokens=False)["input_ids"]))
    return out


def empty_question_indices(records: Sequence[QARecord]) -> list[int]:
    """Records whose question is blank: they are generated anyway (on the bare prompt) and counted."""
    return [r.index for r in records if not r.question.strip()]


def plan_batches(lengths: Mapping[int, int], batch_size: int, rank: int = 0, world_size: int = 1) -> list[list[int]]:
    """This rank's batches of record indices, grouped by similar length (less padding, fewer wasted steps).

    The records are sorted by (length, index) and dealt round-robin to the ranks, so every rank gets
    a similar mix of lengths and no record is given twice (no padding duplicates, unlike a plain
    DistributedSampler); the plan depends only on the pending set, so a resumed run re-forms the
    same batches for the records still missing.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside world size {world_size}")
    order = sorted(lengths, key=lambda i: (lengths[i], i))
    mine = order[rank::world_size]
    return [mine[k:k + batch_size] for k in range(0, len(mine), batch_size)]


def pending_batches(lengths: Mapping[int, int], done: set[int], batch_size: int, rank: int = 0,
                    world_size: int = 1) -> list[list[int]]:
    """This rank's planned batches (`plan_batches` over *every* record) that still hold a record not in `done`.

    The plan never depends on where an earlier run stopped: a resumed run forms exactly the batches of an
    uninterrupted one, and a batch of which a kill left some records committed is run whole again (same rows,
    padding and shared prefix, hence the same numbers) while only its missing records are written. Planning over
    the pending records alone would re-form the batches whenever a shard boundary fell inside a batch, and float16
    memories would then move by one rounding step.
    """
    return [b for b in plan_batches(lengths, batch_size, rank, world_size) if any(i not in done for i in b)]


@dataclass
class JobStats:
    """What one job did in this process (records and tokens are this rank's, for this run only)."""

    records: int = 0
    tokens: int = 0
    batches: int = 0
    seconds: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out.update(out.pop("extra"))
        out["records_per_s"] = self.records / self.seconds if self.seconds > 0 else 0.0
        out["tokens_per_s"] = self.tokens / self.seconds if self.seconds > 0 else 0.0
        return out


class ProgressBar:
    """A tqdm bar in records with tokens/s in the postfix; shown on rank 0 only."""

    def __init__(self, total: int, desc: str, enabled: bool) -> None:
        self.bar = tqdm(total=total, desc=desc, unit="rec", disable=not enabled or total == 0, dynamic_ncols=True)
        self.start = time.perf_counter()
        self.tokens = 0

    def update(self, records: int, tokens: int) -> None:
        self.tokens += tokens
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        self.bar.set_postfix_str(f"{self.tokens / elapsed:.1f} tok/s", refresh=False)
        self.bar.update(records)

    def close(self) -> None:
        self.bar.close()


def end_job(job: Any) -> JobStats:
    """Closing bookkeeping shared by the jobs: the progress bar closed, the job's wall time; returns its stats."""
    if job._bar is not None:
        job._bar.close()
        job._bar = None
    job.stats.seconds = time.perf_counter() - job._t0 if job._t0 else 0.0
    return job.stats


def account_batch(job: Any, token_counts: Sequence[int]) -> None:
    """Per-batch bookkeeping shared by the background, memory and one-pass jobs: stats, progress bar, batch hook
    for a batch of records that generated `token_counts` tokens each."""
    tokens = sum(token_counts)
    job.stats.records += len(token_counts)
    job.stats.tokens += tokens
    job.stats.batches += 1
    job.stats.seconds = time.perf_counter() - job._t0
    if job._bar is not None:
        job._bar.update(len(token_counts), tokens)
    if job.on_batch is not None:
        job.on_batch(job.stats.batches)


class BackgroundJob:
    """Generate the missing backgrounds of `records` into the store at `folder`, batch by batch."""

    def __init__(self, tokenizer: Any, records: Sequence[QARecord], folder: str | Path, settings: Mapping[str, Any],
                 config: BackgroundConfig, stop_ids: Sequence[int], batch_size: int = 16, progress: bool = True,
                 desc: str = "backgrounds", on_batch: BatchHook | None = None, queue_batches: int = 4) -> None:
        if not stop_ids:
            raise ValueError("stop_ids is empty: the expert would never stop; pass the generation config's eos ids")
        self.tokenizer = tokenizer
        self.records = {r.index: r for r in records}
        if len(self.records) != len(records):
            raise ValueError("records carry duplicate indices")
        self.folder = Path(folder)
        self.settings = dict(settings)
        self.config = config
        self.stop_ids = [int(i) for i in stop_ids]
        self.batch_size = int(batch_size)
        # each job batch ("chunk") holds queue_batches decoding batches: generate_batched keeps batch_size
        # sequences in flight and refills a row as soon as it stops; a chunk is also the append/resume unit
        self.chunk_size = self.batch_size * max(1, int(queue_batches))
        self.progress = progress
        self.desc = desc
        self.on_batch = on_batch
        self.prompts = dict(zip(self.records, background_prompt_ids(tokenizer, records, config), strict=True))
        self.empty_questions = empty_question_indices(records)
        self.store: BackgroundStore | None = None
        self.stats = JobStats()
        self.done_at_open: set[int] = set()  # already generated when this run started (all ranks)
        self._done: set[int] = set()  # every index in the store at open (any rank, in the input file or not)
        self._bar: ProgressBar | None = None
        self._t0 = 0.0

    def open(self, rank: int = 0, world_size: int = 1) -> list[list[int]]:
        """Open (or resume) this rank's store file and return this rank's batches of pending records."""
        self.store = BackgroundStore.open_for_writing(self.folder, self.settings, rank=rank)
        done = self.store.done_indices()
        stray = sorted(done - set(self.records))
        if stray:
            log.warning("%s holds %d record(s) not in the input file (e.g. index %d); they are kept but unused",
                        self.folder, len(stray), stray[0])
        self.done_at_open = done & set(self.records)
        self._done = set(done)
        if rank == 0:
            if self.empty_questions:
                log.warning("[%s] %d record(s) have an empty question (indices %s%s); generating on the bare prompt "
                            "and counting them", self.desc, len(self.empty_questions), self.empty_questions[:10],
                            " ..." if len(self.empty_questions) > 10 else "")
            if done:
                log.info("[%s] resuming: %d of %d records already generated", self.desc,
                         len(done & set(self.records)), len(self.records))
        lengths = {i: len(p) for i, p in self.prompts.items()}
        batches = pending_batches(lengths, self._done, self.chunk_size, rank, world_size)
        pending = sum(1 for b in batches for i in b if i not in self._done)
        self._bar = ProgressBar(pending, f"{self.desc} r{rank}" if world_size > 1 else self.desc,
                                self.progress and rank == 0)
        self._t0 = time.perf_counter()
        return batches

    def _seed(self, indices: Sequence[int]) -> None:
        # a batch's sample depends on its own records only, not on how far the run got before a resume
        torch.manual_seed((int(self.config.seed) * 1_000_003 + int(indices[0])) % (2**63 - 1))

    def run_batch(self, model: Any, indices: Sequence[int]) -> list[dict[str, Any]]:
        if self.store is None:
            raise RuntimeError("call open() before run_batch()")
        indices = [int(i) for i in indices]
        prompts = [self.prompts[i] for i in indices]
        decoding = DecodingConfig(max_new_tokens=self.config.max_new_tokens, do_sample=self.config.do_sample,
                                  temperature=self.config.temperature, top_p=self.config.top_p,
                                  batch_size=self.batch_size)
        if self.config.do_sample:
            self._seed(indices)
        generations = generate_batched(model, self.tokenizer, prompts, decoding, self.stop_ids, share_prefix=True,
                                       continuous=True)
        rows = []
        for index, prompt, gen in zip(indices, prompts, generations, strict=True):
            if index in self._done:  # committed before a resume: the whole planned batch ran, only new rows go in
                continue
            record = self.records[index]
            row = {"index": index, "id": record.id, "question": record.question, "answer": record.answer,
                   "background": gen.text, "token_ids": list(gen.token_ids), "finished": bool(gen.finished),
                   "prompt_ids": prompt}
            if record.answers is not None:  # only when given: stores of records without aliases stay byte-identical
                row["answers"] = list(record.answers)
            rows.append(row)
        self.store.append(rows)
        account_batch(self, [len(r["token_ids"]) for r in rows])
        return rows

    def close(self, flush: bool = True) -> JobStats:
        """Finish the job (every batch was already appended durably, so `flush` has nothing to do here)."""
        stats = end_job(self)
        stats.extra["empty_questions"] = len(self.empty_questions)
        return stats


def run_job(job: Any, model: Any) -> JobStats:
    """Drive a job in this process (one rank); the pipeline uses Lightning's predict loop instead."""
    was_training = getattr(model, "training", False)
    model.eval()
    try:
        for batch in job.open(0, 1):
            job.run_batch(model, batch)
    except BaseException:
        job.close(flush=False)  # like a kill: what was not committed is redone on resume
        raise
    finally:
        model.train(was_training)
    return job.close()


def generate_backgrounds(model: Any, tokenizer: Any, records: Sequence[QARecord], folder: str | Path,
                         settings: Mapping[str, Any], config: BackgroundConfig, stop_ids: Sequence[int],
                         batch_size: int = 16, progress: bool = True,
                         on_batch: BatchHook | None = None, queue_batches: int = 4) -> JobStats:
    """Generate (or finish generating) the backgrounds of `records` into the store at `folder`."""
    job = BackgroundJob(tokenizer, records, folder, settings, config, stop_ids, batch_size, progress,
                        on_batch=on_batch, queue_batches=queue_batches)
    return run_job(job, model)
