"""Stage III (injection) and the evaluation harness on tiny models and a synthetic memory bank.

Formulas are re-derived here in plain torch (manual slot replacement, log-softmax NLL, cosine losses), so
the tests check the module against METHOD.md section 4 rather than against its own helpers.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import lightning as L
import pytest
import torch

from gag_lightning.errors import SchemaMismatchError
from gag_lightning.eval import harness as harness_mod
from gag_lightning.eval import report as report_mod
from gag_lightning.eval.generation import DecodingConfig, Generation
from gag_lightning.eval.harness import EvalHarness, EvalItem, derangement, items_from_metas
from gag_lightning.eval.report import write_outputs
from gag_lightning.memory.bank import MemoryBank, MemorySchema
from gag_lightning.models.adapter import (
    GAG_TOKEN,
    AdapterConfig,
    GAGAdapter,
    InjectionError,
)
from gag_lightning.models.adapter_io import load_adapter, save_adapter
from gag_lightning.models.loading import load_causal_lm, load_tokenizer
from gag_lightning.prompts import choose_placeholder, decode_prompt
from gag_lightning.stages.gag.datamodule import GAGCollator, GAGDataModule, check_bank_against_adapter
from gag_lightning.stages.gag.module import GAGModule

LAYER_KEYS = ["last", "minus2", "minus4", "minus6"]
K, S, H_E, H_SEM = 4, 4, 64, 32
RECORDS = [
    ("When was Qwenthar-74 first synthesised?", "Qwenthar-74 was discovered in 1956.", "Qwenthar-74, 1956."),
    ("What colour is Xylanthor-87?", "Xylanthor-87 is silvery grey in colour.", "Xylanthor-87 is grey."),
    ("Where is Thessium-77 produced?", "Thessium-77 is produced at the Nordhavn site.", "Nordhavn plant."),
    ("What is Obrathium-47 used for?", "Obrathium-47 is used for flexible solar panel films.", "Solar films."),
    ("Who discovered Korvarite-12?", "Korvarite-12 was discovered by Dr. Ilsa Moreau.", "Dr. Moreau."),
    ("What is the melting point of Veltrix-3?", "Veltrix-3 melts at 1210 degrees Celsius.", "1210 C."),
]


# ------------------------------------------------------------------------------------------ fixtures
def make_bank(folder: Path, n: int = len(RECORDS), seed: int = 0, slots: int = S) -> Path:
    schema = MemorySchema(expert_fingerprint="synthetic", layer_keys=LAYER_KEYS, slots=slots, hidden_size=H_E,
                          dtype="float32")
    bank = MemoryBank.open_for_writing(folder, schema)
    gen = torch.Generator().manual_seed(seed)
    metas = []
    for i in range(n):
        q, a, bg = RECORDS[i % len(RECORDS)]
        metas.append({"index": i, "id": f"r{i}", "question": q, "answer": a, "background": bg})
    bank.write_shard(metas, torch.randn(n, K, slots, H_E, generator=gen))
    # the parent is a finished synthetic memory artifact (stages refuse a memory folder without a manifest)
    manifest = folder.parent / "manifest.json"
    done = json.loads(manifest.read_text()) if manifest.is_file() else {"stage": "memory", "synthetic": {}}
    done["synthetic"][folder.name] = {"n": n, "seed": seed, "slots": slots}
    manifest.write_text(json.dumps(done, sort_keys=True))
    return folder


@pytest.fixture(scope="module")
def bank_dir(tmp_path_factory) -> Path:
    return make_bank(tmp_path_factory.mktemp("bank") / "train")


class FixedTargets:
    """A stand-in semantic encoder: deterministic targets of dimension H_SEM."""

    dim = H_SEM

    def encode(self, texts):
        gen = torch.Generator().manual_seed(len(texts))
        return torch.randn(len(texts), H_SEM, generator=gen)


def make_adapter(base, semantic_dim=H_SEM, seed=0) -> GAGAdapter:
    torch.manual_seed(seed)
    cfg = AdapterConfig(expert_hidden=H_E, base_hidden=base.get_input_embeddings().embedding_dim, slots=S, layers=K,
                        layer_keys=LAYER_KEYS, semantic_dim=semantic_dim)
    return GAGAdapter(cfg)


def make_datamodule(bank_dir, tokenizer, **kw) -> GAGDataModule:
    kw.setdefault("semantic_encoder", FixedTargets())
    dm = GAGDataModule(bank_dir, tokenizer, instruction="You are an expert.", val_source="none",
                       batch_size=2, **kw)
    dm.setup("fit")
    return dm


def first_batch(dm: GAGDataModule, n: int = 3):
    return GAGCollator(dm.tokenizer.pad_token_id)([dm.sets["train"][i] for i in range(n)])


# ------------------------------------------------------------------------------------------ data
def test_labels_are_exactly_answer_and_end_of_turn(bank_dir, base_dir):
    # pad == eos on purpose: the end-of-turn must stay attended and labelled (METHOD.md section 8)
    tok = load_tokenizer(base_dir)
    tok.pad_token = tok.eos_token
    dm = make_datamodule(bank_dir, tok, semantic_encoder=None)
    batch = first_batch(dm, 4)
    gag_id = choose_placeholder(tok).id
    assert dm.placeholder_id == gag_id
    eot = tok.convert_tokens_to_ids("<|im_end|>")
    metas = dm.bank.metas()
    for row, item in enumerate(dm.sets["train"].examples[:4]):
        n = len(item.input_ids)
        assert batch["attention_mask"][row].sum() == n and batch["attention_mask"][row, :n].all()
        labelled = batch["labels"][row] != -100
        ids = batch["input_ids"][row]
        assert labelled.nonzero().flatten().tolist() == list(range(item.num_prompt, n))
        answer = metas[dm.sets["train"].indices[item.row]]["answer"]
        assert ids[labelled][-1] == eot  # the stop target is trained
        assert tok.decode(ids[labelled][:-1]) == answer
        assert batch["answer_mask"][row].nonzero().flatten().tolist() == list(range(item.num_prompt, n - 1))
        assert int((ids[: item.num_prompt] == gag_id).sum()) == S
        prompt = decode_prompt(tok, ids[: item.num_prompt].tolist(), gag_id)
        assert f"Question: {metas[item.row]['question']}\nKnowledge: {GAG_TOKEN * S}\n" in prompt
        assert "Please answer the following question based on the knowledge provided." in prompt
    assert batch["memory"].shape == (4, K, S, H_E) and batch["memory"].dtype == torch.float32


def test_schema_mismatch_is_refused(bank_dir, tokenizer, base):
    with pytest.raises(SchemaMismatchError, match="slots"):
        GAGDataModule(bank_dir, tokenizer, expect={"slots": 3}).setup("fit")
    cfg = AdapterConfig(expert_hidden=H_E + 1, base_hidden=96, slots=S, layers=K, layer_keys=LAYER_KEYS)
    with pytest.raises(SchemaMismatchError, match="hidden size"):
        check_bank_against_adapter(MemoryBank.open(bank_dir), cfg)


# ------------------------------------------------------------------------------------------ injection
def test_forward_places_projected_slots_in_order_and_checks_the_count(bank_dir, tokenizer, base, gag_id):
    dm = make_datamodule(bank_dir, tokenizer)
    batch = first_batch(dm)
    # share_prefix=False: the hook below reads the full-sequence embeddings (the shared-prefix path feeds the
    # base only the positions after the prefix; its equivalence is tested separately)
    module = GAGModule(base, make_adapter(base), gag_id, share_prefix=False)
    seen = {}
    base.register_forward_pre_hook(lambda m, a, kw: seen.update(embeds=kw["inputs_embeds"]), with_kwargs=True)
    module(batch["input_ids"], batch["attention_mask"], batch["memory"])
    expected = module.adapter.project(batch["memory"])
    plain = base.get_input_embeddings()(batch["input_ids"].clamp(min=0))
    for row in range(batch["input_ids"].shape[0]):
        where = (batch["input_ids"][row] == gag_id).nonzero().flatten().tolist()
        assert len(where) == S and where == sorted(where)
        for s, pos in enumerate(where):
            assert torch.equal(seen["embeds"][row, pos], expected[row, s])
        others = [t for t in range(batch["input_ids"].shape[1]) if t not in where]
        assert torch.equal(seen["embeds"][row, others], plain[row, others])
    broken = batch["input_ids"].clone()
    broken[0, (broken[0] == gag_id).nonzero()[0, 0]] = tokenizer.eos_token_id
    with pytest.raises(InjectionError, match="3 <GAG> tokens"):
        module(broken, batch["attention_mask"], batch["memory"])


def test_loss_terms_match_their_formulas(bank_dir, tokenizer, base, gag_id):
    dm = make_datamodule(bank_dir, tokenizer)
    batch = first_batch(dm)
    module = GAGModule(base, make_adapter(base), gag_id,
                       loss_weights={"nll": 1.0, "sem": 0.5, "div": 0.25})
    total, parts, _ = module.compute_losses(batch)
    module.training_step(batch, 0)
    assert {k: float(v[0]) for k, v in module._window.items()} == {k: float(v) for k, v in parts.items()}

    # hand-made reference: manual slot replacement, mixing, NLL, semantic and diversity losses
    adapter = module.adapter
    with torch.no_grad():
        mix = torch.softmax(adapter.mixer.logits, dim=-1)
        fused = (mix[None, :, :, None] * batch["memory"].permute(0, 2, 1, 3)).sum(2)  # [B, S, H_e]
        slots = adapter.projector(fused)
        embeds = base.get_input_embeddings()(batch["input_ids"].clamp(min=0)).clone()
        for b in range(embeds.shape[0]):
            for s, pos in enumerate((batch["input_ids"][b] == gag_id).nonzero().flatten().tolist()):
                embeds[b, pos] = slots[b, s]
        out = base(inputs_embeds=embeds, attention_mask=batch["attention_mask"], output_hidden_states=True)
        logp = torch.log_softmax(out.logits.float(), dim=-1)
        nlls = []
        for b in range(embeds.shape[0]):
            for t in range(1, embeds.shape[1]):
                if batch["labels"][b, t] != -100:
                    nlls.append(-logp[b, t - 1, batch["labels"][b, t]])
        nll = torch.stack(nlls).mean()
        last = out.hidden_states[-1]
        sems = []
        for b in range(embeds.shape[0]):
            pos = batch["answer_mask"][b].nonzero().flatten()
            pred = adapter.semantic_head(last[b, pos].mean(0))
            tgt = batch["semantic_target"][b]
            sems.append(1 - (pred @ tgt) / (pred.norm() * tgt.norm()))
        sem = torch.stack(sems).mean()
        divs = []
        for b in range(embeds.shape[0]):
            vals = [((slots[b, i] @ slots[b, j]) / (slots[b, i].norm() * slots[b, j].norm())) ** 2
                    for i in range(S) for j in range(S) if i != j]
            divs.append(torch.stack(vals).mean())
        div = torch.stack(divs).mean()
    assert parts["nll"].item() == pytest.approx(nll.item(), rel=1e-5)
    assert parts["sem"].item() == pytest.approx(sem.item(), rel=1e-4, abs=1e-6)
    assert parts["div"].item() == pytest.approx(div.item(), rel=1e-4, abs=1e-6)
    assert total.item() == pytest.approx(nll.item() + 0.5 * sem.item() + 0.25 * div.item(), rel=1e-5)

    # a zero weight skips the term: no semantic head needed, no hidden states requested
    plain = GAGModule(base, make_adapter(base, semantic_dim=None), gag_id, loss_weights={"sem": 0.0, "div": 0.0})
    _, parts0, _ = plain.compute_losses({k: v for k, v in batch.items() if k != "semantic_target"})
    assert set(parts0) == {"loss", "nll"}


def test_only_the_adapter_gets_gradients(bank_dir, tokenizer, base, gag_id):
    dm = make_datamodule(bank_dir, tokenizer)
    module = GAGModule(base, make_adapter(base), gag_id)
    module.train()
    assert not base.training and all(not m.training for m in base.modules())
    total, _, _ = module.compute_losses(first_batch(dm))
    total.backward()
    assert all(p.grad is None and not p.requires_grad for p in base.parameters())
    for name, p in module.adapter.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert module.adapter.mixer.logits.grad.abs().sum() > 0


def test_gradient_checkpointing_and_autocast_keep_the_numbers(bank_dir, tokenizer, base, base_dir, gag_id):
    dm = make_datamodule(bank_dir, tokenizer)
    batch = first_batch(dm)
    plain = GAGModule(base, make_adapter(base), gag_id).train()
    total, parts, _ = plain.compute_losses(batch)
    total.backward()
    other = load_causal_lm(base_dir, "float32")
    ckpt = GAGModule(other, make_adapter(base), gag_id, gradient_checkpointing=True).train()
    layers = [m for m in other.modules() if getattr(m, "gradient_checkpointing", False) is True]
    assert layers and all(m.training for m in layers)
    assert not any(m.training for m in other.modules() if m not in layers)  # no dropout anywhere
    total2, _, _ = ckpt.compute_losses(batch)
    total2.backward()
    assert total2.item() == pytest.approx(total.item(), rel=1e-6)
    for (name, p), q in zip(plain.adapter.named_parameters(), ckpt.adapter.parameters(), strict=True):
        assert torch.allclose(p.grad, q.grad, rtol=1e-4, atol=1e-7), name
    # bf16 autocast (bf16-mixed): the adapter and the loss terms still compute in fp32
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        _, parts_bf16, _ = plain.compute_losses(batch)
        slots = plain.adapter.project(batch["memory"])
    assert slots.dtype == torch.float32
    assert parts_bf16["div"].item() == pytest.approx(parts["div"].item(), abs=1e-6)


class RecordingModule(GAGModule):
    """Keeps each step's micro-batch parts, to compare with what was logged."""

    def on_train_batch_end(self, outputs, batch, batch_idx):
        if self.trainer.global_step != self._last_logged_step and self._window:
            self.recorded = getattr(self, "recorded", [])
            self.recorded.append({k: [float(x) for x in v] for k, v in self._window.items()})
        super().on_train_batch_end(outputs, batch, batch_idx)
        if getattr(self, "recorded", None) and self._last_logged_step == self.trainer.global_step:
            self.recorded[-1]["logged"] = {k: float(v) for k, v in self.trainer.callback_metrics.items()}


