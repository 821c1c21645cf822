"""Teacher side of KL self-distillation in Stage III (METHOD.md section 5b).

The teacher is the same frozen base reading the record's expert background as *text* on the Knowledge line
(the expert_context system's prompt, ``prompts.build_messages("context", ...)``); the student is the base with
the S injected slots. Both sequences end in the same answer tokens, but their prompts differ in length, so the
answer is aligned by its offset from each prompt's end. Kept apart from ``stages/gag/datamodule.py`` so that the plain Stage III data path reads as before.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from gag_lightning.errors import GAGError

if TYPE_CHECKING:
    from gag_lightning.stages.gag.datamodule import GAGExample


def with_teacher(example: GAGExample, teacher: GAGExample | None, record: str) -> GAGExample:
    """``example`` carrying its teacher sequence, after checking that both end in the same answer tokens.

    The common span is the shorter of the two completions (a long background can cut the teacher's answer
    at ``max_length``); ``teacher=None`` (its prompt did not fit) leaves the record without KL positions.
    """
    if teacher is not None:
        n = min(example.num_completion, teacher.num_completion)
        mine = example.input_ids[example.num_prompt : example.num_prompt + n]
        theirs = teacher.input_ids[teacher.num_prompt : teacher.num_prompt + n]
        if mine != theirs:
            raise GAGError(f"record {record}: the answer tokenises differently after the GAG and the expert_context "
                           "prompts, so the KL teacher cannot be aligned by answer offset")
    return dataclasses.replace(example, teacher=teacher)


def teacher_batch(examples: list[GAGExample], student_width: int, pad_id: int) -> dict[str, Tensor]:
    """Right-padded teacher ids and mask, and the aligned answer-position masks of student and teacher.

    ``kl_mask [B, T_s]`` and ``teacher_kl_mask [B, T_t]`` mark the positions whose logits predict the common
    answer tokens (end-of-turn included): the same count per row, so selecting with each gives aligned rows.
    A record without teacher gets a one-token dummy row (an all-masked row can give NaN attention) and no
    KL positions.
    """
    teachers = [ex.teacher for ex in examples]
    width = max([len(t.input_ids) for t in teachers if t is not None] or [1])
    b = len(examples)
    ids = torch.full((b, width), int(pad_id), dtype=torch.long)
    attention = torch.zeros((b, width), dtype=torch.long)
    kl_mask = torch.zeros((b, student_width), dtype=torch.bool)
    teacher_kl_mask = torch.zeros((b, width), dtype=torch.bool)
    for row, (ex, t) in enumerate(zip(examples, teachers, strict=True)):
        if t is None:
            attention[row, 0] = 1
            continue
        ids[row, : len(t.input_ids)] = torch.tensor(t.input_ids, dtype=torch.long)
        attention[row, : len(t.input_ids)] = 1
        n = min(ex.num_completion, t.num_completion)
        # the logits at position p predict token p + 1: an answer's predictors start one position before it
        kl_mask[row, ex.num_prompt - 1 : ex.num_prompt - 1 + n] = True
        teacher_kl_mask[row, t.num_prompt - 1 : t.num_prompt - 1 + n] = True
    return {"teacher_input_ids": ids, "teacher_attention_mask": attention, "kl_mask": kl_mask,
            "teacher_kl_mask": teacher_kl_mask}


__all__ = ["teacher_batch", "with_teacher"]
