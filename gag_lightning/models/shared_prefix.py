"""Training forward on a batch whose rows start with the same prompt prefix, computed once per batch.

The SFT and LoRA prompts of a domain share their chat-template header, system prompt and instruction: on the
demo about 60% of every sequence. The prefix is run on one row with a KV cache that is repeated for the batch
(`repeat_interleave` keeps the autograd graph, so the trained weights get the prefix's gradient once per row,
as in the plain forward) and the rows' own tokens run on top of it. Same loss up to float rounding, about half
the compute of the demo's SFT and LoRA steps.

`answer_token_logits` goes one step further for the answer-only loss: the output head (a 49k x 576 matrix on
SmolLM2, a fifth of the model) is applied only at the positions whose next token is a trained label, through
transformers' boolean ``logits_to_keep``.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import Tensor

IGNORE_INDEX = -100


def shared_prefix_len(input_ids: Tensor, attention_mask: Tensor, labels: Tensor | None = None) -> int:
    """Leading positions every row shares (same ids, no padding), ending before the first trained label.

    The logit at position t predicts the label at t+1, so the prefix stops one position before the first
    labelled one: every logit a loss reads is computed in the rows' own pass.
    """
    if input_ids.shape[0] < 2:
        return 0
    same = (input_ids == input_ids[:1]).all(dim=0) & (attention_mask == 1).all(dim=0)
    shared = int(torch.cumprod(same.long(), dim=0).sum())
    if labels is not None:
        labelled = (labels != IGNORE_INDEX).any(dim=0).nonzero()
        if len(labelled):
            shared = min(shared, int(labelled[0]) - 1)
    return max(0, min(shared, input_ids.shape[1] - 1))


def _cache_kwargs(model: Any) -> tuple[str, dict[str, Any]]:
    params = inspect.signature(model.forward).parameters
    has_kwargs = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    extra = {"logits_to_keep": 1} if "logits_to_keep" in params or has_kwargs else {}
    return ("cache" if "cache" in params else "past_key_values"), extra


def causal_lm_logits(model: Any, input_ids: Tensor, attention_mask: Tensor, labels: Tensor | None = None,
                     share_prefix: bool = True) -> Tensor:
    """Logits ``[B, T, V]`` of ``model`` on the batch; with a shared prefix, the prefix positions hold zeros
    (no loss reads them: see `shared_prefix_len`)."""
    shared = shared_prefix_len(input_ids, attention_mask, labels) if share_prefix else 0
    if not shared:
        return model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
    cache_name, extra = _cache_kwargs(model)
    prefix = model(input_ids=input_ids[:1, :shared], attention_mask=attention_mask[:1, :shared], use_cache=True,
                   **extra)
    cache = prefix["past_key_values"] if "past_key_values" in prefix else prefix["cache"]
    cache.batch_repeat_interleave(input_ids.shape[0])
    out = model(input_ids=input_ids[:, shared:], attention_mask=attention_mask, use_cache=True,
                **{cache_name: cache})
    logits = out.logits
    pad = logits.new_zeros((logits.shape[0], shared, logits.shape[-1]))
    return torch.cat([pad, logits], dim=1)


def _accepts_logits_to_keep(model: Any) -> bool:
    params = inspect.signature(model.forward).parameters
    return "logits_to_keep" in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


def answer_token_logits(model: Any, input_ids: Tensor, attention_mask: Tensor, labels: Tensor,
                        share_prefix: bool = True) -> tuple[Tensor, Tensor]:
    """Logits ``[N, V]`` at the N positions whose next token is a trained label, and those labels ``[N]``, in the
    order of ``logits[:, :-1][labels[:, 1:] != -100]``: `answer_nll`'s selection, without computing the output
    head anywhere else. Models whose forward takes no ``logits_to_keep`` get the full logits, then selected."""
    keep = torch.zeros_like(labels, dtype=torch.bool)
    keep[:, :-1] = labels[:, 1:] != IGNORE_INDEX
    targets = labels[:, 1:][keep[:, :-1]]
    if not _accepts_logits_to_keep(model):
        return causal_lm_logits(model, input_ids, attention_mask, labels, share_prefix)[keep], targets
    shared = shared_prefix_len(input_ids, attention_mask, labels) if share_prefix else 0
    if not shared:
        out = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, logits_to_keep=keep)
        return out.logits, targets
    cache_name, extra = _cache_kwargs(model)
    prefix = model(input_ids=input_ids[:1, :shared], attention_mask=attention_mask[:1, :shared], use_cache=True,
                   **extra)
    cache = prefix["past_key_values"] if "past_key_values" in prefix else prefix["cache"]
    cache.batch_repeat_interleave(input_ids.shape[0])
    out = model(input_ids=input_ids[:, shared:], attention_mask=attention_mask, use_cache=True,
                logits_to_keep=keep[:, shared:], **{cache_name: cache})
    return out.logits, targets


__all__ = ["answer_token_logits", "causal_lm_logits", "shared_prefix_len"]
