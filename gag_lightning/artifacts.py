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
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from gag_lightning.errors import GAGError, MissingArtifactError

MANIFEST = "manifest.json"
# a key entry naming an upstream folder used without a finished manifest (`allow_unfinished=true`)
UNFINISHED = "unfinished_folder"


# ------------------------------------------------------------------------------------------ writing files
def current_umask() -> int:
    """The process umask (read from /proc where it can be, so no other thread sees a changed umask)."""
    try:
        with open("/proc/self/status", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def apply_umask(paths: str | Path | Iterable[str | Path]) -> None:
    """Give files the permissions a plain ``open(..., "w")`` would (0o666 & ~umask).

    Some writers (safetensors' ``save_file``, hence ``save_pretrained``) create their file 0600; a result
    that only its creator can read is useless to the rest of a cluster group. A folder is done recursively.
    """
    mode = 0o666 & ~current_umask()
    items = [paths] if isinstance(paths, str | Path) else list(paths)
    for item in items:
        item = Path(item)
        files = [p for p in item.rglob("*") if p.is_file()] if item.is_dir() else [item]
        for path in files:
            if path.is_file() and not path.is_symlink():
                os.chmod(path, mode)


def fsync_dir(folder: str | Path) -> None:
    """Make renames in `folder` durable; some platforms cannot open directories, which is harmless there."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: str | Path, write: Callable[[str], None], tmp: str | Path | None = None,
                 durable: bool = True) -> None:
    """Have `write(tmp)` fill a temp file beside `path`, then rename it over `path`: the one atomic write.

    A kill at any point leaves either the old file or the new one, never half a file (`tmp` names the temp
    file when a reader must recognise leftovers, as the memory bank's shards do). With `durable`, the data
    and the rename are fsync'ed. The file gets the umask's permissions whoever created it (see `apply_umask`).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tmp) if tmp is not None else path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(str(tmp))
        if durable:
            fd = os.open(tmp, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        apply_umask(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if durable:
        fsync_dir(path.parent)


def atomic_write_bytes(path: str | Path, data: bytes, tmp: str | Path | None = None) -> None:
    """Write bytes durably via a temp file + rename (see `atomic_write`)."""
    atomic_write(path, lambda name: Path(name).write_bytes(data), tmp=tmp)


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write text durably (fsync) via a temp file + rename so a reader never sees half a file."""
    atomic_write_bytes(path, text.encode("utf-8"))


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


def unfinished_inputs(config: Any) -> list[str]:
    """The upstream folders a stage key says were used without a finished manifest (`allow_unfinished=true`)."""
    found: list[str] = []
    if isinstance(config, Mapping):
        if UNFINISHED in config:
            found.append(str(config[UNFINISHED]))
        for value in config.values():
            found.extend(unfinished_inputs(value))
    elif isinstance(config, list | tuple):
        for value in config:
            found.extend(unfinished_inputs(value))
    return list(dict.fromkeys(found))


def write_manifest(folder: str | Path, stage: str, config: Mapping[str, Any], inputs: Mapping[str, Any],
                   metrics: Mapping[str, Any] | None = None, extra: Mapping[str, Any] | None = None) -> Path:
    """Write `manifest.json` last. A key that used unfinished upstream folders is stamped with them."""
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
    unfinished = unfinished_inputs(config)
    if unfinished:
        manifest.update(allow_unfinished=True, unfinished_inputs=unfinished)
    atomic_write_text(folder / MANIFEST, json.dumps(manifest, indent=2, default=str))
    return folder / MANIFEST


def read_manifest(folder: str | Path) -> dict[str, Any] | None:
    path = Path(folder) / MANIFEST
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise GAGError(f"{path}: not valid JSON ({exc}); the artifact is damaged: delete the folder to rebuild "
                       "it") from exc


def manifest_digest(folder: str | Path) -> str | None:
    """sha256 (16 hex) of a folder's manifest bytes: the content identity of a finished artifact, or None."""
    path = Path(folder) / MANIFEST
    if not path.is_file():
        return None
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def listing_digest(folder: str | Path) -> str:
    """Cheap identity of a folder without a manifest: every file's relative path, size and mtime."""
    folder = Path(folder)
    h = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        stat = path.stat()
        h.update(f"{path.relative_to(folder)}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def require_artifact(folder: str | Path, stage: str, hint: str) -> dict[str, Any]:
    """Manifest of a finished stage, or an error telling the user how to produce it."""
    manifest = read_manifest(folder)
    if manifest is None:
        raise MissingArtifactError(
            f"no finished '{stage}' artifact at {folder} (no {MANIFEST}). {hint}"
        )
    return manifest
