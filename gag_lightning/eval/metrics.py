"""Answer-quality metrics of METHOD.md section 5: has-answer EM, chunked BERTScore F1 and STS, and the summary
that puts the fact-level scores of section 5b (`eval.facts`) first, with bootstrap intervals.

Every scorer here scores an empty prediction explicitly (0.0) instead of dropping it: the reference
release dropped empties in its single-domain metric, which *raises* the mean of a system that fails to
answer (METHOD.md section 8). Keeping one rule everywhere makes single- and mixed-domain numbers agree.
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
import unicodedata
import warnings
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torchmetrics import Metric, MetricCollection

from gag_lightning.eval.facts import bootstrap_ci, paired_bootstrap

try:  # the `regex` module knows Unicode property classes; `re` does not
    import regex as _regex
except ImportError:  # pragma: no cover - exercised through _scan_tokens in the tests
    _regex = None

__all__ = [
    "ChunkedBERTScore",
    "MeanScore",
    "STSScorer",
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


# ----------------------------------------------------------------------------------- model paths


def _resolve_model_dir(path: str | os.PathLike[str], what: str, markers: Sequence[str]) -> Path:
    """An absolute model directory, or a FileNotFoundError that says what was expected there.

    Paths only, never hub ids: evaluation must be reproducible offline. A sentence-transformers layout
    whose transformer lives in `0_Transformer/` is accepted where a plain Hugging Face directory is needed.
    """
    p = Path(path).expanduser()
    if not p.is_dir():
        raise FileNotFoundError(f"{what} not found: '{path}' is not a directory (expected {markers[0]} etc.)")
    p = p.absolute()  # keep symlinks: the name is what bert_score looks at
    if any((p / m).is_file() for m in markers):
        return p
    sub = p / "0_Transformer"
    if any((sub / m).is_file() for m in markers):
        return sub
    raise FileNotFoundError(f"{what}: '{p}' exists but holds none of {', '.join(markers)}")


def _encoder_shape(model_dir: Path) -> tuple[int | None, int | None, str]:
    """(layer count, max positions, model_type) from the config, whatever the architecture calls them."""
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(str(model_dir), local_files_only=True)
    depth = positions = None
    for name in ("num_hidden_layers", "n_layers", "num_layers"):
        value = getattr(cfg, name, None)
        if isinstance(value, int):
            depth = value
            break
    value = getattr(cfg, "max_position_embeddings", None)
    if isinstance(value, int):
        positions = value
    return depth, positions, str(getattr(cfg, "model_type", ""))


def _bert_score_safe_alias(model_dir: Path, model_type: str) -> tuple[str, str | None]:
    """A path string bert_score will load as a plain AutoModel, plus a temp dir to delete afterwards.

    bert_score picks the loader from the *name*: anything containing "t5" becomes a T5EncoderModel and a
    name starting with "scibert" is downloaded. An absolute path never starts with "scibert"; for a path
    that contains "t5" we load through a symlink whose path does not.
    """
    path = str(model_dir)
    if "t5" not in path or "t5" in model_type:
        return path, None
    for _ in range(20):
        tmp = tempfile.mkdtemp(prefix="gag_bertscore_")
        alias = os.path.join(tmp, "encoder")
        if "t5" not in alias:
            os.symlink(path, alias, target_is_directory=True)
            return alias, tmp
        shutil.rmtree(tmp, ignore_errors=True)
    raise ValueError(
        f"bert_score would load '{path}' as a T5 model because its path contains 't5'; "
        "move or symlink the encoder to a path without 't5'"
    )


# ------------------------------------------------------------------------------------- BERTScore


class ChunkedBERTScore:
    """BERTScore F1 (idf off, no baseline rescale) that scores long texts chunk by chunk.

    Backend: `bert_score.BERTScorer` with `model_type=<absolute local path>` and `num_layers`, i.e. the
    package's own greedy matching, so numbers are comparable with the paper's. (We verified it loads a
    local directory offline with the installed bert_score 0.3.x / transformers.) `num_layers=k` scores
    with Hugging Face `hidden_states[k]`; a k above the model's depth is clamped with a warning.

    Long texts (our reading of "texts longer than ~500 word-pieces are split into chunks, each chunk pair
    scored, and the record score is the length-weighted mean"): if the candidate *or* the reference has
    more than `max_tokens` word-pieces (tokenizer pieces without [CLS]/[SEP]), both are split into chunks
    of at most `max_tokens` pieces, cutting at whitespace between words when possible and slicing the
    original text (never decoding pieces back). Chunk i of the candidate is paired with chunk i of the
    reference; when the counts differ, the extra chunks of the longer side are paired with the last chunk
    of the other side. Each pair is scored, and the record's F1 is the mean of the pair F1s weighted by
    the pair's length = candidate-chunk pieces + reference-chunk pieces.

    An empty prediction (or one with no word-pieces) scores exactly 0.0; an empty reference also scores
    0.0, with a warning, since there is nothing to match.
    """

    def __init__(
        self,
        model_path: str | os.PathLike[str],
        num_layers: int = 8,
        max_tokens: int = 500,
        batch_size: int = 64,
        device: str | None = None,
    ) -> None:
        from bert_score import BERTScorer
        from transformers import AutoTokenizer

        self.model_dir = _resolve_model_dir(
            model_path,
            "a BERT-like encoder directory for BERTScore (config.json, tokenizer, weights)",
            ("config.json",),
        )
        if num_layers < 0:
            raise ValueError(f"num_layers must be >= 0, got {num_layers}")
        depth, positions, model_type = _encoder_shape(self.model_dir)
        if depth is not None and num_layers > depth:
            warnings.warn(
                f"BERTScore layer {num_layers} requested but '{self.model_dir}' has only {depth} layers; "
                f"using layer {depth}",
                stacklevel=2,
            )
            num_layers = depth
        self.num_layers = num_layers
        self.batch_size = batch_size

        self.tokenizer = AutoTokenizer.from_pretrained(str(self.model_dir), local_files_only=True)
        if not getattr(self.tokenizer, "is_fast", False):
            raise ValueError(f"'{self.model_dir}': chunking needs a fast tokenizer (tokenizer.json)")
        # The tokenizer's limit may be "unbounded" (1e30) when tokenizer_config.json omits it.
        limit = min(int(min(getattr(self.tokenizer, "model_max_length", 10**9), 10**9)), positions or 10**9)
        n_special = len(self.tokenizer("", add_special_tokens=True)["input_ids"])
        if max_tokens < 1 or max_tokens + n_special > limit:
            raise ValueError(
                f"max_tokens={max_tokens} plus {n_special} special tokens exceeds the encoder's limit {limit}"
            )
        self.max_tokens = max_tokens

        alias, tmp = _bert_score_safe_alias(self.model_dir, model_type)
        try:
            self._scorer = BERTScorer(
                model_type=alias,
                num_layers=num_layers,
                idf=False,
                rescale_with_baseline=False,
                batch_size=batch_size,
                device=device,
                use_fast_tokenizer=True,
            )
        finally:
            if tmp is not None:
                shutil.rmtree(tmp, ignore_errors=True)

    # -- chunking -------------------------------------------------------------------------------
    def count_tokens(self, text: str) -> int:
        """Word-pieces of `text` without special tokens: the unit of `max_tokens` and of chunk weights."""
        return len(self.tokenizer(text.strip(), add_special_tokens=False)["input_ids"])

    def split_into_chunks(self, text: str) -> list[str]:
        """Slices of `text` of at most `max_tokens` word-pieces, cut at whitespace where possible."""
        text = text.strip()
        enc = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        offsets: list[tuple[int, int]] = [tuple(o) for o in enc["offset_mapping"]]
        n = len(offsets)
        if n <= self.max_tokens:
            return [text] if text else []
        # A piece starts a new word when whitespace separates it from the previous piece.
        word_start = [i == 0 or offsets[i][0] > offsets[i - 1][1] for i in range(n)]
        chunks: list[str] = []
        start = 0
        while start < n:
            end = min(start + self.max_tokens, n)
            if end < n:
                cut = end
                while cut > start and not word_start[cut]:
                    cut -= 1
                if cut > start:  # else one word longer than max_tokens: cut inside it
                    end = cut
            chunk = text[offsets[start][0] : offsets[end - 1][1]].strip()
            if chunk:
                chunks.append(chunk)
            start = end
        return chunks

    def chunk_pairs(self, pred: str, ref: str) -> list[tuple[str, str, int]]:
        """(candidate chunk, reference chunk, weight) triples for one record, as described on the class."""
        if self.count_tokens(pred) <= self.max_tokens and self.count_tokens(ref) <= self.max_tokens:
            cands, refs = [pred.strip()], [ref.strip()]
        else:
            cands, refs = self.split_into_chunks(pred), self.split_into_chunks(ref)
        pairs = []
        for i in range(max(len(cands), len(refs))):
            c = cands[min(i, len(cands) - 1)]
            r = refs[min(i, len(refs) - 1)]
            pairs.append((c, r, self.count_tokens(c) + self.count_tokens(r)))
        return pairs

    # -- scoring --------------------------------------------------------------------------------
    def score_pairs(self, cands: Sequence[str], refs: Sequence[str]) -> list[float]:
        """Plain BERTScore F1 of already short, non-empty pairs (one batched bert_score call)."""
        if not cands:
            return []
        _, _, f1 = self._scorer.score(list(cands), list(refs), batch_size=self.batch_size)
        return [float(x) for x in f1.tolist()]

    def score(self, preds: Sequence[str], refs: Sequence[str]) -> list[float]:
        """F1 per record; all chunk pairs of all records are scored in one batched pass."""
        if len(preds) != len(refs):
            raise ValueError(f"{len(preds)} predictions but {len(refs)} references")
        scores = [0.0] * len(preds)
        flat_c: list[str] = []
        flat_r: list[str] = []
        owners: list[tuple[int, int]] = []  # (record index, weight) per flat pair
        n_empty_refs = 0
        for i, (pred, ref) in enumerate(zip(preds, refs, strict=True)):
            if is_empty_prediction(pred) or self.count_tokens(pred) == 0:
                continue
            if is_empty_prediction(ref) or self.count_tokens(ref) == 0:
                n_empty_refs += 1
                continue
            for c, r, w in self.chunk_pairs(pred, ref):
                flat_c.append(c)
                flat_r.append(r)
                owners.append((i, w))
        if n_empty_refs:
            warnings.warn(f"{n_empty_refs} empty reference(s) scored BERTScore 0.0", stacklevel=2)
        weighted = [0.0] * len(preds)
        weights = [0] * len(preds)
        for (i, w), f in zip(owners, self.score_pairs(flat_c, flat_r), strict=True):
            weighted[i] += w * f
            weights[i] += w
        for i, w in enumerate(weights):
            if w:
                scores[i] = weighted[i] / w
        return scores


# ------------------------------------------------------------------------------------------- STS


class STSScorer:
    """Cosine similarity of L2-normalised sentence-transformers embeddings (all-mpnet-base-v2 in the paper)."""

    def __init__(
        self, model_path: str | os.PathLike[str], batch_size: int = 64, device: str | None = None
    ) -> None:
        from sentence_transformers import SentenceTransformer

        self.model_dir = _resolve_model_dir(
            model_path,
            "a sentence-transformers model directory for STS (modules.json or config.json, tokenizer, weights)",
            ("modules.json", "config.json"),
        )
        if self.model_dir.name == "0_Transformer":  # load the full pipeline (pooling included)
            self.model_dir = self.model_dir.parent
        self.batch_size = batch_size
        self._model = SentenceTransformer(str(self.model_dir), device=device, local_files_only=True)

    def score(self, preds: Sequence[str], refs: Sequence[str]) -> list[float]:
        """Similarity per record; empty prediction (or reference) -> 0.0, never dropped."""
        if len(preds) != len(refs):
            raise ValueError(f"{len(preds)} predictions but {len(refs)} references")
        keep = [
            i
            for i, (p, r) in enumerate(zip(preds, refs, strict=True))
            if not is_empty_prediction(p) and not is_empty_prediction(r)
        ]
        scores = [0.0] * len(preds)
        if not keep:
            return scores
        texts = [preds[i] for i in keep] + [refs[i] for i in keep]
        emb = self._model.encode(
            texts,
            batch_size=self.batch_size,
            convert_to_tensor=True,
            normalize_embeddings=True,
            show_progress_bar=False,
        ).float()
        a, b = emb[: len(keep)], emb[len(keep) :]
        for i, s in zip(keep, (a * b).sum(dim=-1).tolist(), strict=True):
            scores[i] = float(s)
        return scores


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
