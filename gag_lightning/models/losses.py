"""Stage III losses (METHOD.md section 4): answer NLL + semantic alignment + slot diversity, and the optional
KL self-distillation term of section 5b.

Everything is computed in fp32: the base may run in bf16, but averaging thousands of bf16 log-probs or
hidden states in bf16 loses several digits, and these scalars drive the only trainable weights.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

IGNORE_INDEX = -100
DEFAULT_LOSS_WEIGHTS = (1.0, 0.01, 0.001)
_EPS = 1e-8


def masked_mean(hidden: Tensor, mask: Tensor) -> Tensor:
    """Mean of ``hidden [B, T, H]`` over the positions where ``mask [B, T]`` is true, in fp32 -> ``[B, H]``.

    A row with an empty mask gives a zero vector rather than NaN, so one degenerate record (e.g. an answer
    truncated away) cannot poison a batch.
    """
    if hidden.shape[:2] != mask.shape:
        raise ValueError(f"mask shape {tuple(mask.shape)} does not match hidden {tuple(hidden.shape)}")
    m = mask.to(device=hidden.device, dtype=torch.float32).unsqueeze(-1)
    total = (hidden.float() * m).sum(dim=1)
    count = m.sum(dim=1).clamp_min(1.0)
    return total / count


def semantic_loss(pred: Tensor, target: Tensor) -> Tensor:
    """``mean_b (1 - cos(pred_b, target_b))``; only the direction matters, the encoder's scale is arbitrary."""
    if pred.shape != target.shape:
        raise ValueError(f"pred {tuple(pred.shape)} and target {tuple(target.shape)} differ in shape")
    cos = F.cosine_similarity(pred.float(), target.float(), dim=-1, eps=_EPS)
    return (1.0 - cos).mean()


def diversity_loss(slots: Tensor) -> Tensor:
    """Mean over records of the mean squared off-diagonal cosine similarity between a record's S slots.

    Squared so that anti-parallel slots are penalised like parallel ones: the goal is S slots carrying
    different information, i.e. near-orthogonal. In [0, 1]; 0 for S == 1 (nothing to compare).
    """
    if slots.dim() != 3:
        raise ValueError(f"slots must be [B, S, H], got shape {tuple(slots.shape)}")
    b, s, _ = slots.shape
    if s < 2:
        return slots.new_zeros((), dtype=torch.float32)
    unit = F.normalize(slots.float(), dim=-1, eps=_EPS)
    sim2 = torch.bmm(unit, unit.transpose(1, 2)).pow(2)
    off_diag = ~torch.eye(s, dtype=torch.bool, device=slots.device)
    per_record = sim2[:, off_diag].mean(dim=-1)
    return per_record.mean()


def distillation_kl(student_logits: Tensor, teacher_logits: Tensor, temperature: float = 1.0) -> Tensor:
    """``tau^2 * mean_n KL(softmax(z_t[n] / tau) || softmax(z_s[n] / tau))`` over aligned rows ``[N, V]``.

    The forward KL from the teacher keeps the student's mass wherever the teacher (the base reading the
    background as text) puts mass; ``tau^2`` keeps the gradient scale independent of ``tau`` (Hinton et al.).
    Computed in fp32; no rows gives 0 (still attached to the graph), like ``answer_nll``.
    """
    if student_logits.shape != teacher_logits.shape or student_logits.dim() != 2:
        raise ValueError(f"student {tuple(student_logits.shape)} and teacher {tuple(teacher_logits.shape)} logits "
                         "must both be [N, V]")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if student_logits.shape[0] == 0:
        return student_logits.float().sum()
    log_s = F.log_softmax(student_logits.float() / temperature, dim=-1)
    log_t = F.log_softmax(teacher_logits.detach().float() / temperature, dim=-1)
    per_row = F.kl_div(log_s, log_t, log_target=True, reduction="none").sum(-1)
    return temperature**2 * per_row.mean()


