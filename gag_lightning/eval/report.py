"""Evaluation outputs: the results table (fact_acc with its CI first), paired differences, the files an eval split
writes (predictions.jsonl, metrics.json, report.md) and the flat metrics the loggers get.

Split from the harness (which decodes and scores) so that readers of reports, the eval stage and routed answering,
need nothing of the decoding path.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gag_lightning.artifacts import atomic_write_text

if TYPE_CHECKING:
    from gag_lightning.eval.harness import EvalResult

SCORE_KEYS = ("fact_acc", "token_f1", "bertscore_f1", "sts", "em")
NA = "n/a"


def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def _pct(value: Any) -> str:
    if _missing(value):
        return "-"
    return f"{100 * float(value):.2f}"


def fact_cell(stats: Mapping[str, Any]) -> str:
    """fact_acc x100 with its 95% CI, e.g. ``62.5 [47.5, 77.5]``; ``n/a`` when no record had gold answers."""
    value = stats.get("fact_acc")
    if _missing(value):
        return NA
    ci = stats.get("fact_acc_ci")
    text = f"{100 * float(value):.1f}"
    return f"{text} [{100 * ci[0]:.1f}, {100 * ci[1]:.1f}]" if ci else text


def diff_cell(paired: Mapping[str, Any] | None) -> str:
    """A paired difference x100 with its 95% CI, e.g. ``+12.5 [2.5, 22.5]``; ``n/a`` without paired records."""
    if not paired:
        return NA
    return f"{100 * paired['diff']:+.1f} [{100 * paired['lo']:+.1f}, {100 * paired['hi']:+.1f}]"


def report_rows(summary: Mapping[str, Mapping[str, Any]]) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the results table: fact_acc [95% CI] first, then token F1, BERTScore F1, STS (x100;
    EM only when some system has it)."""
    with_em = any("em" in s for s in summary.values())
    header = ["system", "fact_acc x100 [95% CI]", "token F1 x100", "BERTScore F1 x100", "STS x100"] + (
        ["EM x100"] if with_em else []) + ["empty", "added prompt tokens"]
    rows = []
    for system, s in summary.items():
        row = [system, fact_cell(s), _pct(s.get("token_f1")), _pct(s.get("bertscore_f1")), _pct(s.get("sts"))]
        if with_em:
            row.append(_pct(s.get("em")))
        row += [f"{s['n_empty']}/{s['n']}", f"{s.get('added_prompt_tokens', 0.0):.1f}"]
        rows.append(row)
    return header, rows


def paired_lines(summary: Mapping[str, Mapping[str, Any]], reference: str = "gag") -> list[str]:
    """"GAG minus X: +d [lo, hi]" for every system compared with ``reference`` (fact_acc x100)."""
    key = f"paired_vs_{reference}"
    lines = []
    for system, s in summary.items():
        if key not in s:
            continue
        paired = s[key]
        line = f"{reference.upper()} minus {system}: {diff_cell(paired)}"
        if paired:
            line += f" (p = {paired['p_value']:.3g}, n = {paired['n']})"
        else:
            line += " (no record with gold answers)"
        lines.append(line)
    return lines


def markdown_report(summary: Mapping[str, Mapping[str, Any]], title: str = "", notes: Sequence[str] = ()) -> str:
    """The results table and its legend; ``notes`` (e.g. an adapter selected on the test split) come first."""
    header, rows = report_rows(summary)
    lines = [f"# {title}", ""] if title else []
    lines += [line for note in notes for line in (f"> **Warning:** {note}", "")]
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|" + "|".join("---" if i == 0 else "---:" for i in range(len(header))) + "|")
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    lines += ["", "fact_acc: share of records whose answer contains a gold alias of the fact (METHOD.md section 5b), "
              "with a percentile-bootstrap 95% CI over records (1,000 resamples); n/a = no record has gold "
              "`answers`. BERTScore and STS reward the answer's form, fact_acc its fact. Empty predictions are kept "
              "and scored 0. Added prompt tokens: S `<GAG>` slots for GAG, the mean number of background tokens "
              "(base tokenizer) for the expert context and of retrieved-passage "
              "tokens for RAG."]
    paired = paired_lines(summary)
    if paired:
        lines += ["", "## Paired differences (fact_acc x100, paired bootstrap over the same records, 95% CI)", ""]
        lines += [f"- {line}" for line in paired]
    rag = summary.get("rag", {})
    if "rag_k" in rag:
        lines += ["", f"Retrieval recall@{rag['rag_k']} ({rag.get('rag_retriever')}): "
                      f"{_pct(rag.get('retrieval_recall_at_k'))} (share of questions whose passages hold a gold "
                      "answer; - when the records carry no gold answers)."]
    return "\n".join(lines) + "\n"


