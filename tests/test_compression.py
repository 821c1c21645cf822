"""Slot compression against hand-computed numbers (METHOD.md section 3).

Expected values are written out (or derived with `math.exp`), never produced by the code under test.
"""

from __future__ import annotations

import math
import time

import pytest
import torch

from gag_lightning.memory.compression import (
    LAYER_KEYS,
    build_memories,
    build_memory,
    compress_sequence,
    layer_indices,
    segment_bounds,
    stabilise,
)


def t(rows: list[list[float]]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float32)


def close(actual: torch.Tensor, expected: list[list[float]] | torch.Tensor, atol: float = 1e-6) -> None:
    exp = expected if isinstance(expected, torch.Tensor) else t(expected)
    assert actual.dtype == torch.float32
    assert actual.shape == exp.shape, (actual.shape, exp.shape)
    assert torch.allclose(actual, exp, atol=atol, rtol=1e-6), (actual, exp)


# ---------------------------------------------------------------- layer keys


def test_layer_keys_map_to_hf_hidden_state_indices() -> None:
    assert LAYER_KEYS == {"last": -1, "minus2": -2, "minus4": -4, "minus6": -6, "minus8": -8}
    assert layer_indices(["last", "minus2", "minus4", "minus6"]) == [-1, -2, -4, -6]
    assert layer_indices("minus8") == [-8]


@pytest.mark.parametrize("keys", [["last", "minus3"], ["penultimate"], []])
def test_unknown_layer_key_is_a_clear_error(keys: list[str]) -> None:
    with pytest.raises(ValueError, match="layer key|layer_keys"):
        layer_indices(keys)


def test_unknown_key_message_lists_valid_keys() -> None:
    with pytest.raises(ValueError, match=r"minus3.*last, minus2, minus4, minus6, minus8"):
        layer_indices(["minus3"])


# ---------------------------------------------------------------- boundaries


@pytest.mark.parametrize(
    "length,slots,expected",
    [
        (2, 4, [0, 0, 1, 2, 2]),  # 0.5 -> 0, 1.5 -> 2 (half to even)
        (1, 2, [0, 0, 1]),  # 0.5 -> 0
        (3, 4, [0, 1, 2, 2, 3]),  # 0.75, 1.5 -> 2, 2.25
        (6, 4, [0, 2, 3, 4, 6]),  # 1.5 -> 2, 4.5 -> 4
        (10, 4, [0, 2, 5, 8, 10]),  # 2.5 -> 2, 7.5 -> 8
        (14, 4, [0, 4, 7, 10, 14]),  # 3.5 -> 4, 10.5 -> 10
        (18, 4, [0, 4, 9, 14, 18]),  # 4.5 -> 4, 13.5 -> 14
        (7, 3, [0, 2, 5, 7]),
        (0, 4, [0, 0, 0, 0, 0]),
        (5, 1, [0, 5]),
    ],
)
def test_segment_bounds_round_half_to_even(length: int, slots: int, expected: list[int]) -> None:
    assert segment_bounds(length, slots) == expected


# ---------------------------------------------------------------- segment_softmax

# h0 has norm 5, h1 norm 0, h2 norm sqrt(2); L=3, S=2 -> bounds [0, 2, 3]
H3 = [[3.0, 4.0], [0.0, 0.0], [1.0, 1.0]]


def test_segment_softmax_weights_by_norm() -> None:
    w = math.exp(5) / (math.exp(5) + 1)  # softmax([5, 0])[0] = 0.99330714907...
    out = compress_sequence(t(H3), 2)
    close(out, [[3 * w, 4 * w], [1.0, 1.0]])
    close(out, [[2.9799214472271456, 3.9732285963028606], [1.0, 1.0]])


def test_segment_softmax_temperature() -> None:
    w = math.exp(2.5) / (math.exp(2.5) + 1)  # norms / T = [2.5, 0]
    out = compress_sequence(t(H3), 2, temperature=2.0)
    close(out, [[2.772425459936269, 3.6965672799150258], [1.0, 1.0]])
    close(out, [[3 * w, 4 * w], [1.0, 1.0]])


