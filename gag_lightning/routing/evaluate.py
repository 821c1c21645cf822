"""``route.py mode=eval``: route the mixed online test set, report accuracy (JSON, confusion PNG, per query)."""

from __future__ import annotations

import json
import logging
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from gag_lightning.artifacts import atomic_write_text
from gag_lightning.errors import GAGError, RecordError
from gag_lightning.routing.banks import BankInfo, RouteSpec, dataset_routes
from gag_lightning.routing.encoder import QueryEncoder
from gag_lightning.routing.metrics import gold_routes, plot_confusion, routing_report
from gag_lightning.routing.router import PrototypeRouter, RouteDecision

log = logging.getLogger(__name__)

__all__ = ["CONFUSION_FILE", "REPORT_FILE", "ROUTES_FILE", "evaluate_routing", "print_banks", "print_decisions",
           "print_report"]

REPORT_FILE = "routing_report.json"
CONFUSION_FILE = "confusion.png"
ROUTES_FILE = "routes.jsonl"


# ------------------------------------------------------------------------------------------------- printing
def _console():  # type: ignore[no-untyped-def]
    from rich.console import Console

    return Console()


def _fmt(x: float | None, spec: str = ".4f") -> str:
    return "-" if x is None else format(x, spec)


def print_banks(infos: Mapping[str, BankInfo], encoder: QueryEncoder) -> None:
    from rich.table import Table

    table = Table(title=f"prototype banks ({encoder.fingerprint})")
    for col in ("route", "k", "pool", "status", "folder"):
        table.add_column(col)
    for name, info in infos.items():
        status = f"built {info.seconds:.1f}s" if info.built else "reused"
        table.add_row(name, str(info.bank.k), str(info.bank.pool_size), status, str(info.folder))
    _console().print(table)


def print_report(report: Mapping[str, Any]) -> None:
    from rich.table import Table

    console = _console()
    table = Table(title="per-route accuracy (recall over gold route)")
    for col in ("route", "gold", "pred", "correct", "accuracy", "precision"):
        table.add_column(col, justify="right" if col != "route" else "left")
    for name, row in report["per_route"].items():
        table.add_row(
            name,
            str(row["gold"]),
            str(row["pred"]),
            str(row["correct"]),
            _fmt(row["accuracy"]),
            _fmt(row["precision"]),
        )
    console.print(table)
    labels, matrix = report["confusion"]["labels"], report["confusion"]["matrix"]
    conf = Table(title="confusion matrix (rows gold, columns predicted)")
    conf.add_column("gold \\ pred")
    for label in labels:
        conf.add_column(label, justify="right")
    for label, row in zip(labels, matrix, strict=True):
        conf.add_row(
            label, *(f"[bold]{v}[/bold]" if i == labels.index(label) else str(v) for i, v in enumerate(row))
        )
    console.print(conf)
    console.print(
        f"routing micro accuracy [bold]{_fmt(report['micro_accuracy'])}[/bold] "
        f"({report['correct']}/{report['n']}), macro {_fmt(report['macro_accuracy'])}; "
        f"{report['queries_per_s']:.1f} queries/s (batch {report['batch_size']}, encode + route, "
        f"{report['route_seconds']:.2f}s for {report['n']} queries)"
    )


def print_decisions(questions: Sequence[str], decisions: Sequence[RouteDecision]) -> None:
    from rich.table import Table

    domains = list(decisions[0].scores) if decisions else []
    table = Table(title="routes (score = max cosine to the route's prototypes)")
    table.add_column("query")
    table.add_column("route")
    for d in domains:
        table.add_column(d, justify="right")
    table.add_column("margin", justify="right")
    for q, dec in zip(questions, decisions, strict=True):
        route = dec.domain + (f" (fallback from {dec.best})" if dec.fell_back else "")
        table.add_row(q, route, *(f"{dec.scores[d]:.4f}" for d in domains), _fmt(dec.margin))
    _console().print(table)


# ----------------------------------------------------------------------------------------------------- modes
def evaluate_routing(
    cfg: DictConfig,
    encoder: QueryEncoder,
    router: PrototypeRouter,
    specs: Sequence[RouteSpec],
    out_dir: str | Path,
    bank_folders: Mapping[str, str] | None = None,
) -> tuple[dict[str, Any], list[Any], list[RouteDecision]]:
    """Route the mixed online test set; write the report JSON, the confusion PNG and routes.jsonl."""
    from gag_lightning.data.records import read_mixed

    rc = cfg.router
    if not rc.get("test_set"):
        raise GAGError("router.test_set is not set: point it at the mixed online test set (JSON lines)")
    records = read_mixed(str(rc.test_set))
    names = [r.dataset_name for r in records]
    table = dataset_routes(specs)
    for rec in records:  # the file's 1-based line, not the record's position
        if rec.dataset_name not in table:
            raise RecordError(
                str(rc.test_set), rec.line, "dataset_name",
                f"{rec.dataset_name!r} has no gold route (known: {sorted(table)}). Add the dataset to its route's "
                f"router.domains.<key>.dataset_names (or add the route: +router.domains.<key>={{pool: ..., "
                f"dataset_names: [...]}})",
            )
    gold = gold_routes(names, table)
    missing = Counter(g for g in gold if g not in router)
    for route, n in missing.items():
        log.warning(
            "%d test queries have gold route '%s', which has no bank here: they count as misrouted", n, route
        )
    questions = [r.question for r in records]
    batch_size = int(rc.batch_size)
    t0 = time.perf_counter()
    decisions = router.route_texts(encoder, questions, batch_size=batch_size)
    seconds = time.perf_counter() - t0
    pred = [d.domain for d in decisions]
    report = routing_report(pred, gold, router.domains)
    per_dataset: dict[str, dict[str, Any]] = {}
    for name, g, p in zip(names, gold, pred, strict=True):
        row = per_dataset.setdefault(name, {"gold": g, "n": 0, "correct": 0})
        row["n"] += 1
        row["correct"] += int(g == p)
    for row in per_dataset.values():
        row["accuracy"] = row["correct"] / row["n"]
    report.update(
        {
            "per_dataset": per_dataset,
            "fell_back": sum(d.fell_back for d in decisions),
            "queries_per_s": len(questions) / seconds if seconds > 0 else float("inf"),
            "route_seconds": seconds,
            "batch_size": batch_size,
            "margin": router.margin,
            "test_set": str(rc.test_set),
            "encoder_fingerprint": encoder.fingerprint,
            "banks": {
                d: {
                    "k": router.banks[d].k,
                    "pool_size": router.banks[d].pool_size,
                    "folder": (bank_folders or {}).get(d),
                }
                for d in router.domains
            },
        }
    )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    lines = []
    for rec, g, dec in zip(records, gold, decisions, strict=True):
        lines.append(
            json.dumps(
                {
                    "index": rec.index,
                    "question": rec.question,
                    "dataset_name": rec.dataset_name,
                    "gold": g,
                    "pred": dec.domain,
                    "best": dec.best,
                    "fell_back": dec.fell_back,
                    "scores": {k: round(v, 6) for k, v in dec.scores.items()},
                },
                ensure_ascii=False,
            )
        )
    atomic_write_text(out / ROUTES_FILE, "\n".join(lines) + "\n")
    plot_confusion(report, out / CONFUSION_FILE)
    atomic_write_text(out / REPORT_FILE, json.dumps(report, indent=2, ensure_ascii=False))
    return report, records, decisions