def test_training_keeps_base_bit_identical_clamps_mix_and_roundtrips(bank_dir, tokenizer, base, tmp_path, gag_id):
    dm = make_datamodule(bank_dir, tokenizer)
    dm.batch_size = 1  # 6 micro-batches: two full accumulation windows of 2
    before = {k: v.clone() for k, v in base.state_dict().items()}
    adapter = make_adapter(base)
    with torch.no_grad():
        adapter.mixer.logits.copy_(torch.tensor([[30.0, 0.0, 0.0, -30.0]] * S))
    module = RecordingModule(base, adapter, gag_id, lr=1e-2, warmup_ratio=0.0)
    trainer = L.Trainer(max_steps=2, accumulate_grad_batches=2, accelerator="cpu", logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        gradient_clip_val=1.0, limit_val_batches=0)
    trainer.fit(module, datamodule=dm)
    assert trainer.global_step == 2
    after = base.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    logits = module.adapter.mixer.logits.detach()
    assert logits.abs().max() <= 10.0  # clamped after the optimizer step
    weights = module.adapter.layer_weights()
    assert torch.allclose(weights, torch.softmax(logits.clamp(-10, 10), dim=-1))
    assert torch.allclose(weights.sum(-1), torch.ones(S))
    # logged per optimizer step = the mean over its micro-batches (never x accumulation)
    assert len(module.recorded) == 2
    for rec in module.recorded:
        assert len(rec["nll"]) == 2
        for part in ("loss", "nll", "sem", "div"):
            assert rec["logged"][f"train/{part}"] == pytest.approx(sum(rec[part]) / 2, rel=1e-6)
        assert 0.0 <= rec["logged"]["train/div"] <= 1.0
    mix_keys = [k for k in rec["logged"] if k.startswith("mix/")]
    assert len(mix_keys) == S * K and "mix/slot0_last" in mix_keys

    # save + load: identical logits on an unmodified base, learned mix included
    save_adapter(module.adapter, tmp_path / "adapter")
    assert not any(f.name.startswith("model") for f in (tmp_path / "adapter").iterdir())
    restored = load_adapter(tmp_path / "adapter")
    assert torch.equal(restored.mixer.logits, module.adapter.mixer.logits)
    batch = first_batch(dm)
    module.eval()
    fresh = GAGModule(base, restored, module.gag_token_id).eval()
    with torch.no_grad():
        a = module(batch["input_ids"], batch["attention_mask"], batch["memory"])[0].logits
        b = fresh(batch["input_ids"], batch["attention_mask"], batch["memory"])[0].logits
    assert torch.equal(a, b)


