"""The evaluation's settings from the composed config: the one decoding configuration, the device, the scorers.

Library code: the eval stage and routed answering both build their decoding and scorers here, so they decode and
score alike, and neither reads the other's runner.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from omegaconf import DictConfig

from gag_lightning.eval.generation import DecodingConfig

log = logging.getLogger(__name__)


def eval_device(cfg: DictConfig) -> torch.device:
    """The device of a one-process decoding (routed answering): CUDA when the trainer asks for a GPU and one exists."""
    accel = str(cfg.trainer.get("accelerator", "cpu"))
    if accel in ("gpu", "cuda", "auto") and torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("cpu")


def decoding_config(cfg: DictConfig) -> DecodingConfig:
    """The one DecodingConfig every system uses (greedy; METHOD.md section 5)."""
    node = cfg.eval.decoding
    return DecodingConfig(max_new_tokens=int(node.max_new_tokens), do_sample=False,
                          repetition_penalty=float(node.repetition_penalty),
                          no_repeat_ngram_size=int(node.no_repeat_ngram_size), batch_size=int(node.batch_size))


def fit_chunk_size(model_dir: Any, wanted: int) -> int:
    """The BERTScore chunk size: ``wanted`` word-pieces, or fewer if the encoder cannot take that many.

    The spec's ~500 assumes a 512-position encoder; an encoder with a shorter window (the tiny test encoder
    takes 256) gets chunks that fit it, with a warning, instead of an error at the end of a long run.
    """
    from transformers import AutoConfig, AutoTokenizer

    from gag_lightning.eval.scorers import _resolve_model_dir

    path = _resolve_model_dir(model_dir, "BERTScore encoder", ("config.json",))
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    positions = getattr(AutoConfig.from_pretrained(str(path)), "max_position_embeddings", None) or 10**9
    limit = min(int(min(tokenizer.model_max_length, 10**9)), int(positions))
    n_special = len(tokenizer("", add_special_tokens=True)["input_ids"])
    if wanted + n_special > limit:
        log.warning("BERTScore max_tokens=%d does not fit the encoder's %d positions; chunks of %d word-pieces",
                    wanted, limit, limit - n_special)
        return limit - n_special
    return wanted


def build_scorers(cfg: DictConfig, device: torch.device) -> dict[str, Any]:
    """BERTScore F1 and STS over the configured local encoders (``model.encoders``), on ``device``."""
    from gag_lightning.eval.scorers import ChunkedBERTScore, STSScorer
    from gag_lightning.models.loading import resolve_path

    enc = cfg.model.encoders
    node = cfg.eval
    dev = str(device)
    bert_dir = resolve_path(enc.bertscore, cfg.paths.cache_dir)
    return {
        "bertscore_f1": ChunkedBERTScore(bert_dir, num_layers=int(node.bertscore.layer),
                                         max_tokens=fit_chunk_size(bert_dir, int(node.bertscore.max_tokens)),
                                         batch_size=int(node.bertscore.get("batch_size", 64)), device=dev),
        "sts": STSScorer(resolve_path(enc.sts, cfg.paths.cache_dir),
                         batch_size=int(node.sts.get("batch_size", 64)), device=dev),
    }


__all__ = ["build_scorers", "decoding_config", "eval_device", "fit_chunk_size"]
