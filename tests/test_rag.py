"""The RAG baseline: BM25 and dense retrieval, recall@k."""

from __future__ import annotations

import pytest
import torch

from gag_lightning.baselines.retrieval import (
    BM25Retriever,
    DenseRetriever,
    build_retriever,
    recall_at_k,
    top_k,
)
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