def test_segment_softmax_three_token_segment_and_low_temperature() -> None:
    # L=6, S=2 -> bounds [0, 3, 6]; first segment norms 1, 2, 3
    h = t([[1, 0], [0, 2], [3, 0], [0, 1], [0, 1], [0, 1]])
    close(compress_sequence(h, 2), [[2.0857534404948463, 0.48945694210959534], [0.0, 1.0]])
    # T = 0.5 -> logits 2, 4, 6 -> weights 0.015876, 0.117310, 0.866813
    close(compress_sequence(h, 2, temperature=0.5), [[2.616316236568471, 0.2346208556523967], [0.0, 1.0]])


def test_segment_softmax_empty_segments_take_the_single_token() -> None:
    # L=2, S=4 -> bounds [0,0,1,2,2]: slot0 empty -> token 0; slot3 empty -> token min(1, 2) = 1
    h = t([[1.0, 2.0], [-3.0, 5.0]])
    close(compress_sequence(h, 4), [[1, 2], [1, 2], [-3, 5], [-3, 5]])


def test_segment_softmax_fewer_tokens_than_slots() -> None:
    # L=3, S=4 -> bounds [0,1,2,2,3]: slot2 empty -> token 2
    h = t([[1, 0, 0], [0, 1, 0], [0, 0, 1]])
    close(compress_sequence(h, 4), [[1, 0, 0], [0, 1, 0], [0, 0, 1], [0, 0, 1]])


@pytest.mark.parametrize("pooling", ["segment_softmax", "adaptive_avg"])
def test_empty_generation_is_one_zero_vector(pooling: str) -> None:
    out = compress_sequence(torch.zeros(0, 3), 4, pooling)
    close(out, [[0, 0, 0]] * 4)
    close(compress_sequence(torch.zeros(0, 3), 1, pooling), [[0, 0, 0]])


@pytest.mark.parametrize("pooling", ["segment_softmax", "adaptive_avg"])
def test_one_slot_is_the_plain_mean(pooling: str) -> None:
    # a softmax over norms would weight h0 (norm 5) heavily; S=1 must not
    close(compress_sequence(t(H3), 1, pooling), [[4 / 3, 5 / 3]])


def test_computes_in_float32_for_half_inputs() -> None:
    h = t(H3).to(torch.bfloat16)
    out = compress_sequence(h, 2)
    assert out.dtype == torch.float32
    close(out, [[2.9799214472271456, 3.9732285963028606], [1.0, 1.0]], atol=1e-5)


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="pooling"):
        compress_sequence(t(H3), 2, "max")
    with pytest.raises(ValueError, match="slots"):
        compress_sequence(t(H3), 0)
    with pytest.raises(ValueError, match="temperature"):
        compress_sequence(t(H3), 2, temperature=0.0)
    with pytest.raises(ValueError, match=r"\[L, H\]"):
        compress_sequence(torch.zeros(2, 3, 4), 2)


# ---------------------------------------------------------------- adaptive_avg


def test_adaptive_avg_overlapping_bins() -> None:
    # L=5, S=2: bins [0, 3) and [2, 5)
    h = t([[i, 10 * i] for i in range(5)])
    close(compress_sequence(h, 2, "adaptive_avg"), [[1, 10], [3, 30]])


def test_adaptive_avg_fewer_tokens_than_slots() -> None:
    # L=2, S=3: bins [0,1), [0,2), [1,2)
    h = t([[2, 0], [0, 4]])
    close(compress_sequence(h, 3, "adaptive_avg"), [[2, 0], [1, 2], [0, 4]])


def test_adaptive_avg_even_split() -> None:
    h = t([[1], [3], [5], [7]])
    close(compress_sequence(h, 2, "adaptive_avg"), [[2], [6]])


# ---------------------------------------------------------------- stabilise


