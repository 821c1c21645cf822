"""Frozen text encoder giving the semantic-loss target of Stage III (METHOD.md section 4).

The target is the mean-pooled last hidden state of a plain transformer encoder (SciBERT in the paper,
MiniLM / a tiny BERT here) over the answer text. It is computed with ``AutoModel`` on the encoder's
directory rather than through a sentence-transformers pipeline so that the spec's pooling is applied
exactly (no normalisation or dense layers a sentence-transformers config might add).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor

from gag_lightning.errors import GAGError
from gag_lightning.models.losses import masked_mean


def _transformer_dir(path: str | os.PathLike[str]) -> Path:
    """The Hugging Face model directory inside an encoder directory (root, or ``0_Transformer/``)."""
    p = Path(path).expanduser()
    for candidate in (p, p / "0_Transformer"):
        if (candidate / "config.json").is_file():
            return candidate
    raise GAGError(
        f"semantic encoder directory '{p}' holds no config.json (nor 0_Transformer/config.json); "
        "set model.encoders.semantic to a Hugging Face or sentence-transformers encoder directory"
    )


class SemanticTargetEncoder:
    """Frozen encoder: ``encode(texts) -> [N, H_sem]`` fp32, masked mean of the last hidden state.

    Not an ``nn.Module`` on purpose: it is used once, before training, to precompute every record's
    target, so it never lives on the training device next to the base model.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        max_length: int = 512,
        batch_size: int = 32,
        device: str | torch.device | None = None,
    ) -> None:
        from transformers import AutoModel, AutoTokenizer

        self.model_dir = _transformer_dir(path)
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.tokenizer = AutoTokenizer.from_pretrained(str(self.model_dir))
        self.model = AutoModel.from_pretrained(str(self.model_dir), dtype=torch.float32).to(self.device)
        self.model.eval()
        self.model.requires_grad_(False)
        limit = getattr(self.model.config, "max_position_embeddings", None)
        if isinstance(limit, int) and max_length > limit:
            max_length = limit
        self.max_length = int(max_length)
        self.batch_size = int(batch_size)

    @property
    def dim(self) -> int:
        """H_sem: the semantic head's output size."""
        return int(self.model.config.hidden_size)

    @torch.inference_mode()
    def encode(self, texts: Sequence[str]) -> Tensor:
        """Targets for ``texts`` in input order, on the CPU, fp32 (truncated to ``max_length`` tokens)."""
        out = torch.zeros(len(texts), self.dim, dtype=torch.float32)
        for start in range(0, len(texts), self.batch_size):
            chunk = [str(t).strip() for t in texts[start : start + self.batch_size]]
            enc = self.tokenizer(
                chunk, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
            ).to(self.device)
            hidden = self.model(**enc).last_hidden_state
            out[start : start + len(chunk)] = masked_mean(hidden, enc["attention_mask"].bool()).cpu()
        return out


__all__ = ["SemanticTargetEncoder"]
