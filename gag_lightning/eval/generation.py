"""One batched decoding path for every system (base only, expert context, GAG, routed answers, backgrounds).

The reference release decodes the general route and the GAG route differently (repetition
penalty over prompt tokens in one, only over new tokens in the other) and one query at a time.
Here every system goes through `generate_batched`: left padding, KV cache, prompts always fed as
`inputs_embeds` (so logits processors see only generated tokens, identically for all systems),
and a per-sequence stop at any of the configured end ids.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

EmbedFn = Callable[[torch.Tensor, torch.Tensor, Sequence[int]], torch.Tensor]


@dataclass
class DecodingConfig:
    max_new_tokens: int = 512
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    no_repeat_ngram_size: int = 0
    batch_size: int = 16


@dataclass
class Generation:
    text: str
    token_ids: list[int] = field(default_factory=list)  # generated tokens, stop token excluded
    finished: bool = False  # True if a stop token ended it (False: hit max_new_tokens)


def left_pad(batch: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(x) for x in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for row, seq in enumerate(batch):
        if len(seq):
            ids[row, width - len(seq):] = torch.tensor(list(seq), dtype=torch.long)
            mask[row, width - len(seq):] = 1
    return ids, mask


def shared_prefix_len(batch: Sequence[Sequence[int]]) -> int:
    """Length of the token prefix common to every sequence, leaving each at least one token of its own."""
    if not batch:
        return 0
    limit = min(len(s) for s in batch) - 1
    first = batch[0]
    n = 0
    while n < limit and all(s[n] == first[n] for s in batch):
        n += 1
    return max(n, 0)


def shared_prefix_batch(batch: Sequence[Sequence[int]], shared: int, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[common prefix | left-padded rests]: with shared=0 this is plain left padding.

    The padding sits between the prefix and each row's own tokens; positions come from the attention
    mask (cumsum), so every real token keeps the position it has in its unpadded prompt.
    """
    if shared <= 0:
        return left_pad(batch, pad_id)
    ids, mask = left_pad([s[shared:] for s in batch], pad_id)
    prefix = torch.tensor(list(batch[0][:shared]), dtype=torch.long).expand(len(batch), shared)
    return torch.cat([prefix, ids], dim=1), torch.cat([torch.ones_like(prefix), mask], dim=1)


def _prefix_cache(model: Any, embeds: torch.Tensor, mask: torch.Tensor, shared: int) -> dict[str, Any]:
    """KV cache of the shared prefix, computed on one row and repeated for the batch, as a generate() kwarg."""
    import inspect

    params = inspect.signature(model.forward).parameters
    extra = {"logits_to_keep": 1} if "logits_to_keep" in params else {}
    out = model(inputs_embeds=embeds[:1, :shared], attention_mask=mask[:1, :shared], use_cache=True, **extra)
    cache = out["cache"] if "cache" in out else out["past_key_values"]
    cache.batch_repeat_interleave(embeds.shape[0])
    name = "cache" if "cache" in params else "past_key_values"
    return {name: cache}


def _generate_compacting(model: Any, embeds: torch.Tensor, mask: torch.Tensor, kwargs: dict[str, Any],
                         extra: dict[str, Any], every: int, stop_set: set[int]) -> list[list[int]]:
    """`generate` in rounds of `every` tokens; rows that stopped leave the batch (and its KV cache).

    A continuing row is fed its whole sequence as embeddings with the cache of all but its last
    token, so the next round processes exactly that token at its true position (from the mask):
    the same computation as one uninterrupted `generate`, on fewer rows.
    """
    import inspect

    cache_name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    budget = int(kwargs["max_new_tokens"])
    base = {k: v for k, v in kwargs.items() if k != "max_new_tokens"}
    cache = extra.get(cache_name)
    active = list(range(embeds.shape[0]))
    tokens: list[list[int]] = [[] for _ in active]
    embedding = model.get_input_embeddings()
    while active and budget > 0:
        step = min(every, budget)
        out = model.generate(inputs_embeds=embeds, attention_mask=mask, max_new_tokens=step,
                             return_dict_in_generate=True, **base, **({cache_name: cache} if cache is not None else {}))
        new = out.sequences[:, -step:] if out.sequences.shape[1] > step else out.sequences
        keep = []
        for j, row in enumerate(active):
            seq = new[j].tolist()
            tokens[row].extend(seq)
            if len(seq) == step and not any(t in stop_set for t in seq):
                keep.append(j)
        budget -= step
        if not keep or budget <= 0:
            break
        cache = getattr(out, cache_name, None) or getattr(out, "past_key_values", None)
        index = torch.tensor(keep, device=embeds.device)
        cache.batch_select_indices(index)
        kept_new = new[index]
        embeds = torch.cat([embeds[index], embedding(kept_new).to(embeds.dtype)], dim=1)
        mask = torch.cat([mask[index], torch.ones_like(kept_new, dtype=mask.dtype)], dim=1)
        active = [active[j] for j in keep]
    return tokens


