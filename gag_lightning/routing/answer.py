"""Routed answering (METHOD.md section 6): one shared frozen base, each domain route its own expert and adapter.

A ``RouteAnswerer`` holds **one** copy of the base and, per domain route, that route's ``RouteProfile``
(``routing.profiles``: its instruction, request text, background prompt, compression schema and answer length,
from its own preset or its artifacts' metadata, never from the domain the command was composed with) with its
expert and adapter, loaded once on first use. Queries are grouped by route and each group is answered in
batches: the general route is the base alone with the general prompt (the eval harness's ``base`` system); a
domain route runs its expert to write backgrounds, compresses them into memories exactly as the memory stage
did (same prompts, decoding, stop ids, compression, storage dtype) and lets the base answer with the memories
injected through the eval harness's ``gag`` system, with the instruction and request text the adapter was
trained with. Every route decodes through ``generate_batched`` with the eval stage's settings. The answerer lives in
``routing.answerer``, the scoring in ``routing.scoring``, the server's batch decoder in ``routing.decoding``.

``answer_mixed`` is ``route.py mode=answer``: the mixed online test answered three ways (``routed``: the
router's route; ``oracle``: the gold route; ``base``: the base alone for every query), scored per dataset
(fact_acc, EM, token F1, BERTScore, STS), with the process's peak RSS beside the weights of one base plus
each route's expert and adapter.
"""

from __future__ import annotations

import json
import logging
import time
from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from gag_lightning.artifacts import atomic_write_text
from gag_lightning.routing.answerer import (
    DomainRoute,
    RouteAnswerer,
    RoutedAnswer,
    peak_rss_bytes,
    resolve_profiles,
    rss_bytes,
)
from gag_lightning.routing.decoding import greedy_shrinking
from gag_lightning.routing.profiles import GENERAL, route_entries
from gag_lightning.routing.scoring import fact_aliases, score_routed, score_systems

log = logging.getLogger(__name__)

SYSTEMS = ("routed", "oracle", "base")
ANSWER_REPORT = "answer_report.json"

# the answerer, decoder and scoring names stay importable from here
__all__ = [
    "ANSWER_REPORT",
    "DomainRoute",
    "RouteAnswerer",
    "RoutedAnswer",
    "answer_mixed",
    "answer_routed",
    "fact_aliases",
    "greedy_shrinking",
    "memory_report",
    "resolve_profiles",
    "score_routed",
    "score_systems",
]


def memory_report(answerer: RouteAnswerer, rss_after_load: int | None = None) -> dict[str, Any]:
    """The answerer's weights beside this process's RSS. Weights are memory-mapped and paged in as they are first
    used, so the RSS right after loading says little; the peak while answering (every weight used) minus the RSS
    before the models were loaded is what the models cost, to compare with one base + N experts + N adapters."""
    mem = answerer.memory()
    mem["peak_rss_bytes"] = peak_rss_bytes()
    mem["rss_after_models_bytes"] = rss_after_load
    before = mem["rss_before_models_bytes"]
    if before is not None:
        mem["peak_growth_bytes"] = mem["peak_rss_bytes"] - before
    mib = 2**20
    parts = [f"1 base {mem['base_bytes'] / mib:.0f}"] + [
        f"{n}: expert {mem['expert_bytes'][n] / mib:.0f} + adapter {mem['adapter_bytes'][n] / mib:.1f}"
        for n in mem["expert_bytes"]]
    weights = mem["one_base_plus_routes_bytes"]
    mem["summary"] = (f"peak RSS while answering {mem['peak_rss_bytes'] / mib:.0f} MiB"
                      + (f" = {before / mib:.0f} MiB before the models + {mem['peak_growth_bytes'] / mib:.0f} MiB"
                         if before is not None else "")
                      + f"; weights {weights / mib:.0f} MiB ({'; '.join(parts)} MiB); a second base would make the "
                      f"weights alone {(weights + mem['base_bytes']) / mib:.0f} MiB")
    return mem


# ------------------------------------------------------------------------------------------- mode=query
def answer_routed(cfg: DictConfig, questions: list[str], routes: list[str], records: Sequence[Any] | None = None,
                  out_dir: str | Path | None = None) -> list[str]:
    """Answer each question on its route (the routes it needs are loaded); with ``records`` and ``out_dir`` also
    score the answers as the ``routed`` system."""
    answerer = RouteAnswerer(cfg, resolve_profiles(cfg, sorted({*routes, GENERAL})))
    answers = answerer.answer(questions, routes, _labels(cfg, records, len(questions)))
    if records is not None and out_dir is not None:
        backgrounds = {i: a.background for i, a in enumerate(answers) if a.background is not None}
        score_routed(cfg, records, routes, [a.text for a in answers], backgrounds, Path(out_dir), answerer.notes())
    return [a.text for a in answers]


def _labels(cfg: DictConfig, records: Sequence[Any] | None, n: int) -> list[str]:
    """How an error names each routed question: the test file's 1-based line, or the query's position."""
    if records is not None:
        from omegaconf import OmegaConf

        test_set = OmegaConf.select(cfg, "router.test_set", default="the mixed test set")
        return [f"{test_set}, line {getattr(r, 'line', None) or '?'}: field 'question'" for r in records]
    return [f"query {i + 1}" for i in range(n)]


