"""Routing accuracy report and confusion plot (the paper reports routing micro-accuracy, METHOD.md s.7).

Per-route accuracy is recall per gold route: with a large general pool, micro-accuracy alone hides a
specialist domain that is mostly misrouted.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from gag_lightning.errors import GAGError

__all__ = ["DEFAULT_DATASET_ROUTES", "gold_routes", "routing_report", "plot_confusion"]

# dataset_name of the mixed-domain online test (METHOD.md section 0) -> gold route.
DEFAULT_DATASET_ROUTES: dict[str, str] = {
    "webqa": "general",
    "tqa": "general",
    "popqa": "general",
    "freebase_qa": "general",
    "hotpot_qa": "general",
    "nq": "general",
    "material": "materials",
    "adjuvant_qa": "adjuvant",
}


def gold_routes(dataset_names: Iterable[str], mapping: Mapping[str, str] | None = None) -> list[str]:
    """Map each record's ``dataset_name`` to its gold route; an unmapped name is an error, not a guess."""
    table = dict(DEFAULT_DATASET_ROUTES if mapping is None else mapping)
    out = []
    for i, name in enumerate(dataset_names, start=1):
        if name not in table:
            raise GAGError(
                f"record {i} (1-based): dataset_name {name!r} has no gold route; known: {sorted(table)} "
                f"(pass a mapping for new domains)"
            )
        out.append(table[name])
    return out


def routing_report(pred: Sequence[str], gold: Sequence[str], domains: Sequence[str]) -> dict[str, Any]:
    """Micro accuracy, per-route recall, counts and the confusion matrix (rows gold, columns pred).

    Labels are ``domains`` in the given order, followed by any other label seen in ``pred`` or ``gold``
    (listed under ``unknown_labels``) so that nothing is silently dropped. Undefined rates are None.
    """
    pred, gold = list(pred), list(gold)
    if len(pred) != len(gold):
        raise GAGError(f"routing_report: {len(pred)} predictions but {len(gold)} gold routes")
    labels = list(dict.fromkeys(domains))
    unknown = sorted({x for x in (*gold, *pred) if x not in labels})
    labels += unknown
    index = {d: i for i, d in enumerate(labels)}
    matrix = [[0] * len(labels) for _ in labels]
    for p, g in zip(pred, gold, strict=True):
        matrix[index[g]][index[p]] += 1
    n = len(gold)
    correct = sum(matrix[i][i] for i in range(len(labels)))
    gold_counts = {d: sum(matrix[index[d]]) for d in labels}
    pred_counts = {d: sum(row[index[d]] for row in matrix) for d in labels}
    per_route: dict[str, dict[str, Any]] = {}
    for d in labels:
        i = index[d]
        tp = matrix[i][i]
        per_route[d] = {
            "gold": gold_counts[d],
            "pred": pred_counts[d],
            "correct": tp,
            "accuracy": tp / gold_counts[d] if gold_counts[d] else None,
            "precision": tp / pred_counts[d] if pred_counts[d] else None,
        }
    recalls = [v["accuracy"] for v in per_route.values() if v["accuracy"] is not None]
    return {
        "n": n,
        "correct": correct,
        "micro_accuracy": correct / n if n else None,
        "macro_accuracy": sum(recalls) / len(recalls) if recalls else None,
        "per_route_accuracy": {d: per_route[d]["accuracy"] for d in labels},
        "per_route": per_route,
        "counts": {"gold": gold_counts, "pred": pred_counts},
        "confusion": {"labels": labels, "matrix": matrix, "rows": "gold", "cols": "pred"},
        "unknown_labels": unknown,
    }


def plot_confusion(
    report: Mapping[str, Any], path_png: str | os.PathLike[str], title: str | None = None
) -> Path:
    """Save the confusion matrix as a PNG (colour = row-normalised share, text = counts).

    Uses the Agg canvas directly rather than ``pyplot`` so that no global backend is switched in the
    caller's process and it works on headless nodes.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    labels = list(report["confusion"]["labels"])
    matrix = [list(r) for r in report["confusion"]["matrix"]]
    shares = [[v / max(1, sum(row)) for v in row] for row in matrix]
    size = max(3.0, 0.9 * len(labels) + 2.0)
    fig = Figure(figsize=(size, size))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    im = ax.imshow(shares, cmap="Blues", vmin=0.0, vmax=1.0)
    ax.set_xticks(range(len(labels)), labels=labels, rotation=45, ha="right")
    ax.set_yticks(range(len(labels)), labels=labels)
    ax.set_xlabel("predicted route")
    ax.set_ylabel("gold route")
    for i, row in enumerate(matrix):
        for j, v in enumerate(row):
            ax.text(j, i, str(v), ha="center", va="center", color="white" if shares[i][j] > 0.5 else "black")
    acc = report.get("micro_accuracy")
    ax.set_title(title or (f"routing accuracy {acc:.2%}" if acc is not None else "routing"))
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    fig.tight_layout()
    out = Path(path_png)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, format="png", dpi=120)
    return out
