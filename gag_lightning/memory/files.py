"""What the memory stage's stores share: format version, schema file name, storage dtypes, canonical JSON.

`BackgroundStore` (memory/store.py) and `MemoryBank` (memory/bank.py) both start with a `schema.json` and compare
settings after a JSON round trip, so a reloaded folder compares equal to the settings that wrote it.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch

from gag_lightning.errors import GAGError, SchemaMismatchError

FORMAT_VERSION = 1
SCHEMA_FILE = "schema.json"
STORAGE_DTYPES: dict[str, torch.dtype] = {
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float32": torch.float32,
}


def canonical_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def json_normalise(obj: Any, what: str) -> Any:
    """Round-trip through JSON so tuples/lists and int/float keys compare as they will after a reload."""
    try:
        return json.loads(json.dumps(obj, ensure_ascii=False))
    except (TypeError, ValueError) as exc:
        raise GAGError(f"{what} is not JSON-serialisable: {exc}") from exc


def settings_fingerprint(settings: Any) -> str:
    """Stable sha256 of JSON-serialisable settings; used to tie a memory bank to its backgrounds."""
    return hashlib.sha256(canonical_json(json_normalise(settings, "settings")).encode("utf-8")).hexdigest()


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise SchemaMismatchError(f"{path}: not valid JSON ({exc.msg}); the artifact is damaged") from exc


def format_diffs(diffs: list[tuple[str, Any, Any]], have_label: str, want_label: str) -> str:
    return "; ".join(f"{name}: {have_label} {have!r}, {want_label} {want!r}" for name, have, want in diffs)
