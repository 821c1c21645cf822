"""One batched decoding path for every system (base only, expert context, GAG, routed answers, backgrounds).

The reference release decodes the general route and the GAG route differently (repetition
penalty over prompt tokens in one, only over new tokens in the other) and one query at a time.
Here every system goes through `generate_batched`: left padding, KV cache, prompts always fed as
`inputs_embeds` (so logits processors see only generated tokens, identically for all systems),
and a per-sequence stop at any of the configured end ids.
"""

from __future__ import annotations

import copy
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


def prefix_cache(model: Any, embeds: torch.Tensor, mask: torch.Tensor, shared: int) -> dict[str, Any]:
    """KV cache of the shared prefix, computed on one row and repeated for the batch, as a generate() kwarg."""
    import inspect

    params = inspect.signature(model.forward).parameters
    extra = {"logits_to_keep": 1} if "logits_to_keep" in params else {}
    out = model(inputs_embeds=embeds[:1, :shared], attention_mask=mask[:1, :shared], use_cache=True, **extra)
    cache = out["cache"] if "cache" in out else out["past_key_values"]
    cache.batch_repeat_interleave(embeds.shape[0])
    name = "cache" if "cache" in params else "past_key_values"
    return {name: cache}


def _rows_stopped_class() -> type:
    from transformers import StoppingCriteria

    class RowsStopped(StoppingCriteria):
        """Ends a `generate` round once `needed` rows have emitted a stop id (0: only when all have).

        A stopped row keeps riding along until then: one decoding step costs about the same for 12 or
        16 rows on a CPU (streaming the weights dominates), while every round restart costs a prompt
        prefill for the newcomers, so refilling several rows at once is cheaper than one at a time.
        """

        def __init__(self, stop_ids: torch.Tensor, needed: int) -> None:
            self.stop_ids = stop_ids
            self.needed = needed

        def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **_: Any) -> torch.Tensor:
            if input_ids.shape[1] == 0 or self.needed <= 0:
                return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
            stopped = torch.isin(input_ids, self.stop_ids.to(input_ids.device)).any(dim=1)
            return (stopped.sum() >= self.needed).expand(input_ids.shape[0]).clone()

    return RowsStopped


def _layer_tensors(cache: Any) -> list[Any] | None:
    """The per-layer (keys, values) holders of a plain dynamic cache, or None for any other cache type."""
    layers = getattr(cache, "layers", None)
    if not layers or any(type(layer).__name__ != "DynamicLayer" for layer in layers):
        return None
    return list(layers)


def _pad_cache_left(cache: Any, n: int) -> None:
    if n <= 0:
        return
    for layer in _layer_tensors(cache) or []:
        for name in ("keys", "values"):
            t = getattr(layer, name)
            setattr(layer, name, torch.cat([t.new_zeros((*t.shape[:2], n, t.shape[3])), t], dim=2))


def _pad_left(t: torch.Tensor, n: int) -> torch.Tensor:
    if n <= 0:
        return t
    return torch.cat([t.new_zeros((t.shape[0], n, *t.shape[2:])), t], dim=1)


