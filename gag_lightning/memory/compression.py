"""Slot compression of expert hidden states into a fixed-size latent memory (METHOD.md section 3).

A background of L generated tokens gives, per read layer, a sequence [L, H_e]; the base model only
has room for S `<GAG>` slots, so each layer's sequence is pooled to [S, H_e], the K layers are stacked
to [K, S, H_e] and the result is stabilised so that a degenerate generation cannot inject NaN or huge
values into the frozen base. The arithmetic follows the reference release exactly (float32 boundaries,
half-to-even rounding, single-token fallback for empty segments) so memories compare number for number.

Two implementations live here on purpose: `compress_sequence` / `build_memory` work on one record and
read like the specification; `build_memories` builds the same numbers for a padded batch with one
masked matmul per layer, which is what the extraction stage calls after a batched forward pass.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "LAYER_KEYS",
    "POOLINGS",
    "build_memories",
    "build_memory",
    "compress_sequence",
    "layer_indices",
    "segment_bounds",
    "stabilise",
]

#: Layer key -> index into Hugging Face `output_hidden_states` (-1 = output of the final norm).
LAYER_KEYS: dict[str, int] = {"last": -1, "minus2": -2, "minus4": -4, "minus6": -6, "minus8": -8}

#: Supported pooling names; the first is the paper's default.
POOLINGS: tuple[str, ...] = ("segment_softmax", "adaptive_avg")

_LN_EPS = 1e-6
_CLAMP = 10.0


def layer_indices(keys: Sequence[str]) -> list[int]:
    """Map config layer keys to hidden-state indices, failing early on a typo rather than mid-extraction."""
    if isinstance(keys, str):
        keys = [keys]
    keys = list(keys)
    if not keys:
        raise ValueError("layer_keys is empty; choose at least one of " + ", ".join(LAYER_KEYS))
    unknown = [k for k in keys if k not in LAYER_KEYS]
    if unknown:
        raise ValueError(
            f"unknown layer key(s) {unknown}; valid keys are {', '.join(LAYER_KEYS)} "
            "(Hugging Face hidden_states[-1], [-2], [-4], [-6], [-8])"
        )
    if len(set(keys)) != len(keys):
        raise ValueError(f"layer_keys {keys} contains duplicates; each layer can be read once")
    return [LAYER_KEYS[k] for k in keys]


def _check_args(slots: int, pooling: str, temperature: float) -> None:
    if not isinstance(slots, int) or slots < 1:
        raise ValueError(f"slots must be a positive integer, got {slots!r}")
    if pooling not in POOLINGS:
        raise ValueError(f"unknown pooling {pooling!r}; choose one of {', '.join(POOLINGS)}")
    if not (temperature > 0 and math.isfinite(temperature)):
        raise ValueError(f"temperature must be a positive finite number, got {temperature!r}")


def segment_bounds(length: int, slots: int) -> list[int]:
    """Segment boundaries round(linspace(0, L, S+1)) in float32 with torch.round (half to even).

    Computed with torch itself rather than Python's round so that float32 representation error and
    tie-breaking match the reference exactly (L=2, S=4 -> [0, 0, 1, 2, 2]).
    """
    if length < 0:
        raise ValueError(f"length must be >= 0, got {length}")
    if slots < 1:
        raise ValueError(f"slots must be >= 1, got {slots}")
    grid = torch.linspace(0, length, slots + 1, dtype=torch.float32)
    return [int(v) for v in torch.round(grid).to(torch.int64).tolist()]


def _segment_ranges(length: int, slots: int) -> list[tuple[int, int]]:
    """Half-open token ranges per slot, with the spec's single-token fallback for empty segments."""
    bounds = segment_bounds(length, slots)
    ranges = []
    for s in range(slots):
        lo, hi = bounds[s], bounds[s + 1]
        if hi <= lo:
            lo = min(length - 1, max(0, lo))
            hi = lo + 1
        ranges.append((lo, hi))
    return ranges


