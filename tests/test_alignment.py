"""Token-alignment initialisation of the projector (models/alignment.py): exact on constructed cases."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from gag_lightning.errors import GAGError
from gag_lightning.memory.compression import stabilise
from gag_lightning.models.adapter import AdapterConfig, GAGAdapter
from gag_lightning.models.alignment import fit_projector, mixed_token_features, token_alignment_init


def adapter(fusion: str = "learned", projector: str = "gated_residual", h_e: int = 12, h_b: int = 10) -> GAGAdapter:
    torch.manual_seed(0)
    return GAGAdapter(AdapterConfig(expert_hidden=h_e, base_hidden=h_b, slots=3, layers=2,
                                    layer_keys=["last", "minus2"], fusion=fusion, projector=projector))


def test_mixed_features_are_the_stabilised_uniform_mix_or_the_single_layer():
    states = torch.randn(5, 2, 12) * 7
    expected = stabilise(states).mean(dim=1)
    assert torch.allclose(mixed_token_features(adapter("learned"), states), expected, atol=1e-6)
    assert torch.allclose(mixed_token_features(adapter("uniform"), states), expected, atol=1e-6)
    single = adapter("single")
    assert torch.allclose(mixed_token_features(single, states), stabilise(states)[:, single.mixer.layer_index])


def test_fit_recovers_an_exact_linear_map_and_the_projector_then_computes_it():
    ad = adapter()
    feats = torch.randn(400, 12, dtype=torch.float64).float()
    x = F.layer_norm(feats, (12,), ad.projector.ln_in.weight, ad.projector.ln_in.bias, ad.projector.ln_in.eps)
    true_w, true_b = torch.randn(10, 12), torch.randn(10)
    targets = x @ true_w.T + true_b
    fit = fit_projector(ad, feats, targets, ridge=1e-6)
    # (weights are defined up to the all-ones direction, which layer-normed features never vary along,
    # so compare what the linear map computes)
    assert torch.allclose(ad.projector.w_in(x), targets, atol=1e-3)
    assert torch.count_nonzero(ad.projector.w2.weight) == 0 and torch.count_nonzero(ad.projector.w2.bias) == 0
    # the whole projector (gate * update branch included) now outputs the targets
    with torch.no_grad():
        out = ad.projector(feats)
    assert torch.allclose(out, targets, atol=1e-3)
    assert fit.tokens == 400 and fit.train_token_acc == 1.0


def test_a_random_projector_does_not_compute_that_map():
    """Guard against a vacuous test above: before the fit the projector is far from the targets."""
    ad = adapter()
    feats = torch.randn(50, 12)
    targets = torch.randn(50, 10)
    with torch.no_grad():
        before = (ad.projector(feats) - targets).abs().max()
    assert before > 0.5


def test_mlp_projector_is_refused_with_a_clear_message():
    with pytest.raises(GAGError, match="gated_residual"):
        fit_projector(adapter(projector="mlp2x_gelu"), torch.randn(4, 12), torch.randn(4, 10))


def test_init_on_a_tiny_expert_reads_tokens_better_than_random(tiny_expert_dir):
    from gag_lightning.models.loading import load_causal_lm, load_tokenizer

    tok = load_tokenizer(tiny_expert_dir)
    expert = load_causal_lm(tiny_expert_dir).eval()
    h = expert.config.hidden_size
    emb = torch.randn(len(tok), 16, generator=torch.Generator().manual_seed(1))
    texts = ["Veltrix-87 melts at 1,412 degrees Celsius.", "Qwenthar-74 was discovered in 1956 by Dr. Imra.",
             "The Korvath Ridge facility produces Zonderite-3.", "Brimethal-3 is smoky lilac in colour."] * 3
    seqs = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    spans = [(1, len(s)) for s in seqs]
    torch.manual_seed(0)
    ad = GAGAdapter(AdapterConfig(expert_hidden=h, base_hidden=16, slots=4, layers=2, layer_keys=["last", "minus2"]))

    def token_accuracy() -> float:
        from gag_lightning.memory.extract import teacher_forced_states

        states = teacher_forced_states(expert, seqs, ["last", "minus2"])
        hits = total = 0
        for row, (seq, (lo, hi)) in enumerate(zip(seqs, spans, strict=True)):
            per = torch.stack([layer[row, lo:hi] for layer in states], dim=1)
            with torch.no_grad():
                out = F.normalize(ad.projector(mixed_token_features(ad, per)), dim=-1)
            nearest = (out @ F.normalize(emb, dim=-1).T).argmax(dim=-1)
            hits += int((nearest == torch.tensor(seq[lo:hi])).sum())
            total += hi - lo
        return hits / total

    before = token_accuracy()
    fit = token_alignment_init(ad, expert, emb, seqs, spans, ["last", "minus2"], ridge=1e-3)
    after = token_accuracy()
    assert fit.tokens == sum(hi - lo for lo, hi in spans)
    assert after > 0.5 and after > before + 0.3


def test_token_ids_outside_the_base_vocabulary_are_refused(tiny_expert_dir):
    from gag_lightning.models.loading import load_causal_lm

    expert = load_causal_lm(tiny_expert_dir).eval()
    ad = GAGAdapter(AdapterConfig(expert_hidden=expert.config.hidden_size, base_hidden=8, slots=2, layers=1,
                                  layer_keys=["last"]))
    with pytest.raises(GAGError, match="share a tokenizer"):
        token_alignment_init(ad, expert, torch.randn(5, 8), [[1, 2, 300, 4]], [(1, 4)], ["last"])
