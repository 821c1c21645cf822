"""Saving and loading the GAG adapter (safetensors + JSON, atomic, never pickle), and what its config says about
the slots' placeholder and how it was selected. Split from ``models.adapter`` (the modules and the injection):
files and provenance are one job, the forward pass another.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from gag_lightning.artifacts import atomic_write, atomic_write_text
from gag_lightning.errors import GAGError, SchemaMismatchError
from gag_lightning.models.adapter import (
    ADAPTER_CONFIG,
    ADAPTER_FORMAT_VERSION,
    ADAPTER_WEIGHTS,
    AdapterConfig,
    GAGAdapter,
)
from gag_lightning.prompts import Placeholder, choose_placeholder

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------------------
# Save / load (safetensors + JSON, atomic, never pickle)
# --------------------------------------------------------------------------------------------------------
def save_adapter(adapter: GAGAdapter, folder: str | Path) -> Path:
    """Save the adapter's weights (incl. the learned layer mix) and config; never the base model."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in adapter.state_dict().items()}
    config = {"format_version": ADAPTER_FORMAT_VERSION, **adapter.config.to_dict()}
    atomic_write(folder / ADAPTER_WEIGHTS, lambda p: save_file(tensors, p, metadata={"format": "pt"}))
    atomic_write_text(folder / ADAPTER_CONFIG, json.dumps(config, indent=2, sort_keys=True) + "\n")
    return folder


def read_weights(path: Path) -> dict[str, Tensor]:
    """All tensors of a safetensors file; a truncated or damaged file, or NaN/inf in it, is an error naming it."""
    from safetensors.torch import load_file

    try:
        state = load_file(str(path), device="cpu")
    except Exception as exc:  # safetensors raises its own error types (SafetensorError: incomplete metadata, ...)
        raise GAGError(f"{path}: cannot read the weights ({type(exc).__name__}: {exc}); the file is truncated or "
                       "damaged: retrain, or copy it again") from exc
    bad = [name for name, t in state.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    if bad:
        from gag_lightning.errors import NonFiniteError

        raise NonFiniteError(f"{path}: tensor(s) {bad[:5]} hold NaN/inf values; the weights are unusable: retrain")
    return state


def check_weight_shapes(adapter: GAGAdapter, state: Mapping[str, Tensor], cfg_path: Path, w_path: Path) -> None:
    """Refuse weights whose shapes differ from what the config builds, naming the tensor, the dimension and the
    config fields of that size (instead of torch's `RuntimeError ... size mismatch`)."""
    sizes = ("expert_hidden", "base_hidden", "slots", "layers", "projector_hidden", "semantic_dim")
    problems = []
    for name, want in adapter.state_dict().items():
        have = state.get(name)
        if have is None or tuple(have.shape) == tuple(want.shape):
            continue
        if have.dim() != want.dim():
            problems.append(f"{name} is {list(have.shape)} in {w_path.name} but {list(want.shape)} by {cfg_path.name}")
            continue
        for dim, (h, w) in enumerate(zip(have.shape, want.shape, strict=True)):
            if h != w:
                fields = [f for f in sizes if getattr(adapter.config, f, None) == w]
                named = f" ({', '.join(f'{f}={w}' for f in fields)})" if fields else ""
                problems.append(f"{name} dimension {dim} is {h} in {w_path.name} but {w} by {cfg_path.name}{named}")
    if problems:
        raise SchemaMismatchError(f"adapter folder {w_path.parent}: {cfg_path.name} does not match the weights: "
                                  + "; ".join(problems[:5]) + "; the config must hold the sizes the weights were "
                                  "trained with")


def load_adapter(folder: str | Path, device: str | torch.device | None = None) -> GAGAdapter:
    """Rebuild an adapter from ``save_adapter`` output, restoring every tensor including the layer mix."""
    from gag_lightning.errors import MissingArtifactError

    folder = Path(folder)
    cfg_path, w_path = folder / ADAPTER_CONFIG, folder / ADAPTER_WEIGHTS
    for p in (cfg_path, w_path):
        if not p.is_file():
            raise MissingArtifactError(f"{p} not found; run the 'gag' stage to train an adapter first")
    try:
        with open(cfg_path, encoding="utf-8") as f:
            config = AdapterConfig.from_dict(json.load(f))
        adapter = GAGAdapter(config)
    except (json.JSONDecodeError, TypeError, ValueError) as exc:
        raise GAGError(f"{cfg_path}: not a valid adapter config ({exc})") from exc
    state = read_weights(w_path)
    check_weight_shapes(adapter, state, cfg_path, w_path)
    missing, unexpected = adapter.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise GAGError(
            f"{w_path} does not match {cfg_path}: missing {sorted(missing)}, unexpected {sorted(unexpected)}"
        )
    adapter.float()
    if device is not None:
        adapter.to(device)
    return adapter


# --------------------------------------------------------------------------------------------------------
# Placeholder and provenance
# --------------------------------------------------------------------------------------------------------
def adapter_placeholder(config: AdapterConfig, tokenizer: Any) -> Placeholder:
    """The placeholder ``config`` was trained with, checked against the base's ``tokenizer``.

    An adapter saved before placeholders were recorded (it was trained with an added ``<GAG>`` token) gets this
    tokenizer's ``choose_placeholder``: the slot positions and every other prompt id are the same, and the id at
    the slots is never read (the injection overwrites those positions).
    """
    if not config.placeholder:
        chosen = choose_placeholder(tokenizer)
        log.warning("adapter config records no placeholder (saved by an older version); marking slots with %s",
                    chosen.to_dict())
        return chosen
    recorded = Placeholder.from_dict(config.placeholder)
    recorded.check(tokenizer)
    return recorded


def selection_note(config: AdapterConfig) -> str | None:
    """The warning every report carries when the adapter was selected on the test split, else None."""
    if config.selection.get("val_source") != "test":
        return None
    split = config.selection.get("val_split", "test")
    return (f"The GAG adapter was selected on split '{split}' (gag.val_source=test, allowed by "
            f"gag.allow_test_selection=true): its scores on that split are optimistic.")


__all__ = ["adapter_placeholder", "check_weight_shapes", "load_adapter", "read_weights", "save_adapter",
           "selection_note"]
