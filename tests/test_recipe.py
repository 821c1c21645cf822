"""Stage III recipe switches of METHOD.md section 5b on tiny models and a synthetic memory bank: KL
self-distillation (teacher = the base reading the background as text) and the reconstruction warm-up; both
off by default, both in the gag artifact key when on.

The teacher's logits and the KL are re-derived here from a hand-rendered expert_context prompt, not from the
collator's masks.
"""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import pytest
import torch

from gag_lightning.models.adapter import GAG_TOKEN
from gag_lightning.prompts import RECON_INSTRUCTION, context_user_text, decode_prompt, render_prompt
from gag_lightning.stages.gag.datamodule import GAGCollator, GAGDataModule
from gag_lightning.stages.gag.module import GAGModule, fit_with_recon
from gag_lightning.stages.gag.recon import ReconDataModule
from tests.test_gag_stage import RECORDS, FixedTargets, make_adapter, make_bank

S = 4
INSTRUCTION = "You are an expert."
REQUEST = "Please answer the following question based on the knowledge provided."


@pytest.fixture(scope="module")
def bank_dir(tmp_path_factory) -> Path:
    return make_bank(tmp_path_factory.mktemp("bank") / "train")


def datamodule(bank_dir, tokenizer, **kw) -> GAGDataModule:
    dm = GAGDataModule(bank_dir, tokenizer, instruction=INSTRUCTION, request_text=REQUEST, val_source="none",
                       batch_size=2, **kw)
    dm.setup("fit")
    return dm


def collate(dm: GAGDataModule, n: int = 3) -> dict:
    return GAGCollator(dm.tokenizer.pad_token_id, teacher=dm.teacher_context)([dm.sets["train"][i] for i in range(n)])


def manual_kl(student: torch.Tensor, teacher: torch.Tensor, tau: float) -> torch.Tensor:
    p = torch.softmax(teacher.double() / tau, dim=-1)
    q = torch.softmax(student.double() / tau, dim=-1)
    return tau**2 * (p * (p.log() - q.log())).sum(-1).mean()


# ------------------------------------------------------------------------------------------ KL self-distillation
def test_kl_teacher_is_the_base_reading_the_background_on_the_context_prompt(bank_dir, tokenizer, base, gag_id):
    plain = collate(datamodule(bank_dir, tokenizer))
    assert not any(k.startswith("teacher") or k == "kl_mask" for k in plain)  # off: batches as before

    dm = datamodule(bank_dir, tokenizer, teacher_context=True)
    batch = collate(dm)
    assert torch.equal(batch["input_ids"], plain["input_ids"]) and torch.equal(batch["labels"], plain["labels"])
    tau, a_kl = 2.0, 0.3
    module = GAGModule(base, make_adapter(base, semantic_dim=None), gag_id,
                       loss_weights={"nll": 1.0, "sem": 0.0, "div": 0.0, "kl": a_kl}, kl_temperature=tau)
    teacher_logits = module.teacher_logits(batch)
    with torch.no_grad():
        total, parts, _ = module.compute_losses(batch)
        student_logits = module(batch["input_ids"], batch["attention_mask"], batch["memory"])[0].logits

    metas = dm.bank.metas()
    students, teachers = [], []
    for row, ex in enumerate(dm.sets["train"].examples[:3]):
        meta = metas[ex.row]
        # the teacher by hand: the expert_context user turn, rendered like the GAG prompt, + the same answer ids
        user = context_user_text(INSTRUCTION, REQUEST, meta["question"], meta["background"])
        prompt = tokenizer(render_prompt(tokenizer, [{"role": "user", "content": user}]),
                           add_special_tokens=False)["input_ids"]
        answer = ex.input_ids[ex.num_prompt:]  # answer + end-of-turn, as labelled in the GAG sequence
        full = prompt + answer
        t_ids = batch["teacher_input_ids"][row]
        assert t_ids[: len(full)].tolist() == full and int(batch["teacher_attention_mask"][row].sum()) == len(full)
        assert gag_id not in t_ids.tolist() and f"Knowledge: {meta['background']}\n" in tokenizer.decode(t_ids)
        with torch.no_grad():
            alone = base(input_ids=torch.tensor([full])).logits[0]
        n = len(answer)
        want = alone[len(prompt) - 1 : len(prompt) - 1 + n]  # the positions predicting answer tokens incl. eot
        got = teacher_logits[row][batch["teacher_kl_mask"][row]]
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        s_pos = batch["kl_mask"][row].nonzero().flatten().tolist()
        assert s_pos == list(range(ex.num_prompt - 1, ex.num_prompt - 1 + n))
        assert (batch["labels"][row, [p + 1 for p in s_pos]] == torch.tensor(answer)).all()
        students.append(student_logits[row, s_pos])
        teachers.append(want)
    kl = manual_kl(torch.cat(students), torch.cat(teachers), tau)
    assert parts["kl"].item() == pytest.approx(kl.item(), rel=1e-4, abs=1e-6)
    assert total.item() == pytest.approx(parts["nll"].item() + a_kl * kl.item(), rel=1e-5)

    # the KL gradient reaches the adapter through the frozen base; the teacher is under no_grad
    only_kl = GAGModule(base, make_adapter(base, semantic_dim=None), gag_id,
                        loss_weights={"nll": 0.0, "sem": 0.0, "div": 0.0, "kl": 1.0})
    loss, _, _ = only_kl.compute_losses(batch)
    loss.backward()
    assert only_kl.adapter.projector.w_in.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in base.parameters())


