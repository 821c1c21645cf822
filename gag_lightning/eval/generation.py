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


def _default_embed(model: Any) -> EmbedFn:
    def embed(ids: torch.Tensor, mask: torch.Tensor, rows: Sequence[int]) -> torch.Tensor:
        return model.get_input_embeddings()(ids)

    return embed


@torch.inference_mode()
def generate_batched(model: Any, tokenizer: Any, prompts: Sequence[Sequence[int]], decoding: DecodingConfig,
                     stop_ids: Sequence[int], embed_fn: EmbedFn | None = None,
                     progress: Callable[[int], None] | None = None) -> list[Generation]:
    """Decode `prompts` (token id lists) in batches sorted by length; results come back in input order.

    `embed_fn(ids, mask, rows)` builds the inputs embeddings of a padded batch (`rows` are the
    indices of the batch's prompts in `prompts`), which is how GAG injects its memory slots.
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
        ids, mask = left_pad([prompts[i] for i in rows], pad_id)
        ids, mask = ids.to(device), mask.to(device)
        embeds = embed_fn(ids, mask, rows)
        out = model.generate(inputs_embeds=embeds, attention_mask=mask, **kwargs)
        out = out[:, -decoding.max_new_tokens:] if out.shape[1] > decoding.max_new_tokens else out
        for row_idx, seq in zip(rows, out.tolist(), strict=True):
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