def test_stabilise_layer_norm_without_affine() -> None:
    # mean 2, variance 1 -> (-1, 1) / sqrt(1 + 1e-6)
    out = stabilise(t([[1, 3]]).view(1, 1, 2))
    close(out, t([[-0.999999500000375, 0.999999500000375]]).view(1, 1, 2))


def test_stabilise_nan_inf_become_zero_before_normalising() -> None:
    # [nan, 1, inf, 3] -> [0, 1, 0, 3]: mean 1, variance 1.5
    out = stabilise(torch.tensor([[[float("nan"), 1.0, float("inf"), 3.0]]]))
    s = 0.8164963087623351  # 1 / sqrt(1.5 + 1e-6)
    close(out, t([[-s, 0.0, -s, 2 * s]]).view(1, 1, 4))
    assert torch.isfinite(stabilise(torch.full((1, 1, 3), float("-inf")))).all()


def test_stabilise_clamps_to_ten() -> None:
    # one 1 among 401 entries normalises to 20 (clamped to 10); the rest to -0.05
    x = torch.zeros(1, 1, 401)
    x[0, 0, 0] = 1.0
    out = stabilise(x)
    assert out[0, 0, 0].item() == 10.0
    assert torch.allclose(out[0, 0, 1:], torch.full((400,), -0.05), atol=1e-4)
    assert stabilise(-x)[0, 0, 0].item() == -10.0


def test_stabilise_zero_row_stays_zero() -> None:
    close(stabilise(torch.zeros(2, 1, 3)).view(2, 3), [[0, 0, 0], [0, 0, 0]])


# ---------------------------------------------------------------- build_memory(ies)


def test_build_memory_stacks_layers_in_order() -> None:
    a = t([[1, 3], [1, 3]])  # every slot (1, 3) -> (-1, 1)
    b = t([[3, 1], [3, 1]])  # every slot (3, 1) -> (1, -1)
    mem = build_memory([a, b], slots=2)
    s = 0.999999500000375
    close(mem.view(4, 2), [[-s, s], [-s, s], [s, -s], [s, -s]])
    assert mem.shape == (2, 2, 2)


@pytest.mark.parametrize("pooling", ["segment_softmax", "adaptive_avg"])
@pytest.mark.parametrize("slots", [1, 2, 4])
def test_build_memories_on_padded_batch_equals_per_record(pooling: str, slots: int) -> None:
    gen = torch.Generator().manual_seed(0)
    total, hidden, layers = 12, 5, 3
    spans = [(2, 12), (9, 12), (5, 5), (0, 7), (4, 6)]  # incl. L=0, L<S, left and right padding
    states = [torch.randn(len(spans), total, hidden, generator=gen) * 3 for _ in range(layers)]
    for x in states:
        x[2, :] = float("nan")  # padding must never leak in
        x[0, :2] = float("nan")
        x[3, 7:] = float("inf")
    batched = build_memories(states, spans, slots, pooling, temperature=1.7)
    assert batched.shape == (len(spans), layers, slots, hidden) and batched.dtype == torch.float32
    for b, (start, end) in enumerate(spans):
        single = build_memory([x[b, start:end] for x in states], slots, pooling, temperature=1.7)
        assert torch.allclose(batched[b], single, atol=1e-5), (b, batched[b], single)
    assert torch.equal(batched[2], torch.zeros(layers, slots, hidden))  # nothing generated


def test_build_memories_validates_spans() -> None:
    x = [torch.zeros(2, 4, 3)]
    with pytest.raises(ValueError, match="spans"):
        build_memories(x, [(0, 4)], 2)
    with pytest.raises(ValueError, match="outside"):
        build_memories(x, [(0, 4), (3, 5)], 2)


def test_segment_softmax_is_fast_for_long_wide_sequences() -> None:
    x = torch.randn(1000, 4096)
    start = time.perf_counter()
    out = build_memory([x, x, x, x], slots=4)
    assert out.shape == (4, 4, 4096)
    assert time.perf_counter() - start < 5.0
