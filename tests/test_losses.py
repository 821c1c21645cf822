"""Stage III losses on hand-made examples whose values are written out."""

from __future__ import annotations

import math

import pytest
import torch

from gag_lightning.models.losses import (
    answer_kl,
    answer_nll,
    distillation_kl,
    diversity_loss,
    gag_loss,
    masked_mean,
    semantic_loss,
)


def test_masked_mean() -> None:
    hidden = torch.tensor([[[1.0, 10.0], [3.0, 30.0], [5.0, 50.0]], [[2.0, 0.0], [4.0, 0.0], [6.0, 0.0]]])
    mask = torch.tensor([[1, 0, 1], [0, 0, 0]])
    out = masked_mean(hidden, mask)
    # row 0: mean of positions 0 and 2; row 1: empty mask -> zeros, not NaN
    torch.testing.assert_close(out, torch.tensor([[3.0, 30.0], [0.0, 0.0]]))
    assert masked_mean(hidden.bfloat16(), mask.bool()).dtype == torch.float32


def test_semantic_loss_hand_values() -> None:
    pred = torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 1.0], [1.0, 0.0]])
    target = torch.tensor([[2.0, 0.0], [0.0, 3.0], [5.0, 0.0], [-1.0, 0.0]])
    # cosines: 1 (same direction), 0 (orthogonal), 1/sqrt(2) (45 degrees), -1 (opposite)
    expected = (0.0 + 1.0 + (1.0 - 1.0 / math.sqrt(2.0)) + 2.0) / 4
    assert semantic_loss(pred, target).item() == pytest.approx(expected, abs=1e-6)
    assert semantic_loss(pred[:1], target[:1]).item() == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError, match="shape"):
        semantic_loss(pred, target[:, :1])


def test_diversity_loss_hand_values() -> None:
    orthogonal = torch.eye(3).unsqueeze(0)  # [1, 3, 3]: e1, e2, e3
    assert diversity_loss(orthogonal).item() == pytest.approx(0.0, abs=1e-7)

    identical = torch.tensor([[[1.0, 2.0], [1.0, 2.0], [2.0, 4.0]]])  # parallel, different norms
    assert diversity_loss(identical).item() == pytest.approx(1.0, abs=1e-6)

    forty_five = torch.tensor([[[1.0, 0.0], [1.0, 1.0]]])  # cos = 1/sqrt(2), squared = 1/2
    assert diversity_loss(forty_five).item() == pytest.approx(0.5, abs=1e-6)

    opposite = torch.tensor([[[1.0, 0.0], [-3.0, 0.0]]])  # cos = -1, squared = 1
    assert diversity_loss(opposite).item() == pytest.approx(1.0, abs=1e-6)

    # [1,0], [1,1], [0,1]: pair cos^2 = 1/2, 0, 1/2; each pair appears twice among S(S-1) = 6 entries -> 2/6
    three = torch.tensor([[[1.0, 0.0], [1.0, 1.0], [0.0, 1.0]]])
    assert diversity_loss(three).item() == pytest.approx(1.0 / 3.0, abs=1e-6)

    # mean over records: orthogonal (0) and identical (1) -> 0.5
    batch = torch.cat([torch.eye(2).unsqueeze(0), torch.ones(1, 2, 2)])
    assert diversity_loss(batch).item() == pytest.approx(0.5, abs=1e-6)

    assert diversity_loss(torch.randn(4, 1, 8)).item() == 0.0  # S == 1: nothing to compare


def test_diversity_loss_is_differentiable_and_bounded() -> None:
    slots = torch.randn(3, 4, 16, requires_grad=True)
    loss = diversity_loss(slots)
    assert 0.0 <= loss.item() <= 1.0
    loss.backward()
    assert slots.grad is not None and bool(torch.isfinite(slots.grad).all())


