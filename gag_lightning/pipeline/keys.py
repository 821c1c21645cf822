"""Where a stage's artifact lives: a stable folder named by the hash of everything that determines it.

Two runs with the same model, data, hyper-parameters and seed share one folder (so the pipeline
can skip finished stages and sweeps reuse experts and backgrounds); anything that changes the
result (another seed, another S) gets its own folder. No timestamps are involved.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from gag_lightning.artifacts import config_hash

# keys that change speed or logging but not results
_NON_RESULT_KEYS = {"num_workers", "eval_batch_size", "log_every_n_steps", "report_before_after",
                    "sample_answers", "generation_batch_size", "progress", "num_sanity_val_steps"}

_digest_cache: dict[tuple[str, float, int], str] = {}


def file_digest(path: str | Path | None) -> str | None:
    """sha256 of a data file (cached per path/mtime/size), so edited data invalidates downstream artifacts."""
    if path is None:
        return None
    path = Path(path)
    if not path.is_file():
        return None
    stat = path.stat()
    cache_key = (str(path.resolve()), stat.st_mtime, stat.st_size)
    if cache_key not in _digest_cache:
        h = hashlib.sha256()
        with path.open("rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                h.update(chunk)
        _digest_cache[cache_key] = h.hexdigest()[:16]
    return _digest_cache[cache_key]


def _strip(node: Any) -> Any:
    """Drop non-result keys; a data file named by an absolute path is keyed by its content digest instead.

    With paths in the key, a moved checkout or another mount point of the same data would recompute
    every stage; with digests, an edited file still invalidates what was built from it.
    """
    if isinstance(node, dict):
        return {k: _strip(v) for k, v in node.items() if k not in _NON_RESULT_KEYS}
    if isinstance(node, list):
        return [_strip(v) for v in node]
    if isinstance(node, str) and node.startswith("/") and Path(node).is_file():
        return f"file:{file_digest(node)}"
    return node


def container(node: Any) -> Any:
    if isinstance(node, DictConfig) or OmegaConf.is_config(node):
        return OmegaConf.to_container(node, resolve=True)
    return node


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


# memory-stage keys that set throughput or resume granularity, not the tokens or tensors produced
_MEMORY_RUNTIME_KEYS = {"batch_size", "shard_size", "progress"}


def _node(cfg: DictConfig, stage: str) -> dict[str, Any]:
    if stage in ("backgrounds", "memory"):
        node = _strip(container(cfg.memory.generation if stage == "backgrounds" else cfg.memory.compression))
        return {k: v for k, v in node.items() if k not in _MEMORY_RUNTIME_KEYS}
    return _strip(container(cfg[stage]))


def _drop_recipe_switches_when_off(node: dict[str, Any]) -> None:
    """The METHOD.md 5b switches leave the gag key while off (kl weight 0, no recon steps), so adding them kept
    every earlier adapter's hash; switched on, they and their settings are in it like any other gag key."""
    weights = node.get("loss_weights")
    if isinstance(weights, dict) and not float(weights.get("kl", 0.0) or 0.0):
        weights.pop("kl", None)
        node.pop("kl_temperature", None)
    if not int(node.get("recon_steps", 0) or 0):
        node.pop("recon_steps", None)


def _expert_source(cfg: DictConfig, init: Any) -> dict[str, Any]:
    """Key part naming the expert weights: an upstream artifact's hash, the preset's model, or a path."""
    if init in ("dapt", "sft"):
        return {"upstream": config_hash(stage_key(cfg, init))}
    if init in (None, "base"):
        return {"model": container(cfg.model.expert)}
    return {"model": str(init)}


def stage_key(cfg: DictConfig, stage: str) -> dict[str, Any]:
    """Everything that determines `stage`'s artifact, upstream stages' keys included (by hash).

    Stages: dapt, sft, backgrounds (expert generations), memory (compressed bank), gag (adapter), lora (the
    LoRA baseline), eval (keyed by the LoRA too when it is among the evaluated systems).
    """
    key: dict[str, Any] = {"stage": stage, "config": _node(cfg, stage)}
    if stage == "dapt":
        key.update(seed=cfg.seed, precision=str(cfg.trainer.precision),
                   data=file_digest(cfg.domain.knowledge_base), **_expert_source(cfg, cfg.dapt.get("init_from")))
    elif stage == "sft":
        key.update(seed=cfg.seed, precision=str(cfg.trainer.precision), instruction=cfg.domain.instruction,
                   data=[file_digest(cfg.domain.train), file_digest(cfg.domain.dev)],
                   **_expert_source(cfg, cfg.sft.get("init_from")))
    elif stage == "backgrounds":
        splits = memory_splits(cfg)
        key.update(data={s: file_digest(cfg.domain.get(s)) for s in splits},
                   **_expert_source(cfg, cfg.memory.get("expert", "sft")))
        if cfg.memory.get("max_records") is not None:
            key["max_records"] = container(cfg.memory.max_records)
        if key["config"].get("do_sample"):
            key["seed"] = cfg.seed
    elif stage == "memory":
        key["upstream"] = config_hash(stage_key(cfg, "backgrounds"))
    elif stage == "gag":
        key.update(seed=cfg.seed, precision=str(cfg.trainer.precision), base=container(cfg.model.base),
                   upstream=config_hash(stage_key(cfg, "memory")), request_text=cfg.domain.request_text,
                   instruction=cfg.domain.instruction)
        _drop_recipe_switches_when_off(key["config"])
    elif stage == "lora":
        from gag_lightning.pipeline.lora import record_selection

        key.update(seed=cfg.seed, precision=str(cfg.trainer.precision), base=_strip(container(cfg.model.base)),
                   instruction=cfg.domain.instruction, records=record_selection(cfg))
    elif stage == "eval":
        key.update(upstream=config_hash(stage_key(cfg, "gag")))
        # the evaluated splits, however they were named (`eval.splits`, a legacy `eval.split`)
        key["config"]["splits"] = eval_splits(cfg)
        key["config"].pop("split", None)
        # eval.rag is in key["config"] with the rest of the eval node; the rag system also reads the knowledge
        # base. Without rag neither matters, and its settings leave the key (the hash stays what it was before)
        if "rag" in list(cfg.eval.get("systems") or []):
            key["knowledge_base"] = file_digest(cfg.domain.knowledge_base)
        else:
            key["config"].pop("rag", None)
        if "lora" in cfg.eval.systems and not cfg.eval.get("lora_adapter"):
            key["lora"] = config_hash(stage_key(cfg, "lora"))
    else:
        raise ValueError(f"no artifact key defined for stage '{stage}'")
    return key


def artifact_dir(cfg: DictConfig, stage: str) -> Path:
    """`<artifacts>/<model>/<domain>/<stage>-<hash>`: stable across runs, unique per result."""
    return Path(cfg.paths.artifacts) / str(cfg.model.name) / str(cfg.domain.name) / (
        f"{stage}-{config_hash(stage_key(cfg, stage))[:10]}"
    )