def _adaptive_ranges(length: int, slots: int) -> list[tuple[int, int]]:
    """Bins of adaptive average pooling: [floor(s*L/S), ceil((s+1)*L/S)), overlapping when L < S."""
    return [((s * length) // slots, -((-(s + 1) * length) // slots)) for s in range(slots)]


def compress_sequence(
    states: Tensor, slots: int, pooling: str = "segment_softmax", temperature: float = 1.0
) -> Tensor:
    """Pool one layer's per-token states [L, H] into [S, H] float32.

    An empty generation (L == 0) becomes one zero vector, as the specification says, so every record
    still yields a memory of the agreed shape.
    """
    _check_args(slots, pooling, temperature)
    if states.dim() != 2:
        raise ValueError(f"states must be [L, H], got shape {tuple(states.shape)}")
    x = states.detach().to(torch.float32)
    if x.shape[0] == 0:
        x = x.new_zeros((1, x.shape[1]))
    if slots == 1:
        return x.mean(dim=0, keepdim=True)
    if pooling == "adaptive_avg":
        return F.adaptive_avg_pool1d(x.t().unsqueeze(0), slots).squeeze(0).t().contiguous()
    logits = torch.linalg.vector_norm(x, dim=-1) / temperature
    out = x.new_empty((slots, x.shape[1]))
    for s, (lo, hi) in enumerate(_segment_ranges(x.shape[0], slots)):
        weights = torch.softmax(logits[lo:hi], dim=0)
        out[s] = weights @ x[lo:hi]
    return out


def stabilise(memory: Tensor) -> Tensor:
    """NaN/inf -> 0, layer-norm over H (no affine, eps 1e-6), clamp to [-10, 10].

    Keeps every memory on a common scale whatever the expert's activation magnitudes, and makes a
    diverging generation harmless instead of poisoning the base model's forward pass.
    """
    x = torch.nan_to_num(memory.to(torch.float32), nan=0.0, posinf=0.0, neginf=0.0)
    x = F.layer_norm(x, (x.shape[-1],), eps=_LN_EPS)
    return x.clamp(-_CLAMP, _CLAMP)


def build_memory(
    layer_states: Sequence[Tensor],
    slots: int,
    pooling: str = "segment_softmax",
    temperature: float = 1.0,
) -> Tensor:
    """One record's memory [K, S, H] from its K layers' per-token states [L, H] (K in config order)."""
    if len(layer_states) == 0:
        raise ValueError("layer_states is empty; at least one layer is needed")
    hidden = {t.shape[-1] for t in layer_states}
    if len(hidden) != 1:
        raise ValueError(f"all layers must share the hidden size, got {sorted(hidden)}")
    stacked = torch.stack([compress_sequence(t, slots, pooling, temperature) for t in layer_states])
    return stabilise(stacked)


def _range_masks(
    spans: Sequence[tuple[int, int]], total: int, slots: int, pooling: str
) -> tuple[Tensor, Tensor]:
    """Per (record, slot) membership mask [B, S, T] and the mask of positions any span uses [B, T]."""
    lo = torch.zeros((len(spans), slots), dtype=torch.int64)
    hi = torch.zeros((len(spans), slots), dtype=torch.int64)
    for b, (start, end) in enumerate(spans):
        length = end - start
        if length == 0:
            lo[b], hi[b] = start, start  # empty rows -> zero memory vector
            continue
        if slots == 1:
            ranges = [(0, length)]
        elif pooling == "adaptive_avg":
            ranges = _adaptive_ranges(length, slots)
        else:
            ranges = _segment_ranges(length, slots)
        lo[b] = torch.tensor([r[0] for r in ranges]) + start
        hi[b] = torch.tensor([r[1] for r in ranges]) + start
    pos = torch.arange(total)
    member = (pos >= lo[..., None]) & (pos < hi[..., None])
    return member, member.any(dim=1)


def build_memories(
    hidden_states_per_layer: Sequence[Tensor],
    spans: Sequence[tuple[int, int]],
    slots: int,
    pooling: str = "segment_softmax",
    temperature: float = 1.0,
) -> Tensor:
    """Memories [B, K, S, H] for a padded batch, straight from a batched teacher-forced forward pass.

    `hidden_states_per_layer[k]` is [B, T, H] (layer k of `output_hidden_states`, in config order);
    `spans[b] = (start, end)` are the positions whose input is one of record b's generated tokens
    (eos excluded). Positions outside the spans (padding, prompt) never contribute, even when they
    hold NaN, so left or right padding gives the same numbers as `build_memory` per record.
    """
    _check_args(slots, pooling, temperature)
    if len(hidden_states_per_layer) == 0:
        raise ValueError("hidden_states_per_layer is empty; at least one layer is needed")
    first = hidden_states_per_layer[0]
    if first.dim() != 3:
        raise ValueError(f"hidden states must be [B, T, H], got shape {tuple(first.shape)}")
    batch, total, _ = first.shape
    for t in hidden_states_per_layer:
        if tuple(t.shape) != tuple(first.shape):
            raise ValueError(f"all layers must have shape {tuple(first.shape)}, got {tuple(t.shape)}")
    if len(spans) != batch:
        raise ValueError(f"got {len(spans)} spans for a batch of {batch}")
    spans = [(int(a), int(b)) for a, b in spans]
    for b, (start, end) in enumerate(spans):
        if not 0 <= start <= end <= total:
            raise ValueError(f"span {b} = ({start}, {end}) is outside [0, {total}]")

    member, used = _range_masks(spans, total, slots, pooling)
    device = first.device
    member, used = member.to(device), used.to(device)
    layers = []
    for states in hidden_states_per_layer:
        x = states.detach().to(torch.float32)
        x = torch.where(used[..., None], x, x.new_zeros(()))  # padding may hold NaN; keep it out
        if pooling == "segment_softmax" and slots > 1:
            logits = (torch.linalg.vector_norm(x, dim=-1) / temperature)[:, None, :]
            logits = logits.masked_fill(~member, float("-inf"))
            weights = torch.softmax(logits, dim=-1).masked_fill(~member, 0.0)
        else:
            counts = member.sum(dim=-1, keepdim=True).clamp(min=1)
            weights = member.to(torch.float32) / counts
        layers.append(torch.bmm(weights, x))
    return stabilise(torch.stack(layers, dim=1))
