"""The frozen base as every stage reads it: loaded as published, never resized, with the slot placeholder.

Library code (the eval harness's stage, routed answering) and the GAG runner load the base through this one
function, so they agree on its dtype, its frozen state and the placeholder that marks the memory slots.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from gag_lightning.models.loading import fingerprint_dir, load_causal_lm, load_tokenizer, resolve_path
from gag_lightning.prompts import Placeholder, choose_placeholder


def base_identity(base_dir: Path) -> str:
    """``<dir name>@<fingerprint>``: recorded in the adapter so evaluation can refuse another base."""
    return f"{base_dir.name}@{fingerprint_dir(base_dir)}"


def load_base(cfg: DictConfig) -> tuple[Any, Any, Placeholder, Path]:
    """(frozen base in hardware.base_dtype, its tokenizer, the slot placeholder, base directory).

    The published base as it is: nothing is added to the tokenizer and the embeddings are never resized (a new
    row would also be a new random row of a tied output head). The memory slots are marked by the placeholder
    of ``prompts.choose_placeholder`` (a spare special token of the tokenizer, or a mark outside the vocabulary).
    """
    base_dir = resolve_path(cfg.model.base, cfg.paths.cache_dir)
    tokenizer = load_tokenizer(base_dir)
    base = load_causal_lm(base_dir, cfg.hardware.get("base_dtype", "float32"))
    base.requires_grad_(False)
    base.eval()
    return base, tokenizer, choose_placeholder(tokenizer), base_dir


__all__ = ["base_identity", "load_base"]
