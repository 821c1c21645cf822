"""Bad inputs end in a clear error naming the file, the 1-based line and the field (or the folder and the dimension),
and saved files get the umask's permissions (issue 11, point 7)."""

from __future__ import annotations

import json
import os
import re
import shutil
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from gag_lightning.data.records import read_qa, read_router_pool
from gag_lightning.errors import ContextLengthError, GAGError, RecordError, SchemaMismatchError

LONG_QUERY = "What is the melting point of the compound described at length here? " * 720  # ~50,000 characters


def _write(tmp_path: Path, text: str, name: str = "data.jsonl") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


# ------------------------------------------------------------------------------------------ QA records
def test_empty_input_is_an_error_naming_line_and_field(tmp_path):
    path = _write(tmp_path, '{"input": "Q?", "output": "A."}\n\n{"input": "   ", "output": "A."}\n')
    with pytest.raises(RecordError) as err:
        read_qa(path)
    assert (err.value.path, err.value.line, err.value.field) == (str(path), 3, "input") and "empty" in str(err.value)
    with pytest.raises(RecordError, match="line 1: field 'output' is empty"):
        read_qa(_write(tmp_path, '{"input": "Q?", "output": ""}\n'))


@pytest.mark.parametrize("bad", ["true", "1.5", '["a"]', '{"k": 1}', '""'])
def test_non_string_ids_are_errors(tmp_path, bad):
    path = _write(tmp_path, '{"id": "a", "input": "Q?", "output": "A."}\n'
                            f'{{"id": {bad}, "input": "Q?", "output": "A."}}\n')
    with pytest.raises(RecordError) as err:
        read_qa(path)
    assert (err.value.line, err.value.field) == (2, "id")


def test_integer_ids_stay_accepted(tmp_path):  # METHOD.md section 0: "id"?: any; an integer is unambiguous
    recs = read_qa(_write(tmp_path, '{"id": 7, "input": "Q?", "output": "A."}\n'))
    assert recs[0].id == "7" and recs[0].line == 1


def test_duplicate_ids_name_both_lines(tmp_path):
    path = _write(tmp_path, '{"id": "a", "input": "Q1?", "output": "A."}\n{"id": "b", "input": "Q2?", "output": "A."}\n'
                            '{"id": "a", "input": "Q3?", "output": "A."}\n')
    with pytest.raises(RecordError, match=r"line 3: field 'id' duplicate id 'a': line 1 has the same id"):
        read_qa(path)
    # an integer id and its string spelling are one id
    with pytest.raises(RecordError, match="line 2"):
        read_qa(_write(tmp_path, '{"id": 1, "input": "Q?", "output": "A."}\n{"id": "1", "input": "Q?", "output": "A."}\n'))


# ------------------------------------------------------------------------------------------ knowledge base, router pool
def test_knowledge_base_smaller_than_a_block_is_refused(tmp_path, tiny_expert_dir):
    from gag_lightning.models.loading import load_tokenizer
    from gag_lightning.stages.expert.corpus import KnowledgeBaseDataModule

    kb = _write(tmp_path, '{"text": "three word corpus"}\n', "kb.jsonl")
    dm = KnowledgeBaseDataModule(str(kb), load_tokenizer(tiny_expert_dir), block_size=128, val_fraction=0.03)
    with pytest.raises(GAGError, match=r"kb.jsonl: the knowledge base holds \d+ tokens in 1 text\(s\), fewer than two "
                                       r"blocks.*block_size=128"):
        dm.setup("fit")
    # one block is enough without a validation split; the demo corpus passes
    big = _write(tmp_path, "".join(json.dumps({"text": f"Sentence number {i} about compounds."}) + "\n"
                                   for i in range(40)), "big.jsonl")
    ok = KnowledgeBaseDataModule(str(big), load_tokenizer(tiny_expert_dir), block_size=128, val_fraction=0.0)
    ok.setup("fit")
    assert len(ok.train_set) >= 1


def test_router_pool_needs_two_distinct_questions(tmp_path):
    with pytest.raises(RecordError, match=r"pool.jsonl: field 'question' the router pool holds 1 distinct"):
        read_router_pool(_write(tmp_path, '{"question": "Only one?"}\n', "pool.jsonl"))
    with pytest.raises(RecordError, match="holds 1 distinct"):
        read_router_pool(_write(tmp_path, '{"question": "Same?"}\n{"question": "Same? "}\n', "pool.jsonl"))
    with pytest.raises(RecordError, match="line 2: field 'question' is empty"):
        read_router_pool(_write(tmp_path, '{"question": "A?"}\n{"question": ""}\n', "pool.jsonl"))
    assert read_router_pool(_write(tmp_path, '{"question": "A?"}\n{"question": "B?"}\n', "pool.jsonl")) == ["A?", "B?"]


def test_routing_names_a_bad_record_by_its_file_line(compose_cfg, tmp_path):
    from gag_lightning.routing.run import evaluate_routing, route_specs

    test = _write(tmp_path, '{"question": "q1?", "answer": "a", "dataset_name": "nq"}\n\n'
                            '{"question": "q2?", "answer": "a", "dataset_name": "weird_qa"}\n', "mixed.jsonl")
    cfg = compose_cfg(["experiment=smoke", f"router.test_set={test}"], "route")
    with pytest.raises(RecordError) as err:
        evaluate_routing(cfg, None, None, route_specs(cfg.router), tmp_path / "out")
    assert (err.value.line, err.value.field) == (3, "dataset_name") and "weird_qa" in str(err.value)


