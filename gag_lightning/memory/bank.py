"""`MemoryBank`: the memory stage's compressed memories on disk, safetensors shards with JSON-lines metadata.

A folder that several ranks append to and that survives a kill at any instant: `schema.json` (a `MemorySchema`)
first, then `shard-rRRR-NNNNNN.{jsonl,safetensors}`, each shard committed by renaming its safetensors file into
place. Opening it with other settings is refused (`SchemaMismatchError`) instead of silently mixing records, a
defect of the reference release. Nothing is ever pickled. The background store (memory/store.py), the schema
(memory/schema.py) and the shared helpers (memory/files.py) are re-exported here for existing imports.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Mapping
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
from gag_lightning.memory.files import (
    FORMAT_VERSION,
    SCHEMA_FILE,
    STORAGE_DTYPES,
    canonical_json,
    format_diffs,
    json_normalise,
    read_json,
    settings_fingerprint,
)
from gag_lightning.memory.schema import MemorySchema
from gag_lightning.memory.store import BackgroundStore

__all__ = [
    "FORMAT_VERSION",
    "STORAGE_DTYPES",
    "BackgroundStore",
    "MemoryBank",
    "MemorySchema",
    "ShardBuffer",
    "settings_fingerprint",
]

log = logging.getLogger(__name__)

_SHARD_RE = re.compile(r"^shard-r(\d{3,})-(\d{6,})\.(safetensors|jsonl)$")
_SHARD_TMP_RE = re.compile(r"^\.shard-r(\d{3,})-(\d{6,})\.(safetensors|jsonl)\.tmp$")
_SCHEMA_TMP_RE = re.compile(r"^\.schema\.json\.tmp-\d+$")  # artifacts.atomic_write's default temp name


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
            atomic_write_bytes(schema_path, (json.dumps(schema.to_dict(), indent=2) + "\n").encode())
        # read back even after writing: a concurrent rank with other settings may have won the race
        existing = MemorySchema.from_dict(read_json(schema_path), str(schema_path))
        if existing != schema:
            raise SchemaMismatchError(
                f"memory bank at {folder} was built with different settings ("
                + format_diffs(existing.diff(schema), "bank has", "requested")
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
        bank = cls(folder, MemorySchema.from_dict(read_json(schema_path), str(schema_path)))
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
            metadata={"gag_memory_schema": canonical_json(self.schema.to_dict())},
        )
        atomic_write_bytes(jsonl, "".join(lines).encode("utf-8"), tmp=self.folder / f".{stem}.jsonl.tmp")
        atomic_write_bytes(tensors, payload, tmp=self.folder / f".{stem}.safetensors.tmp")  # commit
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
            want = json_normalise(want, name)
            if name == "temperature" and isinstance(want, int | float):
                want = float(want)
            if have[name] != want:
                diffs.append((name, have[name], want))
        if diffs:
            raise SchemaMismatchError(
                f"memory bank at {self.folder} does not match: "
                + format_diffs(diffs, "bank holds", "asked for")
                + "; rebuild it with the memory stage using these settings, or point to a matching bank"
            )

    def __repr__(self) -> str:
        return f"MemoryBank({str(self.folder)!r}, shape={self.schema.shape}, dtype={self.schema.dtype})"


class ShardBuffer:
    """Memories waiting to fill a shard of `bank`: written `shard_size` records at a time as they arrive, the rest
    by `flush` (which a job skips after an error: a resume redoes those records)."""

    def __init__(self, bank: MemoryBank, shard_size: int) -> None:
        self.bank = bank
        self.shard_size = int(shard_size)
        self._metas: list[dict[str, Any]] = []
        self._memories: list[Tensor] = []

    def add(self, metas: list[dict[str, Any]], memories: Tensor) -> None:
        self._metas.extend(metas)
        self._memories.append(memories)
        while len(self._metas) >= self.shard_size:
            self._write(self.shard_size)

    def flush(self) -> None:
        if self._metas:
            self._write(len(self._metas))

    def _write(self, count: int) -> None:
        metas, self._metas = self._metas[:count], self._metas[count:]
        memories = torch.cat(self._memories)
        self._memories = [memories[count:]] if memories.shape[0] > count else []
        self.bank.write_shard(metas, memories[:count])