def answer_logits(logits: Tensor, mask: Tensor) -> Tensor:
    """``logits [B, T, V]`` at the positions where ``mask [B, T]`` is true -> ``[N, V]``, row-major order.

    Two sequences whose masks hold the same number of positions per row (the student's and the teacher's
    answer-predicting positions) give aligned rows, although their prompts differ in length.
    """
    if logits.shape[:2] != mask.shape:
        raise ValueError(f"mask shape {tuple(mask.shape)} does not match logits {tuple(logits.shape)}")
    return logits[mask.to(device=logits.device, dtype=torch.bool)]


def answer_kl(student_logits: Tensor, student_mask: Tensor, teacher_logits: Tensor, teacher_mask: Tensor,
              temperature: float = 1.0) -> Tensor:
    """``distillation_kl`` between the student's and the teacher's answer positions (one mask each)."""
    if not torch.equal(student_mask.sum(1).cpu(), teacher_mask.sum(1).cpu()):
        raise ValueError("student and teacher masks select different numbers of answer positions per row")
    return distillation_kl(answer_logits(student_logits, student_mask), answer_logits(teacher_logits, teacher_mask),
                           temperature)


def gag_loss(
    nll: Tensor,
    sem: Tensor | None,
    div: Tensor | None,
    weights: tuple[float, float, float] = DEFAULT_LOSS_WEIGHTS,
    kl: Tensor | None = None,
    kl_weight: float = 0.0,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Weighted total ``a_nll*nll + a_sem*sem + a_div*div (+ a_kl*kl)`` and the detached parts for logging.

    ``sem``/``div``/``kl`` may be ``None`` (no semantic head / S == 1 / no distillation) and then contribute
    nothing. The parts are the unweighted per-step values: never multiplied by a gradient-accumulation factor
    (METHOD.md 8).
    """
    a_nll, a_sem, a_div = weights
    total = a_nll * nll
    parts: dict[str, Tensor] = {"nll": nll.detach()}
    if sem is not None:
        total = total + a_sem * sem
        parts["sem"] = sem.detach()
    if div is not None:
        total = total + a_div * div
        parts["div"] = div.detach()
    if kl is not None:
        total = total + kl_weight * kl
        parts["kl"] = kl.detach()
    parts["total"] = total.detach()
    return total, parts


def answer_nll(logits: Tensor, labels: Tensor, reduction: str = "mean") -> Tensor:
    """Causal-LM NLL over the answer tokens (labels != -100), position t predicting labels[t+1].

    ``mean`` = per-token mean over all answer tokens of the batch (long answers weigh more, as in the
    reference); ``sum`` lets a caller normalise across gradient-accumulation micro-batches itself. Only
    the selected positions are upcast to fp32, so a bf16 ``[B, T, V]`` tensor is never copied whole.
    A batch without any answer token gives 0 (still attached to the graph).
    """
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    if logits.shape[:2] != labels.shape:
        raise ValueError(f"labels shape {tuple(labels.shape)} does not match logits {tuple(logits.shape)}")
    shift_logits = logits[:, :-1, :]
    shift_labels = labels[:, 1:].to(logits.device)
    keep = shift_labels != IGNORE_INDEX
    return token_nll(shift_logits[keep], shift_labels[keep], reduction)


def token_nll(selected: Tensor, targets: Tensor, reduction: str = "mean") -> Tensor:
    """`answer_nll` on logits ``[N, V]`` already taken at the answer positions (see
    ``models/shared_prefix.answer_token_logits``), upcast to fp32; no position gives 0, attached to the graph."""
    selected = selected.float()
    if selected.shape[0] == 0:
        return selected.sum()  # an empty sum: 0.0, finite even if logits hold inf, and attached to the graph
    return F.cross_entropy(selected, targets.to(selected.device), reduction=reduction)


__all__ = [
    "DEFAULT_LOSS_WEIGHTS",
    "IGNORE_INDEX",
    "answer_kl",
    "answer_logits",
    "answer_nll",
    "distillation_kl",
    "diversity_loss",
    "gag_loss",
    "masked_mean",
    "token_nll",
    "semantic_loss",
]
