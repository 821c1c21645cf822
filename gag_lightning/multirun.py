"""Reading a Hydra multirun: its jobs (overrides, eval metrics from ``results.json`` or the job's log, the GAG
manifest) as a ``Summary``. Split from ``summarize`` (tables, seed pooling, plot, CSV, the command line), which
renders what this collects.
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from gag_lightning.results import read_run_results

# fact_acc first: the fact-level headline (METHOD.md section 5b); BERTScore and STS reward form
METRICS = {"fact_acc": "fact_acc", "token_f1": "token F1", "bertscore_f1": "BERTScore F1", "sts": "STS", "em": "EM"}
SEED_KEY = "seed"
SYSTEM_ORDER = ("base", "expert", "expert_context", "rag", "lora", "gag", "gag_shuffled")
LEGACY_SPLIT = "test"  # eval/<system>/<metric>: one split, the eval stage's old default `eval.split=test`
_EVAL_LOG = re.compile(r"\[eval\] (?:done: (\S+)/report\.md|artifact already complete for this configuration: "
                       r"(\S+) \(skipping\))")


@dataclass
class Job:
    """One multirun job: its folder, parsed overrides, eval metrics (``eval/<split>/<system>/<metric>``), status."""

    dir: Path
    overrides: dict[str, str]
    metrics: dict[str, float] = field(default_factory=dict)
    gag: dict[str, Any] = field(default_factory=dict)
    eval_artifact: str | None = None
    status: str = "ok"


@dataclass
class Summary:
    root: Path
    jobs: list[Job]
    swept: list[str]
    systems: list[str]
    metrics: list[str]
    sweep_name: str | None = None
    splits: list[str] = field(default_factory=list)

    def split_or_first(self, split: str | None) -> str:
        return split if split is not None else (self.splits[0] if self.splits else LEGACY_SPLIT)

    def rows(self, split: str | None = None) -> list[dict[str, Any]]:
        """Raw values per job on one eval split (the first when None; fractions, not x100): tables and plot."""
        split = self.split_or_first(split)
        out = []
        for job in self.jobs:
            row: dict[str, Any] = {"job": job.dir.name, "split": split, **{k: job.overrides.get(k) for k in self.swept}}

            def get(system: str, key: str, job: Job = job) -> float | None:
                return job.metrics.get(f"eval/{split}/{system}/{key}")

            for metric in self.metrics:
                for system in self.systems:
                    row[f"{system}/{metric}"] = get(system, metric)
                    if metric == "fact_acc":
                        for end in ("lo", "hi"):
                            row[f"{system}/fact_acc_{end}"] = get(system, f"fact_acc_{end}")
                row[f"gag-base/{metric}"] = _diff(get("gag", metric), get("base", metric))
                if metric == "fact_acc":  # the paired-bootstrap interval of gag minus base, when eval made one
                    for end in ("lo", "hi"):
                        row[f"gag-base/fact_acc_{end}"] = get("base", f"gag_minus_fact_acc_{end}")
            # the NLL part alone: comparable across loss weights, unlike the weighted total
            row["gag/val_nll"] = job.gag.get("val/nll")
            row["status"] = job.status
            out.append(row)
        return out

    def all_rows(self) -> list[dict[str, Any]]:
        """Every split's rows, split by split (the CSV)."""
        return [row for split in self.splits or [LEGACY_SPLIT] for row in self.rows(split)]


def metric_key(key: str) -> tuple[str, str, str] | None:
    """``eval/<split>/<system>/<metric>`` -> (split, system, metric); a pre-split ``eval/<system>/<metric>`` is
    split ``test`` (LEGACY_SPLIT); anything else None."""
    parts = key.split("/")
    if parts[0] != "eval":
        return None
    if len(parts) == 4:
        return parts[1], parts[2], parts[3]
    if len(parts) == 3:
        return LEGACY_SPLIT, parts[1], parts[2]
    return None


def eval_metrics(values: dict[str, Any]) -> dict[str, float]:
    """The eval metrics among ``values``, keyed ``eval/<split>/<system>/<metric>`` (legacy keys renamed)."""
    out = {}
    for key, value in values.items():
        parsed = metric_key(str(key))
        if parsed is not None and value is not None:
            out["eval/{}/{}/{}".format(*parsed)] = float(value)
    return out


