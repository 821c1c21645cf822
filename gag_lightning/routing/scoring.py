"""Scoring routed answers per dataset: fact_acc against gold aliases, EM, token F1, BERTScore and STS."""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from gag_lightning.artifacts import atomic_write_text
from gag_lightning.eval.facts import fact_match, token_f1
from gag_lightning.eval.metrics import has_answer, is_empty_prediction, summarize_scores
from gag_lightning.eval.report import markdown_report
from gag_lightning.routing.answerer import RoutedAnswer, _device

__all__ = ["fact_aliases", "score_routed", "score_systems"]


def fact_aliases(record: Any, general_sets: set[str]) -> list[str] | None:
    """The gold aliases fact_acc checks: the record's explicit `answers`, else a general set's gold answer list
    (short answers by construction); None for a specialist record without `answers` (its `answer` is a reference
    text, not a fact to find verbatim), which makes its fact_acc n/a rather than 0."""
    explicit = getattr(record, "fact_answers", None)
    if explicit is not None:
        return list(explicit)
    if record.dataset_name in general_sets and record.answers:
        return list(record.answers)
    return None


def _general_sets(cfg: DictConfig) -> set[str]:
    from omegaconf import OmegaConf

    names = OmegaConf.select(cfg, "router.domains.general.dataset_names", default=None)
    return set(OmegaConf.to_container(names, resolve=True) if OmegaConf.is_config(names) else (names or []))


def score_systems(cfg: DictConfig, records: Sequence[Any],
                  systems: Mapping[str, tuple[Sequence[str], Sequence[RoutedAnswer]]],
                  out_dir: Path, notes: Sequence[str] = ()) -> dict[str, Any]:
    """Per-dataset metrics of each system: fact_acc (records with gold aliases) and token F1 for every set,
    has-answer EM for general sets, BERTScore F1 and STS for specialist sets. Writes predictions.jsonl,
    metrics.json ({"systems": summary, "notes": notes}) and report.md; ``notes`` (an adapter selected on the test
    split) head the report."""
    from gag_lightning.eval.settings import build_scorers

    general_sets = _general_sets(cfg)
    specialist = [i for i, r in enumerate(records) if r.dataset_name not in general_sets]
    scorers = build_scorers(cfg, _device(cfg)) if specialist else {}
    rows = []
    for system, (routes, answers) in systems.items():
        texts = [a.text for a in answers]
        scores: dict[int, dict[str, float]] = defaultdict(dict)
        if specialist:
            preds = [texts[i] for i in specialist]
            refs = [records[i].answers[0] for i in specialist]
            for name, scorer in scorers.items():
                for i, value in zip(specialist, scorer.score(preds, refs), strict=True):
                    scores[i][name] = 0.0 if is_empty_prediction(texts[i]) else float(value)
        for i, rec in enumerate(records):
            row = {"system": system, "id": str(i), "dataset_name": rec.dataset_name, "question": rec.question,
                   "route": routes[i], "reference": rec.answers, "prediction": texts[i],
                   "empty": is_empty_prediction(texts[i]), **scores.get(i, {})}
            aliases = fact_aliases(rec, general_sets)
            row["fact_acc"] = fact_match(texts[i], aliases) if aliases is not None else None
            row["token_f1"] = max((token_f1(texts[i], ref) for ref in rec.answers), default=0.0)
            if rec.dataset_name in general_sets:
                row["em"] = has_answer(texts[i], rec.answers)
            if answers[i].background is not None:
                row["background"] = answers[i].background
            rows.append(row)
    paired = "oracle" if "oracle" in systems else None
    summary = summarize_scores(rows, by="dataset_name", metrics=("fact_acc", "token_f1", "bertscore_f1", "sts", "em"),
                               paired_with=paired)
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out_dir / "predictions.jsonl", "\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n")
    atomic_write_text(out_dir / "metrics.json", json.dumps({"systems": summary, "notes": list(notes)}, indent=2,
                                                           ensure_ascii=False))
    table = {}
    for system in systems:
        for name, stats in summary[system].get("groups", {}).items():
            table[f"{system}/{name}"] = stats
        table[f"{system}/all"] = {k: v for k, v in summary[system].items() if k != "groups"}
    atomic_write_text(out_dir / "report.md", markdown_report(table, "mixed-domain answering", notes))
    return summary


def score_routed(cfg: DictConfig, records: Sequence[Any], routes: Sequence[str], answers: Sequence[str],
                 backgrounds: Mapping[int, str], out_dir: Path, notes: Sequence[str] = ()) -> dict[str, Any]:
    """``score_systems`` for one system, ``routed``."""
    wrapped = [RoutedAnswer(a, r, backgrounds.get(i)) for i, (a, r) in enumerate(zip(answers, routes, strict=True))]
    return score_systems(cfg, records, {"routed": (list(routes), wrapped)}, Path(out_dir), notes)
