"""How an input enters an artifact key by content: a data file by its sha256, a model folder made elsewhere by a
fingerprint of its files, an upstream folder of this project by its finished manifest (an unfinished one is
refused unless ``allow_unfinished=true``).

Split from ``keys`` (which composes the keys): library code that takes an upstream folder by path (routed
answering) needs this, not the stage keys.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from gag_lightning.artifacts import MANIFEST, UNFINISHED, listing_digest, manifest_digest
from gag_lightning.errors import MissingArtifactError, UnfinishedArtifactError

# folders this project writes: `<stage>-<10 hex>` under <artifacts>/<model>/<domain>/
_ARTIFACT_NAME = re.compile(r"^(dapt|sft|backgrounds|memory|gag|lora|eval)-[0-9a-f]{10}$")


_digest_cache: dict[tuple[str, float, int], str] = {}


def file_digest(path: str | Path | None) -> str | None:
    """sha256 of a data file (cached per path/mtime/size), so edited data invalidates downstream artifacts."""
    if path is None:
        return None
    path = Path(path)
    if not path.is_file():
        return None
    stat = path.stat()
    cache_key = (str(path.resolve()), stat.st_mtime, stat.st_size)
    if cache_key not in _digest_cache:
        h = hashlib.sha256()
        with path.open("rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                h.update(chunk)
        _digest_cache[cache_key] = h.hexdigest()[:16]
    return _digest_cache[cache_key]


_folder_cache: dict[tuple[Any, ...], str] = {}


def folder_fingerprint(folder: str | Path) -> str:
    """Content identity of a folder not made by this project (a model or peft directory): each top-level file's
    name, size and first and last MiB. Cheap on an 8B checkpoint, and it tells checkpoints apart in practice."""
    folder = Path(folder)
    files = sorted(p for p in folder.iterdir() if p.is_file()) if folder.is_dir() else []
    stats = tuple((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in files)
    cache_key = (str(folder.resolve()), stats)
    if cache_key not in _folder_cache:
        h = hashlib.sha256()
        for path, (name, size, _) in zip(files, stats, strict=True):
            h.update(f"{name}\0{size}\0".encode())
            with path.open("rb") as handle:
                h.update(handle.read(1 << 20))
                handle.seek(max(0, size - (1 << 20)))
                h.update(handle.read(1 << 20))
        _folder_cache[cache_key] = h.hexdigest()[:16]
    return _folder_cache[cache_key]


# ------------------------------------------------------------------------------------------ explicit upstream folders
def allow_unfinished(cfg: DictConfig) -> bool:
    return bool(cfg.get("allow_unfinished", False))


def _made_here(cfg: DictConfig, folder: Path) -> bool:
    """A folder this project's stages write (by its name, or by lying under paths.artifacts)."""
    if _ARTIFACT_NAME.match(folder.name) or (folder.name == "last" and _ARTIFACT_NAME.match(folder.parent.name)):
        return True
    root = OmegaConf.select(cfg, "paths.artifacts", default=None)
    if root:
        try:
            folder.resolve().relative_to(Path(str(root)).resolve())
            return True
        except ValueError:
            pass
    return False


def upstream_folder(cfg: DictConfig, option: str, value: Any, external_ok: bool = False) -> tuple[Path, dict[str, Any]]:
    """(folder, key part) of an upstream folder given by path in config option `option`.

    A finished artifact (it has `manifest.json`; for an adapter's `last/` the parent's) enters a key by the
    manifest's hash, so a moved folder keeps its key and a rebuilt one gets a new key. Without a finished
    manifest, a folder of this project is refused (its stage was killed: the content is partial), unless
    `allow_unfinished=true`; with `external_ok`, a folder made elsewhere (a downloaded model, a peft LoRA)
    enters by a fingerprint of its files.
    """
    folder = Path(str(value)).expanduser()
    if not folder.is_dir():
        raise MissingArtifactError(f"{option}={value}: no such folder")
    digest = manifest_digest(folder)
    if digest is not None:
        return folder, {"manifest": digest}
    if folder.name == "last" and manifest_digest(folder.parent) is not None:
        return folder, {"manifest": manifest_digest(folder.parent), "subfolder": "last"}
    if external_ok and not _made_here(cfg, folder):
        return folder, {"fingerprint": folder_fingerprint(folder)}
    if allow_unfinished(cfg):
        return folder, {UNFINISHED: str(folder), "listing": listing_digest(folder)}
    raise UnfinishedArtifactError(
        f"{option}={folder}: the folder has no {MANIFEST}, so the stage that writes it did not finish (it was killed "
        f"or is still running) and its content may be partial. Rerun that stage to finish it, or point {option} at "
        f"a finished artifact; to use it anyway pass allow_unfinished=true (stamped in the manifests and the eval "
        f"report)."
    )


__all__ = ["allow_unfinished", "file_digest", "folder_fingerprint", "upstream_folder"]