def print_report(summary: Mapping[str, Mapping[str, Any]], title: str = "evaluation") -> None:
    from rich.console import Console
    from rich.table import Table

    header, rows = report_rows(summary)
    table = Table(title=title)
    for i, name in enumerate(header):  # the fact_acc cell and its CI stay on one line
        table.add_column(name, justify="left" if i == 0 else "right", no_wrap=i <= 1)
    for row in rows:
        table.add_row(*row)
    console = Console()
    console.print(table)
    for line in paired_lines(summary):
        console.print(f"  {line}")


def write_outputs(out_dir: str | Path, result: EvalResult, title: str = "") -> dict[str, Path]:
    """predictions.jsonl (one line per system and record), metrics.json, report.md; atomically each."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    lines = []
    for row in result.rows:
        scores = {k: row[k] for k in SCORE_KEYS if k in row}
        line = {k: v for k, v in row.items() if k not in SCORE_KEYS}
        line["scores"] = scores
        lines.append(json.dumps(line, ensure_ascii=False))
    paths = {"predictions": out_dir / "predictions.jsonl", "metrics": out_dir / "metrics.json",
             "report": out_dir / "report.md"}
    atomic_write_text(paths["predictions"], "\n".join(lines) + "\n")
    atomic_write_text(paths["metrics"], json.dumps({"systems": result.summary, "settings": result.settings},
                                                   indent=2, ensure_ascii=False))
    atomic_write_text(paths["report"], markdown_report(result.summary, title, result.settings.get("notes", ())))
    return paths


def write_split_outputs(out_dir: str | Path, results: Mapping[str, EvalResult],
                        titles: Mapping[str, str]) -> dict[str, Path]:
    """The top of a multi-split evaluation: report.md (every split's report in turn, each under its title) and
    metrics.json ``{split: {systems, settings}}``; each split's own files are ``write_outputs(out_dir / split)``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"metrics": out_dir / "metrics.json", "report": out_dir / "report.md"}
    atomic_write_text(paths["metrics"], json.dumps(
        {split: {"systems": r.summary, "settings": r.settings} for split, r in results.items()},
        indent=2, ensure_ascii=False))
    atomic_write_text(paths["report"], "\n".join(markdown_report(r.summary, titles.get(split, split),
                                                                 r.settings.get("notes", ()))
                                                 for split, r in results.items()))
    return paths


def flat_metrics(summary: Mapping[str, Mapping[str, Any]], prefix: str = "eval") -> dict[str, float]:
    """``<prefix>/<system>/<metric>`` scalars for the loggers, fact_acc first (the eval stage's prefix is
    ``eval/<split>``).

    ``fact_acc`` comes with ``fact_acc_lo`` / ``fact_acc_hi`` (its 95% CI) and, for systems compared with gag,
    ``gag_minus_fact_acc`` (+ ``_lo`` / ``_hi``). A metric that is n/a (None) is left out, never logged as 0.
    """
    out: dict[str, float] = {}
    for system, s in summary.items():
        values: dict[str, Any] = {}
        for key in SCORE_KEYS:
            values[key] = s.get(key)
            if key == "fact_acc" and s.get("fact_acc_ci"):
                values["fact_acc_lo"], values["fact_acc_hi"] = s["fact_acc_ci"]
        paired = s.get("paired_vs_gag")
        if paired:
            values.update(gag_minus_fact_acc=paired["diff"], gag_minus_fact_acc_lo=paired["lo"],
                          gag_minus_fact_acc_hi=paired["hi"])
        for key in ("n_empty", "n", "added_prompt_tokens", "finished_rate", "mean_new_tokens",
                    "retrieval_recall_at_k"):
            values[key] = s.get(key)
        for key, value in values.items():
            if value is not None:
                out[f"{prefix}/{system}/{key}"] = float(value)
    return out


__all__ = [
    "SCORE_KEYS",
    "diff_cell",
    "fact_cell",
    "flat_metrics",
    "markdown_report",
    "paired_lines",
    "print_report",
    "report_rows",
    "write_outputs",
    "write_split_outputs",
]
