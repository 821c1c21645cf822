"""Prototype banks of the routes (METHOD.md section 6): the router encoder, the configured routes, their banks.

Banks are artifacts like any stage output: ``<router.banks_dir>/<encoder slug>/<route>-<settings hash>/`` holds
``bank.json`` + ``prototypes.safetensors`` and a ``manifest.json`` written last. The encoder slug is derived
from the encoder fingerprint (weights hash included) and the settings hash from the pool's content and the
k-means settings, so a rerun reuses every bank, a changed pool or encoder gets a fresh folder, and adding a
route builds that route's bank only (plug-and-play). Used by ``route.py`` (``routing.run``) and the server.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import DictConfig, OmegaConf

from gag_lightning.artifacts import atomic_write_text, config_hash, read_manifest, write_manifest
from gag_lightning.errors import GAGError, SchemaMismatchError
from gag_lightning.routing.encoder import QueryEncoder
from gag_lightning.routing.metrics import DEFAULT_DATASET_ROUTES
from gag_lightning.routing.presets import expand_router
from gag_lightning.routing.prototypes import BANK_VERSION, JSON_FILE, PrototypeBank, build_prototype_bank
from gag_lightning.routing.router import PrototypeRouter

log = logging.getLogger(__name__)

__all__ = [
    "BankInfo",
    "RouteSpec",
    "build_router",
    "dataset_routes",
    "encoder_slug",
    "ensure_bank",
    "load_router_encoder",
    "pick_device",
    "route_specs",
]

_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


# ------------------------------------------------------------------------------------------------ encoder
def _container(node: Any) -> Any:
    return OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else node


def pick_device(cfg: DictConfig) -> str:
    """The encoder runs where the trainer would: a GPU preset on a machine without CUDA falls back to CPU."""
    import torch

    accelerator = str(OmegaConf.select(cfg, "trainer.accelerator", default="cpu"))
    if accelerator in ("gpu", "cuda", "auto") and torch.cuda.is_available():
        return "cuda"
    if accelerator in ("gpu", "cuda"):
        log.warning(
            "trainer.accelerator=%s but CUDA is not available: the router encoder runs on the CPU",
            accelerator,
        )
    return "cpu"


def load_router_encoder(
    spec: Mapping[str, Any],
    cache_dir: str | Path | None = None,
    device: str | None = None,
    dtype: str = "float32",
) -> QueryEncoder:
    """The query encoder named by ``model.encoders.router`` (``kind``: sentence_transformers | causal_lm)."""
    from gag_lightning.models.loading import resolve_path, torch_dtype
    from gag_lightning.routing.encoder import CausalLMQueryEncoder, SentenceTransformerQueryEncoder

    spec = dict(_container(spec))
    kind = str(spec.get("kind", "sentence_transformers"))
    max_length = spec.get("max_length", 256)
    path = resolve_path(spec, cache_dir)
    if kind in ("sentence_transformers", "sentence_transformer"):
        return SentenceTransformerQueryEncoder(path, max_length=max_length, device=device)
    if kind == "causal_lm":
        return CausalLMQueryEncoder.from_pretrained(
            path, max_length=int(max_length or 256), dtype=torch_dtype(dtype), device=device
        )
    raise GAGError(f"model.encoders.router.kind is '{kind}'; choose sentence_transformers or causal_lm")


def encoder_slug(fingerprint: str) -> str:
    """Folder name for one encoder's banks: readable kind and name plus a hash of the whole fingerprint."""
    fields = dict(part.split("=", 1) for part in fingerprint.split("|") if "=" in part)
    kind = fingerprint.split("|", 1)[0]
    readable = re.sub(r"[^A-Za-z0-9._-]+", "-", f"{kind}-{fields.get('name', 'encoder')}").strip("-.")
    digest = hashlib.sha256(fingerprint.encode()).hexdigest()[:12]
    return f"{readable[:60]}-{digest}"


# --------------------------------------------------------------------------------------------- route specs
@dataclass(frozen=True)
class RouteSpec:
    """One configured route: its offline pool (one JSON-lines file or several, read in turn; or a prebuilt bank)
    and the test datasets it owns."""

    name: str
    pool: tuple[Path, ...] | None
    bank: Path | None
    dataset_names: tuple[str, ...]


