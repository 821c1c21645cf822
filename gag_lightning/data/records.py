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


def _text_field(path: Path, lineno: int, obj: dict[str, Any], name: str) -> str:
    """A required string that must say something: an empty or blank question/answer is an error, not a record."""
    value = _string_field(path, lineno, obj, name, required=True)
    if not value.strip():
        raise RecordError(path, lineno, name, "is empty; every record needs a non-blank value")
    return value


def _id_field(path: Path, lineno: int, obj: dict[str, Any], fallback: int, seen: dict[str, int]) -> str:
    """A record id: a string, or an integer (written as its decimal string); absent or null: the 0-based record
    position. Other JSON types (true, 1.5, lists, objects) are errors rather than silently stringified, and an id
    used twice names both lines (two records with one id would give duplicated prediction rows)."""
    raw = obj.get("id")
    if raw is None:
        rid = str(fallback)
    elif isinstance(raw, bool) or not isinstance(raw, str | int):
        raise RecordError(path, lineno, "id", f"expected a string or an integer, got {_describe(raw)}")
    elif isinstance(raw, str) and not raw.strip():
        raise RecordError(path, lineno, "id", "is empty; give a non-blank id or leave the field out")
    else:
        rid = str(raw)
    if rid in seen:
        raise RecordError(path, lineno, "id", f"duplicate id {rid!r}: line {seen[rid]} has the same id")
    seen[rid] = lineno
    return rid


def _answers_field(path: Path, lineno: int, obj: dict[str, Any], name: str = "answers") -> list[str] | None:
    """Optional gold aliases of the fact a question asks for (METHOD.md section 5b): a non-empty list of
    non-empty strings, or absent/null. Anything else is an error here rather than a fact_acc of 0 later."""
    value = obj.get(name)
    if value is None:
        return None
    if not isinstance(value, list) or not value:
        raise RecordError(path, lineno, name, f"expected a non-empty list of strings, got {_describe(value)}")
    for i, alias in enumerate(value):
        if not isinstance(alias, str) or not alias.strip():
            raise RecordError(path, lineno, name, f"item {i} is {_describe(alias)}; every alias must be a "
                                                  "non-empty string")
    return list(value)


def _describe(value: Any) -> str:
    if isinstance(value, str | list):
        return f"{type(value).__name__} {value!r}"[:80]
    return type(value).__name__


@dataclass(frozen=True)
class QARecord:
    """One domain QA record; `index` is the 0-based position in its file, a stable id fallback.

    `answers` (optional) lists aliases of the fact the question asks for; they feed fact_acc in evaluation.
    """

    index: int
    id: str
    question: str
    answer: str
    instruction: str = ""
    extra: dict[str, Any] = field(default_factory=dict)
    answers: list[str] | None = None
    line: int | None = None  # 1-based line in its file, for error messages


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
    """Domain QA: `{"id"?, "instruction"?, "input", "output", "answers"?: [str, ...]}` per line."""
    path = Path(path)
    records = []
    seen: dict[str, int] = {}
    for lineno, obj in iter_jsonl(path):
        question = _text_field(path, lineno, obj, "input")
        answer = _text_field(path, lineno, obj, "output")
        instruction = _string_field(path, lineno, obj, "instruction", required=False) or ""
        index = len(records)
        records.append(
            QARecord(
                index=index,
                id=_id_field(path, lineno, obj, index, seen),
                question=question,
                answer=answer,
                instruction=instruction,
                answers=_answers_field(path, lineno, obj),
                line=lineno,
            )
        )
    if not records:
        raise RecordError(path, None, None, "the QA file holds no records")
    return records


# A route's prototypes summarise how its queries are phrased (METHOD.md section 6: k-means, k=32, capped by the
# number of distinct queries). One question cannot: its single "prototype" is that question, and the route then
# wins only near-copies of it. Two distinct questions is the floor for a pool; realistic pools hold hundreds.
MIN_POOL_QUESTIONS = 2


def read_router_pool(path: str | Path, min_questions: int = MIN_POOL_QUESTIONS) -> list[str]:
    """Router offline pool: `{"question": str, ...}` per line (a domain QA file counts too, by its `input`), at least
    `min_questions` distinct non-blank ones."""
    path = Path(path)
    questions = []
    for lineno, obj in iter_jsonl(path):
        key = "input" if "question" not in obj and "input" in obj else "question"
        questions.append(_text_field(path, lineno, obj, key))
    if not questions:
        raise RecordError(path, None, None, "the router pool holds no questions")
    distinct = len({q.strip() for q in questions})
    if distinct < min_questions:
        raise RecordError(path, None, "question", f"the router pool holds {distinct} distinct question(s); a route "
                                                  f"needs at least {min_questions} to describe its queries (k-means "
                                                  "prototypes, METHOD.md section 6)")
    return questions


@dataclass(frozen=True)
class MixedRecord:
    """One mixed-domain online test record.

    `answers` is the file's `answer` (the references: gold answers of a general set, the reference text of a
    specialist one); `fact_answers` is the explicit `answers` field, aliases of the fact, when given.
    """

    index: int
    question: str
    answers: list[str]
    dataset_name: str
    fact_answers: list[str] | None = None
    line: int | None = None  # 1-based line in its file, for error messages


def read_mixed(path: str | Path) -> list[MixedRecord]:
    """Mixed online test: `{"question" | "input", "answer": str | [str], "answers"?: [str], "dataset_name"}`.

    `answer` may be left out when `answers` is given; the aliases then serve as the references too.
    """
    path = Path(path)
    records = []
    for lineno, obj in iter_jsonl(path):
        key = "question" if "question" in obj else "input"
        question = _text_field(path, lineno, obj, key)
        facts = _answers_field(path, lineno, obj)
        if "answer" not in obj and facts is None:
            raise RecordError(path, lineno, "answer", "missing required field")
        answer = obj.get("answer", facts)
        if isinstance(answer, str):
            answers = [answer]
        elif isinstance(answer, list) and all(isinstance(a, str) for a in answer):
            answers = list(answer)
        else:
            raise RecordError(path, lineno, "answer", "expected a string or a list of strings")
        name = _string_field(path, lineno, obj, "dataset_name", required=True)
        records.append(MixedRecord(index=len(records), question=question, answers=answers, dataset_name=name,
                                   fact_answers=facts, line=lineno))
    if not records:
        raise RecordError(path, None, None, "the mixed test file holds no records")
    return records
