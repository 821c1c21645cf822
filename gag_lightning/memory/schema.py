"""The settings a memory bank is built with (`MemorySchema`), and how the memory stage fills them in.

Two banks are compatible iff their schemas are equal; a bank refuses records made with another schema.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import torch

from gag_lightning.errors import SchemaMismatchError
from gag_lightning.memory.compression import POOLINGS, layer_indices
from gag_lightning.memory.files import FORMAT_VERSION, STORAGE_DTYPES, json_normalise

__all__ = ["MemorySchema", "memory_schema"]


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
        self.extra = json_normalise(dict(self.extra), "MemorySchema.extra")

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



def memory_schema(expert_fingerprint: str, hidden_size: int, compression: Any,
                  background_fingerprint: str) -> MemorySchema:
    """The schema of a bank of `compression` (a `CompressionConfig`) memories of the expert's backgrounds."""
    return MemorySchema(expert_fingerprint=expert_fingerprint, layer_keys=list(compression.layer_keys),
                        slots=int(compression.slots), hidden_size=hidden_size, pooling=compression.pooling,
                        temperature=float(compression.temperature), dtype=compression.dtype,
                        background_fingerprint=background_fingerprint)