def test_kl_weight_without_teacher_batches_is_an_error(bank_dir, tokenizer, base, gag_id):
    from gag_lightning.errors import GAGError

    module = GAGModule(base, make_adapter(base, semantic_dim=None), gag_id,
                       loss_weights={"sem": 0.0, "kl": 0.5})
    with pytest.raises(GAGError, match="teacher"):
        module.compute_losses(collate(datamodule(bank_dir, tokenizer)))


# ------------------------------------------------------------------------------------------ reconstruction warm-up
class PhaseRecorder(GAGModule):
    """Records each micro-batch's phase and first row, and the adapter at the start of every fit."""

    def training_step(self, batch, batch_idx):
        self.seen = getattr(self, "seen", [])
        self.seen.append((self.phase, batch["input_ids"][0].tolist(), batch["labels"][0].tolist()))
        return super().training_step(batch, batch_idx)

    def on_train_start(self):
        super().on_train_start()
        self.snapshots = getattr(self, "snapshots", [])
        self.snapshots.append({k: v.detach().clone() for k, v in self.adapter.state_dict().items()})


def _trainer(steps: int) -> L.Trainer:
    return L.Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0)


def test_recon_warmup_runs_its_steps_before_the_qa_steps(bank_dir, tokenizer, base, gag_id):
    qa_dm = datamodule(bank_dir, tokenizer, semantic_encoder=FixedTargets())
    recon_dm = ReconDataModule(bank_dir, tokenizer, positions=qa_dm.positions["train"], batch_size=2)
    module = PhaseRecorder(base, make_adapter(base), gag_id, lr=1e-2, warmup_ratio=0.0)
    head = {k: v.clone() for k, v in module.adapter.semantic_head.state_dict().items()}
    recon_trainer, qa_trainer = _trainer(2), _trainer(2)
    fit_with_recon(module, qa_trainer, qa_dm, recon_trainer, recon_dm)

    assert recon_trainer.global_step == 2 and qa_trainer.global_step == 2  # the QA fit keeps its own budget
    assert [phase for phase, _, _ in module.seen] == ["recon", "recon", "qa", "qa"]
    backgrounds = {bg for _, _, bg in RECORDS}
    eot = tokenizer.convert_tokens_to_ids("<|im_end|>")
    for phase, ids, labels in module.seen:
        prompt = decode_prompt(tokenizer, [t for t, lab in zip(ids, labels, strict=True) if lab == -100], gag_id)
        target = [lab for lab in labels if lab != -100]
        assert target[-1] == eot  # the end-of-turn is trained in both phases
        if phase == "recon":
            assert f"{RECON_INSTRUCTION}\nKnowledge: {GAG_TOKEN * S}\n" in prompt and "Question:" not in prompt
            assert tokenizer.decode(target[:-1]) in backgrounds
        else:
            assert "Question:" in prompt and f"Knowledge: {GAG_TOKEN * S}" in prompt
            assert tokenizer.decode(target[:-1]) not in backgrounds  # the answer, not the background
    # the warm-up trained the adapter (mixer and projector), not the semantic head; the head trains again after
    start, after_recon = module.snapshots
    changed = {k for k in start if not torch.equal(start[k], after_recon[k])}
    assert any(k.startswith("projector.") for k in changed) and any(k.startswith("mixer.") for k in changed)
    assert not any(k.startswith("semantic_head.") for k in changed)
    assert all(torch.equal(after_recon[f"semantic_head.{k}"], v) for k, v in head.items())
    assert all(p.requires_grad for p in module.adapter.semantic_head.parameters()) and module.phase == "qa"
    assert "train/recon_nll" in recon_trainer.callback_metrics and "train/loss" not in recon_trainer.callback_metrics
    assert "train/loss" in qa_trainer.callback_metrics and "train/recon_nll" not in qa_trainer.callback_metrics


