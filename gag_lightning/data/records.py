"""Readers for the JSON-lines formats of the public GAG dataset (METHOD.md section 0).

Every reader validates as it goes so that a bad line is reported with its file, line and field
instead of surfacing later as a shape error deep inside a training step.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gag_lightning.errors import RecordError


def iter_jsonl(path: str | Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield (line_number, object) for each non-blank line; errors name the file and line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    with path.open("r", encoding="utf-8") as handle:
        for lineno, raw in enumerate(handle, start=1):
            if not raw.strip():
                continue
            try:
                obj = json.loads(raw)
            except json.JSONDecodeError as exc:
                raise RecordError(path, lineno, None, f"invalid JSON ({exc.msg} at column {exc.colno})") from exc
            if not isinstance(obj, dict):
                raise RecordError(path, lineno, None, f"expected a JSON object, got {type(obj).__name__}")
            yield lineno, obj


def _string_field(path: Path, lineno: int, obj: dict[str, Any], name: str, *, required: bool) -> str | None:
    if name not in obj or obj[name] is None:
        if required:
            raise RecordError(path, lineno, name, "missing required field")
        return None
    value = obj[name]
    if not isinstance(value, str):
        raise RecordError(path, lineno, name, f"expected a string, got {type(value).__name__}")
    return value


@dataclass(frozen=True)
class QARecord:
    """One domain QA record; `index` is the 0-based position in its file, a stable id fallback."""

    index: int
    id: str
    question: str
    answer: str
    instruction: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


def read_knowledge_base(path: str | Path) -> list[str]:
    """Stage I corpus: `{"text": str}` per line."""
    path = Path(path)
    texts = []
    for lineno, obj in iter_jsonl(path):
        text = _string_field(path, lineno, obj, "text", required=True)
        texts.append(text)
    if not texts:
        raise RecordError(path, None, None, "the knowledge base holds no records")
    return texts


def read_qa(path: str | Path) -> list[QARecord]:
    """Domain QA: `{"id"?, "instruction"?, "input", "output"}` per line."""
    path = Path(path)
    records = []
    for lineno, obj in iter_jsonl(path):
        question = _string_field(path, lineno, obj, "input", required=True)
        answer = _string_field(path, lineno, obj, "output", required=True)
        instruction = _string_field(path, lineno, obj, "instruction", required=False) or ""
        rid = obj.get("id")
        index = len(records)
        records.append(
            QARecord(
                index=index,
                id=str(rid) if rid is not None else str(index),
                question=question,
                answer=answer,
                instruction=instruction,
            )
        )
    if not records:
        raise RecordError(path, None, None, "the QA file holds no records")
    return records


def read_router_pool(path: str | Path) -> list[str]:
    """Router offline pool: `{"question": str, ...}` per line."""
    path = Path(path)
    questions = []
    for lineno, obj in iter_jsonl(path):
        questions.append(_string_field(path, lineno, obj, "question", required=True))
    if not questions:
        raise RecordError(path, None, None, "the router pool holds no questions")
    return questions


@dataclass(frozen=True)
class MixedRecord:
    """One mixed-domain online test record."""

    index: int
    question: str
    answers: list[str]
    dataset_name: str


def read_mixed(path: str | Path) -> list[MixedRecord]:
    """Mixed online test: `{"question" | "input", "answer": str | [str], "dataset_name"}` per line."""
    path = Path(path)
    records = []
    for lineno, obj in iter_jsonl(path):
        key = "question" if "question" in obj else "input"
        question = _string_field(path, lineno, obj, key, required=True)
        if "answer" not in obj:
            raise RecordError(path, lineno, "answer", "missing required field")
        answer = obj["answer"]
        if isinstance(answer, str):
            answers = [answer]
        elif isinstance(answer, list) and all(isinstance(a, str) for a in answer):
            answers = list(answer)
        else:
            raise RecordError(path, lineno, "answer", "expected a string or a list of strings")
        name = _string_field(path, lineno, obj, "dataset_name", required=True)
        records.append(MixedRecord(index=len(records), question=question, answers=answers, dataset_name=name))
    if not records:
        raise RecordError(path, None, None, "the mixed test file holds no records")
    return records