def test_gag_loss_weights_and_parts() -> None:
    nll, sem, div = torch.tensor(2.0), torch.tensor(0.5), torch.tensor(0.25)
    total, parts = gag_loss(nll, sem, div)
    # 1.0 * 2 + 0.01 * 0.5 + 0.001 * 0.25
    assert total.item() == pytest.approx(2.00525, abs=1e-6)
    assert {k: round(v.item(), 6) for k, v in parts.items()} == {
        "nll": 2.0,
        "sem": 0.5,
        "div": 0.25,
        "total": 2.00525,
    }
    total, _ = gag_loss(nll, sem, div, weights=(0.5, 1.0, 2.0))
    assert total.item() == pytest.approx(1.0 + 0.5 + 0.5)
    total, parts = gag_loss(nll, None, div)
    assert total.item() == pytest.approx(2.00025) and "sem" not in parts


def test_gag_loss_parts_are_detached() -> None:
    nll = torch.tensor(1.0, requires_grad=True)
    total, parts = gag_loss(nll * 3, torch.tensor(0.0), torch.tensor(0.0))
    assert total.requires_grad and not any(v.requires_grad for v in parts.values())


def _hand_logits() -> tuple[torch.Tensor, torch.Tensor, float]:
    logits = torch.zeros(2, 3, 3)
    logits[0, 0] = torch.tensor([0.0, 0.0, math.log(2.0)])  # predicts labels[0, 1] = 2: p = 2/4
    logits[0, 1] = torch.tensor([math.log(3.0), 0.0, 0.0])  # predicts labels[0, 2] = 0: p = 3/5
    logits[0, 2] = torch.tensor([100.0, -100.0, 7.0])  # last position predicts nothing
    logits[1, 1] = torch.tensor([0.0, 0.0, 0.0])  # predicts labels[1, 2] = 1: p = 1/3
    logits[1, 0] = torch.tensor([50.0, -50.0, 0.0])  # its target is ignored
    labels = torch.tensor([[-100, 2, 0], [-100, -100, 1]])
    # per-token mean over all 3 answer tokens of the batch (not a mean of per-row means)
    expected = (math.log(2.0) + math.log(5.0 / 3.0) + math.log(3.0)) / 3
    return logits, labels, expected


def test_answer_nll_hand_value() -> None:
    logits, labels, expected = _hand_logits()
    assert answer_nll(logits, labels).item() == pytest.approx(expected, abs=1e-6)
    assert answer_nll(logits, labels, reduction="sum").item() == pytest.approx(3 * expected, abs=1e-5)


def test_answer_nll_bf16_upcasts() -> None:
    logits, labels, expected = _hand_logits()
    out = answer_nll(logits.bfloat16(), labels)
    assert out.dtype == torch.float32
    assert out.item() == pytest.approx(expected, abs=2e-2)  # only bf16 rounding of the inputs


def test_answer_nll_without_answer_tokens_is_zero_and_backprops() -> None:
    logits = torch.randn(1, 4, 5, requires_grad=True)
    loss = answer_nll(logits, torch.full((1, 4), -100))
    assert loss.item() == 0.0
    loss.backward()
    assert torch.equal(logits.grad, torch.zeros_like(logits))


