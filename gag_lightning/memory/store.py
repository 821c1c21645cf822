"""`BackgroundStore`: step 1 of the memory stage on disk, the expert's generated backgrounds.

Kept so memories can be re-extracted with other slots / pooling / layers without regenerating. One append-only
JSON-lines file per rank after a `schema.json` of the generation settings; a folder made with other settings is
refused (`SchemaMismatchError`) instead of silently mixing records, a defect of the reference release, and a
record cut by a kill mid-append is repaired on resume. Nothing is ever pickled.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from gag_lightning.artifacts import atomic_write_bytes
from gag_lightning.errors import GAGError, MissingArtifactError, RecordError, SchemaMismatchError
from gag_lightning.memory.files import (
    FORMAT_VERSION,
    SCHEMA_FILE,
    format_diffs,
    json_normalise,
    read_json,
    settings_fingerprint,
)

__all__ = ["BackgroundStore"]

log = logging.getLogger(__name__)

_BG_RE = re.compile(r"^backgrounds-r(\d{3,})\.jsonl$")


_BG_FIELDS: dict[str, type | tuple[type, ...]] = {
    "index": int,
    "question": str,
    "answer": str,
    "background": str,
    "token_ids": list,
    "finished": bool,
}


def _validate_background(record: Any, path: Path | str, lineno: int | None) -> dict[str, Any]:
    if not isinstance(record, dict):
        raise RecordError(path, lineno, None, f"expected a JSON object, got {type(record).__name__}")
    if "id" not in record:
        raise RecordError(path, lineno, "id", "missing required field")
    for name, kind in _BG_FIELDS.items():
        if name not in record:
            raise RecordError(path, lineno, name, "missing required field")
        value = record[name]
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise RecordError(path, lineno, name, f"expected {kind.__name__}, got {type(value).__name__}")
    if record["index"] < 0:
        raise RecordError(path, lineno, "index", "must be >= 0")
    if not all(isinstance(t, int) and not isinstance(t, bool) for t in record["token_ids"]):
        raise RecordError(path, lineno, "token_ids", "expected a list of ints")
    return record


def _rfind_newline(handle: Any, end: int, chunk: int = 1 << 16) -> int:
    """Offset of the last b'\\n' before `end`, or -1; reads backwards so big files stay cheap."""
    pos = end
    while pos > 0:
        start = max(0, pos - chunk)
        handle.seek(start)
        found = handle.read(pos - start).rfind(b"\n")
        if found >= 0:
            return start + found
        pos = start
    return -1


def _repair_jsonl_tail(path: Path) -> int:
    """Cut a line left incomplete (or unparsable) by a kill mid-append; returns the bytes removed."""
    size = path.stat().st_size
    keep = size
    with open(path, "r+b") as handle:
        while keep > 0:
            last_nl = _rfind_newline(handle, keep)
            if last_nl + 1 != keep:  # bytes after the last newline: an unfinished line
                keep = last_nl + 1
                continue
            start = _rfind_newline(handle, last_nl) + 1
            handle.seek(start)
            line = handle.read(last_nl - start)
            try:
                if not line.strip() or isinstance(json.loads(line), dict):
                    break
            except (json.JSONDecodeError, UnicodeDecodeError):
                pass
            keep = start
        if keep != size:
            handle.truncate(keep)
            handle.flush()
            os.fsync(handle.fileno())
    if keep != size:
        log.warning("%s: cut %d bytes of a record truncated by an interrupted write", path, size - keep)
    return size - keep


def _iter_background_file(path: Path) -> Iterable[tuple[int, dict[str, Any]]]:
    """Complete, validated records; an unfinished last line (a writer mid-append, or a kill) is skipped."""
    with path.open("rb") as handle:
        for lineno, raw in enumerate(handle, start=1):
            if not raw.endswith(b"\n"):
                log.warning("%s: ignoring unfinished last line %d", path, lineno)
                break
            if not raw.strip():
                continue
            try:
                record = json.loads(raw)
            except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                raise RecordError(path, lineno, None, f"invalid JSON ({exc})") from exc
            yield lineno, _validate_background(record, path, lineno)


class BackgroundStore:
    """Generated backgrounds (step 1 of the memory stage), one append-only JSON-lines file per rank.

    `schema.json` holds the caller's generation settings (expert fingerprint, prompts, max_new_tokens,
    decoding); resuming with other settings is refused. `token_ids` exclude the stopping eos, so a
    teacher-forced pass over them reproduces exactly the hidden states the memory is built from.
    """

    def __init__(self, folder: Path, settings: dict[str, Any], rank: int | None = None) -> None:
        self.folder = folder
        self.settings = settings
        self.rank = rank
        self._known: set[int] = set()

    @property
    def fingerprint(self) -> str:
        """Identifies these backgrounds; store it as `MemorySchema.background_fingerprint`."""
        return settings_fingerprint(self.settings)

    @property
    def path(self) -> Path:
        if self.rank is None:
            raise GAGError("a read-only BackgroundStore has no file of its own")
        return self.folder / f"backgrounds-r{self.rank:03d}.jsonl"

    @staticmethod
    def _read_settings(folder: Path) -> dict[str, Any]:
        path = folder / SCHEMA_FILE
        data = read_json(path)
        if (
            not isinstance(data, dict)
            or set(data) != {"format_version", "settings"}
            or not isinstance(data["settings"], dict)
        ):
            raise SchemaMismatchError(f"{path}: not a background-store schema")
        if data["format_version"] != FORMAT_VERSION:
            raise SchemaMismatchError(f"{path}: format_version {data['format_version']} is not supported")
        return data["settings"]

    @classmethod
    def open_for_writing(
        cls, folder: str | Path, settings: Mapping[str, Any], rank: int = 0
    ) -> BackgroundStore:
        """Create or resume; a different settings dict is refused, a truncated last record is cut."""
        folder = Path(folder)
        settings = json_normalise(dict(settings), "background settings")
        folder.mkdir(parents=True, exist_ok=True)
        schema_path = folder / SCHEMA_FILE
        if not schema_path.exists():
            if any(_BG_RE.match(p.name) for p in folder.iterdir()):
                raise GAGError(
                    f"{folder} holds background files but no {SCHEMA_FILE}; use a new output folder"
                )
            body = {"format_version": FORMAT_VERSION, "settings": settings}
            atomic_write_bytes(schema_path, (json.dumps(body, indent=2, ensure_ascii=False) + "\n").encode())
        existing = cls._read_settings(folder)
        if existing != settings:
            keys = sorted(set(existing) | set(settings), key=str)
            diffs = [
                (k, existing.get(k, "<absent>"), settings.get(k, "<absent>"))
                for k in keys
                if existing.get(k, "<absent>") != settings.get(k, "<absent>")
            ]
            raise SchemaMismatchError(
                f"background store at {folder} was generated with different settings ("
                + format_diffs(diffs, "store has", "requested")
                + "); refusing to mix records: use a new output folder or delete this one to regenerate"
            )
        store = cls(folder, existing, rank=rank)
        if store.path.exists():
            _repair_jsonl_tail(store.path)
        store._known = store.done_indices()
        return store

    @classmethod
    def open(cls, folder: str | Path, expect: Mapping[str, Any] | None = None) -> BackgroundStore:
        """Open for reading; `expect` keys are compared with the stored settings."""
        folder = Path(folder)
        if not (folder / SCHEMA_FILE).is_file():
            raise MissingArtifactError(
                f"no background store at {folder} ({SCHEMA_FILE} missing); run the memory stage "
                "(stage=memory) first or pass the path of an existing store"
            )
        store = cls(folder, cls._read_settings(folder))
        if expect:
            store.check(**expect)
        return store

    def check(self, **expected: Any) -> None:
        """Refuse backgrounds generated with settings other than those the caller needs."""
        diffs = []
        for key, want in expected.items():
            want = json_normalise(want, key)
            have = self.settings.get(key, "<absent>")
            if have != want:
                diffs.append((key, have, want))
        if diffs:
            raise SchemaMismatchError(
                f"background store at {self.folder} does not match: "
                + format_diffs(diffs, "store holds", "asked for")
                + "; regenerate with these settings or point to a matching store"
            )

    def _files(self) -> list[Path]:
        return sorted(p for p in self.folder.iterdir() if _BG_RE.match(p.name))

    def done_indices(self) -> set[int]:
        """Indices already generated by any rank, so a resumed run skips them."""
        return {rec["index"] for path in self._files() for _, rec in _iter_background_file(path)}

    def append(self, records: list[dict[str, Any]]) -> None:
        """Append one batch durably (flush + fsync) so a kill loses at most the batch being written."""
        if self.rank is None:
            raise GAGError(f"background store at {self.folder} was opened read-only; use open_for_writing")
        batch: set[int] = set()
        lines = []
        for k, record in enumerate(records):
            _validate_background(record, f"<append to {self.path}>", k + 1)
            index = record["index"]
            if index in self._known or index in batch:
                raise GAGError(f"record index {index} is already in background store {self.folder}")
            batch.add(index)
            try:
                lines.append(json.dumps(record, ensure_ascii=False) + "\n")
            except (TypeError, ValueError) as exc:
                raise GAGError(f"record {index} is not JSON-serialisable: {exc}") from exc
        if not lines:
            return
        with open(self.path, "ab") as handle:
            handle.write("".join(lines).encode("utf-8"))
            handle.flush()
            os.fsync(handle.fileno())
        self._known |= batch

    def read_all(self) -> list[dict[str, Any]]:
        """Every rank's records ordered by index; an index present twice is an error, not a choice."""
        seen: dict[int, str] = {}
        records = []
        for path in self._files():
            for lineno, rec in _iter_background_file(path):
                where = f"{path.name}:{lineno}"
                if rec["index"] in seen:
                    raise GAGError(
                        f"record index {rec['index']} appears twice in background store {self.folder} "
                        f"({seen[rec['index']]} and {where})"
                    )
                seen[rec["index"]] = where
                records.append(rec)
        return sorted(records, key=lambda r: r["index"])

    def __len__(self) -> int:
        return len(self.done_indices())

    def __repr__(self) -> str:
        return f"BackgroundStore({str(self.folder)!r}, fingerprint={self.fingerprint[:12]})"
