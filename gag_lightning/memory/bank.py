"""On-disk stores of the memory stage: generated backgrounds and compressed memories.

Both are folders that several ranks append to and that survive a kill at any instant:

* `BackgroundStore` keeps step 1 of the memory stage (the expert's generated text and token ids) so
  memories can be re-extracted with other slots / pooling / layers without regenerating.
* `MemoryBank` keeps the [K, S, H_e] memories as safetensors shards with JSON-lines metadata.

Each folder starts with a `schema.json` describing the settings it was made with; opening it with
other settings is refused (`SchemaMismatchError`) instead of silently mixing records, a defect of the
reference release. Nothing is ever pickled.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import Tensor

from gag_lightning.artifacts import atomic_write_bytes
from gag_lightning.artifacts import fsync_dir as _fsync_dir
from gag_lightning.errors import GAGError, MissingArtifactError, RecordError, SchemaMismatchError
from gag_lightning.memory.compression import POOLINGS, layer_indices

__all__ = [
    "FORMAT_VERSION",
    "STORAGE_DTYPES",
    "BackgroundStore",
    "MemoryBank",
    "MemorySchema",
    "settings_fingerprint",
]

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
SCHEMA_FILE = "schema.json"
STORAGE_DTYPES: dict[str, torch.dtype] = {
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float32": torch.float32,
}

_SHARD_RE = re.compile(r"^shard-r(\d{3,})-(\d{6,})\.(safetensors|jsonl)$")
_SHARD_TMP_RE = re.compile(r"^\.shard-r(\d{3,})-(\d{6,})\.(safetensors|jsonl)\.tmp$")
_SCHEMA_TMP_RE = re.compile(r"^\.schema\.json\..*\.tmp$")
_BG_RE = re.compile(r"^backgrounds-r(\d{3,})\.jsonl$")


# --------------------------------------------------------------------------- file helpers


def _atomic_write_bytes(path: Path, data: bytes, tmp: Path | None = None) -> None:
    """The one atomic write (`artifacts.atomic_write`), with this store's temp names (debris cleanup knows them)."""
    atomic_write_bytes(path, data, tmp=tmp or path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"))


def _canonical_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def _json_normalise(obj: Any, what: str) -> Any:
    """Round-trip through JSON so tuples/lists and int/float keys compare as they will after a reload."""
    try:
        return json.loads(json.dumps(obj, ensure_ascii=False))
    except (TypeError, ValueError) as exc:
        raise GAGError(f"{what} is not JSON-serialisable: {exc}") from exc


def settings_fingerprint(settings: Any) -> str:
    """Stable sha256 of JSON-serialisable settings; used to tie a memory bank to its backgrounds."""
    return hashlib.sha256(_canonical_json(_json_normalise(settings, "settings")).encode("utf-8")).hexdigest()


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise SchemaMismatchError(f"{path}: not valid JSON ({exc.msg}); the artifact is damaged") from exc


def _format_diffs(diffs: list[tuple[str, Any, Any]], have_label: str, want_label: str) -> str:
    return "; ".join(f"{name}: {have_label} {have!r}, {want_label} {want!r}" for name, have, want in diffs)


# --------------------------------------------------------------------------- schema


@dataclass(kw_only=True)
class MemorySchema:
    """Settings a memory bank was built with; two banks are compatible iff their schemas are equal."""

    format_version: int = FORMAT_VERSION
    expert_fingerprint: str
    layer_keys: list[str]
    slots: int
    hidden_size: int
    pooling: str = "segment_softmax"
    temperature: float = 1.0
    dtype: str = "float16"
    background_fingerprint: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.layer_keys = list(self.layer_keys)
        layer_indices(self.layer_keys)  # raises on unknown keys
        if not isinstance(self.slots, int) or self.slots < 1:
            raise ValueError(f"slots must be a positive integer, got {self.slots!r}")
        if not isinstance(self.hidden_size, int) or self.hidden_size < 1:
            raise ValueError(f"hidden_size must be a positive integer, got {self.hidden_size!r}")
        if self.pooling not in POOLINGS:
            raise ValueError(f"unknown pooling {self.pooling!r}; choose one of {', '.join(POOLINGS)}")
        if self.dtype not in STORAGE_DTYPES:
            raise ValueError(
                f"unknown storage dtype {self.dtype!r}; choose one of {', '.join(STORAGE_DTYPES)}"
            )
        self.temperature = float(self.temperature)
        self.extra = _json_normalise(dict(self.extra), "MemorySchema.extra")

    @property
    def shape(self) -> tuple[int, int, int]:
        """One record's memory shape (K, S, H)."""
        return (len(self.layer_keys), self.slots, self.hidden_size)

    @property
    def torch_dtype(self) -> torch.dtype:
        return STORAGE_DTYPES[self.dtype]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str = "schema") -> MemorySchema:
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise SchemaMismatchError(
                f"{source}: unknown field(s) {unknown}; was it written by a newer gag-lightning?"
            )
        version = data.get("format_version", FORMAT_VERSION)
        if version != FORMAT_VERSION:
            raise SchemaMismatchError(
                f"{source}: format_version {version} is not supported (this code reads {FORMAT_VERSION})"
            )
        try:
            return cls(**dict(data))
        except (TypeError, ValueError) as exc:
            raise SchemaMismatchError(f"{source}: {exc}") from exc

    def diff(self, other: MemorySchema) -> list[tuple[str, Any, Any]]:
        """(field, self value, other value) for every field that differs."""
        mine, theirs = self.to_dict(), other.to_dict()
        return [(name, mine[name], theirs[name]) for name in mine if mine[name] != theirs[name]]


