"""A KV cache for the streaming decoder that a decoding step writes in place.

Hugging Face's `DynamicLayer` appends a step's keys and values with `torch.cat`, a copy of the whole cache per layer
per step (about 10 ms of a 130 ms step at batch 64 on a CPU, and twice the cache's memory for a moment). Here each
layer's keys and values are views `[:, :, start:end]` of slabs with spare columns: a step writes its column in
place, rows leaving move the last rows into their places (`fill_order`, `keep_rows`), cache columns no row uses any
more only move the view, and the slab is reallocated only when it is full (with `spare` more columns) or when new
rows join.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from transformers.cache_utils import Cache, DynamicLayer

__all__ = ["SlabCache", "SlabLayer", "fill_order", "moved_rows", "slab_layers"]


class SlabLayer(DynamicLayer):
    """One layer's keys and values as views of slabs [B, heads, capacity, head_dim] (see the module docstring)."""

    spare = 16  # columns added when a slab is (re)allocated for growth

    def __init__(self) -> None:
        super().__init__()
        self.key_slab: Tensor | None = None
        self.value_slab: Tensor | None = None
        self.start = self.end = 0

    def _view(self) -> None:
        assert self.key_slab is not None and self.value_slab is not None
        self.keys = self.key_slab[:, :, self.start:self.end]
        self.values = self.value_slab[:, :, self.start:self.end]

    def _reallocate(self, keys: Tensor, values: Tensor, capacity: int) -> None:
        """New slabs holding `keys` and `values` (the live columns) at their start, `capacity` columns wide."""
        b, h, n, d = keys.shape
        self.key_slab = keys.new_empty((b, h, capacity, d))
        self.value_slab = values.new_empty((b, values.shape[1], capacity, values.shape[3]))
        self.key_slab[:, :, :n] = keys
        self.value_slab[:, :, :n] = values
        self.start, self.end = 0, n
        self._view()

    def update(self, key_states: Tensor, value_states: Tensor, *args: Any, **kwargs: Any) -> tuple[Tensor, Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        n = key_states.shape[-2]
        if self.key_slab is None:
            self._reallocate(key_states, value_states, n + self.spare)
            return self.keys, self.values
        if self.end + n > self.key_slab.shape[2]:
            self._reallocate(self.keys, self.values, self.end - self.start + n + self.spare)
        self.key_slab[:, :, self.end:self.end + n] = key_states
        self.value_slab[:, :, self.end:self.end + n] = value_states
        self.end += n
        self._view()
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.end - self.start

    def trim_left(self, columns: int) -> None:
        """Drop the first `columns` columns (no row attends to them any more)."""
        self.start = min(self.end, self.start + int(columns))
        if self.key_slab is not None:
            self._view()

    def batch_select_indices(self, indices: Tensor) -> None:
        if self.key_slab is not None:
            self.key_slab, self.value_slab = self.key_slab[indices], self.value_slab[indices]
            self._view()

    def keep_rows(self, order: Tensor, moved: Tensor | None = None) -> None:
        """Keep rows `order` (from `fill_order`: row i stays where it is or takes a row from beyond the kept count),
        moving only the rows that change place (`moved`, their positions: `moved_rows(order)`, given once for all
        layers by `SlabCache.keep_rows`)."""
        if self.key_slab is None:
            return
        moved = moved_rows(order) if moved is None else moved
        if len(moved):
            self.key_slab[moved] = self.key_slab[order[moved]]
            self.value_slab[moved] = self.value_slab[order[moved]]
        self.key_slab, self.value_slab = self.key_slab[:len(order)], self.value_slab[:len(order)]
        self._view()

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.key_slab is not None:
            self.key_slab = self.key_slab.repeat_interleave(repeats, dim=0)
            self.value_slab = self.value_slab.repeat_interleave(repeats, dim=0)
            self._view()

    def append_rows(self, other: SlabLayer, width: int) -> None:
        """Stack `other`'s rows under these, both left-padded with zeros to `width` columns (spare kept)."""
        mine, theirs = (self.keys, self.values), (other.keys, other.values)
        stacked = [torch.cat([_pad_left(a, width), _pad_left(b, width)]) for a, b in zip(mine, theirs, strict=True)]
        self._reallocate(stacked[0], stacked[1], width + self.spare)


class SlabCache(Cache):
    """A cache of `SlabLayer`s, one added per layer on its first update (full attention only)."""

    def __init__(self) -> None:
        super().__init__(layer_class_to_replicate=SlabLayer)

    def keep_rows(self, order: Tensor) -> None:
        """`SlabLayer.keep_rows` on every layer (which rows move is worked out once)."""
        moved = moved_rows(order)
        for layer in slab_layers(self):
            layer.keep_rows(order, moved)

    def trim_left(self, columns: int) -> None:
        """`SlabLayer.trim_left` on every layer."""
        for layer in slab_layers(self):
            layer.trim_left(columns)

    def append_rows(self, other: SlabCache, width: int) -> None:
        """`SlabLayer.append_rows` layer by layer: `other`'s rows under these, left-padded to `width` columns."""
        for mine, theirs in zip(slab_layers(self), slab_layers(other), strict=True):
            mine.append_rows(theirs, width)


def slab_layers(cache: Any) -> list[SlabLayer]:
    """The layers of a `SlabCache` (refusing any other cache: the decoder moves their views itself)."""
    layers = getattr(cache, "layers", None)
    if not isinstance(cache, SlabCache) or not layers or any(not isinstance(la, SlabLayer) for la in layers):
        raise TypeError(f"the streaming decoder needs its own SlabCache, got {type(cache).__name__}")
    return list(layers)


def fill_order(alive: Tensor) -> Tensor:
    """The rows to keep, as `SlabLayer.keep_rows` wants them: each kept row in place, except the last kept rows,
    which move into the places of dropped rows before them (the batch's order changes, only those rows are copied)."""
    kept = alive.nonzero().flatten()
    n = len(kept)
    order = torch.arange(n, device=alive.device)
    holes = (~alive[:n]).nonzero().flatten()
    order[holes] = kept[kept >= n]
    return order


def moved_rows(order: Tensor) -> Tensor:
    """The positions of `order` (from `fill_order`) that take another row."""
    return (order != torch.arange(len(order), device=order.device)).nonzero().flatten()


def _pad_left(t: Tensor, width: int) -> Tensor:
    """[B, heads, W, d] -> [B, heads, width, d] with zeros on the left."""
    n = width - t.shape[2]
    return t if n <= 0 else torch.cat([t.new_zeros((*t.shape[:2], n, t.shape[3])), t], dim=2)
