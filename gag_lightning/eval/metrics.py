"""Answer-quality metrics of METHOD.md section 5: has-answer EM and the summary that puts the fact-level scores
of section 5b (`eval.facts`) first, with bootstrap intervals. The model-based scorers (chunked BERTScore F1, STS)
are in `eval.scorers`.

Every scorer here scores an empty prediction explicitly (0.0) instead of dropping it: the reference
release dropped empties in its single-domain metric, which *raises* the mean of a system that fails to
answer (METHOD.md section 8). Keeping one rule everywhere makes single- and mixed-domain numbers agree.
"""

from __future__ import annotations

import math
import unicodedata
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torchmetrics import Metric, MetricCollection

from gag_lightning.eval.facts import bootstrap_ci, paired_bootstrap

try:  # the `regex` module knows Unicode property classes; `re` does not
    import regex as _regex
except ImportError:  # pragma: no cover - exercised through _scan_tokens in the tests
    _regex = None

__all__ = [
    "MeanScore",
    "eval_metric_collection",
    "has_answer",
    "is_empty_prediction",
    "normalize_tokens",
    "paired_differences",
    "summarize_scores",
]

#: Per-record scores, headline first: fact accuracy (METHOD.md section 5b), token F1, then the form-level scores.
METRIC_KEYS: tuple[str, ...] = ("fact_acc", "token_f1", "bertscore_f1", "sts", "em")
#: Metrics summarised with a bootstrap confidence interval (and paired differences between systems).
CI_KEYS: tuple[str, ...] = ("fact_acc",)

# --------------------------------------------------------------------------------------------- EM

# A run of letters / digits / combining marks, or any single character that is neither a separator (Z*)
# nor a control/format character (C*): the "non-space" characters of the spec.
_TOKEN_PATTERN = r"[\p{L}\p{N}\p{M}]+|[^\p{Z}\p{C}]"
_TOKEN_RE = _regex.compile(_TOKEN_PATTERN) if _regex is not None else None


def _scan_tokens(text: str) -> list[str]:
    """Pure-stdlib twin of `_TOKEN_PATTERN` (unicodedata categories), used when `regex` is missing."""
    tokens: list[str] = []
    run: list[str] = []
    for ch in text:
        major = unicodedata.category(ch)[0]
        if major in "LNM":
            run.append(ch)
            continue
        if run:
            tokens.append("".join(run))
            run = []
        if major not in "ZC":
            tokens.append(ch)
    if run:
        tokens.append("".join(run))
    return tokens


def normalize_tokens(text: str) -> list[str]:
    """Tokens for has-answer matching: NFD, lower-case, letter/digit/mark runs or single symbols.

    NFD makes precomposed and decomposed spellings of the same accented word identical ("Pelé" written
    either way); the combining mark stays inside the token, so "Pelé" and "Pele" remain different, as
    the spec's "runs of letters/digits/marks" says.
    """
    text = unicodedata.normalize("NFD", text).lower()
    if _TOKEN_RE is not None:
        return _TOKEN_RE.findall(text)
    return _scan_tokens(text)


def has_answer(prediction: str, answers: str | Sequence[str]) -> float:
    """1.0 if any gold answer's token sequence occurs contiguously in the prediction's tokens, else 0.0.

    Token-level (not substring) matching avoids crediting "1984" inside "19845"; an empty gold answer
    never matches, otherwise every prediction would score 1.
    """
    if isinstance(answers, str):
        answers = [answers]
    pred = normalize_tokens(prediction or "")
    if not pred:
        return 0.0
    for answer in answers:
        gold = normalize_tokens(answer or "")
        n = len(gold)
        if n == 0 or n > len(pred):
            continue
        first = gold[0]
        for i in range(len(pred) - n + 1):
            if pred[i] == first and pred[i : i + n] == gold:
                return 1.0
    return 0.0


def is_empty_prediction(prediction: str | None) -> bool:
    """The one definition of "empty" shared by every scorer and the summary: nothing but whitespace."""
    return prediction is None or not str(prediction).strip()


# ------------------------------------------------------------------------------- torchmetrics side


class MeanScore(Metric):
    """Mean of per-record scores, summed across processes, so `eval/*` logs match `summarize_scores`.

    NaN is an error, not skipped: a NaN would mean some record was silently dropped from the mean.
    """

    full_state_update = False
    is_differentiable = False
    higher_is_better = True

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.add_state("total", default=torch.tensor(0.0), dist_reduce_fx="sum")
        self.add_state("count", default=torch.tensor(0), dist_reduce_fx="sum")

    def update(self, scores: torch.Tensor | Sequence[float] | float) -> None:  # type: ignore[override]
        values = torch.as_tensor(scores, dtype=torch.float32, device=self.total.device).flatten()
        if torch.isnan(values).any():
            raise ValueError("MeanScore got NaN; score an empty prediction as 0.0 instead")
        self.total += values.sum()
        self.count += values.numel()

    def compute(self) -> torch.Tensor:
        """NaN when nothing was scored (e.g. no specialist records for BERTScore)."""
        if self.count == 0:
            return torch.tensor(float("nan"), device=self.total.device)
        return self.total / self.count


