"""What ``route.py`` runs: build missing prototype banks (``routing.banks``), then evaluate routing
(``routing.evaluate``), route ad-hoc queries and answer them, or answer the mixed test set routed, oracle and base
alone (``routing.answer``).
"""

from __future__ import annotations

import importlib.util
import json
import logging
import time
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from gag_lightning.errors import GAGError
from gag_lightning.routing.banks import (
    BankInfo,
    RouteSpec,
    build_router,
    dataset_routes,
    encoder_slug,
    ensure_bank,
    load_router_encoder,
    pick_device,
    route_specs,
)
from gag_lightning.routing.evaluate import (
    CONFUSION_FILE,
    REPORT_FILE,
    ROUTES_FILE,
    _console,
    evaluate_routing,
    print_banks,
    print_decisions,
    print_report,
)
from gag_lightning.routing.metrics import gold_routes
from gag_lightning.routing.presets import expand_router

log = logging.getLogger(__name__)

# the bank and evaluation names stay importable from here (route.py, baselines.rag, bench/route.py use them)
__all__ = [
    "CONFUSION_FILE",
    "REPORT_FILE",
    "ROUTES_FILE",
    "BankInfo",
    "RouteSpec",
    "answer_metrics",
    "answering_available",
    "build_router",
    "dataset_routes",
    "encoder_slug",
    "ensure_bank",
    "evaluate_routing",
    "load_router_encoder",
    "pick_device",
    "route_specs",
    "run",
]

ANSWER_MODULE = "gag_lightning.routing.answer"
ANSWER_METRICS_FILE = "metrics.json"  # written by routed answering (answer.score_systems) into the output dir


def _container(node: Any) -> Any:
    return OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else node


def answering_available() -> bool:
    """Routed answering (``gag_lightning.routing.answer``) is part of this build."""
    return importlib.util.find_spec(ANSWER_MODULE) is not None


def _queries(cfg: DictConfig) -> list[str]:
    query = _container(cfg.get("query"))
    if isinstance(query, str):
        query = [query]
    if not query or not all(isinstance(q, str) and q.strip() for q in query):
        raise GAGError(
            'mode=query needs a non-empty query, e.g. python route.py mode=query query="What is ...?"'
        )
    return list(query)


def run(cfg: DictConfig) -> dict[str, Any]:
    """Dispatch on ``cfg.mode``; returns the figures (micro_accuracy, queries_per_s, routes ...)."""
    mode = str(cfg.get("mode", "eval"))
    if mode not in ("eval", "query", "answer"):
        raise GAGError(f"mode is '{mode}'; choose eval, query or answer")
    questions = _queries(cfg) if mode == "query" else []
    rc = cfg.router
    specs = route_specs(expand_router(cfg))
    t0 = time.perf_counter()
    encoder = load_router_encoder(
        cfg.model.encoders.router,
        cfg.paths.cache_dir,
        device=pick_device(cfg),
        dtype=str(rc.get("dtype") or "float32"),
    )
    load_s = time.perf_counter() - t0
    log.info("router encoder %s loaded in %.1fs", encoder.fingerprint, load_s)
    router, infos = build_router(cfg, encoder, specs)
    print_banks(infos, encoder)
    result: dict[str, Any] = {
        "mode": mode,
        "encoder_fingerprint": encoder.fingerprint,
        "encoder_load_s": load_s,
        "banks": {n: {"folder": str(i.folder), "built": i.built, "k": i.bank.k} for n, i in infos.items()},
    }
    out_dir = Path(cfg.paths.output_dir)
    if mode == "query":
        decisions = router.route_texts(encoder, questions, batch_size=int(rc.batch_size))
        print_decisions(questions, decisions)
        result["routes"] = [
            {"query": q, "route": d.domain, "scores": d.scores, "fell_back": d.fell_back}
            for q, d in zip(questions, decisions, strict=True)
        ]
        from gag_lightning.routing.answer import answer_routed

        answers = answer_routed(cfg, questions, [d.domain for d in decisions])
        result["answers"] = answers
        for q, d, a in zip(questions, decisions, answers, strict=True):
            _console().print(f"[bold]{d.domain}[/bold] | {q}\n  -> {a}")
        return result

    folders = {n: str(i.folder) for n, i in infos.items()}
    report, records, decisions = evaluate_routing(cfg, encoder, router, specs, out_dir, folders)
    print_report(report)
    log.info("routing report: %s", out_dir / REPORT_FILE)
    result.update(
        {k: report[k] for k in ("micro_accuracy", "macro_accuracy", "per_route_accuracy", "queries_per_s")}
    )
    result["report"] = str(out_dir / REPORT_FILE)
    if mode == "answer":
        from gag_lightning.routing.answer import ANSWER_REPORT, answer_mixed

        gold = gold_routes([r.dataset_name for r in records], dataset_routes(specs))
        answer_report, answers = answer_mixed(cfg, records, [d.domain for d in decisions], gold, out_dir)
        result["answer_metrics"] = answer_metrics(out_dir / ANSWER_METRICS_FILE)
        result["answer_report"] = str(out_dir / ANSWER_REPORT)
        result["answers"] = answers["routed"]
        result["memory"] = answer_report["memory"]
        result["routed_minus_oracle_fact_acc"] = answer_report["routed_minus_oracle_fact_acc"]
    return result


def answer_metrics(path: Path, system: str = "routed") -> dict[str, dict[str, Any]]:
    """Per-dataset answer quality of one system (routed, oracle, base) from the answering's metrics.json:
    fact_acc (n/a = None for sets without gold aliases) with its CI beside EM and BERTScore F1 / STS; {} when
    answering wrote none."""
    if not path.is_file():
        return {}
    routed = (json.loads(path.read_text(encoding="utf-8")).get("systems") or {}).get(system) or {}
    keys = ("n", "fact_acc", "fact_acc_ci", "em", "bertscore_f1", "sts")
    out = {name: {k: stats.get(k) for k in keys} for name, stats in (routed.get("groups") or {}).items()}
    if routed:
        out["all"] = {k: routed.get(k) for k in keys}
    return out