def test_distillation_kl_hand_values() -> None:
    """tau = 2: z / tau gives the probabilities below; L = tau^2 * mean_n sum_v p_t log(p_t / p_s)."""
    tau = 2.0
    ln2 = math.log(2.0)
    # row 0: teacher [1/2, 1/4, 1/4], student uniform      -> KL = 1/2 ln(3/2) + 2 * 1/4 ln(3/4) = 1/2 ln(9/8)
    # row 1: teacher [1/2, 1/4, 1/4], student [1/4, 1/2, 1/4] -> KL = 1/2 ln 2 + 1/4 ln(1/2) = 1/4 ln 2
    teacher = tau * torch.tensor([[ln2, 0.0, 0.0], [ln2, 0.0, 0.0]])
    student = tau * torch.tensor([[0.0, 0.0, 0.0], [0.0, ln2, 0.0]])
    expected = tau**2 * (0.5 * math.log(9.0 / 8.0) + 0.25 * ln2) / 2
    assert distillation_kl(student, teacher, tau).item() == pytest.approx(expected, abs=1e-6)
    # the direction is KL(teacher || student): swapping the roles gives another value
    # swapped, row 0: 1/3 (ln(2/3) + 2 ln(4/3)); row 1: 1/4 ln(1/2) + 1/2 ln 2 = 1/4 ln 2
    swapped = tau**2 * ((math.log(2.0 / 3.0) + 2 * math.log(4.0 / 3.0)) / 3 + (0.25 * ln2)) / 2
    assert distillation_kl(teacher, student, tau).item() == pytest.approx(swapped, abs=1e-6)
    assert distillation_kl(student, teacher, tau).item() != pytest.approx(swapped, abs=1e-3)
    assert distillation_kl(teacher, teacher, tau).item() == pytest.approx(0.0, abs=1e-7)
    # tau scales twice: inside the softmax and by tau^2 (tau = 1 on the same logits is another value)
    row0 = torch.tensor([[0.0, 0.0, 0.0]]), torch.tensor([[ln2, 0.0, 0.0]])
    assert distillation_kl(*row0, temperature=1.0).item() == pytest.approx(0.5 * math.log(9.0 / 8.0), abs=1e-6)
    with pytest.raises(ValueError, match="temperature"):
        distillation_kl(student, teacher, 0.0)
    with pytest.raises(ValueError, match="N, V"):
        distillation_kl(student, teacher[:1])


def test_answer_kl_aligns_by_mask_and_ignores_other_positions() -> None:
    """Prompts of different lengths: the masks pick the same count per row, everything else is ignored."""
    tau, ln2 = 2.0, math.log(2.0)
    garbage = 1e4
    student = torch.full((2, 3, 3), garbage)
    teacher = torch.full((2, 5, 3), -garbage)
    student[0, 1] = tau * torch.tensor([0.0, 0.0, 0.0])
    teacher[0, 3] = tau * torch.tensor([ln2, 0.0, 0.0])
    student[1, 0] = tau * torch.tensor([0.0, ln2, 0.0])
    teacher[1, 2] = tau * torch.tensor([ln2, 0.0, 0.0])
    s_mask = torch.tensor([[0, 1, 0], [1, 0, 0]], dtype=torch.bool)
    t_mask = torch.tensor([[0, 0, 0, 1, 0], [0, 0, 1, 0, 0]], dtype=torch.bool)
    expected = tau**2 * (0.5 * math.log(9.0 / 8.0) + 0.25 * ln2) / 2
    assert answer_kl(student, s_mask, teacher, t_mask, tau).item() == pytest.approx(expected, abs=1e-6)
    # no position at all: 0, finite, attached
    empty = torch.zeros(2, 3, dtype=torch.bool)
    leaf = student.clone().requires_grad_(True)
    out = answer_kl(leaf, empty, teacher[:, :3], empty, tau)
    assert out.item() == 0.0 and out.requires_grad
    with pytest.raises(ValueError, match="numbers of answer positions"):
        answer_kl(student, s_mask, teacher, torch.zeros(2, 5, dtype=torch.bool), tau)


def test_kl_gradient_reaches_the_student_only() -> None:
    student = torch.randn(4, 7, requires_grad=True)
    teacher = torch.randn(4, 7, requires_grad=True)
    distillation_kl(student, teacher, 1.5).backward()
    assert student.grad is not None and student.grad.abs().sum() > 0 and teacher.grad is None


def test_gag_loss_adds_the_weighted_kl_term() -> None:
    nll, kl = torch.tensor(2.0), torch.tensor(0.5)
    total, parts = gag_loss(nll, None, None, (1.0, 0.0, 0.0), kl=kl, kl_weight=0.4)
    assert total.item() == pytest.approx(2.2) and parts["kl"].item() == 0.5
    total, parts = gag_loss(nll, None, None, (1.0, 0.0, 0.0))
    assert total.item() == 2.0 and "kl" not in parts