def eval_metric_collection(prefix: str = "eval/", keys: Iterable[str] = METRIC_KEYS) -> MetricCollection:
    """`eval/fact_acc`, `eval/token_f1`, `eval/bertscore_f1`, `eval/sts`, `eval/em` as one MetricCollection.

    compute_groups is off: grouping merges metrics whose first updates happen to be equal (e.g. two
    metrics that both saw only empty predictions), after which they would share state.
    """
    return MetricCollection({k: MeanScore() for k in keys}, prefix=prefix, compute_groups=False)


# ---------------------------------------------------------------------------------------- summary


def _stats(rows: Sequence[Mapping[str, Any]], metrics: Sequence[str], prediction_key: str,
           ci: Sequence[str], bootstrap: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {
        "n": len(rows),
        "n_empty": sum(is_empty_prediction(r.get(prediction_key)) for r in rows),
    }
    for key in metrics:
        values = [r[key] for r in rows if r.get(key) is not None]
        if not values:
            if key in ci:  # explicitly "not measured" (n/a), never a 0 that reads like a failure
                out.update({key: None, f"{key}_ci": None, f"{key}_n": 0})
            continue
        values = [float(v) for v in values]
        if any(math.isnan(v) for v in values):
            raise ValueError(f"metric '{key}' has NaN values; empty predictions must be scored 0.0")
        out[key] = math.fsum(values) / len(values)
        if key in ci:
            _, lo, hi = bootstrap_ci(values, **bootstrap)
            out[f"{key}_ci"] = [lo, hi]
            out[f"{key}_n"] = len(values)
    return out


def _keyed(rows: Sequence[Mapping[str, Any]], metric: str, id_key: str) -> dict[Any, float]:
    """{record id: score} of the rows that carry `metric`; by position when ids are missing or repeated."""
    ids = [r.get(id_key) for r in rows]
    if any(i is None for i in ids) or len(set(ids)) != len(ids):
        ids = list(range(len(rows)))
    return {i: float(r[metric]) for i, r in zip(ids, rows, strict=True) if r.get(metric) is not None}


def paired_differences(systems: Mapping[str, Sequence[Mapping[str, Any]]], reference: str, metric: str,
                       id_key: str = "id", **bootstrap: Any) -> dict[str, dict[str, Any] | None]:
    """{system: paired bootstrap of reference minus system on `metric`} over the records both scored.

    Pairing by record id makes the interval reflect the systems' difference on the same questions, not
    the spread of question difficulty; None where the two share no scored record.
    """
    ref = _keyed(systems[reference], metric, id_key)
    out: dict[str, dict[str, Any] | None] = {}
    for name, members in systems.items():
        if name == reference:
            continue
        other = _keyed(members, metric, id_key)
        common = [i for i in ref if i in other]
        out[name] = (paired_bootstrap([ref[i] for i in common], [other[i] for i in common], **bootstrap)
                     if common else None)
    return out


def summarize_scores(
    rows: Sequence[Mapping[str, Any]],
    by: str | None = None,
    metrics: Sequence[str] = METRIC_KEYS,
    system_key: str = "system",
    prediction_key: str = "prediction",
    ci: Sequence[str] = CI_KEYS,
    paired_with: str | None = "gag",
    id_key: str = "id",
    n_resamples: int = 1000,
    seed: int = 0,
) -> dict[str, dict[str, Any]]:
    """Means per system (and per `by` value, e.g. "dataset_name"), never dropping empty predictions.

    Returns `{system: {"n", "n_empty", <metric>: mean, ..., "groups": {value: {same keys}}}}`; "groups"
    only when `by` is given. A metric is averaged over the rows that carry it (general-QA rows have only
    `em`, specialist rows `bertscore_f1`/`sts`); empty predictions carry their 0.0 and so lower the mean.
    Rows without `system_key` count as system "default"; rows without `by` fall in group "unknown".

    For each metric in `ci` (fact_acc) the entry also holds `<metric>_ci` = [lo, hi] (percentile bootstrap,
    95%, `n_resamples` resamples of records, `seed`) and `<metric>_n` = the rows that carry it; when no row
    does, `<metric>` is None (n/a), not 0. When system `paired_with` is present, every other system gets
    `paired_vs_<paired_with>` = {diff, lo, hi, p_value, n}: `paired_with` minus that system on the first `ci`
    metric, records paired by `id_key`.
    """
    bootstrap = {"n_resamples": n_resamples, "seed": seed}
    ci = [k for k in ci if k in metrics]
    systems: dict[str, list[Mapping[str, Any]]] = {}
    for row in rows:
        systems.setdefault(str(row.get(system_key, "default")), []).append(row)
    summary: dict[str, dict[str, Any]] = {}
    for name, members in systems.items():
        entry = _stats(members, metrics, prediction_key, ci, bootstrap)
        if by is not None:
            groups: dict[str, list[Mapping[str, Any]]] = {}
            for row in members:
                groups.setdefault(str(row.get(by, "unknown")), []).append(row)
            entry["groups"] = {g: _stats(m, metrics, prediction_key, ci, bootstrap) for g, m in sorted(groups.items())}
        summary[name] = entry
    if paired_with is not None and paired_with in systems and ci:
        for name, paired in paired_differences(systems, paired_with, ci[0], id_key, **bootstrap).items():
            summary[name][f"paired_vs_{paired_with}"] = paired
    return summary
