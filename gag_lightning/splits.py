"""Which QA splits and records each stage reads: one reading of the config for the stages and their artifact keys.

The memory runner, the LoRA runner and `keys.py` all ask these questions; answering them here keeps the keys from
importing any stage runner.
"""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig, OmegaConf

from gag_lightning.errors import GAGError
from gag_lightning.fingerprints import file_digest

__all__ = ["domain_eval_splits", "eval_splits", "memory_splits", "record_selection", "split_limits"]


def _names(node: Any) -> list[str]:
    """A split list from config: one name or a list of names, each once, in order."""
    if node is None:
        return []
    names = [node] if isinstance(node, str) else list(node)
    return list(dict.fromkeys(str(n) for n in names))


def domain_eval_splits(cfg: DictConfig) -> list[str]:
    """`domain.eval_splits`: the QA splits the domain is evaluated on (`[test]` when a preset names none)."""
    return _names(cfg.domain.get("eval_splits")) or ["test"]


def eval_splits(cfg: DictConfig) -> list[str]:
    """The splits the eval stage evaluates: a legacy `eval.split` name, else `eval.splits` (by default the
    domain's `eval_splits`)."""
    node = cfg.get("eval")
    if node is not None and node.get("split"):
        return [str(node.split)]
    if node is not None and node.get("splits") is not None:
        return _names(node.splits)
    return domain_eval_splits(cfg)


def memory_splits(cfg: DictConfig) -> list[str]:
    """The QA splits the memory stage builds a bank for: `memory.splits` when it is given, else gag's train
    split, the domain's eval splits, and gag's val split when Stage III validates on it (`gag.val_source=test`),
    each once in that order. The memory runner and the artifact keys both read this."""
    given = cfg.memory.get("splits")
    if given is not None:
        return _names(given)
    gag = cfg.get("gag")
    splits = [str(gag.get("train_split", "train")) if gag is not None else "train", *domain_eval_splits(cfg)]
    if gag is not None and str(gag.get("val_source", "split")) == "test":
        splits.append(str(gag.get("val_split", "test")))
    return list(dict.fromkeys(splits))


def split_limits(cfg: DictConfig, splits: list[str]) -> dict[str, int | None]:
    """`memory.max_records` per split: null (all records), one int for every split, or {split: N}."""
    node = cfg.memory.get("max_records")
    if node is None:
        return {s: None for s in splits}
    if isinstance(node, int) and not isinstance(node, bool):
        limits = {s: node for s in splits}
    elif OmegaConf.is_dict(node):
        unknown = sorted(set(node) - set(splits))
        if unknown:
            raise GAGError(f"memory.max_records names split(s) {unknown} that the memory stage does not build "
                           f"(its splits: {splits}; memory.splits, or gag.train_split + domain.eval_splits)")
        limits = {s: node.get(s) for s in splits}
    else:
        raise GAGError(f"memory.max_records={node!r}: give null, an integer, or a mapping {{split: integer}}")
    for split, n in limits.items():
        if n is not None and (not isinstance(n, int) or isinstance(n, bool) or n < 1):
            raise GAGError(f"memory.max_records for split '{split}' is {n!r}; it must be a positive integer or null")
    return limits


def record_selection(cfg: DictConfig) -> dict[str, Any]:
    """What decides the LoRA's training records, mirroring Stage III's data module (part of the artifact key)."""
    gag = cfg.gag
    split = str(gag.get("train_split", "train"))
    holdout = float(gag.get("val_fraction", 0.0)) if str(gag.get("val_source", "split")) == "split" else 0.0
    return {"split": split, "data": file_digest(cfg.domain.get(split)),
            "max_records": split_limits(cfg, memory_splits(cfg)).get(split),
            "holdout": holdout, "max_train_records": gag.get("max_train_records")}
