"""The screened greedy head returns the float32 head's argmax, whatever the screen's rounding."""

from __future__ import annotations

import pytest
import torch

from gag_lightning.memory.greedy_head import ScreenedGreedyHead


def heads(vocab: int = 3000, hidden: int = 96, seed: int = 0, bias: bool = False):
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(vocab, hidden, generator=g) * 0.5
    b = torch.randn(vocab, generator=g) if bias else None
    return weight, b, g


@pytest.mark.parametrize("bias", [False, True])
def test_random_rows_match_the_float32_argmax(bias) -> None:
    weight, b, g = heads(bias=bias)
    head = ScreenedGreedyHead(weight, b)
    hidden = torch.randn(256, weight.shape[1], generator=g) * 4
    want = (hidden @ weight.T + (b if bias else 0)).argmax(dim=1)
    assert torch.equal(head.argmax(hidden), want)
    assert head.full_rows == 0  # a few candidates per row, not the fallback


def test_near_ties_the_screen_cannot_separate_are_decided_in_float32() -> None:
    weight, _, g = heads()
    hidden = torch.randn(64, weight.shape[1], generator=g)
    # token 1234 beats token 7 by far less than bfloat16 resolves: in bfloat16 they tie, and a plain argmax of
    # the screen would answer 7 (the first)
    weight[1234] = hidden[0] / hidden[0].norm() * 3
    weight[7] = weight[1234] * (1 - 2e-6)
    head = ScreenedGreedyHead(weight)
    screened = (hidden[:1].bfloat16() @ head.screen.T).float()[0]
    assert abs(float(screened[7] - screened[1234])) < 1e-2 * float(screened[7].abs())  # the screen cannot tell
    want = (hidden @ weight.T).argmax(dim=1)
    assert int(want[0]) == 1234
    assert int(screened.argmax()) != 1234
    assert torch.equal(head.argmax(hidden), want)


def test_exact_ties_pick_the_first_token_as_torch_argmax() -> None:
    weight, _, g = heads()
    hidden = torch.randn(8, weight.shape[1], generator=g)
    weight[500] = hidden[0] / hidden[0].norm() * 4
    weight[20] = weight[500]
    weight[2999] = weight[500]
    got = ScreenedGreedyHead(weight).argmax(hidden)
    assert int(got[0]) == 20
    assert torch.equal(got, (hidden @ weight.T).argmax(dim=1))


def test_rows_with_too_many_candidates_get_the_full_float32_row() -> None:
    weight, _, g = heads()
    weight[:] = weight[0]  # every token scores the same up to rounding: all are candidates
    weight[1:] += torch.randn(weight.shape[0] - 1, weight.shape[1], generator=g) * 1e-7
    hidden = torch.randn(4, weight.shape[1], generator=g)
    head = ScreenedGreedyHead(weight, max_candidates=16)
    assert torch.equal(head.argmax(hidden), (hidden @ weight.T).argmax(dim=1))
    assert head.full_rows == 4


def test_refuses_a_head_that_is_not_float32() -> None:
    with pytest.raises(ValueError, match="float32"):
        ScreenedGreedyHead(torch.zeros(10, 4, dtype=torch.bfloat16))