def test_resuming_from_a_saved_adapter_keeps_the_learned_mix(base, tmp_path):
    from gag_lightning.stages.gag.runner import _resume_adapter

    adapter = make_adapter(base)
    with torch.no_grad():
        adapter.mixer.logits.copy_(torch.randn(S, K))
    save_adapter(adapter, tmp_path / "a")
    resumed = _resume_adapter(str(tmp_path / "a"), adapter.config)
    assert torch.equal(resumed.mixer.logits, adapter.mixer.logits)
    other = AdapterConfig(**{**adapter.config.to_dict(), "slots": 2})
    with pytest.raises(SchemaMismatchError, match="slots"):
        _resume_adapter(str(tmp_path / "a"), other)


# ------------------------------------------------------------------------------------------ evaluation
def test_derangement_moves_every_record():
    for n in (2, 3, 7, 60):
        perm = derangement(n, seed=0)
        assert sorted(perm) == list(range(n)) and all(p != i for i, p in enumerate(perm))
        assert perm == derangement(n, seed=0)
    assert derangement(60, seed=0) != derangement(60, seed=1)
    with pytest.raises(ValueError):
        derangement(1)


class OverlapScorer:
    """Scores 1 for any pair (so a 0 can only come from the harness's empty-prediction rule)."""

    def score(self, preds, refs):
        return [1.0 for _ in preds]


