"""Fact-level scoring (METHOD.md section 5b): does the answer state the fact, and how sure are we of the mean?

BERTScore and STS reward an answer's *form*: against "Qwenthar-74 was discovered in 1956." the wrong
"Qwenthar-74 was discovered in 1987." scores far above the right "It was 1956.". ``fact_match`` asks the
only question that matters for knowledge injection -- is one of the gold aliases of the fact in the
answer? -- with the section-5 has-answer rule (contiguous token match, never inside a longer number)
after normalising the spellings that differ without the fact differing: case, accents' encoding,
punctuation, articles, digit grouping ("1,412" = "1 412" = "1412") and trailing decimal zeros
("3.50" = "3.5"). Unit words ("617 degrees Celsius" vs "617 °C") are left to the aliases.

With a few dozen test records a mean alone says little, so ``bootstrap_ci`` gives a percentile bootstrap
interval over records and ``paired_bootstrap`` the interval of a difference between two systems scored on
the same records (resampling records jointly, which removes the between-record variance the two share).
"""

from __future__ import annotations

import re
import unicodedata
from collections import Counter
from collections.abc import Sequence

import torch

__all__ = [
    "ARTICLES",
    "answer_tokens",
    "bootstrap_ci",
    "fact_match",
    "normalize_answer",
    "paired_bootstrap",
    "token_f1",
]

ARTICLES = frozenset({"a", "an", "the"})

# Digit groups of three after a 1-3 digit head, separated by commas or spaces (NFKD has already turned
# no-break and thin spaces into plain ones): "1,412", "1 412", "12,345,678". A head preceded by a digit or a
# decimal point is the tail of another number, and a group followed by a digit is not a group of three.
_DIGIT_GROUPS = re.compile(r"(?<![\d.])\d{1,3}(?:[, ]\d{3})+(?!\d)")
_GROUP_SEPARATORS = re.compile(r"[, ]")
# Dotted abbreviations ("u.s.a.") become one word, as most alias lists spell them ("usa").
_ACRONYM = re.compile(r"(?<!\w)(?:[^\W\d_]\.){2,}")
_DECIMAL = re.compile(r"-?\d+\.\d+")
_MINUS = {"-", "\u2212", "\u2012", "\u2013"}  # hyphen-minus, minus sign, figure dash, en dash


def _is_word_char(ch: str) -> bool:
    return unicodedata.category(ch)[0] in "LNM"


def _canonical_number(token: str) -> str:
    """"3.50" -> "3.5", "3.0" -> "3": a trailing decimal zero does not change the value."""
    if _DECIMAL.fullmatch(token):
        token = token.rstrip("0").rstrip(".")
    return token


def _scan(text: str) -> list[tuple[str, bool]]:
    """(token, is_article) pairs: runs of letters/digits/marks, a decimal point between digits and a leading
    minus kept in the number. Tokens are case-folded here; ``text`` keeps its case so that an article can be
    told from the letter "A" in "vitamin A" / "type A": an upper-case "A" right after a word (or a comma)
    names something, any other a/an/the is an article."""
    out: list[tuple[str, bool]] = []
    run: list[str] = []
    start = 0
    n = len(text)

    def flush() -> None:
        token = "".join(run)
        folded = _canonical_number(token.casefold())
        article = folded in ARTICLES
        if token == "A":
            before = text[:start].rstrip()
            article = not before or not (_is_word_char(before[-1]) or before[-1] == ",")
        out.append((folded, article))

    for i, ch in enumerate(text):
        if _is_word_char(ch):
            if not run:
                start = i
            run.append(ch)
            continue
        nxt_digit = i + 1 < n and text[i + 1].isdigit()
        if ch == "." and run and run[-1].isdigit() and nxt_digit:
            run.append(ch)
            continue
        if run:
            flush()
            run = []
        if ch in _MINUS and nxt_digit and (i == 0 or not _is_word_char(text[i - 1])):
            start = i
            run.append("-")  # a sign ("-40 °C"), not a hyphen ("Veltrix-3", "1956-1960")
    if run:
        flush()
    return out


def answer_tokens(text: str | None, drop_articles: bool = True) -> list[str]:
    """The normalised tokens of ``text`` that ``fact_match`` and ``token_f1`` compare.

    NFKD (compatibility forms such as full-width digits or ligatures, then the canonical decomposition of
    section 5, so both spellings of "Pelé" agree; the accent stays, as in section 5), case-folding, digit
    groups joined, dotted abbreviations joined, punctuation and symbols dropped, decimals canonical, and the
    articles a/an/the dropped (but not the "A" of "vitamin A").
    """
    text = unicodedata.normalize("NFKD", text or "")
    text = _DIGIT_GROUPS.sub(lambda m: _GROUP_SEPARATORS.sub("", m.group(0)), text)
    text = _ACRONYM.sub(lambda m: m.group(0).replace(".", "") + " ", text)
    return [token for token, article in _scan(text) if not (drop_articles and article)]


def normalize_answer(text: str | None) -> str:
    """``answer_tokens`` joined by single spaces: the canonical spelling used for matching and F1."""
    return " ".join(answer_tokens(text))