def route_specs(router_cfg: Mapping[str, Any], general: str = "general") -> list[RouteSpec]:
    """Parse ``router.domains``; every error names the key to fix."""
    domains = _container(router_cfg.get("domains")) or {}
    if not isinstance(domains, Mapping):
        raise GAGError("router.domains must be a mapping: route key -> {pool, dataset_names}")
    specs: list[RouteSpec] = []
    seen: dict[str, str] = {}
    for key, entry in domains.items():
        if entry is None:
            continue  # router.domains.<key>=null removes a route
        if not isinstance(entry, Mapping):
            raise GAGError(
                f"router.domains.{key} must be a mapping with 'pool' (or 'bank') and 'dataset_names'"
            )
        name = str(entry.get("name") or key)
        if not _SAFE_NAME.match(name):
            raise GAGError(
                f"router.domains.{key}: route name '{name}' must be letters, digits, '.', '_' or '-'"
            )
        if name in seen:
            raise GAGError(f"route '{name}' is configured twice (router.domains.{seen[name]} and .{key})")
        seen[name] = str(key)
        pool, bank = entry.get("pool"), entry.get("bank")
        if not pool and not bank:
            raise GAGError(
                f"router.domains.{key} (route '{name}') has neither 'pool' (a JSON-lines file of "
                f"{{\"question\"}} records) nor 'bank' (a prebuilt bank folder); set one, e.g. "
                f"router.domains.{key}.pool=/path/pool.jsonl, or remove the route with router.domains.{key}=null"
            )
        names = entry.get("dataset_names") or []
        if isinstance(names, str):
            names = [names]
        pools = [pool] if isinstance(pool, str | Path) else list(pool or [])
        specs.append(
            RouteSpec(
                name=name,
                pool=tuple(Path(str(p)) for p in pools) or None,
                bank=Path(str(bank)) if bank else None,
                dataset_names=tuple(str(n) for n in names),
            )
        )
    if general not in seen:
        raise GAGError(
            f"router.domains has no '{general}' route; PPR sends every query that matches no specialist "
            f"domain to it, so configure router.domains.{general}.pool (configured: {sorted(seen)})"
        )
    return specs


def dataset_routes(specs: Sequence[RouteSpec]) -> dict[str, str]:
    """``dataset_name`` -> gold route: the paper's table, overridden by the configured routes."""
    table = dict(DEFAULT_DATASET_ROUTES)
    owner: dict[str, str] = {}
    for spec in specs:
        for ds in spec.dataset_names:
            if ds in owner and owner[ds] != spec.name:
                raise GAGError(f"dataset_name '{ds}' is claimed by routes '{owner[ds]}' and '{spec.name}'")
            owner[ds] = spec.name
            table[ds] = spec.name
    return table


# ---------------------------------------------------------------------------------------------------- banks
@dataclass
class BankInfo:
    """A route's bank and where it came from (``built`` is False when an existing artifact was reused)."""

    bank: PrototypeBank
    folder: Path
    built: bool
    seconds: float


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _foreign_bank_error(
    bank: PrototypeBank, where: Path, encoder: QueryEncoder, fix: str
) -> SchemaMismatchError:
    return SchemaMismatchError(
        f"the prototype bank at {where} (route '{bank.domain}') was built with another encoder:\n"
        f"  bank:    {bank.encoder_fingerprint} (dim {bank.dim})\n"
        f"  this run: {encoder.fingerprint} (dim {encoder.dim})\n"
        f"similarities across encoders are meaningless, so it is refused; {fix}"
    )