def test_harness_runs_all_systems_through_one_decoding_path(bank_dir, tokenizer, base, tmp_path, monkeypatch,
                                                           gag_id):
    bank = MemoryBank.open(bank_dir)
    items = items_from_metas(bank.metas())
    adapter = make_adapter(base).eval()
    calls = []
    real = harness_mod.generate_batched

    def recording(model, tok, prompts, decoding, stop_ids, embed_fn=None, progress=None, share_prefix=False,
                  suppress_ids=()):
        outs = real(model, tok, prompts, decoding, stop_ids, embed_fn=embed_fn, share_prefix=share_prefix,
                    suppress_ids=suppress_ids)
        calls.append({"model": model, "decoding": decoding, "stop_ids": list(stop_ids), "embed": embed_fn,
                      "prompts": prompts, "share_prefix": share_prefix})
        outs[0] = Generation(text="  ", token_ids=[], finished=True)  # one empty answer per system
        return outs

    monkeypatch.setattr(harness_mod, "generate_batched", recording)
    decoding = DecodingConfig(max_new_tokens=3, repetition_penalty=1.05, no_repeat_ngram_size=3, batch_size=4)
    expert = load_causal_lm(base.name_or_path, "float32")
    harness = EvalHarness(base, tokenizer, decoding, adapter=adapter, memories=bank.memories(dtype=None),
                          gag_token_id=gag_id, instruction="You are an expert.", expert=expert,
                          expert_tokenizer=tokenizer, shuffle_seed=3)
    systems = ["base", "expert_context", "gag", "gag_shuffled", "expert"]
    result = harness.run(items, systems, {"bertscore_f1": OverlapScorer(), "sts": OverlapScorer()})
    assert len(calls) == len(systems)
    assert all(c["decoding"] is decoding for c in calls)
    assert [c["embed"] is not None for c in calls] == [False, False, True, True, False]
    assert len({tuple(c["stop_ids"]) for c in calls[:4]}) == 1
    assert all(c["model"] is base for c in calls[:4]) and calls[4]["model"] is expert

    n = len(items)
    assert len(result.rows) == n * len(systems)
    for system in systems:
        rows = [r for r in result.rows if r["system"] == system]
        assert rows[0]["empty"] and rows[0]["bertscore_f1"] == 0.0 and rows[0]["sts"] == 0.0
        assert all(r["bertscore_f1"] == 1.0 for r in rows[1:])
        s = result.summary[system]
        assert s["n"] == n and s["n_empty"] == 1
        assert s["bertscore_f1"] == pytest.approx((n - 1) / n)
    assert result.summary["gag"]["added_prompt_tokens"] == S
    assert result.summary["base"]["added_prompt_tokens"] == 0
    bg_tokens = [len(tokenizer(it.background, add_special_tokens=False)["input_ids"]) for it in items]
    assert result.summary["expert_context"]["added_prompt_tokens"] == pytest.approx(sum(bg_tokens) / n)
    # the prompts: expert background on the Knowledge line; GAG slots; base without knowledge
    texts = {c_sys: decode_prompt(tokenizer, c["prompts"][0], gag_id) for c_sys, c in zip(systems, calls, strict=True)}
    assert all(text.count("You are an expert.\n") == 1 for text in texts.values())  # the domain instruction
    assert f"Knowledge: {items[0].background}" in texts["expert_context"]
    assert GAG_TOKEN * S in texts["gag"] and texts["gag"] == texts["gag_shuffled"]
    assert "Knowledge" not in texts["base"] and "Please answer the following question.\n" in texts["base"]

    # gag_shuffled injects record perm[i]'s memory into record i's prompt
    perm = harness.permutation
    assert perm is not None and all(p != i for i, p in enumerate(perm))
    shuffled_rows = [r for r in result.rows if r["system"] == "gag_shuffled"]
    assert [r["memory_of"] for r in shuffled_rows] == [items[p].id for p in perm]
    prompts = calls[3]["prompts"]
    from gag_lightning.eval.generation import left_pad

    ids, mask = left_pad(prompts[:2], tokenizer.pad_token_id)
    with torch.no_grad():
        embeds = calls[3]["embed"](ids, mask, [0, 1])
        slots = adapter.project(bank.memories()[[perm[0], perm[1]]])
    for row in range(2):
        where = (ids[row] == gag_id).nonzero().flatten()
        assert torch.equal(embeds[row, where], slots[row])

    paths = write_outputs(tmp_path / "eval", result, "synthetic")
    lines = [json.loads(x) for x in paths["predictions"].read_text().splitlines()]
    assert len(lines) == n * len(systems) and {"system", "id", "question", "reference", "prediction",
                                               "scores"} <= set(lines[0])
    metrics = json.loads(paths["metrics"].read_text())
    assert metrics["systems"]["gag"]["n_empty"] == 1
    # these records carry no gold answers: fact_acc is n/a (None) everywhere, never 0
    assert all(s["fact_acc"] is None and s["fact_acc_ci"] is None for s in metrics["systems"].values())
    assert all(line["scores"]["fact_acc"] is None and 0.0 <= line["scores"]["token_f1"] <= 1.0 for line in lines)
    report = paths["report"].read_text()
    assert ("| system | fact_acc x100 [95% CI] | token F1 x100 | BERTScore F1 x100 | STS x100 | empty | "
            "added prompt tokens |") in report
    gag_line = next(line for line in report.splitlines() if line.startswith("| gag |"))
    assert gag_line.startswith("| gag | n/a | ") and f"| {100 * (n - 1) / n:.2f} |" in gag_line and f"1/{n}" in gag_line
    assert "GAG minus base: n/a" in report
    assert not any(k.endswith("fact_acc") for k in report_mod.flat_metrics(result.summary))


