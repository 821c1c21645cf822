"""The LoRA baseline: frozen base bit-identical, LoRA-only training and artifact, answer-only labels, eval system."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import lightning as L
import pytest
import torch
from safetensors import safe_open

from gag_lightning.data.records import QARecord
from gag_lightning.eval.generation import DecodingConfig
from gag_lightning.eval.harness import EvalHarness, EvalItem
from gag_lightning.models.loading import load_causal_lm, load_tokenizer, resolve_path
from gag_lightning.prompts import GENERAL_REQUEST_TEXT
from gag_lightning.stages.expert.qa import collate_sft
from gag_lightning.stages.lora.datamodule import LoRADataModule, encode_plain
from tests.conftest import ROOT, compose
from tests.test_gag_stage import RECORDS, make_bank

INSTRUCTION = "You are an expert of the lab."


@pytest.fixture(scope="module")
def smoke_cfg():
    return compose(["experiment=smoke", "stage=lora", f"paths.cache_dir={ROOT / '.cache'}", "paths.output_dir=/tmp"])


@pytest.fixture(scope="module")
def base_dir(smoke_cfg) -> Path:
    return resolve_path(smoke_cfg.model.base, smoke_cfg.paths.cache_dir)


def qa_records() -> list[QARecord]:
    return [QARecord(i, f"r{i}", q, a) for i, (q, a, _) in enumerate(RECORDS)]


def tensor_digests(state: dict[str, torch.Tensor]) -> dict[str, str]:
    return {k: hashlib.sha256(v.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()
            for k, v in state.items()}


def base_tensors_of(peft_model) -> dict[str, torch.Tensor]:
    """The wrapped base's own tensors under their original names (peft moves them to ``<layer>.base_layer``)."""
    state = peft_model.get_base_model().state_dict()
    return {k.replace(".base_layer.", "."): v for k, v in state.items() if "lora_" not in k}


# ------------------------------------------------------------------------------------------ data
def test_labels_are_answer_and_end_of_turn_only_with_pad_equal_to_eos(base_dir):
    tok = load_tokenizer(base_dir)
    tok.pad_token = tok.eos_token  # pad == eos == <|im_end|>: the stop target must stay attended and labelled
    eot = tok.convert_tokens_to_ids("<|im_end|>")
    long, short = qa_records()[3], QARecord(9, "s", "Short?", "Yes.")
    examples = [encode_plain(r, tok, INSTRUCTION) for r in (long, short)]
    batch = collate_sft(examples, tok.pad_token_id)
    for row, (ex, rec) in enumerate(zip(examples, (long, short), strict=True)):
        n = len(ex.input_ids)
        assert batch["attention_mask"][row].sum() == n and batch["attention_mask"][row, :n].all()
        labelled = batch["labels"][row] != -100
        assert labelled.nonzero().flatten().tolist() == list(range(ex.num_prompt, n))
        ids = batch["input_ids"][row][labelled]
        assert ids[-1] == eot and tok.decode(ids[:-1]) == rec.answer
    assert batch["input_ids"][1, -1] == tok.pad_token_id and batch["labels"][1, -1] == -100  # padding untrained
    prompt = tok.decode(examples[0].input_ids[: examples[0].num_prompt])
    assert f"{INSTRUCTION}\n{GENERAL_REQUEST_TEXT}\nQuestion: {long.question}\n" in prompt
    assert "Knowledge" not in prompt and prompt.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")


def test_training_prompt_is_the_eval_prompt_of_base_and_lora(base_dir):
    tok = load_tokenizer(base_dir)
    harness = EvalHarness(None, tok, DecodingConfig())
    records = qa_records()
    items = [EvalItem(id=r.id, question=r.question, reference=r.answer, instruction=INSTRUCTION) for r in records]
    trained = [encode_plain(r, tok, INSTRUCTION) for r in records]
    expected = [ex.input_ids[: ex.num_prompt] for ex in trained]
    assert harness.prompts("lora", items) == expected == harness.prompts("base", items)
    assert harness.added_prompt_tokens("lora", items) == 0.0


