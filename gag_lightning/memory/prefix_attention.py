"""Attention over a prompt prefix that every row shares, kept once instead of once per row.

Every background prompt starts with the same system prompt (42 of SmolLM2's 62 prompt tokens on the demo). Copied
into each row's KV cache it is most of what a decoding step reads (a memory-bound read on a CPU, about 40% of the
cache at batch 64) and most of the cache's memory. Here the rows' caches hold only their own columns and each
attention layer also reads the prefix's keys and values, once for the whole batch:

    out = (e^{l_p} out_p + e^{l_r} out_r) / (e^{l_p} + e^{l_r})

where out_p, l_p are the attention output and log-sum-exp of every query of every row over the prefix (no mask:
every token follows the whole prefix) and out_r, l_r those over the row's own columns (Hugging Face's mask:
padding and causality). That is softmax attention over [prefix | row] split in two blocks, as flash attention
splits any key sequence; the result equals one SDPA call over the concatenated keys up to float rounding.

`shared_prefix(model, layers)` switches the model to this attention for a `with` block; `layers` are the prefix's
(keys, values) per layer, [1, kv_heads, P, head_dim]. Outside the block and for a model without a prefix
it is Hugging Face's SDPA attention.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask
from transformers.modeling_utils import AttentionInterface

__all__ = ["IMPLEMENTATION", "prefix_attention_forward", "shared_prefix"]

#: the name under which the attention function is registered with transformers
IMPLEMENTATION = "gag_shared_prefix"


@dataclass
class _SharedPrefix:
    """The active prefix (keys, values per layer) and the last mask seen with what was made of it: HF hands every
    layer of a forward the same mask, converted once."""

    layers: Sequence[tuple[Tensor, Tensor]]
    mask_seen: Tensor | None = None
    made: tuple[Tensor | None, Tensor | None] = (None, None)


_PREFIX: contextvars.ContextVar[_SharedPrefix | None] = contextvars.ContextVar("gag_shared_prefix", default=None)

_flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu


def prefix_attention_forward(module: Any, query: Tensor, key: Tensor, value: Tensor, attention_mask: Tensor | None,
                             dropout: float = 0.0, scaling: float | None = None, **kwargs: Any
                             ) -> tuple[Tensor, None]:
    """SDPA over [shared prefix | this row's columns] (see the module docstring); [B, T, heads, d] as HF's SDPA."""
    prefix = _PREFIX.get()
    if prefix is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    if query.device.type != "cpu" or dropout:
        raise NotImplementedError("shared-prefix attention runs on the CPU's flash kernel, without dropout")
    prefix_keys, prefix_values = prefix.layers[module.layer_idx]
    b, heads, t, d = query.shape
    kv_heads = key.shape[1]
    group = heads // kv_heads
    # every query of every row against the prefix: one call, the rows stacked on the query axis per KV head
    stacked = query.reshape(b, kv_heads, group * t, d).transpose(0, 1).reshape(1, kv_heads, b * group * t, d)
    out_p, lse_p = _flash(stacked, prefix_keys, prefix_values, scale=scaling)
    out_p = out_p.reshape(kv_heads, b, group * t, d).transpose(0, 1).reshape(b, heads, t, d)
    lse_p = lse_p.reshape(kv_heads, b, group * t).transpose(0, 1).reshape(b, heads, t)
    mask, fully_masked = _row_mask(prefix, attention_mask, t, key.shape[2], query)
    if t == 1 and group > 1:  # a decoding step: the group's queries side by side, no copy of the keys
        out_r, lse_r = _flash(query.reshape(b, kv_heads, group, d), key, value, attn_mask=mask, scale=scaling)
        out_r, lse_r = out_r.reshape(b, heads, 1, d), lse_r.reshape(b, heads, 1)
    else:
        out_r, lse_r = _flash(query, repeat_kv(key, group), repeat_kv(value, group), attn_mask=mask, scale=scaling)
    if fully_masked is not None:  # a query whose own columns are all masked (left padding) takes the prefix alone
        lse_r = lse_r.masked_fill(fully_masked, float("-inf"))
    total = torch.logaddexp(lse_p, lse_r)
    w_p, w_r = torch.exp(lse_p - total)[..., None], torch.exp(lse_r - total)[..., None]
    out = out_p * w_p + out_r * w_r
    return out.transpose(1, 2).contiguous(), None


def _row_mask(state: _SharedPrefix, attention_mask: Tensor | None, t: int, width: int,
              query: Tensor) -> tuple[Tensor | None, Tensor | None]:
    """The additive mask of a row's own columns and which queries see none of them (each None when unmasked)."""
    if attention_mask is not None and state.mask_seen is attention_mask:
        return state.made
    allowed = attention_mask
    if allowed is None and t > 1:  # HF left out an all-ones mask: causal, aligned on the last column
        allowed = torch.ones(t, width, dtype=torch.bool, device=query.device).tril(width - t)[None, None]
    if allowed is None:
        return None, None
    if allowed.dtype != torch.bool:
        allowed = allowed > torch.finfo(allowed.dtype).min / 2
    mask = torch.zeros(allowed.shape, dtype=query.dtype, device=query.device).masked_fill_(~allowed, float("-inf"))
    fully_masked = ~allowed.any(dim=-1)
    if attention_mask is not None:
        state.mask_seen, state.made = attention_mask, (mask, fully_masked)
    return mask, fully_masked


AttentionInterface.register(IMPLEMENTATION, prefix_attention_forward)
ALL_MASK_ATTENTION_FUNCTIONS.register(IMPLEMENTATION, sdpa_mask)


@contextlib.contextmanager
def shared_prefix(model: Any, layers: Sequence[tuple[Tensor, Tensor]]) -> Iterator[None]:
    """Within the block, `model`'s attention layers also attend to `layers` (the shared prefix's keys and values)."""
    before = model.config._attn_implementation
    model.set_attn_implementation(IMPLEMENTATION)
    token = _PREFIX.set(_SharedPrefix(list(layers)))
    try:
        yield
    finally:
        _PREFIX.reset(token)
        model.set_attn_implementation(before)