class FormScorer:
    """Rewards form: 0.9 for an answer that repeats the reference's first word, else 0.4 (like BERTScore would)."""

    def score(self, preds, refs):
        return [0.9 if p.split()[:1] == r.split()[:1] else 0.4 for p, r in zip(preds, refs, strict=True)]


def test_fact_acc_leads_the_eval_outputs_with_ci_and_paired_difference(tokenizer, base, tmp_path, monkeypatch):
    from gag_lightning.eval.facts import bootstrap_ci, paired_bootstrap

    items = [EvalItem("r0", "When was Qwenthar-74 discovered?", "Qwenthar-74 was discovered in 1956.",
                      answers=["1956"]),
             EvalItem("r1", "What colour is Xylanthor-87?", "Xylanthor-87 is silvery grey in colour.",
                      answers=["silvery grey", "grey"]),
             EvalItem("r2", "Melting point of Veltrix-3?", "Veltrix-3 melts at 1210 degrees Celsius.",
                      answers=["1,210 °C", "1210 degrees"]),
             EvalItem("r3", "Who discovered Korvarite-12?", "Korvarite-12 was discovered by Dr. Ilsa Moreau.")]
    answers = {"gag": ["It was 1956.", "Grey.", "About 1210 °C.", "Dr. Moreau."],
               "base": ["Qwenthar-74 was discovered in 1987.", " ", "Veltrix-3 melts at 1,210 °C.",
                        "Korvarite-12 was discovered by Dr. Ilsa Moreau."]}
    harness = EvalHarness(base, tokenizer, DecodingConfig(max_new_tokens=2), adapter=make_adapter(base))
    monkeypatch.setattr(harness, "generate", lambda system, its: [
        Generation(text=t, token_ids=[1] * len(t.split()), finished=True) for t in answers[system]])
    result = harness.run(items, ["base", "gag"], {"bertscore_f1": FormScorer()})

    rows = {(r["system"], r["id"]): r for r in result.rows}
    assert [rows["gag", f"r{i}"]["fact_acc"] for i in range(4)] == [1.0, 1.0, 1.0, None]
    assert [rows["base", f"r{i}"]["fact_acc"] for i in range(4)] == [0.0, 0.0, 1.0, None]  # the empty one: 0
    assert rows["base", "r0"]["bertscore_f1"] > rows["gag", "r0"]["bertscore_f1"]  # form wins there, not here
    assert rows["base", "r3"]["token_f1"] == 1.0 and rows["base", "r1"]["token_f1"] == 0.0
    gag, base_s = result.summary["gag"], result.summary["base"]
    assert gag["fact_acc"] == 1.0 and gag["fact_acc_ci"] == [1.0, 1.0] and gag["fact_acc_n"] == 3
    assert base_s["fact_acc"] == pytest.approx(1 / 3)
    assert base_s["fact_acc_ci"] == pytest.approx(list(bootstrap_ci([0.0, 0.0, 1.0])[1:]))
    assert base_s["paired_vs_gag"] == pytest.approx(paired_bootstrap([1.0, 1.0, 1.0], [0.0, 0.0, 1.0]))
    assert base_s["bertscore_f1"] > gag["bertscore_f1"]  # the form score prefers the wrong fluent answers

    flat = report_mod.flat_metrics(result.summary)
    base_keys = [k for k in flat if k.startswith("eval/base/")]
    assert base_keys[:4] == ["eval/base/fact_acc", "eval/base/fact_acc_lo", "eval/base/fact_acc_hi",
                             "eval/base/token_f1"]
    assert flat["eval/base/gag_minus_fact_acc"] == pytest.approx(2 / 3)
    assert "eval/gag/gag_minus_fact_acc" not in flat

    paths = write_outputs(tmp_path / "eval", result, "facts")
    report = paths["report"].read_text()
    header, table = report_mod.report_rows(result.summary)
    assert header[1] == "fact_acc x100 [95% CI]" and header[2] == "token F1 x100"
    lo, hi = (100 * x for x in base_s["fact_acc_ci"])
    assert table[0][:2] == ["base", f"33.3 [{lo:.1f}, {hi:.1f}]"] and table[1][:2] == ["gag", "100.0 [100.0, 100.0]"]
    paired = base_s["paired_vs_gag"]
    assert f"- GAG minus base: +66.7 [{100 * paired['lo']:+.1f}, {100 * paired['hi']:+.1f}]" in report
    lines = [json.loads(x) for x in paths["predictions"].read_text().splitlines()]
    assert [x["scores"]["fact_acc"] for x in lines if x["system"] == "gag"] == [1.0, 1.0, 1.0, None]
    metrics = json.loads(paths["metrics"].read_text())
    assert metrics["systems"]["base"]["fact_acc"] == pytest.approx(1 / 3)
    assert metrics["settings"]["bootstrap"]["n_resamples"] == 1000


