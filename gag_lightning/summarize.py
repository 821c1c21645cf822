"""Tabulate a Hydra multirun: one table per eval split, one row per job (its swept values; fact_acc [95% CI], token
F1, BERTScore F1, STS of every evaluated system; gag minus base), saved beside the runs as ``summary.md`` +
``summary.csv`` (a ``split`` column) + ``summary.png`` and printed. Jobs that differ only by ``seed`` are also shown
pooled: mean ± std over the seeds.

    python -m gag_lightning.summarize logs/smoke/multiruns/slots_2026-01-01_12-00-00

A job's metrics come from the ``results.json`` train.py writes last in its folder (they name the eval artifact
the job used, which may have been built by another job); for runs without one, the eval artifact is found
through the job's log. Nothing is re-composed, so a summary works on a copy of the run folders. Metrics are
``eval/<split>/<system>/<metric>``; those of runs from before the eval splits (``eval/<system>/<metric>``) are read
as split ``test``, the eval split those runs used by default.
"""

from __future__ import annotations

import argparse
import csv
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from gag_lightning.multirun import (
    LEGACY_SPLIT,
    METRICS,
    SEED_KEY,
    Job,
    Summary,
    collect,
)


# ------------------------------------------------------------------------------------------ rendering
def _pct(value: float | None, signed: bool = False) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{100 * value:+.2f}" if signed else f"{100 * value:.2f}"


def _interval_cell(value: float | None, lo: float | None, hi: float | None, signed: bool = False) -> str:
    """x100 with a CI, one decimal as in the eval report: ``62.5 [47.5, 77.5]`` (``+12.5 [+2.5, +22.5]``)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    fmt = "{:+.1f}" if signed else "{:.1f}"
    cell = fmt.format(100 * value)
    if lo is not None and hi is not None:
        cell += f" [{fmt.format(100 * lo)}, {fmt.format(100 * hi)}]"
    return cell


def _cells(row: dict[str, Any], metric: str, systems: Sequence[str], with_diff: bool) -> list[str]:
    if metric != "fact_acc":
        cells = [_pct(row[f"{s}/{metric}"]) for s in systems]
        return cells + ([_pct(row[f"gag-base/{metric}"], signed=True)] if with_diff else [])
    cells = [_interval_cell(row[f"{s}/fact_acc"], row[f"{s}/fact_acc_lo"], row[f"{s}/fact_acc_hi"]) for s in systems]
    if with_diff:
        cells.append(_interval_cell(row["gag-base/fact_acc"], row["gag-base/fact_acc_lo"], row["gag-base/fact_acc_hi"],
                                    signed=True))
    return cells


def short_names(keys: Sequence[str]) -> dict[str, str]:
    """``memory.compression.slots`` -> ``slots`` unless two swept keys end the same way."""
    last = [k.rsplit(".", 1)[-1] for k in keys]
    return {k: (s if last.count(s) == 1 else k) for k, s in zip(keys, last, strict=True)}


def markdown_table(summary: Summary, split: str | None = None) -> str:
    """One eval split's table (the first split when None)."""
    names = short_names(summary.swept)
    header = ["job", *(names[k] for k in summary.swept)]
    for metric in summary.metrics:
        header += [f"{METRICS[metric]} {s}" + (" [95% CI]" if metric == "fact_acc" else "") for s in summary.systems]
        if {"gag", "base"} <= set(summary.systems):
            header.append(f"{METRICS[metric]} gag-base")
    header += ["gag val NLL", "status"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] * len(header)) + "|"]
    with_diff = {"gag", "base"} <= set(summary.systems)
    for job, row in zip(summary.jobs, summary.rows(split), strict=True):
        cells = [job.dir.name, *(str(row[k]) if row[k] is not None else "-" for k in summary.swept)]
        for metric in summary.metrics:
            cells += _cells(row, metric, summary.systems, with_diff)
        loss = row["gag/val_nll"]
        cells += [f"{float(loss):.4f}" if loss is not None else "-", job.status]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------ seeds
def seed_groups(summary: Summary, split: str | None = None) -> list[tuple[dict[str, str | None], list[dict[str, Any]]]]:
    """Jobs that differ only by ``seed``, grouped: [(the other swept values, their rows on ``split``)]; [] when seed
    is not swept or no two jobs share everything else."""
    if SEED_KEY not in summary.swept:
        return []
    others = [k for k in summary.swept if k != SEED_KEY]
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for row in summary.rows(split):
        groups.setdefault(tuple(row.get(k) for k in others), []).append(row)
    if not any(len(rows) > 1 for rows in groups.values()):
        return []
    return [(dict(zip(others, key, strict=True)), rows) for key, rows in groups.items()]