def test_recon_data_uses_the_given_rows_and_skips_empty_backgrounds(tmp_path, tokenizer):
    from gag_lightning.memory.bank import MemoryBank

    folder = make_bank(tmp_path / "b", n=5)
    bank = MemoryBank.open(folder)
    dm = ReconDataModule(bank, tokenizer, positions=[0, 2, 4])
    dm.setup()
    assert len(dm.dataset) == 3 and dm.dataset.indices == [0, 2, 4]
    assert torch.equal(dm.dataset.memories, bank.memories(dtype=None)[[0, 2, 4]])
    batch = next(iter(dm.train_dataloader()))
    assert batch["memory"].shape[1:] == bank.memories().shape[1:]


# ------------------------------------------------------------------------------------------ keys and the runner
def test_recipe_switches_enter_the_gag_key_only_when_on(compose_cfg):
    from gag_lightning.keys import artifact_dir, stage_key

    default = compose_cfg(["experiment=smoke"])
    assert default.gag.loss_weights.kl == 0.0 and default.gag.recon_steps == 0 and default.gag.kl_temperature == 1.0
    config = stage_key(default, "gag")["config"]
    assert "kl" not in config["loss_weights"] and "recon_steps" not in config and "kl_temperature" not in config
    base_dir = artifact_dir(default, "gag")
    assert artifact_dir(compose_cfg(["experiment=smoke", "gag.kl_temperature=2.0"]), "gag") == base_dir  # kl off
    kl = artifact_dir(compose_cfg(["experiment=smoke", "gag.loss_weights.kl=0.5"]), "gag")
    kl_tau = artifact_dir(compose_cfg(["experiment=smoke", "gag.loss_weights.kl=0.5", "gag.kl_temperature=2.0"]), "gag")
    recon = artifact_dir(compose_cfg(["experiment=smoke", "gag.recon_steps=2"]), "gag")
    assert len({base_dir, kl, kl_tau, recon}) == 4
    assert artifact_dir(compose_cfg(["experiment=smoke", "gag.recon_steps=2"]), "eval") != artifact_dir(default, "eval")


def test_run_gag_with_both_switches_logs_and_records_them(compose_cfg, tmp_path):
    from gag_lightning.stages import run

    mem = tmp_path / "memory"
    make_bank(mem / "train", n=6)
    cfg = compose_cfg(["experiment=smoke", "stage=gag", f"gag.memory_dir={mem}", "gag.max_steps=2",
                       "gag.batch_size=2", "gag.val_fraction=0.34", "gag.loss_weights.kl=0.5", "gag.recon_steps=2",
                       "gag.init=random", "memory.compression.slots=4", "run_stages=[gag]"])
    result = run(cfg)["gag"]
    manifest = json.loads((Path(result["artifact"]) / "manifest.json").read_text())
    m = manifest["metrics"]
    assert {"train/kl", "val/kl", "train/recon_nll", "train/nll", "val/loss"} <= set(m)
    assert m["recon_steps"] == 2 and m["recon_records"] == 4 and manifest["global_step"] == 2
    assert manifest["config"]["config"]["recon_steps"] == 2 and manifest["config"]["config"]["loss_weights"]["kl"] == 0.5
    rows = (tmp_path / "out" / "gag").rglob("metrics.csv")
    text = "".join(p.read_text() for p in rows)
    assert "train/recon_nll" in text and "train/kl" in text
