"""The model-based answer scorers of METHOD.md section 5: chunked BERTScore F1 and STS (cosine of sentence
embeddings), each over local encoder folders. Split from `eval.metrics` (string metrics and summaries): these
load models, that module does arithmetic.

Like every scorer of the project they score an empty prediction explicitly (0.0) instead of dropping it.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import warnings
from collections.abc import Sequence
from pathlib import Path

from gag_lightning.eval.metrics import is_empty_prediction

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


__all__ = ["ChunkedBERTScore", "STSScorer"]
