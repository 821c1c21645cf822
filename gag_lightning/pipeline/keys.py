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
    if isinstance(node, dict):
        return {k: _strip(v) for k, v in node.items() if k not in _NON_RESULT_KEYS}
    if isinstance(node, list):
        return [_strip(v) for v in node]
    return node


def container(node: Any) -> Any:
    if isinstance(node, DictConfig) or OmegaConf.is_config(node):
        return OmegaConf.to_container(node, resolve=True)
    return node


def stage_key(cfg: DictConfig, stage: str) -> dict[str, Any]:
    """Everything that determines `stage`'s artifact, upstream stages' keys included."""
    node = _strip(container(cfg[stage]))
    key: dict[str, Any] = {"stage": stage, "config": node, "seed": cfg.seed,
                           "precision": str(cfg.trainer.precision)}
    if stage == "dapt":
        key["model"] = container(cfg.model.expert) if node.get("init_from") is None else node["init_from"]
        key["data"] = file_digest(cfg.domain.knowledge_base)
    elif stage == "sft":
        init = node.get("init_from")
        if init == "dapt":
            key["upstream"] = config_hash(stage_key(cfg, "dapt"))
        elif init in (None, "base"):
            key["model"] = container(cfg.model.expert)
        else:
            key["model"] = init
        key["data"] = [file_digest(cfg.domain.train), file_digest(cfg.domain.dev)]
        key["instruction"] = cfg.domain.instruction
    return key


def artifact_dir(cfg: DictConfig, stage: str) -> Path:
    """`<artifacts>/<model>/<domain>/<stage>-<hash>`: stable across runs, unique per result."""
    return Path(cfg.paths.artifacts) / str(cfg.model.name) / str(cfg.domain.name) / (
        f"{stage}-{config_hash(stage_key(cfg, stage))[:10]}"
    )