def mean_std(values: Sequence[float | None]) -> tuple[float | None, float | None, int]:
    """(mean, sample std, n) of the values present; std is None for fewer than two."""
    present = [float(v) for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not present:
        return None, None, 0
    mean = math.fsum(present) / len(present)
    if len(present) < 2:
        return mean, None, len(present)
    return mean, math.sqrt(math.fsum((v - mean) ** 2 for v in present) / (len(present) - 1)), len(present)


def _mean_std_cell(values: Sequence[float | None], signed: bool = False) -> str:
    mean, std, _ = mean_std(values)
    if mean is None:
        return "n/a"
    cell = f"{100 * mean:+.1f}" if signed else f"{100 * mean:.1f}"
    return cell + (f" ± {100 * std:.1f}" if std is not None else "")


def seed_table(summary: Summary, split: str | None = None) -> str:
    """Markdown: one row per group of jobs that differ only by seed, each metric as mean ± std (x100) over seeds."""
    groups = seed_groups(summary, split)
    if not groups:
        return ""
    names = short_names(summary.swept)
    others = [k for k in summary.swept if k != SEED_KEY]
    with_diff = {"gag", "base"} <= set(summary.systems)
    header = [*(names[k] for k in others), "seeds"]
    for metric in summary.metrics:
        header += [f"{METRICS[metric]} {s}" for s in summary.systems] + ([f"{METRICS[metric]} gag-base"]
                                                                          if with_diff else [])
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] * len(header)) + "|"]
    for values, rows in groups:
        cells = [str(values[k]) if values[k] is not None else "-" for k in others]
        cells.append(", ".join(str(r.get(SEED_KEY)) for r in rows))
        for metric in summary.metrics:
            cells += [_mean_std_cell([r[f"{s}/{metric}"] for r in rows]) for s in summary.systems]
            if with_diff:
                cells.append(_mean_std_cell([r[f"gag-base/{metric}"] for r in rows], signed=True))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _job_label(summary: Summary, job: Job) -> str:
    names = short_names(summary.swept)
    if not summary.swept:
        return job.dir.name
    if len(summary.swept) == 1:
        return str(job.overrides.get(summary.swept[0], "-"))
    return "\n".join(f"{names[k]}={job.overrides.get(k, '-')}" for k in summary.swept)


def plot(summary: Summary, path: Path) -> Path | None:
    """One panel per eval split and metric: each system's score (x100) against the swept value(s), jobs in sweep
    order; one row of panels per split."""
    if not summary.metrics:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    splits = summary.splits or [LEGACY_SPLIT]
    rows_of = {split: summary.rows(split) for split in splits}
    xs = list(range(len(summary.jobs)))
    labels = [_job_label(summary, j) for j in summary.jobs]
    n = len(summary.metrics)
    width = min(14.0, max(5.0, 1.1 * len(xs) + 3))
    # many jobs: panels stacked, so labels stay readable
    nrows, ncols = (n * len(splits), 1) if len(xs) > 5 else (len(splits), n)
    fig, axes = plt.subplots(nrows, ncols, figsize=(width * ncols, 4.2 * nrows), squeeze=False)
    panels = [(split, metric) for split in splits for metric in summary.metrics]
    for ax, (split, metric) in zip(axes.flat, panels, strict=True):
        rows = rows_of[split]
        for system in summary.systems:
            ys = [100 * r[f"{system}/{metric}"] if r[f"{system}/{metric}"] is not None else float("nan")
                  for r in rows]
            style = "-o" if system == "gag" else ("--" if system == "base" else ":.")
            ax.plot(xs, ys, style, label=system)
        ax.set_xticks(xs)
        ax.set_xticklabels(labels, fontsize=8)
        ax.set_xlabel(", ".join(short_names(summary.swept).values()) or "job")
        ax.set_ylabel(f"{METRICS[metric]} x100")
        ax.set_title(split, fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"sweep: {summary.sweep_name or summary.root.name}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_csv(summary: Summary, path: Path) -> Path:
    rows = summary.all_rows()
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def write_summary(summary: Summary, make_plot: bool = True) -> dict[str, Path]:
    """summary.md (+ summary.csv, summary.png) in the multirun folder; returns their paths."""
    root = summary.root
    paths = {"csv": write_csv(summary, root / "summary.csv")}
    png = plot(summary, root / "summary.png") if make_plot else None
    if png:
        paths["png"] = png
    first = next((j for j in summary.jobs if j.eval_artifact), None)
    ok = sum(bool(j.metrics) for j in summary.jobs)
    text = [f"# Sweep summary: {summary.sweep_name or root.name}", "",
            f"`{root}`: {len(summary.jobs)} jobs ({ok} with eval metrics); swept: "
            f"{', '.join(f'`{k}`' for k in summary.swept) or 'nothing'}.",
            "Scores x100 on each eval split (one table per split): fact_acc (a gold alias of the fact in the answer, with its bootstrap 95% "
            "CI; n/a = no gold answers), token F1, BERTScore F1, STS cosine; gag-base = GAG minus the base alone "
            "(for fact_acc with its paired-bootstrap CI); gag val NLL = the answer NLL at the adapter's last "
            "validation.", ""]
    if first:
        text += [f"Eval artifact of job {first.dir.name}: `{first.eval_artifact}`", ""]
    for split in summary.splits or [LEGACY_SPLIT]:
        text += [f"## Eval split `{split}`", "", markdown_table(summary, split), ""]
        seeds = seed_table(summary, split)
        if seeds:
            text += [f"### Across seeds on `{split}` (mean ± sample std over the seeds, x100)", "", seeds, ""]
    if png:
        text += [f"![{png.stem}]({png.name})", ""]
    paths["md"] = root / "summary.md"
    paths["md"].write_text("\n".join(text), encoding="utf-8")
    return paths


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gag_lightning.summarize", description=__doc__.split("\n\n")[0])
    parser.add_argument("multirun_dir", help="a Hydra multirun folder (logs/<task>/multiruns/<...>)")
    parser.add_argument("--no-plot", action="store_true", help="skip summary.png")
    args = parser.parse_args(argv)
    try:
        summary = collect(args.multirun_dir)
    except FileNotFoundError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    paths = write_summary(summary, make_plot=not args.no_plot)
    for split in summary.splits or [LEGACY_SPLIT]:
        print(f"\nEval split {split}:\n" + markdown_table(summary, split))
        seeds = seed_table(summary, split)
        if seeds:
            print(f"\nAcross seeds on {split} (mean ± std, x100):\n" + seeds)
    print("\n" + "  ".join(f"{k}: {v}" for k, v in paths.items()))
    return 0 if any(j.metrics for j in summary.jobs) else 2


if __name__ == "__main__":
    raise SystemExit(main())