# ------------------------------------------------------------------------------------------- mode=answer
def answer_mixed(cfg: DictConfig, records: Sequence[Any], routed: Sequence[str], gold: Sequence[str],
                 out_dir: str | Path) -> tuple[dict[str, Any], dict[str, list[str]]]:
    """The mixed online test answered by the router's routes, by the gold routes and by the base alone.

    Routed and oracle answers come from one pass per route over the union of the queries either system sends
    there (a (route, question) pair is decoded once); the base-alone system is decoded on its own, so the general
    route's answers are compared with an independent base run. Writes predictions.jsonl, metrics.json,
    report.md and answer_report.json into ``out_dir``; returns (that report, {system: answer texts}).
    """
    out = Path(out_dir)
    questions = [r.question for r in records]
    configured = _configured(cfg)
    unknown = sorted({*routed, *gold} - configured)
    if unknown:
        log.warning("[answer] route(s) %s have no configured answering route: their queries get empty answers",
                    unknown)
    t0 = time.perf_counter()
    answerer = RouteAnswerer(cfg, resolve_profiles(cfg, sorted({*routed, *gold, GENERAL} & configured)))
    answerer.load_all()
    rss_after_load = rss_bytes()
    load_s = time.perf_counter() - t0

    t0 = time.perf_counter()
    needed: dict[str, list[int]] = defaultdict(list)
    for i in range(len(records)):
        for route in dict.fromkeys((routed[i], gold[i])):
            if route in answerer.profiles:
                needed[route].append(i)
    labels = _labels(cfg, records, len(records))
    by_pair: dict[tuple[str, int], RoutedAnswer] = {}
    timings: dict[str, dict[str, float]] = {}
    for route, rows in needed.items():
        t = time.perf_counter()
        answers = answerer.answer_route(route, [questions[i] for i in rows], labels=[labels[i] for i in rows])
        for i, ans in zip(rows, answers, strict=True):
            by_pair[(route, i)] = ans
        timings[route] = {"queries": len(rows), "seconds": time.perf_counter() - t}
        log.info("[answer] route %s: %d queries in %.1fs", route, len(rows), timings[route]["seconds"])
    t = time.perf_counter()
    base_answers = answerer.answer_route(GENERAL, questions, labels=labels)
    timings["base_alone"] = {"queries": len(questions), "seconds": time.perf_counter() - t}
    answer_s = time.perf_counter() - t0

    def pick(routes: Sequence[str]) -> list[RoutedAnswer]:
        return [by_pair.get((r, i)) or RoutedAnswer("", r, None, False, 0) for i, r in enumerate(routes)]

    systems = {"routed": (list(routed), pick(routed)), "oracle": (list(gold), pick(gold)),
               "base": ([GENERAL] * len(records), base_answers)}
    memory = memory_report(answerer, rss_after_load)  # before the scorers load their models
    notes = answerer.notes()
    summary = score_systems(cfg, records, systems, out, notes)
    general_rows = [i for i, r in enumerate(routed) if r == GENERAL]
    same = sum(systems["routed"][1][i].text == base_answers[i].text for i in general_rows)
    groups = {s: summary[s].get("groups", {}) for s in SYSTEMS}
    report = {
        "systems": {s: {name: _headline(stats) for name, stats in g.items()} for s, g in groups.items()},
        "all": {s: _headline(summary[s]) for s in SYSTEMS},
        "routed_minus_oracle_fact_acc": {
            name: (None if stats.get("fact_acc") is None or groups["oracle"][name].get("fact_acc") is None
                   else stats["fact_acc"] - groups["oracle"][name]["fact_acc"])
            for name, stats in groups["routed"].items()},
        "notes": notes,
        "misrouted": sum(r != g for r, g in zip(routed, gold, strict=True)),
        "general_route_vs_base": {"queries": len(general_rows), "identical_answers": same},
        "routes": {n: p.describe() for n, p in answerer.profiles.items()},
        "memory": memory,
        "timing": {"load_s": load_s, "answer_s": answer_s, "per_route": timings},
    }
    atomic_write_text(out / ANSWER_REPORT, json.dumps(report, indent=2, ensure_ascii=False, default=str))
    _print_answer_report(report)
    return report, {name: [a.text for a in answers] for name, (_, answers) in systems.items()}


def _configured(cfg: DictConfig) -> set[str]:
    return {str(e.get("name") or k) for k, e in route_entries(cfg).items()} | {GENERAL}


def _headline(stats: Mapping[str, Any]) -> dict[str, Any]:
    keys = ("n", "fact_acc", "fact_acc_ci", "em", "token_f1", "bertscore_f1", "sts")
    return {k: stats.get(k) for k in keys if k in stats}


def _print_answer_report(report: Mapping[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    def pct(x: Any) -> str:
        return "-" if x is None else f"{100 * float(x):.1f}"

    table = Table(title="mixed-domain answering: routed vs oracle routing vs base alone (x100)")
    table.add_column("dataset")
    table.add_column("n", justify="right")
    for s in SYSTEMS:
        for m in ("fact_acc", "em", "bertscore_f1"):
            table.add_column(f"{s} {m}", justify="right")
    systems = report["systems"]
    for name in systems["routed"]:
        row = [name, str(systems["routed"][name].get("n"))]
        for s in SYSTEMS:
            stats = systems[s].get(name, {})
            row += [pct(stats.get(m)) for m in ("fact_acc", "em", "bertscore_f1")]
        table.add_row(*row)
    console = Console()
    console.print(table)
    g = report["general_route_vs_base"]
    console.print(f"general route vs base alone: {g['identical_answers']}/{g['queries']} identical answers; "
                  f"misrouted queries: {report['misrouted']}")
    console.print(report["memory"]["summary"])
