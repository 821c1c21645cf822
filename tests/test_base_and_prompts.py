"""The base stays the published base, and one prompt builder serves training, evaluation and routing.

* Every base tensor hashes the same before and after the stages that touch the base (Stage III training and
  evaluation), for a tiny base without a spare special token (slots marked with ``MARK_ID``) and one with a
  spare special token (the placeholder); the embeddings are never resized and nothing is added to the tokenizer.
* A placeholder token is never generated, even by a base that strongly prefers it.
* The same record gives the same prompt token ids in Stage III training (the collated batch), in the eval
  harness and in routed answering; the record's instruction wins over the domain's everywhere.
* ``gag.val_source=test`` is refused unless ``gag.allow_test_selection=true``, and then every report says so.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch

from gag_lightning.errors import GAGError
from gag_lightning.eval.generation import DecodingConfig, Generation, generate_batched
from gag_lightning.eval.harness import EvalHarness, items_from_metas
from gag_lightning.memory.bank import MemoryBank, MemorySchema
from gag_lightning.models.adapter import AdapterConfig, GAGAdapter
from gag_lightning.models.loading import load_causal_lm, load_tokenizer, resolve_path
from gag_lightning.prompts import (
    GAG_TOKEN,
    MARK_ID,
    PromptSettings,
    build_messages,
    choose_placeholder,
    decode_prompt,
    record_instruction,
    stop_token_ids,
)
from gag_lightning.stages.gag.datamodule import GAGCollator, GAGDataModule
from tests.conftest import ROOT, compose
from tests.test_gag_stage import H_E, LAYER_KEYS, RECORDS, K, S, make_bank

SPARE = "<spare_a>"
SPARE_OVERRIDE = f'+model.base.extra_special_tokens=["{SPARE}"]'
DOMAIN_INSTRUCTION = "Answer about the lab."
REQUEST = "Please answer the following question based on the knowledge provided."


def tensor_digests(model) -> dict[str, str]:
    return {k: hashlib.sha256(v.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()
            for k, v in model.state_dict().items()}


def published_digests(base_dir: Path) -> dict[str, str]:
    from safetensors.torch import load_file

    tensors = {}
    for f in sorted(base_dir.glob("*.safetensors")):
        tensors.update(load_file(str(f)))
    return {k: hashlib.sha256(v.contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()
            for k, v in tensors.items()}


def spare_base_dir() -> Path:
    cfg = compose(["experiment=smoke", SPARE_OVERRIDE, f"paths.cache_dir={ROOT / '.cache'}", "paths.output_dir=/tmp"])
    return resolve_path(cfg.model.base, cfg.paths.cache_dir)


def random_adapter(base, seed: int = 0) -> GAGAdapter:
    torch.manual_seed(seed)
    return GAGAdapter(AdapterConfig(expert_hidden=H_E, base_hidden=base.get_input_embeddings().embedding_dim,
                                    slots=S, layers=K, layer_keys=LAYER_KEYS, semantic_dim=None)).eval()


# ------------------------------------------------------------------------------------------ the prompt rule
def test_one_instruction_rule_and_stripping_for_every_use():
    settings = PromptSettings(instruction="  Domain says.  ", request_text="Req.", base_request_text="Plain req.")
    own = {"question": "  What colour is X?\n", "instruction": " Record says. ", "answer": "Red."}
    bare = {"input": "What colour is X?", "answer": "Red."}
    assert record_instruction(own, settings.instruction) == "Record says."
    assert record_instruction(bare, settings.instruction) == "Domain says."
    assert record_instruction({"instruction": "   "}, "Domain says.") == "Domain says."
    texts = {use: build_messages(use, own, settings, num_slots=2, knowledge="  Bg.  ")[0]["content"]
             for use in ("sft", "gag", "context", "rag", "plain")}
    assert texts["sft"] == "Record says.\nQuestion: What colour is X?"
    assert texts["gag"] == f"Record says.\nReq.\nQuestion: What colour is X?\nKnowledge: {GAG_TOKEN * 2}\n"
    assert texts["context"] == texts["rag"] == "Record says.\nReq.\nQuestion: What colour is X?\nKnowledge: Bg.\n"
    assert texts["plain"] == "Record says.\nPlain req.\nQuestion: What colour is X?\n"
    assert build_messages("plain", bare, settings)[0]["content"].startswith("Domain says.\nPlain req.\n")
    with pytest.raises(ValueError, match="knowledge"):
        build_messages("context", own, settings)
    with pytest.raises(ValueError, match="num_slots"):
        build_messages("gag", own, settings)


def test_same_record_same_prompt_ids_in_training_eval_and_routing(tmp_path, tokenizer, base, gag_id, monkeypatch,
                                                                 compose_cfg):
    from gag_lightning.data.records import QARecord
    from gag_lightning.eval import harness as harness_mod
    from gag_lightning.stages.expert.qa import encode_sft
    from gag_lightning.stages.lora.datamodule import encode_plain

    # records: one with its own instruction (it wins everywhere), one without, one with a padded question
    folder = tmp_path / "bank"
    schema = MemorySchema(expert_fingerprint="synthetic", layer_keys=LAYER_KEYS, slots=S, hidden_size=H_E,
                          dtype="float32")
    bank = MemoryBank.open_for_writing(folder, schema)
    metas = [{"index": i, "id": f"r{i}", "question": q, "answer": a, "background": bg}
             for i, (q, a, bg) in enumerate(RECORDS[:3])]
    metas[0]["instruction"] = "Use your own words."
    metas[2]["question"] = "  " + metas[2]["question"] + " \n"
    bank.write_shard(metas, torch.randn(3, K, S, H_E, generator=torch.Generator().manual_seed(0)))

    dm = GAGDataModule(folder, tokenizer, instruction=DOMAIN_INSTRUCTION, request_text=REQUEST, val_source="none",
                       batch_size=3, teacher_context=True)
    dm.setup("fit")
    examples = dm.sets["train"].examples
    batch = GAGCollator(tokenizer.pad_token_id, teacher=True)([dm.sets["train"][i] for i in range(3)])
    trained = [batch["input_ids"][r, : ex.num_prompt].tolist() for r, ex in enumerate(examples)]
    teacher = [batch["teacher_input_ids"][r, : ex.teacher.num_prompt].tolist() for r, ex in enumerate(examples)]

    adapter = random_adapter(base)
    harness = EvalHarness(base, tokenizer, DecodingConfig(), adapter=adapter, gag_token_id=gag_id,
                          instruction=DOMAIN_INSTRUCTION, request_text=REQUEST)
    items = items_from_metas(MemoryBank.open(folder).metas())
    assert harness.prompts("gag", items) == trained
    assert harness.prompts("expert_context", items) == teacher  # the KL teacher = the expert_context system
    texts = [decode_prompt(tokenizer, ids, gag_id) for ids in trained]
    assert "Use your own words.\n" in texts[0] and DOMAIN_INSTRUCTION not in texts[0]
    assert all(f"{DOMAIN_INSTRUCTION}\n{REQUEST}\n" in t for t in texts[1:])
    assert f"Question: {RECORDS[2][0]}\nKnowledge: {GAG_TOKEN * S}\n" in texts[2]  # stripped in training too
    assert all(ids.count(gag_id) == S for ids in trained) and gag_id == MARK_ID

    # the LoRA baseline and the expert's SFT use the same builder (and rule) as the base and expert systems
    records = [QARecord(i, m["id"], m["question"], m["answer"], instruction=m.get("instruction", ""))
               for i, m in enumerate(metas)]
    lora = [encode_plain(r, tokenizer, DOMAIN_INSTRUCTION) for r in records]
    assert [ex.input_ids[: ex.num_prompt] for ex in lora] == harness.prompts("lora", items)
    harness.expert_tokenizer = tokenizer
    sft = [encode_sft(r, tokenizer, DOMAIN_INSTRUCTION) for r in records]
    assert [ex.input_ids[: ex.num_prompt] for ex in sft] == harness.prompts("expert", items)

    # routed answering: the domain route feeds the base the same ids (records without their own instruction); the
    # route's profile carries the instruction and request text its adapter was trained with
    from gag_lightning.prompts import choose_placeholder
    from gag_lightning.routing import answerer as answerer_mod
    from gag_lightning.routing.profiles import RouteProfile

    cfg = compose_cfg(["experiment=smoke"])
    fed: list[list[int]] = []

    def capture(model, tok, prompts, decoding, stop_ids, embed_fn=None, share_prefix=False, suppress_ids=()):
        fed.extend(prompts)
        return [Generation("x", [1], True) for _ in prompts]

    class Route:  # the route's expert only writes memories: stand-ins, the base's prompt is what is checked
        def __init__(self, profile, device, base_tokenizer):
            self.adapter, self.placeholder, self.selection_note = adapter, choose_placeholder(base_tokenizer), None

        def backgrounds(self, qs, batch_size, labels=None):
            return [[1]] * len(qs), [Generation("bg", [1], True) for _ in qs]

        def memories(self, prompts, gens, batch_size):
            return torch.randn(len(prompts), K, S, H_E)

    monkeypatch.setattr(harness_mod, "generate_batched", capture)
    monkeypatch.setattr(answerer_mod, "DomainRoute", Route)
    monkeypatch.setattr(answerer_mod, "check_base", lambda profile, identity: None)
    profile = RouteProfile(name="demo", instruction=DOMAIN_INSTRUCTION, request_text=REQUEST,
                           answer_max_new_tokens=4, adapter_dir=Path("a"))
    questions = [metas[1]["question"], metas[2]["question"]]
    answerer_mod.RouteAnswerer(cfg, {"demo": profile}).answer_route("demo", questions)
    assert fed == trained[1:]


# ------------------------------------------------------------------------------------------ the base is untouched
@pytest.mark.parametrize("spare", [False, True], ids=["mark", "spare_token"])
def test_gag_training_and_eval_leave_every_base_tensor_as_published(compose_cfg, tmp_path, monkeypatch, spare):
    from gag_lightning.models import base as base_mod
    from gag_lightning.stages import run
    from gag_lightning.stages.gag import runner as gag_pipeline

    loaded: list[dict] = []
    real_load_base = base_mod.load_base

    def recording_load_base(cfg):
        base, tok, placeholder, base_dir = real_load_base(cfg)
        loaded.append({"base": base, "tok": tok, "placeholder": placeholder, "dir": base_dir,
                       "before": tensor_digests(base)})
        return base, tok, placeholder, base_dir

    monkeypatch.setattr(gag_pipeline, "load_base", recording_load_base)  # imported by name when the runner loads
    monkeypatch.setattr(base_mod, "load_base", recording_load_base)  # the eval runner imports it when it runs
    mem = tmp_path / "memory"
    make_bank(mem / "train", n=4)
    make_bank(mem / "test", n=2, seed=1)
    overrides = ["experiment=smoke", "stage=eval", f"gag.memory_dir={mem}", "gag.max_steps=2", "gag.batch_size=2",
                 "gag.val_fraction=0.25", "eval.max_records=2", "eval.splits=[test]", "domain.answer_max_new_tokens=3",
                 "eval.systems=[base,gag]", "run_stages=[gag,eval]", f"memory.compression.slots={S}",
                 "domain.budget.gag.init=random"] + ([SPARE_OVERRIDE] if spare else [])
    results = run(compose_cfg(overrides))

    assert len(loaded) == 2  # the gag stage and the eval stage each loaded the base
    published = published_digests(loaded[0]["dir"])
    fresh = load_tokenizer(loaded[0]["dir"])
    for stage in loaded:
        base, tok = stage["base"], stage["tok"]
        after = tensor_digests(base)
        assert after == stage["before"] == published  # every tensor, bit for bit
        rows = base.get_input_embeddings().num_embeddings
        assert rows == len(fresh) == len(tok) == base.config.vocab_size  # no resize; no spare row to begin with
        assert base.get_output_embeddings().weight.shape[0] == rows
        assert tok.get_vocab() == fresh.get_vocab() and GAG_TOKEN not in tok.get_vocab()
    want = ({"token": SPARE, "id": fresh.convert_tokens_to_ids(SPARE)} if spare else {"token": None, "id": MARK_ID})
    assert loaded[0]["placeholder"].to_dict() == want
    adapter_config = json.loads((Path(results["gag"]["artifact"]) / "adapter_config.json").read_text())
    assert adapter_config["placeholder"] == want and adapter_config["selection"] == {"val_source": "split"}
    settings = json.loads((Path(results["eval"]["artifact"]) / "test" / "metrics.json").read_text())["settings"]
    assert settings["placeholder_id"] == want["id"] and settings["suppressed_ids"] == ([want["id"]] if spare else [])
    assert settings["notes"] == []


def test_a_placeholder_token_is_never_generated_even_when_the_base_prefers_it():
    base_dir = spare_base_dir()
    tok = load_tokenizer(base_dir)
    base = load_causal_lm(base_dir, "float32").eval()
    placeholder = choose_placeholder(tok)
    assert placeholder.token == SPARE
    bias = torch.zeros(base.config.vocab_size)
    bias[placeholder.id] = 1e4  # the base would now emit the placeholder at every step
    base.lm_head.register_forward_hook(lambda module, inputs, out: out + bias)
    metas = [{"id": f"r{i}", "question": q, "answer": a, "background": bg} for i, (q, a, bg) in enumerate(RECORDS[:3])]
    items = items_from_metas(metas)
    decoding = DecodingConfig(max_new_tokens=4, batch_size=2)  # no n-gram blocking: it would break the repeats
    harness = EvalHarness(base, tok, decoding, adapter=random_adapter(base), gag_token_id=placeholder.id,
                          memories=torch.randn(3, K, S, H_E), instruction=DOMAIN_INSTRUCTION)

    unguarded = generate_batched(base, tok, harness.prompts("base", items), decoding, harness.stop_ids)
    assert all(g.token_ids and set(g.token_ids) == {placeholder.id} for g in unguarded)  # the case is real
    for system in ("base", "expert_context", "gag", "gag_shuffled"):
        for gen in harness.generate(system, items):
            assert placeholder.id not in gen.token_ids, system
            assert SPARE not in tok.decode(gen.token_ids) and GAG_TOKEN not in gen.text
    assert stop_token_ids(tok) and placeholder.id not in stop_token_ids(tok)


# ------------------------------------------------------------------------------------------ test-split selection
def test_selecting_the_adapter_on_test_is_refused_unless_allowed_and_then_stamped(compose_cfg, tmp_path):
    from gag_lightning.stages import run
    from gag_lightning.stages.gag.runner import run_gag

    mem = tmp_path / "memory"
    make_bank(mem / "train", n=4)
    make_bank(mem / "test", n=2, seed=1)
    overrides = ["experiment=smoke", "stage=eval", f"gag.memory_dir={mem}", "gag.max_steps=1", "gag.batch_size=2",
                 "gag.val_source=test", "eval.max_records=2", "eval.splits=[test]", "domain.answer_max_new_tokens=2",
                 "eval.systems=[gag]", "run_stages=[gag,eval]", f"memory.compression.slots={S}",
                 "domain.budget.gag.init=random"]
    with pytest.raises(GAGError, match="allow_test_selection=true"):
        run_gag(compose_cfg(overrides))
    assert not (tmp_path / "artifacts").exists() or not list((tmp_path / "artifacts").rglob("adapter.safetensors"))

    results = run(compose_cfg(overrides + ["gag.allow_test_selection=true"]))
    gag_dir, eval_dir = Path(results["gag"]["artifact"]), Path(results["eval"]["artifact"])
    selection = json.loads((gag_dir / "adapter_config.json").read_text())["selection"]
    assert selection == {"val_source": "test", "val_split": "test"}
    for report in (eval_dir / "report.md", eval_dir / "test" / "report.md"):
        text = report.read_text()
        assert "> **Warning:** The GAG adapter was selected on split 'test'" in text, report
        assert text.index("Warning") < text.index("| system |")  # above the table
    split_metrics = json.loads((eval_dir / "test" / "metrics.json").read_text())
    top_metrics = json.loads((eval_dir / "metrics.json").read_text())
    for settings in (split_metrics["settings"], top_metrics["test"]["settings"]):
        assert len(settings["notes"]) == 1 and "gag.allow_test_selection=true" in settings["notes"][0]
        assert settings["adapter_selection"] == selection


def test_routed_reports_carry_the_test_selection_note(tmp_path):
    from omegaconf import OmegaConf

    from gag_lightning.data.records import MixedRecord
    from gag_lightning.models.adapter_io import selection_note
    from gag_lightning.routing.answer import score_routed

    config = AdapterConfig(expert_hidden=H_E, base_hidden=96, slots=S, layers=K, layer_keys=LAYER_KEYS)
    assert selection_note(config) is None
    config.selection = {"val_source": "test", "val_split": "test_kb_only"}
    note = selection_note(config)
    assert "selected on split 'test_kb_only'" in note
    cfg = OmegaConf.create({"trainer": {"accelerator": "cpu"},
                            "router": {"domains": {"general": {"dataset_names": ["nq"]}}}})
    score_routed(cfg, [MixedRecord(0, "Capital of France?", ["Paris"], "nq")], ["general"], ["Paris."], {}, tmp_path,
                 [f"route demo: {note}"])
    assert f"> **Warning:** route demo: {note}" in (tmp_path / "report.md").read_text()
    assert json.loads((tmp_path / "metrics.json").read_text())["notes"] == [f"route demo: {note}"]
