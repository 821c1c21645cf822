"""The RAG baseline's retrieval step: top-k knowledge-base passages for every evaluation question.

The harness's ``rag`` system places the retrieved passages on the prompt's "Knowledge:" line, exactly where
``expert_context`` puts the expert's background, so the two baselines differ only in where the knowledge text
comes from. Retrieval runs once, before decoding, and its result (passages, recall@k, settings) is handed to
the harness as plain data: the harness never imports a retrieval library.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gag_lightning.baselines.retrieval import RETRIEVERS, Retriever, build_retriever, recall_at_k
from gag_lightning.errors import GAGError

log = logging.getLogger(__name__)


@dataclass
class RagRetrieval:
    """What was retrieved for each evaluation record (keyed by record id), and how well."""

    retriever: str
    k: int
    passage_ids: dict[str, list[int]]
    passages: dict[str, list[str]]
    recall_at_k: float | None
    seconds: float = 0.0
    settings: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        """The keys the harness adds to the ``rag`` system's summary."""
        return {"retrieval_recall_at_k": self.recall_at_k, "rag_k": self.k, "rag_retriever": self.retriever}


def retrieve_for_items(retriever: Retriever, passages: Sequence[str], items: Sequence[Any], k: int) -> RagRetrieval:
    """Retrieve top-``k`` passages for each item's question (items: anything with ``id``, ``question``,
    ``answers``); recall@k counts only items that carry gold answers."""
    ids = [str(it.id) for it in items]
    if len(set(ids)) != len(ids):
        raise GAGError("the rag system keys retrieved passages by record id, and the test records repeat ids")
    start = time.perf_counter()
    ranked = retriever.retrieve([str(it.question) for it in items], int(k))
    seconds = time.perf_counter() - start
    texts = [[passages[j] for j in row] for row in ranked]
    recall = recall_at_k(texts, [getattr(it, "answers", None) for it in items])
    return RagRetrieval(retriever=retriever.name, k=int(k), passage_ids=dict(zip(ids, ranked, strict=True)),
                        passages=dict(zip(ids, texts, strict=True)), recall_at_k=recall, seconds=seconds)


@dataclass
class RagIndex:
    """The configured retriever over the knowledge base, built once and queried for every eval split."""

    retriever: Retriever
    passages: list[str]
    k: int
    settings: dict[str, Any]


def build_rag_index(cfg: Any, device: str = "cpu") -> RagIndex:
    """Build the configured retriever (``eval.rag``) over ``domain.knowledge_base``.

    The dense retriever embeds with ``model.encoders.router``, the encoder prototype routing uses.
    """
    from gag_lightning.data.records import read_knowledge_base

    node = cfg.eval.rag
    kind = str(node.retriever)
    if kind not in RETRIEVERS:
        raise GAGError(f"eval.rag.retriever is {kind!r}; choose from {list(RETRIEVERS)}")
    kb_path = Path(str(cfg.domain.knowledge_base))
    passages = read_knowledge_base(kb_path)
    start = time.perf_counter()
    encoder = None
    if kind == "dense":
        from gag_lightning.routing.run import load_router_encoder

        encoder = load_router_encoder(cfg.model.encoders.router, cfg.paths.cache_dir, device=device,
                                      dtype=str(_select(cfg, "router.dtype", "float32")))
    retriever = build_retriever(kind, passages, encoder=encoder)
    settings = {"knowledge_base": str(kb_path), "num_passages": len(passages),
                "index_seconds": round(time.perf_counter() - start, 3),
                "encoder": getattr(encoder, "fingerprint", None)}
    return RagIndex(retriever, list(passages), int(node.k), settings)


def rag_retrieval(cfg: Any, items: Sequence[Any], device: str = "cpu", index: RagIndex | None = None,
                  label: str = "") -> RagRetrieval:
    """Retrieve for ``items`` with ``index`` (built from ``cfg`` when not given)."""
    if index is None:
        index = build_rag_index(cfg, device)
    result = retrieve_for_items(index.retriever, index.passages, items, index.k)
    result.settings = {**index.settings, "retrieve_seconds": round(result.seconds, 3)}
    log.info("[eval] rag%s: %s top-%d over %d passages; recall@%d %s (index %.1fs, retrieval %.1fs)",
             f"[{label}]" if label else "", result.retriever, result.k, len(index.passages), result.k,
             "n/a (no gold answers)" if result.recall_at_k is None else f"{100 * result.recall_at_k:.2f}",
             index.settings["index_seconds"], result.seconds)
    return result


def _select(cfg: Any, key: str, default: Any) -> Any:
    from omegaconf import OmegaConf

    return OmegaConf.select(cfg, key, default=default) if OmegaConf.is_config(cfg) else default


__all__ = ["RagIndex", "RagRetrieval", "build_rag_index", "rag_retrieval", "retrieve_for_items"]
