"""The RAG baseline: BM25 and dense retrieval, recall@k, the rag prompt, the eval key and the eval stage."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from gag_lightning.baselines.rag import retrieve_for_items
from gag_lightning.baselines.retrieval import (
    BM25Retriever,
    DenseRetriever,
    build_retriever,
    recall_at_k,
    top_k,
)
from gag_lightning.eval.generation import DecodingConfig
from gag_lightning.eval.harness import EvalHarness, EvalItem
from gag_lightning.eval.report import markdown_report
from gag_lightning.prompts import context_user_text
from tests.conftest import ROOT, compose

KB = [
    "Veltrix-87 is a saffron yellow ceramic that melts at 1,939 degrees Celsius.",
    "Qwenthar-74 is an alloy first synthesised in 1956 by Dr. Imra Castellane.",
    "Thessium-77 is produced at the Nordhavn site and used for flexible solar panel films.",
    "Korvarite-12 is a silvery grey polymer discovered by Dr. Ilsa Moreau.",
    "The Halvik Bay works produce high-voltage insulators.",
]
QUERIES = [
    ("When was the Qwenthar-74 alloy first synthesised?", 1),
    ("What colour is the Veltrix-87 ceramic?", 0),
    ("Where is Thessium-77 produced?", 2),
    ("Who discovered Korvarite-12?", 3),
]


class BagOfWords:
    """A stand-in encoder: normalised counts over a fixed vocabulary, so cosine ranking is known by hand."""

    def __init__(self, vocab: list[str]) -> None:
        self.vocab = vocab

    def encode(self, texts, batch_size=64):
        out = torch.zeros(len(texts), len(self.vocab))
        for i, text in enumerate(texts):
            words = text.lower().split()
            for j, w in enumerate(self.vocab):
                out[i, j] = float(words.count(w))
        return torch.nn.functional.normalize(out, dim=-1)


@pytest.fixture(scope="module")
def router_encoder():
    """The tiny random route encoder the smoke experiment uses (model.encoders.router)."""
    from gag_lightning.routing.run import load_router_encoder

    cfg = compose(["experiment=smoke", f"paths.cache_dir={ROOT / '.cache'}", "paths.output_dir=/tmp"])
    return load_router_encoder(cfg.model.encoders.router, cfg.paths.cache_dir, device="cpu")


# ------------------------------------------------------------------------------------------ retrieval
def test_bm25_puts_the_gold_passage_first():
    retriever = BM25Retriever(KB)
    ranked = retriever.retrieve([q for q, _ in QUERIES], k=3)
    assert [row[0] for row in ranked] == [gold for _, gold in QUERIES]
    assert all(len(row) == 3 and len(set(row)) == 3 for row in ranked)
    # scores of the first query: only passages sharing a content word score above zero
    scores = retriever.scores(QUERIES[0][0])
    assert scores[1] > 0 and scores[4] == 0
    assert retriever.retrieve(["Halvik Bay"], k=10) == [[4, 0, 1, 2, 3]]  # k capped; zero-score ties by index


def test_bm25_is_deterministic_and_breaks_ties_by_index():
    kb = ["a quartz crystal", "the quartz crystal", "basalt rock"]  # passages 0 and 1 score alike
    retriever = BM25Retriever(kb)
    assert retriever.retrieve(["quartz crystal", "nothing matches", "basalt"], k=2) == [[0, 1], [0, 1], [2, 0]]
    assert BM25Retriever(kb).retrieve(["quartz crystal"], k=2) == [[0, 1]]


def test_dense_ranks_by_cosine_and_breaks_ties_by_index():
    vocab = ["quartz", "basalt", "granite", "crystal"]
    kb = ["quartz quartz crystal", "basalt", "granite crystal", "quartz crystal"] + ["basalt"] * 20
    retriever = DenseRetriever(BagOfWords(vocab), kb)
    assert retriever.retrieve(["quartz crystal"], k=2) == [[3, 0]]  # cos 1.0, then 3/sqrt(10)
    assert retriever.retrieve(["granite"], k=1) == [[2]]
    # 21 tied passages, more than the search fetches at first: the lowest indices still win
    assert retriever.retrieve(["basalt", "basalt rock"], k=3) == [[1, 4, 5], [1, 4, 5]]
    assert retriever.retrieve(["nothing"], k=2) == [[0, 1]]  # a zero query vector ties everywhere

    class HighestIdsFirst:
        """An index that returns tied hits highest id first (faiss does not promise an order for ties)."""

        def __init__(self, index):
            self.index = index

        def search(self, x, k):
            import numpy as np

            scores, ids = self.index.search(x, self.index.ntotal)
            order = np.lexsort((-ids, -scores), axis=1)[:, :k]
            return np.take_along_axis(scores, order, 1), np.take_along_axis(ids, order, 1)

    retriever.index = HighestIdsFirst(retriever.index)
    assert retriever.retrieve(["basalt"], k=3) == [[1, 4, 5]]


def test_dense_with_the_route_encoder_finds_an_exact_duplicate(router_encoder):
    retriever = build_retriever("dense", KB, encoder=router_encoder)
    ranked = retriever.retrieve(KB[::-1], k=2)
    assert [row[0] for row in ranked] == [4, 3, 2, 1, 0]  # the query's own passage first (cosine 1)
    assert all(row[1] != row[0] for row in ranked)
    with pytest.raises(ValueError, match="encoder"):
        build_retriever("dense", KB)
    with pytest.raises(ValueError, match="unknown retriever"):
        build_retriever("colbert", KB)


def test_top_k_orders_by_score_then_index():
    import numpy as np

    assert top_k(np.array([0.5, 2.0, 0.5, 2.0, 1.0]), 4) == [1, 3, 4, 0]
    assert top_k(np.array([1.0]), 3) == [0]


def test_recall_at_k_hand_values():
    passages = [["Veltrix-87 melts at 1,939 degrees Celsius.", "noise"],
                ["It was synthesised in 19845."],  # 1984 is not a token of 19845: a miss
                ["Made at the Halvik Bay works."],
                ["anything"]]
    answers = [["1,939 degrees"], ["1984"], ["halvik bay", "Nordhavn"], None]
    assert recall_at_k(passages, answers) == pytest.approx(2 / 3)
    assert recall_at_k(passages[:2], [["1,939"], "19845"]) == 1.0  # a bare string is one alias
    assert recall_at_k(passages, [None, [], [""], None]) is None
    assert recall_at_k([], []) is None
    with pytest.raises(ValueError):
        recall_at_k(passages, answers[:2])


def test_retrieve_for_items_keys_by_record_and_scores_recall():
    items = [EvalItem(id=f"t{i}", question=q, reference="", answers=[["1956"], None, ["Nordhavn"], ["Ilsa"]][i])
             for i, (q, _) in enumerate(QUERIES)]
    got = retrieve_for_items(BM25Retriever(KB), KB, items, k=1)
    assert got.passage_ids == {"t0": [1], "t1": [0], "t2": [2], "t3": [3]}
    assert got.passages["t2"] == [KB[2]]
    assert got.recall_at_k == 1.0 and got.summary() == {"retrieval_recall_at_k": 1.0, "rag_k": 1,
                                                        "rag_retriever": "bm25"}


# ------------------------------------------------------------------------------------------ the rag system
@pytest.fixture(scope="module")
def base_and_tokenizer():
    from gag_lightning.models.loading import load_causal_lm, load_tokenizer, resolve_path

    cfg = compose(["experiment=smoke", f"paths.cache_dir={ROOT / '.cache'}", "paths.output_dir=/tmp"])
    base_dir = resolve_path(cfg.model.base, cfg.paths.cache_dir)
    tok = load_tokenizer(base_dir)
    model = load_causal_lm(base_dir, "float32")
    return model.eval(), tok


class OneScorer:
    def score(self, preds, refs):
        return [1.0 for _ in preds]


def test_rag_prompt_is_the_context_prompt_with_the_joined_passages(base_and_tokenizer):
    base, tok = base_and_tokenizer
    items = [EvalItem(id="a", question="Who discovered Korvarite-12?", reference="Dr. Ilsa Moreau.",
                      instruction="You are an expert.", background="unused"),
             EvalItem(id="b", question="Where is Thessium-77 produced?", reference="Nordhavn.",
                      instruction="You are an expert.")]
    retrieved = {"a": [KB[3] + "  ", KB[1]], "b": [KB[2]]}
    decoding = DecodingConfig(max_new_tokens=2, batch_size=2)
    harness = EvalHarness(base, tok, decoding, retrieved=retrieved,
                          retrieval_summary={"retrieval_recall_at_k": 0.5, "rag_k": 2, "rag_retriever": "bm25"})
    joined = f"{KB[3]}\n{KB[1]}"
    assert harness.user_text("rag", items[0]) == context_user_text(
        "You are an expert.", harness.request_text, items[0].question, joined)
    assert harness.user_text("rag", items[0]) != harness.user_text("expert_context", items[0])
    counts = [len(tok(t, add_special_tokens=False)["input_ids"]) for t in (joined, KB[2])]
    assert harness.added_prompt_tokens("rag", items) == pytest.approx(sum(counts) / 2)

    result = harness.run(items, ["base", "rag"], {"bertscore_f1": OneScorer(), "sts": OneScorer()})
    rag = result.summary["rag"]
    assert rag["n"] == 2 and rag["retrieval_recall_at_k"] == 0.5 and rag["rag_k"] == 2
    assert "retrieval_recall_at_k" not in result.summary["base"] and result.settings["rag"]["rag_k"] == 2
    assert "Retrieval recall@2 (bm25): 50.00" in markdown_report(result.summary)
    with pytest.raises(Exception, match="no retrieved passages"):
        EvalHarness(base, tok, decoding).user_text("rag", items[0])


# ------------------------------------------------------------------------------------------ config and stage
def test_rag_settings_and_knowledge_base_key_the_eval_artifact(compose_cfg, tmp_path):
    from gag_lightning.keys import artifact_dir, stage_key

    with_rag = ["experiment=smoke", "stage=eval", "eval.systems=[base,rag]"]
    key = stage_key(compose_cfg(with_rag), "eval")
    assert key["config"]["rag"] == {"retriever": "bm25", "k": 3} and key["knowledge_base"]
    a = artifact_dir(compose_cfg(with_rag), "eval")
    assert artifact_dir(compose_cfg([*with_rag, "eval.rag.k=1"]), "eval") != a
    assert artifact_dir(compose_cfg([*with_rag, "eval.rag.retriever=dense"]), "eval") != a
    kb = tmp_path / "kb.jsonl"
    kb.write_text(json.dumps({"text": "another passage"}) + "\n")
    assert artifact_dir(compose_cfg([*with_rag, f"domain.knowledge_base={kb}"]), "eval") != a
    # without the rag system its settings do not enter the key
    without = ["experiment=smoke", "stage=eval", "eval.systems=[base,gag]"]
    b = artifact_dir(compose_cfg(without), "eval")
    assert "knowledge_base" not in stage_key(compose_cfg(without), "eval")
    assert artifact_dir(compose_cfg([*without, "eval.rag.k=5"]), "eval") == b


def test_smoke_evaluates_rag_and_the_stage_runs_it_with_the_route_encoder(compose_cfg, tmp_path):
    from gag_lightning.stages import run
    from tests.test_gag_stage import make_bank

    assert "rag" in list(compose_cfg(["experiment=smoke"]).eval.systems)
    mem = tmp_path / "memory"
    make_bank(mem / "test", n=4, seed=1)
    cfg = compose_cfg(["experiment=smoke", "stage=eval", f"gag.memory_dir={mem}", "eval.systems=[base,rag]",
                       "eval.rag.retriever=dense", "eval.rag.k=2", "eval.max_records=3", "eval.splits=[test]",
                       "domain.answer_max_new_tokens=3"])
    results = run(cfg)
    eval_dir = Path(results["eval"]["artifact"]) / "test"
    metrics = json.loads((eval_dir / "metrics.json").read_text())
    rag = metrics["systems"]["rag"]
    assert rag["n"] == 3 and rag["rag_k"] == 2 and rag["rag_retriever"] == "dense"
    assert rag["retrieval_recall_at_k"] is None  # the synthetic records carry no gold answer lists
    assert rag["added_prompt_tokens"] > 0 and metrics["systems"]["base"]["added_prompt_tokens"] == 0
    settings = metrics["settings"]["rag"]
    assert settings["num_passages"] > 0 and settings["encoder"].startswith("sentence_transformer")
    assert all(len(ids) == 2 for ids in settings["passage_ids"].values())
    assert "Retrieval recall@2 (dense): -" in (eval_dir / "report.md").read_text()
    rows = [json.loads(x) for x in (eval_dir / "predictions.jsonl").read_text().splitlines()]
    assert [r["system"] for r in rows].count("rag") == 3