# ------------------------------------------------------------------------------------------ collecting
def _job_sort_key(path: Path) -> tuple[int, str]:
    return (int(path.name), "") if path.name.isdigit() else (sys.maxsize, path.name)


def find_jobs(root: Path) -> list[Path]:
    """Job folders under ``root`` (those holding ``.hydra/overrides.yaml``), in job-number order."""
    found = {p.parent.parent for p in root.glob("**/.hydra/overrides.yaml")}
    return sorted(found, key=_job_sort_key)


def parse_overrides(lines: Sequence[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for line in lines:
        key, sep, value = str(line).partition("=")
        if sep:
            out[key.lstrip("+~")] = value
    return out


def sweeper_params(root: Path) -> list[str]:
    """Keys of ``hydra.sweeper.params`` (from the multirun's ``multirun.yaml`` or a job's ``hydra.yaml``)."""
    candidates = [root / "multirun.yaml", *(j / ".hydra" / "hydra.yaml" for j in find_jobs(root)[:1])]
    for path in candidates:
        if path.is_file():
            node = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
            params = ((node.get("hydra") or {}).get("sweeper") or {}).get("params") or {}
            return [str(k).lstrip("+~") for k in params]
    return []


def _eval_artifact_from_log(job_dir: Path) -> str | None:
    for log_file in sorted(job_dir.glob("*.log")):
        for line in reversed(log_file.read_text(encoding="utf-8", errors="replace").splitlines()):
            match = _EVAL_LOG.search(line)
            if match:
                return match.group(1) or match.group(2)
    return None


def _read_manifest_metrics(folder: str | None) -> dict[str, Any]:
    if not folder:
        return {}
    path = Path(folder) / "manifest.json"
    if not path.is_file():
        return {}
    return dict(json.loads(path.read_text(encoding="utf-8")).get("metrics") or {})


def load_job(job_dir: Path) -> Job:
    overrides = parse_overrides(yaml.safe_load((job_dir / ".hydra" / "overrides.yaml").read_text()) or [])
    job = Job(job_dir, overrides)
    results = read_run_results(job_dir)
    if results is not None:
        stages = results.get("stages") or {}
        evaluation = stages.get("eval") or {}
        job.eval_artifact = evaluation.get("artifact")
        job.metrics = eval_metrics(evaluation)
        job.gag = dict(stages.get("gag") or {})
        if not evaluation:
            job.status = "no eval stage"
        return job
    # no results.json: the job failed, is still running, or predates it; its log may still name the eval artifact
    job.eval_artifact = _eval_artifact_from_log(job_dir)
    metrics = _read_manifest_metrics(job.eval_artifact)
    job.metrics = eval_metrics(metrics)
    job.status = "ok (from log)" if job.metrics else "no results (failed or unfinished)"
    return job


def collect(root: str | Path) -> Summary:
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root} is not a folder (give a multirun folder, e.g. logs/<task>/multiruns/<time>)")
    jobs = [load_job(d) for d in find_jobs(root)]
    if not jobs:
        raise FileNotFoundError(f"no Hydra job folders (with .hydra/overrides.yaml) under {root}")
    swept = [k for k in sweeper_params(root) if not k.startswith("hydra")]
    for job in jobs:  # command-line sweeps (seed=1,2) and anything else that differs between jobs
        for key in job.overrides:
            values = {j.overrides.get(key) for j in jobs}
            if key not in swept and not key.startswith("hydra") and len(values) > 1:
                swept.append(key)
    keys = [k.split("/")[1:] for j in jobs for k in j.metrics]  # [split, system, metric]
    splits = list(dict.fromkeys(k[0] for k in keys))
    seen_systems = {k[1] for k in keys}
    systems = [s for s in SYSTEM_ORDER if s in seen_systems] + sorted(seen_systems - set(SYSTEM_ORDER))
    metrics = [m for m in METRICS if any(k[2] == m for k in keys)]
    sweep_name = next((r.get("sweep_name") for r in map(read_run_results, (j.dir for j in jobs)) if r), None)
    return Summary(root, jobs, swept, systems, metrics, sweep_name, splits)


def _diff(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a - b
