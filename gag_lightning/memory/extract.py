"""Step 2 of the memory stage: teacher-forced hidden states of the backgrounds, compressed into a bank.

The reference release records every layer's state at every decoding step and pickles them. The same
numbers come out of one batched forward pass over prompt + generated tokens: under causal attention
the state at the position where generated token j is the input is what incremental decoding saw
when it fed token j back. Sequences are right-padded with an attention mask built from their lengths
(never by comparing ids with the pad id), only the positions of the generated tokens (stop token
excluded) enter the compression, and only the configured layers are kept.

`MemoryJob` has the same `open / run_batch / close` shape as `BackgroundJob`: memories are buffered
and written as safetensors shards of `shard_size` records, the resume unit of a `MemoryBank`.
"""

from __future__ import annotations

import inspect
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from gag_lightning.eval.generation import shared_prefix_len
from gag_lightning.memory.background import (
    BatchHook,
    JobStats,
    ProgressBar,
    account_batch,
    end_job,
    pending_batches,
    run_job,
)
from gag_lightning.memory.bank import MemoryBank, MemorySchema, ShardBuffer
from gag_lightning.memory.compression import build_memories, layer_indices

__all__ = [
    "CompressionConfig",
    "MemoryJob",
    "build_memory_bank",
    "extract_memories",
    "memory_metadata",
    "teacher_forced_states",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CompressionConfig:
    layer_keys: tuple[str, ...] = ("last", "minus2", "minus4", "minus6")
    slots: int = 4
    pooling: str = "segment_softmax"
    temperature: float = 1.0
    dtype: str = "float16"  # storage dtype of the bank

    def __post_init__(self) -> None:
        object.__setattr__(self, "layer_keys", tuple(self.layer_keys))
        layer_indices(self.layer_keys)

    @classmethod
    def from_mapping(cls, node: Mapping[str, Any]) -> CompressionConfig:
        """Build from the `memory.compression` config node; other keys are ignored."""
        names = set(cls.__dataclass_fields__)
        return cls(**{k: (list(node[k]) if k == "layer_keys" else node[k]) for k in names if k in node})


def _backbone(model: Any) -> Any:
    """The transformer without its LM head: hidden states only, no [B, T, vocab] logits tensor."""
    base = getattr(model, "base_model", None)
    return base if base is not None else model


def _device(model: Any) -> torch.device:
    return next(model.parameters()).device


def teacher_forced_states(model: Any, sequences: Sequence[Sequence[int]], layer_keys: Sequence[str],
                          prefix_len: int = 0) -> list[Tensor]:
    """Hidden states [B, T - prefix_len, H] of the configured layers (config order) for right-padded `sequences`.

    Indices follow Hugging Face `output_hidden_states` (-1 = after the final norm). Padded positions
    come after every real token, so with causal attention they cannot change a real position.
    `prefix_len` > 0 (tokens every sequence starts with, e.g. the system prompt) runs that prefix once,
    repeats its KV cache over the batch and returns the states of the positions after it only.
    """
    if not sequences:
        raise ValueError("no sequences to run")
    if any(len(s) <= prefix_len for s in sequences):
        raise ValueError(f"every sequence needs a token after the shared prefix of {prefix_len}")
    if prefix_len and any(list(s[:prefix_len]) != list(sequences[0][:prefix_len]) for s in sequences):
        raise ValueError(f"the sequences do not share their first {prefix_len} tokens")
    picks = layer_indices(layer_keys)
    width = max(len(s) for s in sequences) - prefix_len
    ids = torch.zeros((len(sequences), width), dtype=torch.long)
    mask = torch.zeros((len(sequences), prefix_len + width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        ids[row, : len(seq) - prefix_len] = torch.tensor(list(seq[prefix_len:]), dtype=torch.long)
        mask[row, : len(seq)] = 1
    device = _device(model)
    backbone = _backbone(model)
    kwargs: dict[str, Any] = {}
    with torch.inference_mode():
        if prefix_len:
            prefix = torch.tensor([list(sequences[0][:prefix_len])], dtype=torch.long, device=device)
            first = backbone(input_ids=prefix, use_cache=True, return_dict=True)
            cache = first["cache"] if "cache" in first else first["past_key_values"]
            cache.batch_repeat_interleave(len(sequences))
            name = "cache" if "cache" in inspect.signature(backbone.forward).parameters else "past_key_values"
            kwargs = {name: cache, "use_cache": True}
        else:
            kwargs = {"use_cache": False}
        out = backbone(input_ids=ids.to(device), attention_mask=mask.to(device), output_hidden_states=True,
                       return_dict=True, **kwargs)
        hidden = out.hidden_states
        if hidden is None:
            raise TypeError(f"{type(model).__name__} returned no hidden_states for output_hidden_states=True")
        depth = len(hidden) - 1  # hidden[0] is the embedding output
        too_deep = [k for k, i in zip(layer_keys, picks, strict=True) if -i > depth]
        if too_deep:
            raise ValueError(f"layer key(s) {too_deep} reach below the first of the expert's {depth} layers")
        states = [hidden[i] for i in picks]
        del out, hidden, kwargs
    return states


def extract_memories(model: Any, prompt_ids: Sequence[Sequence[int]], generated_ids: Sequence[Sequence[int]],
                     config: CompressionConfig, share_prefix: bool = True) -> Tensor:
    """Memories [B, K, S, H] (float32, on the model's device) of records given as prompt + generated tokens.

    `generated_ids` exclude the stop token; record b uses positions len(prompt_b) .. len(prompt_b) +
    L_b - 1, the positions whose input is a generated token. L_b = 0 gives one zero vector (METHOD.md).
    With `share_prefix`, the prompt prefix common to the batch is encoded once (same numbers up to
    float rounding, far less compute when every prompt starts with the same system prompt).
    """
    if len(prompt_ids) != len(generated_ids):
        raise ValueError(f"{len(prompt_ids)} prompts for {len(generated_ids)} generations")
    sequences = [list(p) + list(g) for p, g in zip(prompt_ids, generated_ids, strict=True)]
    shared = 0
    if share_prefix and len(sequences) > 1:
        shared = min(shared_prefix_len(sequences), min(len(p) for p in prompt_ids))
    spans = [(len(p) - shared, len(p) + len(g) - shared) for p, g in zip(prompt_ids, generated_ids, strict=True)]
    states = teacher_forced_states(model, sequences, config.layer_keys, prefix_len=shared)
    return build_memories(states, spans, config.slots, config.pooling, config.temperature)


def memory_metadata(background: Mapping[str, Any]) -> dict[str, Any]:
    """The JSON metadata of one bank record (everything a later stage needs besides the tensor).

    The gold fact aliases (`answers`, for fact_acc) are copied only when the record has them, so a bank of
    records without aliases is byte for byte what it was before they existed.
    """
    meta = {"index": int(background["index"]), "id": background["id"], "question": background["question"],
            "answer": background["answer"], "background": background["background"],
            "num_generated_tokens": len(background["token_ids"]), "finished": bool(background["finished"])}
    if background.get("answers") is not None:
        meta["answers"] = list(background["answers"])
    return meta


class MemoryJob:
    """Extract and bank the memories of `backgrounds` (store records) missing from the bank at `folder`."""

    def __init__(self, backgrounds: Sequence[Mapping[str, Any]], folder: str | Path, schema: MemorySchema,
                 config: CompressionConfig, batch_size: int = 16, shard_size: int = 256, progress: bool = True,
                 desc: str = "memories", on_batch: BatchHook | None = None) -> None:
        if shard_size < 1:
            raise ValueError(f"shard_size must be >= 1, got {shard_size}")
        missing = [b["index"] for b in backgrounds if "prompt_ids" not in b]
        if missing:
            raise ValueError(f"background record(s) {missing[:5]} carry no prompt_ids; regenerate the backgrounds")
        self.backgrounds = {int(b["index"]): b for b in backgrounds}
        self.folder = Path(folder)
        self.schema = schema
        self.config = config
        self.batch_size = int(batch_size)
        self.shard_size = int(shard_size)
        self.progress = progress
        self.desc = desc
        self.on_batch = on_batch
        self.bank: MemoryBank | None = None
        self.stats = JobStats()
        self.done_at_open: set[int] = set()  # already banked when this run started (all ranks)
        self._done: set[int] = set()  # every index in the bank at open (any rank)
        self._pending: ShardBuffer | None = None
        self._bar: ProgressBar | None = None
        self._t0 = 0.0

    def open(self, rank: int = 0, world_size: int = 1) -> list[list[int]]:
        self.bank = MemoryBank.open_for_writing(self.folder, self.schema, rank=rank)
        self._pending = ShardBuffer(self.bank, self.shard_size)
        done = self.bank.done_indices()
        self.done_at_open = done & set(self.backgrounds)
        self._done = set(done)
        lengths = {i: len(b["prompt_ids"]) + len(b["token_ids"]) for i, b in self.backgrounds.items()}
        if rank == 0 and done:
            log.info("[%s] resuming: %d of %d memories already banked", self.desc,
                     len(done & set(self.backgrounds)), len(self.backgrounds))
        # batches planned over every record, so a resumed bank is bit-identical whatever shard_size and batch_size
        batches = pending_batches(lengths, self._done, self.batch_size, rank, world_size)
        pending = sum(1 for b in batches for i in b if i not in self._done)
        self._bar = ProgressBar(pending, f"{self.desc} r{rank}" if world_size > 1 else self.desc,
                                self.progress and rank == 0)
        self._t0 = time.perf_counter()
        return batches

    def run_batch(self, model: Any, indices: Sequence[int]) -> Tensor:
        if self._pending is None:
            raise RuntimeError("call open() before run_batch()")
        rows = [self.backgrounds[int(i)] for i in indices]
        memories = extract_memories(model, [r["prompt_ids"] for r in rows], [r["token_ids"] for r in rows],
                                    self.config).cpu()
        # the whole planned batch ran (same numbers as without a kill); records banked before a resume are not rewritten
        keep = [k for k, r in enumerate(rows) if int(r["index"]) not in self._done]
        if len(keep) < len(rows):
            rows, memories = [rows[k] for k in keep], memories[keep]
        self._pending.add([memory_metadata(r) for r in rows], memories)
        account_batch(self, [len(r["token_ids"]) for r in rows])
        return memories

    def close(self, flush: bool = True) -> JobStats:
        """Write the last partial shard (skipped when closing after an error: a resume redoes those records)."""
        if flush and self._pending is not None:
            self._pending.flush()
        self._pending = None
        return end_job(self)


def build_memory_bank(model: Any, backgrounds: Sequence[Mapping[str, Any]], folder: str | Path,
                      schema: MemorySchema, config: CompressionConfig, batch_size: int = 16,
                      shard_size: int = 256, progress: bool = True, on_batch: BatchHook | None = None) -> JobStats:
    """Extract (or finish extracting) the memories of `backgrounds` into the bank at `folder`."""
    job = MemoryJob(backgrounds, folder, schema, config, batch_size, shard_size, progress, on_batch=on_batch)
    return run_job(job, model)
