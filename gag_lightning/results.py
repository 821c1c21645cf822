"""``results.json`` in a run's output folder: what the run was asked (overrides) and what each stage returned.

Artifacts are shared between runs (a sweep job may skip every upstream stage), so a run's own folder is the
only place that says which artifacts *this* job used and which metrics they hold; ``gag_lightning.summarize``
reads it to tabulate a multirun without re-composing any config.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from gag_lightning.artifacts import atomic_write_text

RESULTS = "results.json"


def _hydra_job() -> dict[str, Any]:
    """Overrides and job number of the current Hydra job; empty outside a Hydra run (compose API, tests)."""
    try:
        from hydra.core.hydra_config import HydraConfig

        hc = HydraConfig.get()
    except (ImportError, ValueError):
        return {"overrides": [], "job_num": None, "mode": None}
    job_num = hc.job.get("num")
    return {"overrides": list(hc.overrides.task), "job_num": int(job_num) if job_num is not None else None,
            "mode": str(hc.mode) if hc.get("mode") is not None else None}


def _jsonable(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if hasattr(value, "item"):  # tensors / numpy scalars
        try:
            return _jsonable(value.item())
        except (ValueError, RuntimeError):
            pass
    return str(value)


def write_run_results(cfg: DictConfig, results: Mapping[str, Mapping[str, Any]],
                      path: str | Path | None = None) -> Path | None:
    """Write ``<paths.output_dir>/results.json`` (atomically; the last thing a successful run does; rank 0 only)."""
    from gag_lightning.stages._common.trainer import global_rank

    if global_rank() != 0:
        return None
    path = Path(path) if path is not None else Path(cfg.paths.output_dir) / RESULTS
    payload = {
        "task_name": cfg.get("task_name"),
        "sweep_name": cfg.get("sweep_name"),
        "model": str(cfg.model.name),
        "domain": str(cfg.domain.name),
        "seed": cfg.get("seed"),
        "run_stages": list(cfg.run_stages),
        **_hydra_job(),
        "output_dir": str(cfg.paths.output_dir),
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "stages": _jsonable(results),
    }
    atomic_write_text(path, json.dumps(payload, indent=2) + "\n")
    return path


def read_run_results(run_dir: str | Path) -> dict[str, Any] | None:
    path = Path(run_dir) / RESULTS
    if not path.is_file():
        return None
    return json.loads(path.read_text(encoding="utf-8"))


__all__ = ["RESULTS", "read_run_results", "write_run_results"]