# ------------------------------------------------------------------------------------------ training and artifact
def test_lora_trains_only_lora_keeps_base_bit_identical_and_roundtrips(smoke_cfg, base_dir, tmp_path):
    from peft import get_peft_model

    from gag_lightning.stages.gag.runner import weights_bytes
    from gag_lightning.stages.lora.module import LoRAModule, trainable_names
    from gag_lightning.stages.lora.runner import LORA_CONFIG, LORA_WEIGHTS, load_lora, lora_config, save_lora

    tok = load_tokenizer(base_dir)
    base = load_causal_lm(base_dir, "float32")
    before = tensor_digests(base.state_dict())
    torch.manual_seed(0)
    model = get_peft_model(base, lora_config(smoke_cfg.lora))
    names = trainable_names(model)
    assert names and all("lora_" in n for n in names)
    assert {n.split(".")[-4] for n in names} >= {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                 "down_proj"}
    lora_before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    dm = LoRADataModule(qa_records(), tok, instruction=INSTRUCTION, batch_size=1)
    dm.setup("fit")
    module = LoRAModule(model, lr=1e-2, warmup_ratio=0.0)
    trainer = L.Trainer(max_steps=2, accumulate_grad_batches=2, accelerator="cpu", logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        gradient_clip_val=1.0, limit_val_batches=0)
    trainer.fit(module, datamodule=dm)
    assert trainer.global_step == 2
    after = base_tensors_of(model)
    assert after.keys() == before.keys() and tensor_digests(after) == before
    changed = [n for n, p in model.named_parameters() if p.requires_grad and not torch.equal(p, lora_before[n])]
    assert changed and any("lora_B" in n for n in changed)

    # the artifact holds the LoRA tensors and their config only, a fraction of the base
    save_lora(model, tmp_path / "lora")
    assert {p.name for p in (tmp_path / "lora").iterdir()} == {LORA_WEIGHTS, LORA_CONFIG}
    with safe_open(str(tmp_path / "lora" / LORA_WEIGHTS), "pt") as f:
        keys = list(f.keys())
    assert keys and all("lora_" in k for k in keys)
    assert len(keys) == len(names)
    assert (tmp_path / "lora" / LORA_WEIGHTS).stat().st_size < weights_bytes(base_dir) / 2

    # reloaded onto a fresh base: identical logits; with the LoRA switched off: the plain base's logits
    ids = torch.tensor([dm.train_set[0].input_ids])
    model.eval()
    fresh_base = load_causal_lm(base_dir, "float32").eval()
    with torch.no_grad():
        plain = fresh_base(input_ids=ids).logits
        reloaded = load_lora(fresh_base, tmp_path / "lora")
        a = model(input_ids=ids).logits
        b = reloaded(input_ids=ids).logits
        with reloaded.disable_adapter():
            off = reloaded(input_ids=ids).logits
    assert torch.equal(a, b) and not torch.equal(a, plain) and torch.equal(off, plain)


# ------------------------------------------------------------------------------------------ records and keys
def test_lora_trains_on_stage_three_records_and_keys_them(compose_cfg):
    from gag_lightning.keys import artifact_dir, stage_key
    from gag_lightning.stages.gag.datamodule import split_positions
    from gag_lightning.stages.lora.runner import train_records

    demo = compose_cfg(["stage=lora"])  # the demo preset: all 112 train records get a memory
    records = train_records(demo)
    train_pos, val_pos = split_positions(112, 0.05, demo.seed)
    assert [r.index for r in records] == train_pos and len(records) == 106 and len(val_pos) == 6
    assert len(train_records(compose_cfg(["stage=lora", "gag.val_source=none"]))) == 112
    capped = compose_cfg(["stage=lora", "memory.max_records={train: 96, test_kb_only: 8}"])
    assert len(train_records(capped)) == len(split_positions(96, 0.05, demo.seed)[0])
    same = ["gag.adapter.fusion=uniform", "gag.loss_weights.sem=0", "memory.compression.slots=2",
            "hardware.num_workers=3", "gag.lr=0.5"]
    other = ["memory.max_records=50", "gag.val_fraction=0.2", "gag.max_steps=7", "lora.r=4", "seed=3",
             "model.expert.file=other.gguf", "hardware.base_dtype=bfloat16", "domain.instruction=x"]
    ref = artifact_dir(demo, "lora")
    assert all(artifact_dir(compose_cfg(["stage=lora", o]), "lora") == ref for o in same)
    assert all(artifact_dir(compose_cfg(["stage=lora", o]), "lora") != ref for o in other)
    # the evaluation is keyed by the LoRA only when it evaluates it
    with_lora = stage_key(compose_cfg(["stage=pipeline"]), "eval")
    assert "lora" in with_lora and "lora" not in stage_key(compose_cfg(["stage=eval"]), "eval")
    changed = stage_key(compose_cfg(["stage=pipeline", "lora.r=4"]), "eval")
    assert changed["lora"] != with_lora["lora"]


