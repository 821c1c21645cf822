"""The streaming decoder's KV cache holds what Hugging Face's dynamic cache would, written in place."""

from __future__ import annotations

import pytest
import torch
from transformers.cache_utils import DynamicLayer

from gag_lightning.memory.slab_cache import SlabCache, SlabLayer, fill_order, slab_layers


def states(b: int, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, 2, n, 4, generator=g), torch.randn(b, 2, n, 4, generator=g)


def test_updates_equal_the_dynamic_layer_across_slab_growth() -> None:
    slab, plain = SlabLayer(), DynamicLayer()
    for step, n in enumerate([5] + [1] * (SlabLayer.spare + 10) + [3]):  # grows past the first slab
        k, v = states(3, n, step)
        got, want = slab.update(k, v), plain.update(k, v)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
        assert slab.get_seq_length() == plain.get_seq_length()
    assert slab.key_slab.shape[2] > slab.get_seq_length()  # spare columns: the next step writes in place
    before = slab.key_slab
    slab.update(*states(3, 1, 99))
    assert slab.key_slab is before


def test_trim_select_repeat_and_append_rows() -> None:
    layer = SlabLayer()
    k, v = states(4, 6, 0)
    layer.update(k, v)
    layer.trim_left(2)
    assert torch.equal(layer.keys, k[:, :, 2:]) and layer.get_seq_length() == 4
    layer.batch_select_indices(torch.tensor([3, 1]))
    assert torch.equal(layer.values, v[[3, 1], :, 2:])
    k2, v2 = states(1, 7, 1)
    other = SlabLayer()
    other.update(k2, v2)
    layer.append_rows(other, 7)  # these rows are 4 columns wide: left-padded with zeros to 7
    assert layer.keys.shape == (3, 2, 7, 4)
    assert torch.equal(layer.keys[:2, :, 3:], k[[3, 1], :, 2:]) and not layer.keys[:2, :, :3].any()
    assert torch.equal(layer.values[2], v2[0])
    layer.update(*states(3, 1, 2))  # room to write in place after the merge
    assert layer.get_seq_length() == 8
    rep = SlabLayer()
    rep.update(k[:1], v[:1])
    rep.batch_repeat_interleave(3)
    assert torch.equal(rep.keys, k[:1].expand(3, -1, -1, -1))


def test_slab_layers_refuses_other_caches() -> None:
    cache = SlabCache()
    cache.update(*states(1, 2, 0), layer_idx=0)
    assert len(slab_layers(cache)) == 1
    from transformers.cache_utils import DynamicCache

    plain = DynamicCache()
    plain.update(*states(1, 2, 0), layer_idx=0)
    with pytest.raises(TypeError, match="SlabCache"):
        slab_layers(plain)


def test_keep_rows_moves_only_the_last_rows_into_the_holes() -> None:
    alive = torch.tensor([True, False, True, False, True, True])
    order = fill_order(alive)
    assert order.tolist() == [0, 4, 2, 5]  # rows 4 and 5 fill the holes at 1 and 3
    layer = SlabLayer()
    k, v = states(6, 3, 0)
    layer.update(k, v)
    layer.keep_rows(order)
    assert torch.equal(layer.keys, k[order]) and torch.equal(layer.values, v[order])
    layer.update(*states(4, 1, 1))  # the kept rows go on in place
    assert layer.keys.shape[0] == 4 and layer.get_seq_length() == 4
    assert fill_order(torch.tensor([False, False])).tolist() == []
