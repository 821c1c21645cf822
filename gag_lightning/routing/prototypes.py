"""Per-domain prototype banks (METHOD.md section 6): k-means centres of a domain's query embeddings.

A bank is the only thing a new domain adds to the router, so it is a small self-describing artifact
(``prototypes.safetensors`` + ``bank.json``) that records which encoder made it; the router refuses banks
from another encoder instead of routing on meaningless similarities.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from gag_lightning.artifacts import atomic_write, atomic_write_text
from gag_lightning.errors import GAGError, MissingArtifactError, SchemaMismatchError

__all__ = ["build_prototype_bank", "PrototypeBank", "BANK_FORMAT", "BANK_VERSION"]

BANK_FORMAT = "gag-lightning/prototype-bank"
BANK_VERSION = 1
TENSORS_FILE = "prototypes.safetensors"
JSON_FILE = "bank.json"


def _as_matrix(embeddings: Tensor | np.ndarray, what: str = "embeddings") -> Tensor:
    t = torch.as_tensor(embeddings)
    if t.ndim != 2:
        raise GAGError(f"{what} must be a 2-D [N, D] tensor, got shape {tuple(t.shape)}")
    t = t.detach().to(device="cpu", dtype=torch.float32)
    if not torch.isfinite(t).all():
        bad = int((~torch.isfinite(t)).any(dim=1).sum())
        raise GAGError(f"{what}: {bad} row(s) contain NaN or inf; check the encoder and its dtype")
    return t


def build_prototype_bank(
    embeddings: Tensor | np.ndarray,
    k: int = 32,
    n_init: int = 10,
    seed: int = 0,
    max_queries: int | None = 10000,
) -> Tensor:
    """k-means centres of (a seeded sample of) a domain's normalised query embeddings, L2-normalised.

    Sampling and k-means both use ``seed`` so a bank is reproducible. ``k`` is capped by the number of
    distinct embeddings: k-means cannot place more distinct centres than there are distinct points.
    """
    from sklearn.cluster import KMeans

    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if n_init < 1:
        raise ValueError(f"n_init must be >= 1, got {n_init}")
    x = _as_matrix(embeddings)
    if x.shape[0] == 0:
        raise GAGError("cannot build a prototype bank from an empty pool of queries")
    x = F.normalize(x, p=2, dim=1)
    if max_queries is not None and x.shape[0] > max_queries:
        if max_queries < 1:
            raise ValueError(f"max_queries must be >= 1 or None, got {max_queries}")
        rng = np.random.default_rng(seed)
        idx = np.sort(rng.choice(x.shape[0], size=max_queries, replace=False))
        x = x[torch.from_numpy(idx)]
    data = x.numpy().astype(np.float64)
    n_unique = int(np.unique(data, axis=0).shape[0])
    n_clusters = min(k, n_unique)
    km = KMeans(n_clusters=n_clusters, n_init=n_init, random_state=seed)
    km.fit(data)
    centres = torch.from_numpy(km.cluster_centers_).to(torch.float32)
    return F.normalize(centres, p=2, dim=1).contiguous()


@dataclass
class PrototypeBank:
    """One domain's prototypes [k, D] and the provenance the router checks before using them.

    ``pool_size`` is the number of queries in the domain's pool; ``meta`` holds build settings
    (seed, n_init, max_queries, n_clustered, source file ...) as strings for the record.
    """

    domain: str
    prototypes: Tensor
    encoder_fingerprint: str
    dim: int
    k: int
    pool_size: int
    meta: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.domain, str) or not self.domain.strip():
            raise GAGError("a prototype bank needs a non-empty domain name")
        p = _as_matrix(self.prototypes, what=f"prototypes of domain '{self.domain}'")
        if p.shape[0] < 1:
            raise GAGError(f"prototype bank '{self.domain}' has no prototypes")
        if p.shape[1] != self.dim or p.shape[0] != self.k:
            raise SchemaMismatchError(
                f"prototype bank '{self.domain}': tensor shape {tuple(p.shape)} does not match "
                f"k={self.k}, dim={self.dim}"
            )
        # Cosine scores assume unit prototypes; re-normalise only when needed so a save/load is exact.
        if not torch.allclose(p.norm(dim=1), torch.ones(p.shape[0]), atol=1e-4):
            p = F.normalize(p, p=2, dim=1)
        self.prototypes = p.contiguous()
        self.dim, self.k, self.pool_size = int(self.dim), int(self.k), int(self.pool_size)
        self.meta = {str(a): str(b) for a, b in self.meta.items()}

    @classmethod
    def from_embeddings(
        cls,
        domain: str,
        embeddings: Tensor | np.ndarray,
        encoder_fingerprint: str,
        k: int = 32,
        n_init: int = 10,
        seed: int = 0,
        max_queries: int | None = 10000,
        meta: dict[str, Any] | None = None,
    ) -> PrototypeBank:
        """Cluster a domain's query embeddings into a bank (the offline half of PPR)."""
        x = _as_matrix(embeddings)
        protos = build_prototype_bank(x, k=k, n_init=n_init, seed=seed, max_queries=max_queries)
        n_clustered = x.shape[0] if max_queries is None else min(x.shape[0], max_queries)
        info = {
            "k_requested": k,
            "n_init": n_init,
            "seed": seed,
            "max_queries": max_queries,
            "n_clustered": n_clustered,
        }
        info.update(meta or {})
        return cls(
            domain=domain,
            prototypes=protos,
            encoder_fingerprint=encoder_fingerprint,
            dim=int(protos.shape[1]),
            k=int(protos.shape[0]),
            pool_size=int(x.shape[0]),
            meta={a: str(b) for a, b in info.items()},
        )

    def header(self) -> dict[str, Any]:
        """The JSON description of the bank (also mirrored in the safetensors metadata)."""
        return {
            "format": BANK_FORMAT,
            "version": BANK_VERSION,
            "domain": self.domain,
            "encoder_fingerprint": self.encoder_fingerprint,
            "dim": self.dim,
            "k": self.k,
            "pool_size": self.pool_size,
            "meta": dict(self.meta),
            "tensors": TENSORS_FILE,
        }

    def save(self, folder: str | os.PathLike[str]) -> Path:
        """Write ``prototypes.safetensors`` then ``bank.json`` (last, so its presence means complete)."""
        from safetensors.torch import save_file

        out = Path(folder)
        out.mkdir(parents=True, exist_ok=True)
        header = self.header()
        st_meta = {
            "format": BANK_FORMAT,
            "version": str(BANK_VERSION),
            "domain": self.domain,
            "encoder_fingerprint": self.encoder_fingerprint,
            "dim": str(self.dim),
            "k": str(self.k),
            "pool_size": str(self.pool_size),
            "meta": json.dumps(self.meta, sort_keys=True),
        }
        tensors = {"prototypes": self.prototypes.to(torch.float32).contiguous()}
        atomic_write(out / TENSORS_FILE, lambda tmp: save_file(tensors, tmp, metadata=st_meta))
        atomic_write_text(out / JSON_FILE, json.dumps(header, indent=2, ensure_ascii=False) + "\n")
        return out

    @classmethod
    def load(cls, folder: str | os.PathLike[str]) -> PrototypeBank:
        """Read a bank written by ``save``; the JSON and the tensor metadata must agree."""
        from safetensors import safe_open

        src = Path(folder)
        jpath, tpath = src / JSON_FILE, src / TENSORS_FILE
        for p in (jpath, tpath):
            if not p.is_file():
                raise MissingArtifactError(
                    f"prototype bank file {p} is missing; build the domain's bank first "
                    f"(the router 'prototypes' step) or point to the right folder"
                )
        try:
            header = json.loads(jpath.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise GAGError(f"{jpath}: not valid JSON ({exc}); rebuild the bank") from exc
        if header.get("format") != BANK_FORMAT:
            raise SchemaMismatchError(
                f"{jpath}: format is {header.get('format')!r}, expected {BANK_FORMAT!r}"
            )
        if int(header.get("version", -1)) > BANK_VERSION:
            raise SchemaMismatchError(
                f"{jpath}: bank version {header.get('version')} is newer than this code ({BANK_VERSION})"
            )
        with safe_open(str(tpath), framework="pt") as fh:
            st_meta = fh.metadata() or {}
            if "prototypes" not in fh.keys():
                raise SchemaMismatchError(f"{tpath}: no 'prototypes' tensor")
            prototypes = fh.get_tensor("prototypes")
        for key in ("domain", "encoder_fingerprint", "dim", "k"):
            if key in st_meta and str(st_meta[key]) != str(header.get(key)):
                raise SchemaMismatchError(
                    f"{src}: {key} is {header.get(key)!r} in {JSON_FILE} but {st_meta[key]!r} in "
                    f"{TENSORS_FILE}; the two files come from different builds"
                )
        missing = [k for k in ("domain", "encoder_fingerprint", "dim", "k", "pool_size") if k not in header]
        if missing:
            raise SchemaMismatchError(f"{jpath}: missing field(s) {missing}")
        return cls(
            domain=header["domain"],
            prototypes=prototypes,
            encoder_fingerprint=header["encoder_fingerprint"],
            dim=int(header["dim"]),
            k=int(header["k"]),
            pool_size=int(header["pool_size"]),
            meta=dict(header.get("meta") or {}),
        )