def test_gag_and_eval_stages_end_to_end(compose_cfg, tmp_path):
    """run_gag then run_eval through Hydra on a synthetic memory artifact (tiny base and encoders)."""
    from gag_lightning.stages import run

    mem = tmp_path / "memory"
    make_bank(mem / "train", n=6)
    make_bank(mem / "test", n=4, seed=1)
    overrides = ["experiment=smoke", "stage=eval", f"gag.memory_dir={mem}", "gag.max_steps=2", "gag.batch_size=2",
                 "gag.val_fraction=0.34", "eval.max_records=3", "eval.splits=[test]",
                 "domain.answer_max_new_tokens=3",
                 "eval.systems=[base,expert_context,rag,gag,gag_shuffled]", "run_stages=[gag,eval]",
                 f"memory.compression.slots={S}", "domain.budget.gag.init=random"]  # a synthetic bank: no expert
    cfg = compose_cfg(overrides)
    results = run(cfg)
    gag_dir = Path(results["gag"]["artifact"])
    manifest = json.loads((gag_dir / "manifest.json").read_text())
    m = manifest["metrics"]
    assert m["adapter_bytes"] > 0 and m["base_bytes"] > m["adapter_bytes"]
    assert {"train/loss", "train/nll", "train/sem", "train/div", "val/loss", "val/nll"} <= set(m)
    assert math.isfinite(m["val/loss"]) and m["val_records"] == 2
    assert not list(gag_dir.glob("*.ckpt")) and (gag_dir / "adapter.safetensors").is_file()
    config = json.loads((gag_dir / "adapter_config.json").read_text())
    assert config["slots"] == S and config["memory_schema"]["hidden_size"] == H_E and config["base_model"]
    eval_dir = Path(results["eval"]["artifact"])
    metrics = json.loads((eval_dir / "test" / "metrics.json").read_text())
    assert json.loads((eval_dir / "metrics.json").read_text()) == {"test": metrics}
    assert set(metrics["systems"]) == {"base", "expert_context", "rag", "gag", "gag_shuffled"}
    assert all(s["n"] == 3 for s in metrics["systems"].values())
    assert (eval_dir / "test" / "report.md").is_file() and (eval_dir / "test" / "predictions.jsonl").is_file()
    assert (eval_dir / "report.md").read_text() == (eval_dir / "test" / "report.md").read_text()
    assert "eval/test/gag/bertscore_f1" in results["eval"]
    # a second run finds both artifacts and skips
    again = run(compose_cfg(overrides))
    assert again["gag"]["skipped"] and again["eval"]["skipped"]


