"""Runner side of `gag.init=token_alignment`: which text the projector is fitted on, with which expert.

The fit itself lives in `models/alignment.py`; this module only gathers its inputs from the pipeline: the
memory stage's expert, the train bank's backgrounds (re-tokenised after their own background prompts, i.e.
the very sequences the memories were read from) and, to see more of the domain's wording, knowledge-base
paragraphs, up to `gag.alignment.max_tokens` text tokens in all.
"""

from __future__ import annotations

import logging
from typing import Any

from omegaconf import DictConfig

from gag_lightning.data.records import QARecord, read_knowledge_base
from gag_lightning.errors import GAGError
from gag_lightning.memory.background import BackgroundConfig, background_prompt_ids
from gag_lightning.memory.bank import MemoryBank
from gag_lightning.models.adapter import GAGAdapter
from gag_lightning.models.alignment import AlignmentFit, token_alignment_init

log = logging.getLogger(__name__)


def alignment_sequences(tokenizer: Any, metas: list[dict[str, Any]], kb_texts: list[str],
                        config: BackgroundConfig, max_tokens: int) -> tuple[list[list[int]], list[tuple[int, int]]]:
    """(token sequences, text spans): backgrounds after their prompts, then KB paragraphs after a bare prompt."""
    records = [QARecord(index=i, id=str(m.get("id", i)), question=str(m.get("question", "")), answer="")
               for i, m in enumerate(metas)]
    prompts = background_prompt_ids(tokenizer, records, config)
    texts = [str(m.get("background") or "") for m in metas]
    generic = background_prompt_ids(tokenizer, [QARecord(index=0, id="kb", question="", answer="")], config)[0]
    prompts += [generic] * len(kb_texts)
    texts += kb_texts
    sequences: list[list[int]] = []
    spans: list[tuple[int, int]] = []
    used = 0
    for prompt, text in zip(prompts, texts, strict=True):
        ids = list(tokenizer(text.strip(), add_special_tokens=False)["input_ids"]) if text.strip() else []
        if not ids:
            continue
        ids = ids[: max(0, max_tokens - used)]
        if not ids:
            break
        sequences.append(prompt + ids)
        spans.append((len(prompt), len(prompt) + len(ids)))
        used += len(ids)
    return sequences, spans


def check_shared_tokenizer(expert_tok: Any, base_tok: Any, sample: str) -> None:
    a = expert_tok(sample, add_special_tokens=False)["input_ids"]
    b = base_tok(sample, add_special_tokens=False)["input_ids"]
    if list(a) != list(b):
        raise GAGError("gag.init=token_alignment needs the expert and the base to share a tokenizer (the same "
                       "ids for the same text); they differ here. Use gag.init=random.")


def align_adapter(cfg: DictConfig, adapter: GAGAdapter, base: Any, base_tokenizer: Any,
                  train_bank: Any) -> AlignmentFit:
    """Load the memory stage's expert and fit the adapter's projector (see models/alignment.py)."""
    from gag_lightning.models.loading import load_causal_lm, load_tokenizer
    from gag_lightning.upstream import memory_expert_path

    node = cfg.gag.get("alignment") or {}
    expert_dir = memory_expert_path(cfg)
    expert_tok = load_tokenizer(expert_dir)
    expert = load_causal_lm(expert_dir, cfg.hardware.get("base_dtype", "float32")).eval()
    metas = MemoryBank.open(train_bank).metas()
    kb = read_knowledge_base(cfg.domain.knowledge_base) if node.get("knowledge_base", True) else []
    config = BackgroundConfig.from_mapping(cfg.memory.generation, seed=int(cfg.seed))
    sequences, spans = alignment_sequences(expert_tok, metas, kb, config, int(node.get("max_tokens", 6000)))
    sample = " ".join(str(m.get("background") or "") for m in metas[:8]) + " " + " ".join(kb[:4])
    check_shared_tokenizer(expert_tok, base_tokenizer, sample)
    fit = token_alignment_init(adapter, expert, base.get_input_embeddings().weight, sequences, spans,
                               list(adapter.config.layer_keys), ridge=float(node.get("ridge", 1.0)),
                               batch_size=int(cfg.memory.compression.get("batch_size", 16)))
    del expert
    return fit


__all__ = ["align_adapter", "alignment_sequences", "check_shared_tokenizer"]
