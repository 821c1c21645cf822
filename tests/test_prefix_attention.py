"""Attention over [shared prefix | own columns] in two blocks equals one SDPA call over the concatenated keys."""

from __future__ import annotations

import types

import pytest
import torch

from gag_lightning.memory import prefix_attention as pa

B, HEADS, KV_HEADS, D, P = 3, 6, 2, 16, 5


def run(query, keys, values, mask, prefix):
    module = types.SimpleNamespace(layer_idx=0, num_key_value_groups=HEADS // KV_HEADS, is_causal=True)
    token = pa._PREFIX.set(pa._SharedPrefix([prefix]))
    try:
        return pa.prefix_attention_forward(module, query, keys, values, mask, scaling=0.25)[0]
    finally:
        pa._PREFIX.reset(token)


def reference(query, keys, values, mask, prefix):
    b, t = query.shape[0], query.shape[2]
    pk, pv = prefix
    k = torch.cat([pk.expand(b, -1, -1, -1), keys], 2).repeat_interleave(HEADS // KV_HEADS, 1)
    v = torch.cat([pv.expand(b, -1, -1, -1), values], 2).repeat_interleave(HEADS // KV_HEADS, 1)
    full = torch.cat([torch.ones(b, 1, t, pk.shape[2], dtype=torch.bool), mask], 3)
    return torch.nn.functional.scaled_dot_product_attention(query, k, v, attn_mask=full, scale=0.25).transpose(1, 2)


@pytest.mark.parametrize(("steps", "width"), [(1, 7), (4, 4), (3, 6)])
def test_two_blocks_equal_one_call(steps, width) -> None:
    g = torch.Generator().manual_seed(steps)
    query = torch.randn(B, HEADS, steps, D, generator=g)
    keys, values = torch.randn(B, KV_HEADS, width, D, generator=g), torch.randn(B, KV_HEADS, width, D, generator=g)
    prefix = (torch.randn(1, KV_HEADS, P, D, generator=g), torch.randn(1, KV_HEADS, P, D, generator=g))
    mask = torch.ones(B, 1, steps, width, dtype=torch.bool)
    mask[1, :, :, :2] = False  # left padding: with causality, row 1's first query sees none of its own columns
    mask &= torch.ones(steps, width, dtype=torch.bool).tril(width - steps)
    got = run(query, keys, values, mask, prefix)
    assert got.shape == (B, steps, HEADS, D)
    torch.testing.assert_close(got, reference(query, keys, values, mask, prefix), atol=1e-6, rtol=1e-5)
    if steps > 1:  # HF leaves out a mask with nothing but causality: the same result
        full = torch.ones(steps, width, dtype=torch.bool).tril(width - steps).expand(B, 1, -1, -1)
        torch.testing.assert_close(run(query, keys, values, None, prefix),
                                   reference(query, keys, values, full, prefix), atol=1e-6, rtol=1e-5)


def test_without_a_prefix_it_is_hugging_face_sdpa() -> None:
    g = torch.Generator().manual_seed(0)
    query = torch.randn(B, HEADS, 1, D, generator=g)
    keys = torch.randn(B, KV_HEADS, 4, D, generator=g)
    module = types.SimpleNamespace(layer_idx=0, num_key_value_groups=HEADS // KV_HEADS, is_causal=True)
    got = pa.prefix_attention_forward(module, query, keys, keys, None, scaling=0.25)[0]
    want = torch.nn.functional.scaled_dot_product_attention(
        query, keys.repeat_interleave(3, 1), keys.repeat_interleave(3, 1), scale=0.25).transpose(1, 2)
    torch.testing.assert_close(got, want)
