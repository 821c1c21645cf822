"""The stage-to-stage contract: stable artifact folders with a manifest written last.

Stages never look for each other's outputs in timestamped run directories; they look at
`${paths.artifacts}/<model>/<domain>/<stage>/`, and trust a folder only if its manifest exists
(it is written atomically after everything else, so a killed stage leaves no manifest).
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from gag_lightning.errors import MissingArtifactError

MANIFEST = "manifest.json"


def atomic_write(path: str | Path, write: Callable[[str], None]) -> None:
    """Have `write(tmp)` fill a temp file beside `path`, then rename it over `path`.

    A kill at any point leaves either the old file or the new one, never half a file. The temp file
    is created by `write` itself (not mkstemp, which makes it 0600), so results get the usual
    umask permissions and stay readable by the rest of a cluster group.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(str(tmp))
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write text durably (fsync) via a temp file + rename so a reader never sees half a file."""

    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())

    atomic_write(path, write)


def config_hash(node: Any) -> str:
    """Stable hash of a JSON-able config node, used to decide whether an artifact can be reused."""
    return hashlib.sha256(json.dumps(node, sort_keys=True, default=str).encode()).hexdigest()[:16]


def versions() -> dict[str, str]:
    import lightning
    import torch
    import transformers

    from gag_lightning import __version__

    return {"gag_lightning": __version__, "torch": torch.__version__, "lightning": lightning.__version__,
            "transformers": transformers.__version__, "python": platform.python_version()}


def write_manifest(folder: str | Path, stage: str, config: Mapping[str, Any], inputs: Mapping[str, Any],
                   metrics: Mapping[str, Any] | None = None, extra: Mapping[str, Any] | None = None) -> Path:
    folder = Path(folder)
    manifest = {
        "stage": stage,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "config_hash": config_hash(config),
        "config": config,
        "inputs": dict(inputs),
        "metrics": dict(metrics or {}),
        "versions": versions(),
        **dict(extra or {}),
    }
    atomic_write_text(folder / MANIFEST, json.dumps(manifest, indent=2, default=str))
    return folder / MANIFEST


def read_manifest(folder: str | Path) -> dict[str, Any] | None:
    path = Path(folder) / MANIFEST
    if not path.is_file():
        return None
    return json.loads(path.read_text(encoding="utf-8"))


def require_artifact(folder: str | Path, stage: str, hint: str) -> dict[str, Any]:
    """Manifest of a finished stage, or an error telling the user how to produce it."""
    manifest = read_manifest(folder)
    if manifest is None:
        raise MissingArtifactError(
            f"no finished '{stage}' artifact at {folder} (no {MANIFEST}). {hint}"
        )
    return manifest
