"""Query encoders for prototype routing (METHOD.md section 6).

The router compares a query embedding with prototype banks that were built offline, so the encoder that
embeds online queries must be exactly the one that embedded the offline pools. Every encoder therefore
carries a ``fingerprint`` (kind, model name, pooling, max length and a short hash of a few weights) that
banks record and the router checks.
"""

from __future__ import annotations

import hashlib
import inspect
import os
from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "QueryEncoder",
    "CausalLMQueryEncoder",
    "SentenceTransformerQueryEncoder",
    "weights_hash",
    "model_short_name",
]


def weights_hash(module: nn.Module, n_tensors: int = 8, n_values: int = 1024) -> str:
    """Short hash of a strided sample of a few parameter tensors.

    Names alone cannot tell two random tiny models (or a base and its fine-tune saved under the same
    name) apart; hashing every weight of a 2B model would take seconds. A strided sample of a handful of
    tensors spread over the network is cheap and changes whenever the weights do in practice.
    """
    params = [p for p in module.parameters()]
    h = hashlib.sha256()
    if not params:
        return h.hexdigest()[:12]
    n = min(n_tensors, len(params))
    picks = sorted({round(i * (len(params) - 1) / max(1, n - 1)) for i in range(n)})
    for i in picks:
        p = params[i].detach()
        flat = p.reshape(-1)
        stride = max(1, flat.numel() // n_values)
        sample = flat[::stride][:n_values].to(device="cpu", dtype=torch.float32).contiguous()
        h.update(str(tuple(p.shape)).encode())
        h.update(sample.numpy().tobytes())
    return h.hexdigest()[:12]


def model_short_name(name_or_path: str | os.PathLike[str] | None) -> str:
    """Last path component of a model path or hub id.

    Banks built on one machine must load on another where the same model lives under another directory;
    the weight hash, not the path, is what guarantees identity.
    """
    if not name_or_path:
        return "unnamed"
    text = str(name_or_path).rstrip("/\\")
    return Path(text).name or text


class QueryEncoder(ABC):
    """Maps query texts to L2-normalised float32 vectors; identified by ``fingerprint``."""

    @property
    @abstractmethod
    def fingerprint(self) -> str:
        """Identity of the encoder; banks built with a different fingerprint are refused by the router."""

    @property
    @abstractmethod
    def dim(self) -> int:
        """Embedding dimension D."""

    @abstractmethod
    def encode(self, texts: Sequence[str], batch_size: int = 64) -> Tensor:
        """Return a float32 CPU tensor [N, D] of unit vectors, row i for ``texts[i]``."""

    def __call__(self, texts: Sequence[str], batch_size: int = 64) -> Tensor:
        return self.encode(texts, batch_size=batch_size)


def _check_texts(texts: Iterable[str]) -> list[str]:
    """A bare string would silently be encoded character by character; refuse it."""
    if isinstance(texts, str):
        raise TypeError("encode() takes a list of strings, not a single string")
    out = list(texts)
    for i, t in enumerate(out):
        if not isinstance(t, str):
            raise TypeError(f"encode(): item {i} is {type(t).__name__}, expected str")
    return out


def _dtype_kwarg() -> str:
    """transformers >= 4.56 calls the load dtype ``dtype``; older versions call it ``torch_dtype``."""
    import transformers

    parts = transformers.__version__.split(".")
    try:
        major, minor = int(parts[0]), int(parts[1])
    except (ValueError, IndexError):
        return "dtype"
    return "dtype" if (major, minor) >= (4, 56) else "torch_dtype"


class CausalLMQueryEncoder(QueryEncoder):
    """Frozen causal LM, attention-masked mean of the last hidden states, L2-normalised.

    ``hidden_states[-1]`` from ``output_hidden_states=True`` is used instead of reaching into the
    backbone (``model.model``, ``model.transformer`` ...) so that any architecture works. Padding is done
    here, on the right, by hand: with right padding a causal model never lets real tokens see the pads and
    positions start at 0, so a padded batch gives the same vectors as one query at a time, and no pad
    token needs to be added to (or mutated on) the caller's tokenizer.
    """

    kind = "causal_lm"
    pooling = "mean"

    def __init__(self, model: nn.Module, tokenizer: Any, max_length: int = 256) -> None:
        if max_length < 1:
            raise ValueError(f"max_length must be >= 1, got {max_length}")
        self.model = model
        self.tokenizer = tokenizer
        self.max_length = int(max_length)
        config = getattr(model, "config", None)
        name = getattr(model, "name_or_path", None) or getattr(config, "_name_or_path", None)
        self.name = model_short_name(name)
        hidden = getattr(config, "hidden_size", None)
        if hidden is None and config is not None and hasattr(config, "get_text_config"):
            hidden = getattr(config.get_text_config(), "hidden_size", None)
        if hidden is None:
            emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
            hidden = emb.weight.shape[1] if emb is not None else None
        if hidden is None:
            raise ValueError("cannot tell the hidden size of the model (no config.hidden_size)")
        self._dim = int(hidden)
        self._fingerprint = (
            f"{self.kind}|name={self.name}|pool={self.pooling}|max_len={self.max_length}"
            f"|w={weights_hash(model)}"
        )
        try:
            params = inspect.signature(model.forward).parameters
        except (TypeError, ValueError):
            params = {}
        # Only the hidden states are needed: skip the [B, T, vocab] logits where the model allows it.
        self._logits_kwarg = next((k for k in ("logits_to_keep", "num_logits_to_keep") if k in params), None)
        self._pad_id = self._pick_pad_id(tokenizer)

    @classmethod
    def from_pretrained(
        cls,
        path: str | os.PathLike[str],
        max_length: int = 256,
        dtype: torch.dtype | str = torch.float32,
        device: str | torch.device | None = None,
        **model_kwargs: Any,
    ) -> CausalLMQueryEncoder:
        """Load a local directory (or cached hub id) and freeze it."""
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(path))
        model_kwargs = {_dtype_kwarg(): dtype, **model_kwargs}
        model = AutoModelForCausalLM.from_pretrained(str(path), **model_kwargs)
        model.requires_grad_(False)
        model.eval()
        if device is not None:
            model.to(device)
        return cls(model, tokenizer, max_length=max_length)

    @property
    def fingerprint(self) -> str:
        return self._fingerprint

    @property
    def dim(self) -> int:
        return self._dim

    @staticmethod
    def _pick_pad_id(tokenizer: Any) -> int:
        """Any valid id works because pads are masked out; prefer pad, then eos, then 0."""
        for attr in ("pad_token_id", "eos_token_id"):
            value = getattr(tokenizer, attr, None)
            if isinstance(value, list):
                value = value[0] if value else None
            if value is not None:
                return int(value)
        return 0

    def _device(self) -> torch.device:
        try:
            return next(self.model.parameters()).device
        except StopIteration:
            return torch.device("cpu")

    def tokenize(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids per text, truncated to ``max_length`` (special tokens as the tokenizer adds them)."""
        enc = self.tokenizer(list(texts), truncation=True, max_length=self.max_length, padding=False)
        return [list(ids) for ids in enc["input_ids"]]

    def encode(self, texts: Sequence[str], batch_size: int = 64) -> Tensor:
        """Embed ``texts``; an empty query (no tokens) gets a zero vector, which ties everywhere."""
        texts = _check_texts(texts)
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        out = torch.zeros(len(texts), self._dim, dtype=torch.float32)
        if not texts:
            return out
        ids = self.tokenize(texts)
        # Longest first: similar lengths share a batch (little padding) and an OOM shows up at once.
        order = sorted((i for i in range(len(ids)) if ids[i]), key=lambda i: -len(ids[i]))
        device = self._device()
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.inference_mode():
                for start in range(0, len(order), batch_size):
                    chunk = order[start : start + batch_size]
                    out[chunk] = self._encode_ids([ids[i] for i in chunk], device)
        finally:
            self.model.train(was_training)
        return out

    def _encode_ids(self, batch: list[list[int]], device: torch.device) -> Tensor:
        width = max(len(x) for x in batch)
        input_ids = torch.full((len(batch), width), self._pad_id, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, x in enumerate(batch):
            input_ids[row, : len(x)] = torch.tensor(x, dtype=torch.long)
            mask[row, : len(x)] = 1
        input_ids, mask = input_ids.to(device), mask.to(device)
        kwargs: dict[str, Any] = {"output_hidden_states": True, "use_cache": False, "return_dict": True}
        if self._logits_kwarg is not None:
            kwargs[self._logits_kwarg] = 1
        outputs = self.model(input_ids=input_ids, attention_mask=mask, **kwargs)
        hidden = outputs.hidden_states[-1].float()
        keep = mask.bool().unsqueeze(-1)
        # masked_fill, not multiply: a non-finite value at a pad position must not reach the sum.
        summed = hidden.masked_fill(~keep, 0.0).sum(dim=1)
        pooled = summed / mask.sum(dim=1, keepdim=True).clamp_min(1).to(summed.dtype)
        return F.normalize(pooled, p=2, dim=-1).cpu()


class SentenceTransformerQueryEncoder(QueryEncoder):
    """A sentence-transformers model with normalised embeddings: a cheap, strong router encoder on CPU."""

    kind = "sentence_transformer"

    def __init__(
        self,
        path_or_model: str | os.PathLike[str] | Any,
        max_length: int | None = 256,
        device: str | torch.device | None = None,
    ) -> None:
        from sentence_transformers import SentenceTransformer

        if isinstance(path_or_model, (str, os.PathLike)):
            self.model = SentenceTransformer(str(path_or_model), device=str(device) if device else None)
            name: Any = path_or_model
        else:
            self.model = path_or_model
            if device is not None:
                self.model.to(device)
            name = self._model_name(self.model)
        if max_length is not None:
            if max_length < 1:
                raise ValueError(f"max_length must be >= 1, got {max_length}")
            self.model.max_seq_length = int(max_length)
        self.max_length = int(self.model.max_seq_length)
        self.name = model_short_name(name)
        self.pooling = self._pooling_mode(self.model)
        get_dim = getattr(self.model, "get_embedding_dimension", None) or getattr(
            self.model, "get_sentence_embedding_dimension", None
        )
        dim = get_dim() if get_dim is not None else None
        if dim is None:
            dim = int(self.model.encode(["x"], convert_to_tensor=True).shape[-1])
        self._dim = int(dim)
        self._fingerprint = (
            f"{self.kind}|name={self.name}|pool={self.pooling}|max_len={self.max_length}"
            f"|w={weights_hash(self.model)}"
        )

    @staticmethod
    def _model_name(model: Any) -> str | None:
        try:
            first = model[0]
            auto = getattr(first, "auto_model", None)
            cfg = getattr(auto, "config", None)
            return getattr(cfg, "_name_or_path", None)
        except (IndexError, KeyError, TypeError):
            return None

    @staticmethod
    def _pooling_mode(model: Any) -> str:
        # sentence-transformers 3-5 expose get_pooling_mode_str(); 6.x a pooling_mode attribute.
        for module in getattr(model, "_modules", {}).values():
            get_mode = getattr(module, "get_pooling_mode_str", None)
            if get_mode is not None:
                return str(get_mode())
            mode = getattr(module, "pooling_mode", None)
            if isinstance(mode, str):
                return mode
        return "unknown"

    @property
    def fingerprint(self) -> str:
        return self._fingerprint

    @property
    def dim(self) -> int:
        return self._dim

    def encode(self, texts: Sequence[str], batch_size: int = 64) -> Tensor:
        texts = _check_texts(texts)
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not texts:
            return torch.zeros(0, self._dim, dtype=torch.float32)
        emb = self.model.encode(
            texts,
            batch_size=batch_size,
            normalize_embeddings=True,
            convert_to_tensor=True,
            show_progress_bar=False,
        )
        return emb.detach().to(device="cpu", dtype=torch.float32)
