"""Bad input is an error naming the file, the line and the field."""

from __future__ import annotations

import pytest

from gag_lightning.data.records import read_knowledge_base, read_mixed, read_qa, read_router_pool
from gag_lightning.errors import RecordError


def _write(tmp_path, text: str):
    path = tmp_path / "data.jsonl"
    path.write_text(text, encoding="utf-8")
    return path


def test_qa_reads_reference_fields(tmp_path):
    path = _write(tmp_path, '{"id": 7, "instruction": "be brief", "input": "Q?", "output": "A."}\n\n'
                            '{"input": "Q2?", "output": "A2."}\n')
    recs = read_qa(path)
    assert [(r.index, r.id, r.question, r.answer, r.instruction) for r in recs] == [
        (0, "7", "Q?", "A.", "be brief"), (1, "1", "Q2?", "A2.", "")]


def test_malformed_json_names_file_and_line(tmp_path):
    path = _write(tmp_path, '{"input": "Q", "output": "A"}\n{"input": "Q", "output": \n')
    with pytest.raises(RecordError) as err:
        read_qa(path)
    assert str(path) in str(err.value) and "line 2" in str(err.value) and "invalid JSON" in str(err.value)


def test_missing_field_names_field(tmp_path):
    path = _write(tmp_path, '{"input": "Q", "output": "A"}\n{"input": "Q"}\n')
    with pytest.raises(RecordError) as err:
        read_qa(path)
    assert (err.value.line, err.value.field) == (2, "output")
    assert "line 2" in str(err.value) and "'output'" in str(err.value)


def test_wrong_type_and_non_object(tmp_path):
    with pytest.raises(RecordError, match="line 1: field 'text' expected a string"):
        read_knowledge_base(_write(tmp_path, '{"text": 3}\n'))
    with pytest.raises(RecordError, match="expected a JSON object"):
        read_router_pool(_write(tmp_path, '["q"]\n'))


def test_mixed_answers_accept_string_or_list(tmp_path):
    path = _write(tmp_path, '{"question": "a", "answer": "x", "dataset_name": "nq"}\n'
                            '{"input": "b", "answer": ["y", "z"], "dataset_name": "material"}\n')
    recs = read_mixed(path)
    assert recs[0].answers == ["x"] and recs[1].answers == ["y", "z"] and recs[1].question == "b"
    with pytest.raises(RecordError) as err:
        read_mixed(_write(tmp_path, '{"question": "a", "answer": [1], "dataset_name": "nq"}\n'))
    assert err.value.field == "answer"


def test_qa_answers_are_optional_aliases(tmp_path):
    path = _write(tmp_path, '{"input": "Q?", "output": "It was 1956.", "answers": ["1956", "the year 1956"]}\n'
                            '{"input": "Q2?", "output": "A2."}\n{"input": "Q3?", "output": "A3.", "answers": null}\n')
    recs = read_qa(path)
    assert [r.answers for r in recs] == [["1956", "the year 1956"], None, None]


@pytest.mark.parametrize("value, problem", [
    ('"1956"', "expected a non-empty list of strings"),
    ("[]", "expected a non-empty list of strings"),
    ('["1956", ""]', "item 1"),
    ('["1956", "  "]', "item 1"),
    ('[1956]', "item 0 is int"),
])
def test_bad_answers_name_file_line_and_field(tmp_path, value, problem):
    path = _write(tmp_path, '{"input": "Q", "output": "A"}\n{"input": "Q", "output": "A", "answers": ' + value + "}\n")
    with pytest.raises(RecordError, match=problem) as err:
        read_qa(path)
    assert (err.value.path, err.value.line, err.value.field) == (str(path), 2, "answers")


def test_mixed_records_take_explicit_fact_aliases(tmp_path):
    path = _write(tmp_path, '{"question": "a", "answer": "Veltrix-3 melts at 1210 C.", "answers": ["1210"], '
                            '"dataset_name": "material"}\n'
                            '{"question": "b", "answers": ["Paris"], "dataset_name": "nq"}\n'
                            '{"question": "c", "answer": ["x", "y"], "dataset_name": "nq"}\n')
    recs = read_mixed(path)
    assert recs[0].answers == ["Veltrix-3 melts at 1210 C."] and recs[0].fact_answers == ["1210"]
    assert recs[1].answers == ["Paris"] and recs[1].fact_answers == ["Paris"]  # the aliases are the reference
    assert recs[2].answers == ["x", "y"] and recs[2].fact_answers is None
    with pytest.raises(RecordError) as err:
        read_mixed(_write(tmp_path, '{"question": "a", "answer": "x", "answers": "x", "dataset_name": "nq"}\n'))
    assert (err.value.line, err.value.field) == (1, "answers")
    with pytest.raises(RecordError) as err:
        read_mixed(_write(tmp_path, '{"question": "a", "dataset_name": "nq"}\n'))
    assert err.value.field == "answer"


def test_demo_files_are_valid():
    from tests.conftest import ROOT

    demo = ROOT / "data" / "demo"
    assert len(read_knowledge_base(demo / "knowledge_base.jsonl")) > 50
    train, test = read_qa(demo / "train.jsonl"), read_qa(demo / "test.jsonl")
    assert not {r.question for r in train} & {r.question for r in test}
    assert read_mixed(demo / "mixed_online.jsonl")
