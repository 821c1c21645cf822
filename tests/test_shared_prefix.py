"""The shared-prefix training forward (SFT and LoRA steps) gives the plain forward's loss and gradients."""

from __future__ import annotations

import pytest
import torch

from gag_lightning.models.losses import answer_nll
from gag_lightning.models.shared_prefix import causal_lm_logits, shared_prefix_len


def _batch(vocab: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    head = torch.randint(5, vocab, (9,), generator=g)
    rows, labels, masks = [], [], []
    for n_own, n_pad in ((6, 0), (4, 2), (5, 1)):  # right padding, as the SFT collate does
        own = torch.randint(5, vocab, (n_own,), generator=g)
        ids = torch.cat([head, own, torch.zeros(n_pad, dtype=torch.long)])
        lab = torch.full_like(ids, -100)
        lab[9 + 2: 9 + n_own] = ids[9 + 2: 9 + n_own]  # the answer: the row's last tokens
        rows.append(ids), labels.append(lab), masks.append((torch.arange(len(ids)) < 9 + n_own).long())
    return {"input_ids": torch.stack(rows), "attention_mask": torch.stack(masks), "labels": torch.stack(labels)}


def test_prefix_stops_before_the_first_trained_label():
    ids = torch.tensor([[1, 2, 3, 4, 5], [1, 2, 3, 9, 9]])
    mask = torch.ones_like(ids)
    assert shared_prefix_len(ids, mask) == 3
    labels = torch.tensor([[-100, -100, 3, 4, 5], [-100, -100, -100, 9, 9]])
    assert shared_prefix_len(ids, mask, labels) == 1  # logit 1 predicts label 2: it must be in the rows' pass
    assert shared_prefix_len(ids[:1], mask[:1]) == 0  # one row: nothing to share


@pytest.mark.parametrize("lora", [False, True])
def test_shared_prefix_forward_matches_the_plain_forward(tiny_expert_dir, lora):
    from gag_lightning.models.loading import load_causal_lm

    model = load_causal_lm(tiny_expert_dir, "float32")
    if lora:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"]))
        for name, p in model.named_parameters():
            if "lora_B" in name:  # non-zero B so the LoRA path changes the logits and gets gradients
                torch.nn.init.normal_(p, std=0.05)
    model.train()
    batch = _batch(model.config.vocab_size)
    assert shared_prefix_len(batch["input_ids"], batch["attention_mask"], batch["labels"]) == 9
    results = []
    for share in (False, True):
        model.zero_grad()
        logits = causal_lm_logits(model, batch["input_ids"], batch["attention_mask"], batch["labels"], share)
        loss = answer_nll(logits, batch["labels"])
        loss.backward()
        grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
        results.append((float(loss), grads))
    assert results[1][0] == pytest.approx(results[0][0], rel=1e-5)
    assert results[0][1].abs().sum() > 0
    assert torch.allclose(results[1][1], results[0][1], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("share", [False, True])
def test_answer_token_logits_give_the_full_forward_loss_and_gradients(tiny_expert_dir, share):
    """The output head applied only at answer positions: the same loss and gradients as `answer_nll` on the
    full logits, and exactly as many logits as answer tokens."""
    from gag_lightning.models.loading import load_causal_lm
    from gag_lightning.models.losses import token_nll
    from gag_lightning.models.shared_prefix import answer_token_logits

    model = load_causal_lm(tiny_expert_dir, "float32")
    model.train()
    batch = _batch(model.config.vocab_size)
    results = []
    for compact in (False, True):
        model.zero_grad()
        if compact:
            logits, targets = answer_token_logits(model, batch["input_ids"], batch["attention_mask"],
                                                  batch["labels"], share)
            assert logits.shape[0] == int((batch["labels"][:, 1:] != -100).sum())
            loss = token_nll(logits, targets)
        else:
            loss = answer_nll(model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits,
                              batch["labels"])
        loss.backward()
        results.append((float(loss), torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])))
    assert results[1][0] == pytest.approx(results[0][0], rel=1e-5)
    assert torch.allclose(results[1][1], results[0][1], rtol=1e-4, atol=1e-6)