# --------------------------------------------------------------------------- memory bank


def _check_finite(path: Path, memories: Tensor, metas: list[dict[str, Any]]) -> None:
    """Refuse a shard holding NaN/inf memories (a damaged file: the memory stage never writes them), naming the
    shard and the first bad record, so no stage trains or evaluates on them."""
    bad = ~torch.isfinite(memories.reshape(memories.shape[0], -1)).all(dim=1)
    if bool(bad.any()):
        rows = bad.nonzero().flatten().tolist()
        meta = metas[rows[0]]
        raise GAGError(
            f"{path}: record id {meta.get('id')!r} (index {meta.get('index')}, line {rows[0] + 1} of "
            f"{path.with_suffix('.jsonl').name}) holds NaN/inf memory values ({len(rows)} of {len(metas)} records "
            f"of this shard); the bank is damaged: delete {path.parent} and rerun the memory stage"
        )


def _shard_stem(rank: int, seq: int) -> str:
    return f"shard-r{rank:03d}-{seq:06d}"


class MemoryBank:
    """A folder of memory shards: `schema.json` + `shard-rRRR-NNNNNN.{jsonl,safetensors}`.

    The safetensors file is the commit marker of a shard: it is renamed into place only after its
    JSON-lines partner is durable, so a shard without it was interrupted and is discarded on resume.
    One writer per rank; readers merge every rank's shards ordered by record index.
    """

    def __init__(self, folder: Path, schema: MemorySchema, rank: int | None = None) -> None:
        self.folder = folder
        self.schema = schema
        self.rank = rank  # None for a read-only bank
        self._next_seq = 0
        self._known: set[int] = set()
        self._cache: tuple[list[dict[str, Any]], Tensor] | None = None

    # ---------------------------------------------------------------- opening

    @classmethod
    def open_for_writing(cls, folder: str | Path, schema: MemorySchema, rank: int = 0) -> MemoryBank:
        """Create or resume a bank; refuses a folder built with other settings."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        schema_path = folder / SCHEMA_FILE
        if not schema_path.exists():
            if any(_SHARD_RE.match(p.name) for p in folder.iterdir()):
                raise GAGError(
                    f"{folder} holds memory shards but no {SCHEMA_FILE}; it was not written by this "
                    "code or is damaged; use a new output folder"
                )
            _atomic_write_bytes(schema_path, (json.dumps(schema.to_dict(), indent=2) + "\n").encode())
        # read back even after writing: a concurrent rank with other settings may have won the race
        existing = MemorySchema.from_dict(_read_json(schema_path), str(schema_path))
        if existing != schema:
            raise SchemaMismatchError(
                f"memory bank at {folder} was built with different settings ("
                + _format_diffs(existing.diff(schema), "bank has", "requested")
                + "); refusing to mix memories: use a new output folder or delete this bank to rebuild it"
            )
        bank = cls(folder, existing, rank=rank)
        bank._remove_debris(rank)
        bank._known = bank.done_indices()
        own_seqs = []
        for path in bank._committed_shards():
            m = _SHARD_RE.match(path.name)
            if m and int(m.group(1)) == rank:
                own_seqs.append(int(m.group(2)))
        bank._next_seq = max(own_seqs, default=-1) + 1
        return bank

    @classmethod
    def open(cls, folder: str | Path, expect: Mapping[str, Any] | None = None) -> MemoryBank:
        """Open a bank for reading (all ranks merged); `expect` is passed to `check`."""
        folder = Path(folder)
        schema_path = folder / SCHEMA_FILE
        if not schema_path.is_file():
            raise MissingArtifactError(
                f"no memory bank at {folder} ({SCHEMA_FILE} missing); run the memory stage "
                "(stage=memory) first or pass the path of an existing bank"
            )
        bank = cls(folder, MemorySchema.from_dict(_read_json(schema_path), str(schema_path)))
        if expect:
            bank.check(**expect)
        bank._load()
        return bank

    @staticmethod
    def recover(folder: str | Path) -> list[Path]:
        """Delete every rank's interrupted-write debris; call only while no writer is running.

        `open_for_writing` cleans only its own rank's debris, so resuming with fewer ranks than before
        can leave other ranks' leftovers; readers ignore them either way.
        """
        folder = Path(folder)
        return MemoryBank._debris(folder, rank=None, delete=True)

    # ---------------------------------------------------------------- writing

    @staticmethod
    def _debris(folder: Path, rank: int | None, delete: bool) -> list[Path]:
        names = {p.name for p in folder.iterdir()}
        found = []
        for name in sorted(names):
            tmp, shard = _SHARD_TMP_RE.match(name), _SHARD_RE.match(name)
            if tmp:
                owner = int(tmp.group(1))
            elif shard and shard.group(3) == "jsonl" and f"{name[: -len('.jsonl')]}.safetensors" not in names:
                owner = int(shard.group(1))  # metadata written, commit marker never renamed into place
            elif rank is None and _SCHEMA_TMP_RE.match(name):
                owner = None
            else:
                continue
            if rank is None or owner == rank:
                found.append(folder / name)
        if delete:
            for path in found:
                log.warning("removing leftover of an interrupted write: %s", path)
                path.unlink(missing_ok=True)
            if found:
                _fsync_dir(folder)
        return found

    def _remove_debris(self, rank: int) -> None:
        self._debris(self.folder, rank=rank, delete=True)

    def done_indices(self) -> set[int]:
        """Record indices in committed shards of every rank, so a resumed run skips them."""
        done: set[int] = set()
        for path in self._committed_shards():
            try:  # read only the small index tensor, not the memories
                with safe_open(str(path), framework="pt") as handle:
                    done.update(int(i) for i in handle.get_tensor("indices").tolist())
            except Exception as exc:  # safetensors raises its own error types
                raise GAGError(f"{path}: cannot read shard indices ({exc}); the bank is damaged") from exc
        return done

    def write_shard(self, metas: list[dict[str, Any]], memories: Tensor) -> Path:
        """Durably append one shard of records; returns the committed safetensors path.

        Each meta needs an int `index` (the record's position in its source file) and usually carries
        id, question, answer, background and num_generated_tokens.
        """
        if self.rank is None:
            raise GAGError(f"memory bank at {self.folder} was opened read-only; use open_for_writing")
        if not isinstance(memories, Tensor) or memories.dim() != 4:
            shape = tuple(memories.shape) if isinstance(memories, Tensor) else type(memories).__name__
            raise SchemaMismatchError(f"memories must be a tensor [n, K, S, H], got {shape}")
        if tuple(memories.shape[1:]) != self.schema.shape:
            raise SchemaMismatchError(
                f"memories have shape [K, S, H] = {list(memories.shape[1:])} but the bank's schema says "
                f"{list(self.schema.shape)} (layer_keys={self.schema.layer_keys}, slots={self.schema.slots}, "
                f"hidden_size={self.schema.hidden_size})"
            )
        n = memories.shape[0]
        if n == 0 or len(metas) != n:
            raise ValueError(f"write_shard needs >= 1 record and one meta per memory, got {len(metas)} / {n}")
        indices = []
        for k, meta in enumerate(metas):
            index = meta.get("index") if isinstance(meta, Mapping) else None
            if not isinstance(index, int) or isinstance(index, bool) or index < 0:
                raise ValueError(f"meta {k} needs a non-negative int 'index', got {index!r}")
            indices.append(index)
        repeated = sorted(set(indices) & self._known) or sorted(
            i for i in set(indices) if indices.count(i) > 1
        )
        if repeated:
            raise GAGError(
                f"record index(es) {repeated[:10]} already in memory bank {self.folder}; refusing duplicates"
            )
        stored = memories.detach().to("cpu", self.schema.torch_dtype).contiguous()
        if not torch.isfinite(stored).all():
            raise ValueError(
                f"memories contain NaN/inf in storage dtype {self.schema.dtype}; stabilise them first"
            )
        lines = []
        for meta in metas:
            try:
                lines.append(json.dumps(meta, ensure_ascii=False) + "\n")
            except (TypeError, ValueError) as exc:
                raise GAGError(f"metadata of record {meta['index']} is not JSON-serialisable: {exc}") from exc

        stem = _shard_stem(self.rank, self._next_seq)
        jsonl, tensors = self.folder / f"{stem}.jsonl", self.folder / f"{stem}.safetensors"
        payload = st_save(
            {"memories": stored, "indices": torch.tensor(indices, dtype=torch.int64)},
            metadata={"gag_memory_schema": _canonical_json(self.schema.to_dict())},
        )
        _atomic_write_bytes(jsonl, "".join(lines).encode("utf-8"), tmp=self.folder / f".{stem}.jsonl.tmp")
        _atomic_write_bytes(tensors, payload, tmp=self.folder / f".{stem}.safetensors.tmp")  # commit
        self._next_seq += 1
        self._known.update(indices)
        self._cache = None
        return tensors

    # ---------------------------------------------------------------- reading

    def _committed_shards(self) -> list[Path]:
        shards = []
        for path in self.folder.iterdir():
            m = _SHARD_RE.match(path.name)
            if m and m.group(3) == "safetensors":
                shards.append((int(m.group(1)), int(m.group(2)), path))
        return [p for _, _, p in sorted(shards)]

    def _read_shard_tensors(self, path: Path) -> tuple[Tensor, Tensor]:
        try:
            tensors = st_load(path.read_bytes())
        except Exception as exc:  # safetensors raises its own error types
            raise GAGError(f"{path}: cannot read shard ({exc}); the bank is damaged") from exc
        if set(tensors) != {"memories", "indices"}:
            raise GAGError(f"{path}: expected tensors 'memories' and 'indices', found {sorted(tensors)}")
        memories, indices = tensors["memories"], tensors["indices"]
        if tuple(memories.shape[1:]) != self.schema.shape or memories.dtype != self.schema.torch_dtype:
            raise SchemaMismatchError(
                f"{path}: memories {tuple(memories.shape)} {memories.dtype} do not match the bank schema "
                f"[n, {', '.join(map(str, self.schema.shape))}] {self.schema.dtype}"
            )
        if indices.dim() != 1 or indices.shape[0] != memories.shape[0]:
            raise GAGError(f"{path}: {indices.shape} indices for {memories.shape[0]} memories")
        return memories, indices

    def _load(self) -> tuple[list[dict[str, Any]], Tensor]:
        if self._cache is not None:
            return self._cache
        metas: list[dict[str, Any]] = []
        chunks: list[Tensor] = []
        where: dict[int, Path] = {}
        for path in self._committed_shards():
            memories, indices = self._read_shard_tensors(path)
            jsonl = path.with_suffix(".jsonl")
            if not jsonl.is_file():
                raise GAGError(f"{path} has no metadata file {jsonl.name}; the bank is damaged")
            shard_metas = []
            with jsonl.open("r", encoding="utf-8") as handle:
                for lineno, raw in enumerate(handle, start=1):
                    try:
                        meta = json.loads(raw)
                    except json.JSONDecodeError as exc:
                        raise RecordError(jsonl, lineno, None, f"invalid JSON ({exc.msg})") from exc
                    shard_metas.append(meta)
            if len(shard_metas) != len(indices):
                raise GAGError(f"{jsonl}: {len(shard_metas)} metadata lines for {len(indices)} memories")
            for lineno, (meta, index) in enumerate(zip(shard_metas, indices.tolist(), strict=True), start=1):
                if not isinstance(meta, dict) or meta.get("index") != index:
                    raise RecordError(jsonl, lineno, "index", f"does not match the shard's index {index}")
                if index in where:
                    raise GAGError(
                        f"record index {index} appears twice in memory bank {self.folder}: in "
                        f"{where[index].name} and {path.name}; delete one of the shards"
                    )
                where[index] = path
            _check_finite(path, memories, shard_metas)
            metas.extend(shard_metas)
            chunks.append(memories)
        if chunks:
            stacked = torch.cat(chunks)
            order = sorted(range(len(metas)), key=lambda i: metas[i]["index"])
            metas = [metas[i] for i in order]
            stacked = stacked[torch.tensor(order, dtype=torch.int64)]
        else:
            stacked = torch.empty((0, *self.schema.shape), dtype=self.schema.torch_dtype)
        self._cache = (metas, stacked)
        return self._cache

    def __len__(self) -> int:
        return len(self._load()[0])

    def __getitem__(self, position: int) -> tuple[dict[str, Any], Tensor]:
        """(metadata, memory [K, S, H] float32) of the record at `position` in index order."""
        metas, memories = self._load()
        return dict(metas[position]), memories[position].to(torch.float32)

    def memories(self, dtype: torch.dtype | None = torch.float32) -> Tensor:
        """All memories [N, K, S, H] in index order (dtype=None keeps the storage dtype, saving memory)."""
        stored = self._load()[1]
        return stored if dtype is None else stored.to(dtype)

    def metas(self) -> list[dict[str, Any]]:
        return [dict(m) for m in self._load()[0]]

    def indices(self) -> list[int]:
        """Record indices in the order of `metas()` / `memories()`."""
        return [m["index"] for m in self._load()[0]]

    def check(self, **expected: Any) -> None:
        """Refuse a bank whose schema differs from what the caller needs (slots, hidden_size, ...)."""
        have = self.schema.to_dict()
        unknown = sorted(set(expected) - set(have))
        if unknown:
            raise ValueError(f"unknown memory schema field(s) {unknown}; known: {', '.join(have)}")
        diffs = []
        for name, want in expected.items():
            want = _json_normalise(want, name)
            if name == "temperature" and isinstance(want, int | float):
                want = float(want)
            if have[name] != want:
                diffs.append((name, have[name], want))
        if diffs:
            raise SchemaMismatchError(
                f"memory bank at {self.folder} does not match: "
                + _format_diffs(diffs, "bank holds", "asked for")
                + "; rebuild it with the memory stage using these settings, or point to a matching bank"
            )

    def __repr__(self) -> str:
        return f"MemoryBank({str(self.folder)!r}, shape={self.schema.shape}, dtype={self.schema.dtype})"


# --------------------------------------------------------------------------- background store

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
        data = _read_json(path)
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
        settings = _json_normalise(dict(settings), "background settings")
        folder.mkdir(parents=True, exist_ok=True)
        schema_path = folder / SCHEMA_FILE
        if not schema_path.exists():
            if any(_BG_RE.match(p.name) for p in folder.iterdir()):
                raise GAGError(
                    f"{folder} holds background files but no {SCHEMA_FILE}; use a new output folder"
                )
            body = {"format_version": FORMAT_VERSION, "settings": settings}
            _atomic_write_bytes(schema_path, (json.dumps(body, indent=2, ensure_ascii=False) + "\n").encode())
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
                + _format_diffs(diffs, "store has", "requested")
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
            want = _json_normalise(want, key)
            have = self.settings.get(key, "<absent>")
            if have != want:
                diffs.append((key, have, want))
        if diffs:
            raise SchemaMismatchError(
                f"background store at {self.folder} does not match: "
                + _format_diffs(diffs, "store holds", "asked for")
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
