"""Passage retrievers over a domain's knowledge base, for the RAG baseline (METHOD.md section 7).

The paper compares GAG with RAG over the same private corpus the expert was adapted on, so the passages
here are the knowledge-base records themselves, one passage per line. Two retrievers share one interface:
lexical BM25 (``bm25s``) and dense inner-product search (``faiss``) with the route encoder, the frozen text
encoder the router already loads, so the dense baseline adds no model of its own.

Rankings are deterministic: higher score first, equal scores by lower passage index, so a rerun (or another
machine) retrieves the same passages and the eval artifact it feeds is reproducible.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np

from gag_lightning.eval.metrics import has_answer

RETRIEVERS = ("bm25", "dense")


class Retriever(Protocol):
    """Ranks the passages it was built on for each query."""

    name: str

    def retrieve(self, queries: list[str], k: int) -> list[list[int]]:
        """Top-``k`` passage indices per query, best first (fewer when the corpus is smaller)."""
        ...


def top_k(scores: np.ndarray, k: int) -> list[int]:
    """Indices of the ``k`` highest scores, ties broken by the lower index (a total, reproducible order)."""
    k = max(0, min(int(k), scores.shape[0]))
    order = np.lexsort((np.arange(scores.shape[0]), -scores.astype(np.float64)))
    return [int(i) for i in order[:k]]


def _check_k(k: int) -> int:
    if int(k) < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    return int(k)


class BM25Retriever:
    """BM25 (Lucene variant, k1=1.5, b=0.75) over ``bm25s``'s lowercase word tokens minus English stopwords.

    No stemmer: it would add a dependency, and the knowledge bases are matched on names and numbers, which
    stemming does not help. Scores come from ``get_scores_from_ids`` for every passage and are ranked here,
    so ties are broken by :func:`top_k`, not by the library's partial sort.
    """

    name = "bm25"

    def __init__(self, passages: Sequence[str]) -> None:
        import bm25s

        if not passages:
            raise ValueError("BM25Retriever needs at least one passage")
        self._bm25s = bm25s
        self.num_passages = len(passages)
        self.index = bm25s.BM25()
        self.index.index(self.tokenize(passages), show_progress=False)

    def tokenize(self, texts: Sequence[str]) -> list[list[str]]:
        return self._bm25s.tokenize(list(texts), lower=True, stopwords="en", return_ids=False,
                                    show_progress=False)

    def scores(self, query: str) -> np.ndarray:
        """BM25 score of every passage for one query; all zeros when no query token is in the corpus."""
        ids = self.index.get_tokens_ids(self.tokenize([query])[0])
        if not ids:
            return np.zeros(self.num_passages, dtype=np.float32)
        return np.asarray(self.index.get_scores_from_ids(ids), dtype=np.float32)

    def retrieve(self, queries: list[str], k: int) -> list[list[int]]:
        k = _check_k(k)
        return [top_k(self.scores(q), k) for q in queries]


class DenseRetriever:
    """Cosine similarity of encoder embeddings: ``faiss.IndexFlatIP`` over L2-normalised vectors (exact search).

    ``encoder`` is a :class:`~gag_lightning.routing.encoder.QueryEncoder` (or anything with ``encode(texts,
    batch_size)`` returning a [N, D] tensor); passages are embedded once here, queries per call. faiss may order
    equal scores either way, so the hits are re-sorted by (score, index); when the k-th score ties with the
    last one fetched, the query is searched over every passage so that no tied lower index is missed.
    """

    name = "dense"

    def __init__(self, encoder: Any, passages: Sequence[str], batch_size: int = 64) -> None:
        import faiss

        if not passages:
            raise ValueError("DenseRetriever needs at least one passage")
        self._faiss = faiss
        self.encoder = encoder
        self.batch_size = int(batch_size)
        vectors = self._embed(passages)
        self.num_passages = vectors.shape[0]
        self.index = faiss.IndexFlatIP(vectors.shape[1])
        self.index.add(vectors)

    def _embed(self, texts: Sequence[str]) -> np.ndarray:
        emb = self.encoder.encode(list(texts), batch_size=self.batch_size)
        vectors = np.ascontiguousarray(emb.detach().cpu().float().numpy(), dtype=np.float32)
        self._faiss.normalize_L2(vectors)  # the route encoders already normalise; anything else is made cosine
        return vectors

    def retrieve(self, queries: list[str], k: int) -> list[list[int]]:
        k = _check_k(k)
        if not queries:
            return []
        vectors = self._embed(queries)
        n = self.num_passages
        k = min(k, n)
        fetch = min(n, k + 8)
        scores, ids = self.index.search(vectors, fetch)
        out = []
        for row in range(len(queries)):
            s, i = scores[row], ids[row]
            if fetch < n and s[fetch - 1] >= s[k - 1]:
                s, i = self.index.search(vectors[row : row + 1], n)
                s, i = s[0], i[0]
            order = np.lexsort((i, -s.astype(np.float64)))[:k]
            out.append([int(i[j]) for j in order])
        return out


def build_retriever(kind: str, passages: Sequence[str], encoder: Any = None, batch_size: int = 64) -> Retriever:
    """``bm25`` or ``dense`` (which needs ``encoder``)."""
    if kind == "bm25":
        return BM25Retriever(passages)
    if kind == "dense":
        if encoder is None:
            raise ValueError("the dense retriever needs an encoder")
        return DenseRetriever(encoder, passages, batch_size=batch_size)
    raise ValueError(f"unknown retriever {kind!r}; choose from {RETRIEVERS}")


def recall_at_k(passages_per_query: Sequence[Sequence[str]],
                answers_per_query: Sequence[Sequence[str] | None]) -> float | None:
    """Fraction of queries whose retrieved passages contain a gold alias; None when no query has answers.

    A hit is the has-answer EM match (normalised tokens, contiguous), applied to each passage: the same
    rule that scores the predictions, so recall bounds what the reader could copy from its context.
    Queries without gold answers are left out of the fraction rather than counted as misses.
    """
    if len(passages_per_query) != len(answers_per_query):
        raise ValueError(f"{len(passages_per_query)} rankings for {len(answers_per_query)} answer lists")
    hits: list[float] = []
    for passages, answers in zip(passages_per_query, answers_per_query, strict=True):
        if isinstance(answers, str):
            answers = [answers]
        answers = [a for a in (answers or []) if a and a.strip()]
        if not answers:
            continue
        hits.append(float(any(has_answer(p, answers) for p in passages)))
    return sum(hits) / len(hits) if hits else None


__all__ = ["RETRIEVERS", "BM25Retriever", "DenseRetriever", "Retriever", "build_retriever", "recall_at_k",
           "top_k"]