class _ContinuousBatcher:
    """Continuous batching over Hugging Face `generate`: rounds end when a row stops, rows are refilled.

    Each row's state is its input embeddings [W, H], attention mask [W] and a KV cache of its first
    W - 1 positions; a round feeds the last column. Rows of different widths are aligned by left
    padding (zeros in the cache, 0 in the mask); positions come from the mask, so a row computes
    exactly what it would alone. New rows reuse the KV cache of the common prompt prefix.
    """

    def __init__(self, model: Any, prompts: Sequence[Sequence[int]], order: Sequence[int], width: int,
                 kwargs: dict[str, Any], embed_fn: EmbedFn, stop_set: set[int], pad_id: int, share_prefix: bool,
                 progress: Callable[[int], None] | None) -> None:
        import inspect

        self.model = model
        self.prompts = prompts
        self.queue = list(order)
        self.width = width
        self.max_new = int(kwargs["max_new_tokens"])
        self.kwargs = {k: v for k, v in kwargs.items() if k != "max_new_tokens"}
        self.embed_fn = embed_fn
        self.stop_set = stop_set
        self.pad_id = pad_id
        self.progress = progress
        self.device = next(model.parameters()).device
        self.cache_name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
        self.prefix = shared_prefix_len([prompts[i] for i in order]) if share_prefix else 0
        self.prefix_cache: Any = None
        from transformers import StoppingCriteriaList

        self.rows_stopped = _rows_stopped_class()(torch.tensor(sorted(stop_set)), 0)
        self.criteria = StoppingCriteriaList([self.rows_stopped])
        self.refill = max(1, width // 4)  # rows that must stop before a round ends to take new prompts

    def _forward_cache(self, embeds: torch.Tensor, mask: torch.Tensor, cache: Any = None) -> Any:
        """KV cache after feeding `embeds` (the last columns of `mask`), at positions counted on the mask."""
        kw = {self.cache_name: cache} if cache is not None else {}
        positions = (mask.long().cumsum(-1) - 1).clamp(min=0)[:, -embeds.shape[1]:]
        out = self.model(inputs_embeds=embeds, attention_mask=mask, position_ids=positions, use_cache=True,
                         logits_to_keep=1, **kw)
        return out["cache"] if "cache" in out else out["past_key_values"]

    def supported(self) -> bool:
        """A probe on the first prompt: the model must keep a plain dynamic cache this code can re-align."""
        if any(len(self.prompts[i]) < 2 for i in self.queue):
            return False
        first = self.prompts[self.queue[0]]
        ids = torch.tensor([list(first[:2])], device=self.device)
        probe = self._forward_cache(self.model.get_input_embeddings()(ids), torch.ones_like(ids))
        return _layer_tensors(probe) is not None

    def _admit(self, rows: list[int]) -> tuple[torch.Tensor, torch.Tensor, Any]:
        """Inputs and cache (all but the last position) of new rows: [prefix | padding | own tokens]."""
        p = self.prefix
        ids, mask = shared_prefix_batch([self.prompts[i] for i in rows], p, self.pad_id)
        ids, mask = ids.to(self.device), mask.to(self.device)
        embeds = self.embed_fn(ids, mask, rows)
        cache = None
        if p:
            if self.prefix_cache is None:
                self.prefix_cache = self._forward_cache(embeds[:1, :p], mask[:1, :p])
            cache = copy.deepcopy(self.prefix_cache)
            cache.batch_repeat_interleave(len(rows))
        if embeds.shape[1] - 1 > p:
            cache = self._forward_cache(embeds[:, p:-1], mask[:, :-1], cache)
        return embeds, mask, cache

    def run(self) -> dict[int, list[int]]:
        out_tokens: dict[int, list[int]] = {}
        active: list[int] = []
        embeds = mask = cache = None
        while self.queue or active:
            free = self.width - len(active)
            if free > 0 and self.queue:
                new_rows, self.queue = self.queue[:free], self.queue[free:]
                e_new, m_new, c_new = self._admit(new_rows)
                for r in new_rows:
                    out_tokens[r] = []
                if not active:
                    embeds, mask, cache = e_new, m_new, c_new
                else:
                    target = max(embeds.shape[1], e_new.shape[1])
                    _pad_cache_left(cache, target - embeds.shape[1])
                    _pad_cache_left(c_new, target - e_new.shape[1])
                    embeds = torch.cat([_pad_left(embeds, target - embeds.shape[1]),
                                        _pad_left(e_new, target - e_new.shape[1])])
                    mask = torch.cat([_pad_left(mask, target - mask.shape[1]), _pad_left(m_new, target - m_new.shape[1])])
                    for old, add in zip(_layer_tensors(cache) or [], _layer_tensors(c_new) or [], strict=True):
                        old.keys = torch.cat([old.keys, add.keys])
                        old.values = torch.cat([old.values, add.values])
                active = active + new_rows
            budget = min(self.max_new - len(out_tokens[r]) for r in active)
            kw = {self.cache_name: cache} if cache is not None else {}
            # with nothing left to admit, the round runs until every row has stopped
            self.rows_stopped.needed = min(self.refill, len(active)) if self.queue else 0
            result = self.model.generate(inputs_embeds=embeds, attention_mask=mask, max_new_tokens=budget,
                                         stopping_criteria=self.criteria, return_dict_in_generate=True,
                                         **self.kwargs, **kw)
            new = result.sequences[:, -budget:] if result.sequences.shape[1] > budget else result.sequences
            keep, done = [], []
            for j, r in enumerate(active):
                seq = new[j].tolist()
                out_tokens[r].extend(seq)
                stopped = any(t in self.stop_set for t in seq)
                (done if stopped or len(out_tokens[r]) >= self.max_new else keep).append(j)
            if self.progress is not None and done:
                self.progress(len(done))
            if not keep:
                active, embeds, mask, cache = [], None, None, None
                continue
            cache = result["cache"] if "cache" in result else result["past_key_values"]
            index = torch.tensor(keep, device=self.device)
            if len(keep) < len(active):
                cache.batch_select_indices(index)
            kept = new[index]
            embeds = torch.cat([embeds[index], self.model.get_input_embeddings()(kept).to(embeds.dtype)], dim=1)
            mask = torch.cat([mask[index], torch.ones_like(kept, dtype=mask.dtype)], dim=1)
            active = [active[j] for j in keep]
        return out_tokens


def plan_batches(prompts: Sequence[Sequence[int]], batch_size: int) -> list[list[int]]:
    """The fixed batches `generate_batched` decodes: prompt indices sorted by length (ties in input order), cut
    every `batch_size`. A batch's predictions depend on its members (padding, the shared prefix), so a caller that
    splits the work (the eval stage's predict loop, one planned batch per step on any rank) decodes exactly these
    batches to get the same tokens as one call over all prompts."""
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    size = max(int(batch_size), 1)
    return [order[start: start + size] for start in range(0, len(order), size)]


def _default_embed(model: Any) -> EmbedFn:
    def embed(ids: torch.Tensor, mask: torch.Tensor, rows: Sequence[int]) -> torch.Tensor:
        return model.get_input_embeddings()(ids)

    return embed


def _to_generation(seq: Sequence[int], stop_set: set[int], tokenizer: Any) -> Generation:
    """Cut a decoded row at its first stop token (excluded); `finished` says whether one was reached."""
    tokens: list[int] = []
    for t in seq:
        if t in stop_set:
            return Generation(tokenizer.decode(tokens, skip_special_tokens=True).strip(), tokens, True)
        tokens.append(t)
    return Generation(tokenizer.decode(tokens, skip_special_tokens=True).strip(), tokens, False)


@torch.inference_mode()
def generate_batched(model: Any, tokenizer: Any, prompts: Sequence[Sequence[int]], decoding: DecodingConfig,
                     stop_ids: Sequence[int], embed_fn: EmbedFn | None = None,
                     progress: Callable[[int], None] | None = None,
                     share_prefix: bool = False, continuous: bool = False,
                     suppress_ids: Sequence[int] = ()) -> list[Generation]:
    """Decode `prompts` (token id lists) in batches sorted by length; results come back in input order.

    `embed_fn(ids, mask, rows)` builds the inputs embeddings of a padded batch (`rows` are the
    indices of the batch's prompts in `prompts`), which is how GAG injects its memory slots.
    `share_prefix=True` encodes the token prefix common to a batch's prompts once (e.g. a long
    system prompt) and reuses its KV cache for every row: the same tokens up to float rounding,
    with much less prefill compute on a CPU (see `shared_prefix_batch`).
    `continuous=True` keeps `batch_size` sequences in flight: a row that stops leaves at once and the
    next prompt takes its place (continuing rows keep their KV cache), so a batch no longer runs as
    long as its longest row. It needs history-free logits processing (no repetition penalty, no
    n-gram blocking) and a plain dynamic KV cache, and falls back to fixed batches otherwise.
    `suppress_ids` can never be generated (their logits are -inf at every step): the base's GAG slot
    placeholder token (prompts.Placeholder.suppress_ids).
    """
    from gag_lightning.eval.limits import check_prompts_fit

    check_prompts_fit(model, prompts, decoding.max_new_tokens)  # beyond its positions a model decodes garbage
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
    if suppress_ids:
        kwargs["suppress_tokens"] = sorted(set(int(i) for i in suppress_ids))
    if decoding.do_sample:
        kwargs.update(temperature=decoding.temperature, top_p=decoding.top_p)
    else:
        kwargs.update(temperature=None, top_p=None, top_k=None)
    history_free = decoding.repetition_penalty == 1.0 and not decoding.no_repeat_ngram_size
    if continuous and history_free and len(prompts) > 1 and decoding.batch_size > 1:
        engine = _ContinuousBatcher(model, prompts, order, decoding.batch_size, kwargs, embed_fn, stop_set, pad_id,
                                    share_prefix, progress)
        if engine.supported():
            for row_idx, seq in engine.run().items():
                results[row_idx] = _to_generation(seq, stop_set, tokenizer)
            return [r for r in results if r is not None]
    for rows in plan_batches(prompts, decoding.batch_size):
        shared = shared_prefix_len([prompts[i] for i in rows]) if share_prefix and len(rows) > 1 else 0
        ids, mask = shared_prefix_batch([prompts[i] for i in rows], shared, pad_id)
        ids, mask = ids.to(device), mask.to(device)
        embeds = embed_fn(ids, mask, rows)
        extra = prefix_cache(model, embeds, mask, shared) if shared else {}
        out = model.generate(inputs_embeds=embeds, attention_mask=mask, **kwargs, **extra)
        out = out[:, -decoding.max_new_tokens:] if out.shape[1] > decoding.max_new_tokens else out
        for row_idx, seq in zip(rows, out.tolist(), strict=True):
            results[row_idx] = _to_generation(seq, stop_set, tokenizer)
        if progress is not None:
            progress(len(rows))
    return [r for r in results if r is not None]