def _contains(haystack: Sequence[str], needle: Sequence[str]) -> bool:
    n = len(needle)
    if n == 0 or n > len(haystack):
        return False
    first = needle[0]
    return any(haystack[i] == first and list(haystack[i:i + n]) == list(needle) for i in range(len(haystack) - n + 1))


def fact_match(prediction: str | None, answers: str | Sequence[str]) -> float:
    """1.0 if some alias's normalised tokens occur contiguously in the prediction's, else 0.0.

    Token-level, so "1956" never matches inside "19567". An alias that is only an article ("The") is
    matched with the articles kept rather than silently becoming empty; an alias with no tokens at all
    never matches (it would match every answer). An empty prediction scores 0.
    """
    if isinstance(answers, str):
        answers = [answers]
    pred = answer_tokens(prediction)
    pred_full: list[str] | None = None
    for alias in answers:
        gold = answer_tokens(alias)
        if gold:
            if _contains(pred, gold):
                return 1.0
            continue
        gold = answer_tokens(alias, drop_articles=False)
        if gold:
            if pred_full is None:
                pred_full = answer_tokens(prediction, drop_articles=False)
            if _contains(pred_full, gold):
                return 1.0
    return 0.0


def token_f1(prediction: str | None, reference: str | None) -> float:
    """SQuAD-style F1 of the normalised token bags: partial credit for overlap, no credit for form alone.

    An empty prediction (or reference) scores 0: the project never drops or rewards an empty answer.
    """
    pred, ref = answer_tokens(prediction), answer_tokens(reference)
    if not pred or not ref:
        return 0.0
    common = sum((Counter(pred) & Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


# ------------------------------------------------------------------------------------------- bootstrap
_MAX_DRAWS = 1 << 22  # indices drawn per block: bounds memory for large test sets


def _as_vector(values: Sequence[float] | torch.Tensor, what: str) -> torch.Tensor:
    vec = torch.as_tensor(values, dtype=torch.float64).flatten()
    if vec.numel() == 0:
        raise ValueError(f"{what}: no values to resample")
    if torch.isnan(vec).any():
        raise ValueError(f"{what}: NaN among the values; score a missing answer as 0, or leave the record out")
    return vec


def _resampled_means(values: torch.Tensor, n_resamples: int, seed: int) -> torch.Tensor:
    """Means of ``n_resamples`` resamples (with replacement, size n) of ``values``, seeded and vectorised."""
    if n_resamples < 1:
        raise ValueError(f"n_resamples must be >= 1, got {n_resamples}")
    n = values.numel()
    gen = torch.Generator().manual_seed(int(seed))
    block = max(1, _MAX_DRAWS // n)
    means = []
    for start in range(0, n_resamples, block):
        rows = min(block, n_resamples - start)
        idx = torch.randint(n, (rows, n), generator=gen)
        means.append(values[idx].mean(dim=1))
    return torch.cat(means)


def _interval(stats: torch.Tensor, alpha: float) -> tuple[float, float]:
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    qs = torch.tensor([alpha / 2, 1 - alpha / 2], dtype=torch.float64)
    lo, hi = torch.quantile(stats, qs).tolist()
    return float(lo), float(hi)


def bootstrap_ci(values: Sequence[float] | torch.Tensor, n_resamples: int = 1000, seed: int = 0,
                 alpha: float = 0.05) -> tuple[float, float, float]:
    """(mean, lo, hi): the mean and its percentile-bootstrap (1 - alpha) interval over records.

    The same ``values`` and ``seed`` always give the same interval, so a report can be regenerated exactly.
    """
    vec = _as_vector(values, "bootstrap_ci")
    lo, hi = _interval(_resampled_means(vec, n_resamples, seed), alpha)
    return float(vec.mean()), lo, hi


def paired_bootstrap(a: Sequence[float] | torch.Tensor, b: Sequence[float] | torch.Tensor, n_resamples: int = 1000,
                     seed: int = 0, alpha: float = 0.05) -> dict[str, float]:
    """mean(a) - mean(b) with a percentile-bootstrap interval, resampling record indices jointly.

    ``a[i]`` and ``b[i]`` must score the same record. ``p_value`` is the two-sided bootstrap estimate
    2 * min(P*(d <= 0), P*(d >= 0)) with the add-one correction, so it is never exactly 0.
    """
    va, vb = _as_vector(a, "paired_bootstrap"), _as_vector(b, "paired_bootstrap")
    if va.numel() != vb.numel():
        raise ValueError(f"paired_bootstrap: {va.numel()} values in a but {vb.numel()} in b")
    diffs = _resampled_means(va - vb, n_resamples, seed)
    lo, hi = _interval(diffs, alpha)
    below = (int((diffs <= 0).sum()) + 1) / (n_resamples + 1)
    above = (int((diffs >= 0).sum()) + 1) / (n_resamples + 1)
    return {"diff": float(va.mean() - vb.mean()), "lo": lo, "hi": hi, "p_value": min(1.0, 2 * min(below, above)),
            "n": int(va.numel())}