def _default_embed(model: Any) -> EmbedFn:
    def embed(ids: torch.Tensor, mask: torch.Tensor, rows: Sequence[int]) -> torch.Tensor:
        return model.get_input_embeddings()(ids)

    return embed


@torch.inference_mode()
def generate_batched(model: Any, tokenizer: Any, prompts: Sequence[Sequence[int]], decoding: DecodingConfig,
                     stop_ids: Sequence[int], embed_fn: EmbedFn | None = None,
                     progress: Callable[[int], None] | None = None,
                     share_prefix: bool = False, compact_every: int = 0) -> list[Generation]:
    """Decode `prompts` (token id lists) in batches sorted by length; results come back in input order.

    `embed_fn(ids, mask, rows)` builds the inputs embeddings of a padded batch (`rows` are the
    indices of the batch's prompts in `prompts`), which is how GAG injects its memory slots.
    `share_prefix=True` encodes the token prefix common to a batch's prompts once (e.g. a long
    system prompt) and reuses its KV cache for every row: the same tokens up to float rounding,
    with much less prefill compute on a CPU (see `shared_prefix_batch`).
    `compact_every=n` decodes in rounds of n tokens and drops the rows that have stopped between
    rounds (continuing the others from their KV cache), so short answers stop costing compute while
    the longest one of their batch finishes. It needs history-free logits processing, so it is
    ignored when a repetition penalty or n-gram blocking is set.
    """
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stop_ids[0]
    embed_fn = embed_fn or _default_embed(model)
    device = next(model.parameters()).device
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    results: list[Generation | None] = [None] * len(prompts)
    stop_set = set(int(s) for s in stop_ids)
    kwargs: dict[str, Any] = dict(
        max_new_tokens=decoding.max_new_tokens, do_sample=decoding.do_sample, eos_token_id=list(stop_set),
        pad_token_id=pad_id, repetition_penalty=decoding.repetition_penalty,
        no_repeat_ngram_size=decoding.no_repeat_ngram_size, use_cache=True,
    )
    if decoding.do_sample:
        kwargs.update(temperature=decoding.temperature, top_p=decoding.top_p)
    else:
        kwargs.update(temperature=None, top_p=None, top_k=None)
    for start in range(0, len(order), decoding.batch_size):
        rows = order[start: start + decoding.batch_size]
        shared = shared_prefix_len([prompts[i] for i in rows]) if share_prefix and len(rows) > 1 else 0
        ids, mask = shared_prefix_batch([prompts[i] for i in rows], shared, pad_id)
        ids, mask = ids.to(device), mask.to(device)
        embeds = embed_fn(ids, mask, rows)
        extra = _prefix_cache(model, embeds, mask, shared) if shared else {}
        history_free = decoding.repetition_penalty == 1.0 and not decoding.no_repeat_ngram_size
        if compact_every > 0 and history_free and len(rows) > 1:
            seqs = _generate_compacting(model, embeds, mask, kwargs, extra, compact_every, stop_set)
        else:
            out = model.generate(inputs_embeds=embeds, attention_mask=mask, **kwargs, **extra)
            out = out[:, -decoding.max_new_tokens:] if out.shape[1] > decoding.max_new_tokens else out
            seqs = out.tolist()
        for row_idx, seq in zip(rows, seqs, strict=True):
            tokens: list[int] = []
            finished = False
            for t in seq:
                if t in stop_set:
                    finished = True
                    break
                tokens.append(t)
            text = tokenizer.decode(tokens, skip_special_tokens=True).strip()
            results[row_idx] = Generation(text=text, token_ids=tokens, finished=finished)
        if progress is not None:
            progress(len(rows))
    return [r for r in results if r is not None]