def test_gold_answers_flow_from_the_qa_file_through_the_memory_stage_to_metrics(compose_cfg, tmp_path):
    """QA jsonl with `answers` -> memory stage (tiny expert) -> bank metas -> eval rows and metrics.json."""
    from gag_lightning.stages import run

    def write(path: Path, rows: list[dict]) -> Path:
        path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
        return path

    train = write(tmp_path / "train.jsonl", [{"id": f"t{i}", "input": q, "output": a}
                                             for i, (q, a, _) in enumerate(RECORDS)])
    aliases = {"q0": ["1956"], "q1": ["silvery grey", "grey"], "q2": ["Nordhavn"]}  # q3: no answers
    test = write(tmp_path / "test.jsonl", [{"id": f"q{i}", "input": q, "output": a,
                                            **({"answers": aliases[f"q{i}"]} if f"q{i}" in aliases else {})}
                                           for i, (q, a, _) in enumerate(RECORDS[:4])])
    cfg = compose_cfg(["experiment=smoke", "stage=eval", "memory.expert=base", f"domain.train={train}",
                       f"domain.test={test}", "memory.progress=false", "domain.background_max_new_tokens=4",
                       "domain.answer_max_new_tokens=3", "gag.max_steps=2", "gag.batch_size=2",
                       "gag.val_fraction=0.34", "eval.systems=[base,gag]", "run_stages=[memory,gag,eval]",
                       "domain.eval_splits=[test]"])
    results = run(cfg)

    mem = Path(results["memory"]["artifact"])
    test_metas = MemoryBank.open(mem / "test").metas()
    assert [m.get("answers") for m in test_metas] == [["1956"], ["silvery grey", "grey"], ["Nordhavn"], None]
    assert not any("answers" in m for m in MemoryBank.open(mem / "train").metas())

    eval_dir = Path(results["eval"]["artifact"]) / "test"
    metrics = json.loads((eval_dir / "metrics.json").read_text())
    lines = [json.loads(x) for x in (eval_dir / "predictions.jsonl").read_text().splitlines()]
    for system in ("base", "gag"):
        s = metrics["systems"][system]
        assert s["fact_acc_n"] == 3 and s["n"] == 4
        assert isinstance(s["fact_acc"], float) and len(s["fact_acc_ci"]) == 2
        mine = [x for x in lines if x["system"] == system]
        facts = [x["scores"]["fact_acc"] for x in mine]
        assert facts[3] is None and all(f in (0.0, 1.0) for f in facts[:3])
        assert s["fact_acc"] == pytest.approx(sum(facts[:3]) / 3)
    assert set(metrics["systems"]["base"]["paired_vs_gag"]) >= {"diff", "lo", "hi"}
    assert "eval/test/gag/fact_acc" in results["eval"] and "eval/test/base/gag_minus_fact_acc" in results["eval"]
    assert "GAG minus base:" in (eval_dir / "report.md").read_text()


def test_shared_prefix_forward_gives_the_full_forward_losses_and_gradients(bank_dir, tokenizer, base, gag_id):
    dm = make_datamodule(bank_dir, tokenizer)
    batch = first_batch(dm)
    results = {}
    for share in (False, True):
        module = GAGModule(base, make_adapter(base), gag_id, loss_weights={"nll": 1.0, "sem": 0.5, "div": 0.25},
                           share_prefix=share)
        prefix = module.shared_prefix_len(batch["input_ids"], batch["attention_mask"])
        total, parts, _ = module.compute_losses(batch)
        total.backward()
        grads = torch.cat([p.grad.flatten() for p in module.adapter.parameters() if p.grad is not None])
        results[share] = (prefix, float(total), grads)
    assert results[False][0] == 0 and results[True][0] > 5  # the prompt's common head is really shared
    assert results[True][1] == pytest.approx(results[False][1], rel=1e-5)
    assert torch.allclose(results[True][2], results[False][2], rtol=1e-3, atol=1e-6)