# ------------------------------------------------------------------------------------------ context length
def test_prompt_longer_than_the_base_is_refused(base_dir, tokenizer):
    from gag_lightning.eval.generation import DecodingConfig, generate_batched
    from gag_lightning.models.loading import load_causal_lm

    base = load_causal_lm(base_dir)
    ids = tokenizer(LONG_QUERY, add_special_tokens=False)["input_ids"]
    assert len(ids) > base.config.max_position_embeddings
    with pytest.raises(ContextLengthError, match=r"prompt 2 of 2: the prompt is \d+ tokens.*max_position_embeddings="
                                                 r"2048"):
        generate_batched(base, tokenizer, [ids[:10], ids], DecodingConfig(max_new_tokens=4), [0])
    # the last position counts: a prompt that leaves no room for max_new_tokens is refused too
    with pytest.raises(ContextLengthError, match="needs 2049 positions"):
        generate_batched(base, tokenizer, [ids[:2045]], DecodingConfig(max_new_tokens=4), [0])


def test_routed_answer_names_the_test_file_line_of_a_long_query(compose_cfg, tmp_path):
    from gag_lightning.data.records import MixedRecord
    from gag_lightning.routing.answer import answer_routed

    test = tmp_path / "mixed.jsonl"
    cfg = compose_cfg(["experiment=smoke", f"router.test_set={test}"], "route")
    records = [MixedRecord(0, "Short?", ["a"], "nq", line=1), MixedRecord(1, LONG_QUERY, ["a"], "nq", line=4)]
    with pytest.raises(ContextLengthError, match=re.escape(f"{test}, line 4: field 'question': the prompt is")):
        answer_routed(cfg, [r.question for r in records], ["general", "general"], records=records,
                      out_dir=tmp_path / "out")


# ------------------------------------------------------------------------------------------ damaged artifacts
def _adapter(folder: Path) -> Path:
    from gag_lightning.models.adapter import AdapterConfig, GAGAdapter
    from gag_lightning.models.adapter_io import save_adapter

    config = AdapterConfig(expert_hidden=8, base_hidden=12, slots=2, layers=2, layer_keys=["last", "minus2"])
    return save_adapter(GAGAdapter(config), folder)


def test_adapter_config_that_does_not_fit_its_weights_names_folder_and_dimension(tmp_path):
    from gag_lightning.models.adapter import ADAPTER_CONFIG
    from gag_lightning.models.adapter_io import load_adapter

    folder = _adapter(tmp_path / "adapter")
    config = json.loads((folder / ADAPTER_CONFIG).read_text())
    config["expert_hidden"] = 16
    (folder / ADAPTER_CONFIG).write_text(json.dumps(config))
    with pytest.raises(SchemaMismatchError) as err:
        load_adapter(folder)
    message = str(err.value)
    assert str(folder) in message and "dimension" in message and "expert_hidden=16" in message
    assert "8 in adapter.safetensors" in message


def test_truncated_adapter_weights_name_the_file(tmp_path):
    from gag_lightning.models.adapter import ADAPTER_WEIGHTS
    from gag_lightning.models.adapter_io import load_adapter

    folder = _adapter(tmp_path / "adapter")
    weights = folder / ADAPTER_WEIGHTS
    weights.write_bytes(weights.read_bytes()[:40])
    with pytest.raises(GAGError, match=re.escape(f"{weights}: cannot read the weights")):
        load_adapter(folder)


def test_truncated_model_weights_name_the_file(tmp_path, tiny_expert_dir):
    from gag_lightning.models.loading import load_causal_lm

    model_dir = shutil.copytree(tiny_expert_dir, tmp_path / "expert")
    weights = model_dir / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(GAGError, match=re.escape(f"{weights}: cannot read the weights")):
        load_causal_lm(model_dir)


# ------------------------------------------------------------------------------------------ file permissions
@contextmanager
def _umask(mask: int):
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


def _mode(path: Path) -> int:
    return path.stat().st_mode & 0o777


@pytest.mark.parametrize("mask", [0o022, 0o027])
def test_saved_weights_get_the_umask_permissions(tmp_path, tiny_expert_dir, mask):
    from gag_lightning.models.adapter import ADAPTER_WEIGHTS
    from gag_lightning.models.loading import load_causal_lm, load_tokenizer
    from gag_lightning.routing.prototypes import TENSORS_FILE, PrototypeBank
    from gag_lightning.stages.expert.runner import export_expert

    want = 0o666 & ~mask
    with _umask(mask):
        adapter = _adapter(tmp_path / "adapter")
        protos = torch.nn.functional.normalize(torch.randn(3, 4), dim=1)
        bank = PrototypeBank("demo", protos, "enc", dim=4, k=3, pool_size=3).save(tmp_path / "bank")
        trainer = SimpleNamespace(is_global_zero=True, global_step=0, strategy=SimpleNamespace(barrier=lambda *_: None))
        export_expert(trainer, SimpleNamespace(model=load_causal_lm(tiny_expert_dir)), SimpleNamespace(best_path=None),
                      tmp_path / "export", load_tokenizer(tiny_expert_dir), tiny_expert_dir, "float32")
    assert _mode(adapter / ADAPTER_WEIGHTS) == want
    assert _mode(bank / TENSORS_FILE) == want
    assert _mode(tmp_path / "export" / "model.safetensors") == want
    assert _mode(adapter / "adapter_config.json") == want