def ensure_bank(
    encoder: QueryEncoder,
    spec: RouteSpec,
    banks_root: str | Path,
    k: int = 32,
    n_init: int = 10,
    seed: int = 0,
    max_queries: int | None = 10000,
    batch_size: int = 64,
) -> BankInfo:
    """Load the route's bank for this encoder and settings, building it (and its manifest) when missing."""
    t0 = time.perf_counter()
    if spec.bank is not None:
        bank = PrototypeBank.load(spec.bank)
        if bank.encoder_fingerprint != encoder.fingerprint or bank.dim != encoder.dim:
            raise _foreign_bank_error(
                bank,
                spec.bank,
                encoder,
                "give the route a pool instead (router.domains.<key>.pool=...) so that it is rebuilt with "
                "this encoder, or run with the encoder that made it",
            )
        if bank.domain != spec.name:
            raise GAGError(
                f"the bank at {spec.bank} is for route '{bank.domain}', but it is configured as '{spec.name}'"
            )
        return BankInfo(bank, spec.bank, False, time.perf_counter() - t0)

    assert spec.pool is not None
    for path in spec.pool:
        if not path.is_file():
            raise GAGError(f"router pool of route '{spec.name}' not found: {path}")
    digests = [_file_sha256(p) for p in spec.pool]
    settings = {
        "route": spec.name,
        "pool_sha256": digests[0] if len(digests) == 1 else digests,  # one file: the key banks always had
        "k": int(k),
        "n_init": int(n_init),
        "seed": int(seed),
        "max_queries": None if max_queries is None else int(max_queries),
        "bank_version": BANK_VERSION,
    }
    digest = config_hash(settings)
    slug_dir = Path(banks_root) / encoder_slug(encoder.fingerprint)
    folder = slug_dir / f"{spec.name}-{digest[:10]}"
    manifest = read_manifest(folder)
    if manifest is not None and manifest.get("config_hash") == digest and (folder / JSON_FILE).is_file():
        bank = PrototypeBank.load(folder)
        if bank.encoder_fingerprint != encoder.fingerprint or bank.dim != encoder.dim:
            raise _foreign_bank_error(
                bank,
                folder,
                encoder,
                f"this folder is reserved for this run's encoder: delete {folder} to rebuild it",
            )
        log.info("route '%s': reusing bank %s", spec.name, folder)
        return BankInfo(bank, folder, False, time.perf_counter() - t0)

    from gag_lightning.data.records import read_router_pool

    texts = [q for path in spec.pool for q in read_router_pool(path)]
    pool_size = len(texts)
    if max_queries is not None and pool_size > max_queries:
        # Sample before encoding (same seed as k-means): a 1M-query pool is never embedded in full.
        rng = np.random.default_rng(seed)
        idx = np.sort(rng.choice(pool_size, size=int(max_queries), replace=False))
        texts = [texts[i] for i in idx]
    log.info("route '%s': building its bank from %d of %d pool queries", spec.name, len(texts), pool_size)
    emb = encoder.encode(texts, batch_size=batch_size)
    protos = build_prototype_bank(emb, k=k, n_init=n_init, seed=seed, max_queries=None)
    bank = PrototypeBank(
        domain=spec.name,
        prototypes=protos,
        encoder_fingerprint=encoder.fingerprint,
        dim=int(protos.shape[1]),
        k=int(protos.shape[0]),
        pool_size=pool_size,
        meta={
            "k_requested": k,
            "n_init": n_init,
            "seed": seed,
            "max_queries": max_queries,
            "n_clustered": len(texts),
            "pool": ", ".join(str(p) for p in spec.pool),
            "pool_sha256": settings["pool_sha256"],
        },
    )
    encoder_file = slug_dir / "encoder.json"
    if not encoder_file.is_file():
        atomic_write_text(
            encoder_file, json.dumps({"fingerprint": encoder.fingerprint, "dim": encoder.dim}, indent=2)
        )
    bank.save(folder)
    seconds = time.perf_counter() - t0
    write_manifest(
        folder,
        stage="router_bank",
        config=settings,
        inputs={"pool": [str(p) for p in spec.pool], "encoder_fingerprint": encoder.fingerprint},
        metrics={
            "k": bank.k,
            "pool_size": pool_size,
            "n_clustered": len(texts),
            "build_s": round(seconds, 3),
        },
    )
    return BankInfo(bank, folder, True, seconds)


def build_router(
    cfg: DictConfig, encoder: QueryEncoder, specs: Sequence[RouteSpec] | None = None
) -> tuple[PrototypeRouter, dict[str, BankInfo]]:
    """Every configured route's bank (built if missing) plugged into one router."""
    rc = cfg.router
    specs = route_specs(expand_router(cfg)) if specs is None else specs
    infos = {
        s.name: ensure_bank(
            encoder,
            s,
            rc.banks_dir,
            k=int(rc.k),
            n_init=int(rc.n_init),
            seed=int(rc.seed),
            max_queries=None if rc.max_queries is None else int(rc.max_queries),
            batch_size=int(rc.batch_size),
        )
        for s in specs
    }
    margin = rc.get("margin")
    router = PrototypeRouter.from_banks(
        [i.bank for i in infos.values()], margin=None if margin is None else float(margin)
    )
    return router, infos