def test_pipeline_skips_an_unused_lora_and_refuses_another_base(compose_cfg, base_dir, tmp_path):
    from gag_lightning.errors import SchemaMismatchError
    from gag_lightning.stages.lora.runner import check_lora_base, run_lora

    cfg = compose_cfg(["experiment=smoke", "eval.systems=[base,gag]"])
    assert run_lora(cfg)["unused"] is True and not (tmp_path / "artifacts").exists()
    folder = tmp_path / "foreign"
    folder.mkdir()
    (folder / "manifest.json").write_text(json.dumps({"inputs": {"base_model": "other@123"}}))
    with pytest.raises(SchemaMismatchError, match="other@123"):
        check_lora_base(folder, base_dir)


# ------------------------------------------------------------------------------------------ end to end
def test_lora_stage_and_eval_system_end_to_end(compose_cfg, tmp_path):
    """run_lora then run_eval (systems base + lora) on a synthetic test bank, through Hydra."""
    from gag_lightning.stages import run

    mem = tmp_path / "memory"
    make_bank(mem / "test", n=4, seed=1)
    common = ["experiment=smoke", "stage=eval", f"gag.memory_dir={mem}", "lora.max_steps=2", "eval.max_records=3",
              "eval.splits=[test]", "domain.answer_max_new_tokens=4", "memory.max_records=24"]
    results = run(compose_cfg([*common, "run_stages=[lora,eval]", "eval.systems=[base,lora]"]))
    lora_dir = Path(results["lora"]["artifact"])
    manifest = json.loads((lora_dir / "manifest.json").read_text())
    m = manifest["metrics"]
    assert m["train_records"] == 23 and 0 < m["lora_bytes"] < m["base_bytes"] and m["lora_to_base"] < 0.5
    assert manifest["config"]["config"]["max_steps"] == 2 and manifest["global_step"] == 2
    assert sorted(p.name for p in lora_dir.iterdir()) == ["adapter_config.json", "adapter_model.safetensors",
                                                          "manifest.json"]
    eval_dir = Path(results["eval"]["artifact"]) / "test"
    metrics = json.loads((eval_dir / "metrics.json").read_text())
    assert set(metrics["systems"]) == {"base", "lora"}
    assert metrics["systems"]["lora"]["added_prompt_tokens"] == 0.0 and metrics["systems"]["lora"]["n"] == 3
    assert metrics["settings"]["lora_bytes"] == m["lora_bytes"] and metrics["settings"]["lora"] == str(lora_dir)
    assert "eval/test/lora/bertscore_f1" in results["eval"]

    # the base system answers exactly as in an evaluation without the LoRA loaded (it is switched off)
    alone = run(compose_cfg([*common, "run_stages=[eval]", "eval.systems=[base]"]))
    assert alone["eval"]["artifact"] != results["eval"]["artifact"]

    def predictions(folder: str, system: str) -> list[str]:
        rows = [json.loads(x) for x in (Path(folder) / "test" / "predictions.jsonl").read_text().splitlines()]
        return [r["prediction"] for r in rows if r["system"] == system]

    assert predictions(alone["eval"]["artifact"], "base") == predictions(results["eval"]["artifact"], "base")
    again = run(compose_cfg([*common, "run_stages=[lora,eval]", "eval.systems=[base,lora]"]))
    assert again["lora"]["skipped"] and again["eval"]["skipped"]
