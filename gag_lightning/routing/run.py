"""What ``route.py`` runs: build missing prototype banks, then evaluate routing, route ad-hoc queries or answer.

Banks are artifacts like any stage output: ``<router.banks_dir>/<encoder slug>/<route>-<settings hash>/`` holds
``bank.json`` + ``prototypes.safetensors`` and a ``manifest.json`` written last. The encoder slug is derived
from the encoder fingerprint (weights hash included) and the settings hash from the pool's content and the
k-means settings, so a rerun reuses every bank, a changed pool or encoder gets a fresh folder, and adding a
route builds that route's bank only (METHOD.md section 6: plug-and-play).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import re
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import DictConfig, OmegaConf

from gag_lightning.artifacts import atomic_write_text, config_hash, read_manifest, write_manifest
from gag_lightning.errors import GAGError, RecordError, SchemaMismatchError
from gag_lightning.routing.encoder import QueryEncoder
from gag_lightning.routing.metrics import DEFAULT_DATASET_ROUTES, gold_routes, plot_confusion, routing_report
from gag_lightning.routing.profiles import expand_router
from gag_lightning.routing.prototypes import BANK_VERSION, JSON_FILE, PrototypeBank, build_prototype_bank
from gag_lightning.routing.router import PrototypeRouter, RouteDecision

log = logging.getLogger(__name__)

__all__ = [
    "RouteSpec",
    "BankInfo",
    "load_router_encoder",
    "encoder_slug",
    "route_specs",
    "dataset_routes",
    "ensure_bank",
    "build_router",
    "evaluate_routing",
    "answering_available",
    "answer_metrics",
    "run",
]

REPORT_FILE = "routing_report.json"
CONFUSION_FILE = "confusion.png"
ROUTES_FILE = "routes.jsonl"
ANSWER_MODULE = "gag_lightning.routing.answer"
ANSWER_METRICS_FILE = "metrics.json"  # written by routed answering (answer.score_systems) into the output dir
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


# ------------------------------------------------------------------------------------------------- printing
def _console():  # type: ignore[no-untyped-def]
    from rich.console import Console

    return Console()


def _fmt(x: float | None, spec: str = ".4f") -> str:
    return "-" if x is None else format(x, spec)


def print_banks(infos: Mapping[str, BankInfo], encoder: QueryEncoder) -> None:
    from rich.table import Table

    table = Table(title=f"prototype banks ({encoder.fingerprint})")
    for col in ("route", "k", "pool", "status", "folder"):
        table.add_column(col)
    for name, info in infos.items():
        status = f"built {info.seconds:.1f}s" if info.built else "reused"
        table.add_row(name, str(info.bank.k), str(info.bank.pool_size), status, str(info.folder))
    _console().print(table)


def print_report(report: Mapping[str, Any]) -> None:
    from rich.table import Table

    console = _console()
    table = Table(title="per-route accuracy (recall over gold route)")
    for col in ("route", "gold", "pred", "correct", "accuracy", "precision"):
        table.add_column(col, justify="right" if col != "route" else "left")
    for name, row in report["per_route"].items():
        table.add_row(
            name,
            str(row["gold"]),
            str(row["pred"]),
            str(row["correct"]),
            _fmt(row["accuracy"]),
            _fmt(row["precision"]),
        )
    console.print(table)
    labels, matrix = report["confusion"]["labels"], report["confusion"]["matrix"]
    conf = Table(title="confusion matrix (rows gold, columns predicted)")
    conf.add_column("gold \\ pred")
    for label in labels:
        conf.add_column(label, justify="right")
    for label, row in zip(labels, matrix, strict=True):
        conf.add_row(
            label, *(f"[bold]{v}[/bold]" if i == labels.index(label) else str(v) for i, v in enumerate(row))
        )
    console.print(conf)
    console.print(
        f"routing micro accuracy [bold]{_fmt(report['micro_accuracy'])}[/bold] "
        f"({report['correct']}/{report['n']}), macro {_fmt(report['macro_accuracy'])}; "
        f"{report['queries_per_s']:.1f} queries/s (batch {report['batch_size']}, encode + route, "
        f"{report['route_seconds']:.2f}s for {report['n']} queries)"
    )


def print_decisions(questions: Sequence[str], decisions: Sequence[RouteDecision]) -> None:
    from rich.table import Table

    domains = list(decisions[0].scores) if decisions else []
    table = Table(title="routes (score = max cosine to the route's prototypes)")
    table.add_column("query")
    table.add_column("route")
    for d in domains:
        table.add_column(d, justify="right")
    table.add_column("margin", justify="right")
    for q, dec in zip(questions, decisions, strict=True):
        route = dec.domain + (f" (fallback from {dec.best})" if dec.fell_back else "")
        table.add_row(q, route, *(f"{dec.scores[d]:.4f}" for d in domains), _fmt(dec.margin))
    _console().print(table)


# ----------------------------------------------------------------------------------------------------- modes
def evaluate_routing(
    cfg: DictConfig,
    encoder: QueryEncoder,
    router: PrototypeRouter,
    specs: Sequence[RouteSpec],
    out_dir: str | Path,
    bank_folders: Mapping[str, str] | None = None,
) -> tuple[dict[str, Any], list[Any], list[RouteDecision]]:
    """Route the mixed online test set; write the report JSON, the confusion PNG and routes.jsonl."""
    from gag_lightning.data.records import read_mixed

    rc = cfg.router
    if not rc.get("test_set"):
        raise GAGError("router.test_set is not set: point it at the mixed online test set (JSON lines)")
    records = read_mixed(str(rc.test_set))
    names = [r.dataset_name for r in records]
    table = dataset_routes(specs)
    for rec in records:  # the file's 1-based line, not the record's position
        if rec.dataset_name not in table:
            raise RecordError(
                str(rc.test_set), rec.line, "dataset_name",
                f"{rec.dataset_name!r} has no gold route (known: {sorted(table)}). Add the dataset to its route's "
                f"router.domains.<key>.dataset_names (or add the route: +router.domains.<key>={{pool: ..., "
                f"dataset_names: [...]}})",
            )
    gold = gold_routes(names, table)
    missing = Counter(g for g in gold if g not in router)
    for route, n in missing.items():
        log.warning(
            "%d test queries have gold route '%s', which has no bank here: they count as misrouted", n, route
        )
    questions = [r.question for r in records]
    batch_size = int(rc.batch_size)
    t0 = time.perf_counter()
    decisions = router.route_texts(encoder, questions, batch_size=batch_size)
    seconds = time.perf_counter() - t0
    pred = [d.domain for d in decisions]
    report = routing_report(pred, gold, router.domains)
    per_dataset: dict[str, dict[str, Any]] = {}
    for name, g, p in zip(names, gold, pred, strict=True):
        row = per_dataset.setdefault(name, {"gold": g, "n": 0, "correct": 0})
        row["n"] += 1
        row["correct"] += int(g == p)
    for row in per_dataset.values():
        row["accuracy"] = row["correct"] / row["n"]
    report.update(
        {
            "per_dataset": per_dataset,
            "fell_back": sum(d.fell_back for d in decisions),
            "queries_per_s": len(questions) / seconds if seconds > 0 else float("inf"),
            "route_seconds": seconds,
            "batch_size": batch_size,
            "margin": router.margin,
            "test_set": str(rc.test_set),
            "encoder_fingerprint": encoder.fingerprint,
            "banks": {
                d: {
                    "k": router.banks[d].k,
                    "pool_size": router.banks[d].pool_size,
                    "folder": (bank_folders or {}).get(d),
                }
                for d in router.domains
            },
        }
    )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    lines = []
    for rec, g, dec in zip(records, gold, decisions, strict=True):
        lines.append(
            json.dumps(
                {
                    "index": rec.index,
                    "question": rec.question,
                    "dataset_name": rec.dataset_name,
                    "gold": g,
                    "pred": dec.domain,
                    "best": dec.best,
                    "fell_back": dec.fell_back,
                    "scores": {k: round(v, 6) for k, v in dec.scores.items()},
                },
                ensure_ascii=False,
            )
        )
    atomic_write_text(out / ROUTES_FILE, "\n".join(lines) + "\n")
    plot_confusion(report, out / CONFUSION_FILE)
    atomic_write_text(out / REPORT_FILE, json.dumps(report, indent=2, ensure_ascii=False))
    return report, records, decisions


def answering_available() -> bool:
    """Routed answering (``gag_lightning.routing.answer``) is part of this build."""
    return importlib.util.find_spec(ANSWER_MODULE) is not None


def _queries(cfg: DictConfig) -> list[str]:
    query = _container(cfg.get("query"))
    if isinstance(query, str):
        query = [query]
    if not query or not all(isinstance(q, str) and q.strip() for q in query):
        raise GAGError(
            'mode=query needs a non-empty query, e.g. python route.py mode=query query="What is ...?"'
        )
    return list(query)


def run(cfg: DictConfig) -> dict[str, Any]:
    """Dispatch on ``cfg.mode``; returns the figures (micro_accuracy, queries_per_s, routes ...)."""
    mode = str(cfg.get("mode", "eval"))
    if mode not in ("eval", "query", "answer"):
        raise GAGError(f"mode is '{mode}'; choose eval, query or answer")
    questions = _queries(cfg) if mode == "query" else []
    rc = cfg.router
    specs = route_specs(expand_router(cfg))
    t0 = time.perf_counter()
    encoder = load_router_encoder(
        cfg.model.encoders.router,
        cfg.paths.cache_dir,
        device=pick_device(cfg),
        dtype=str(rc.get("dtype") or "float32"),
    )
    load_s = time.perf_counter() - t0
    log.info("router encoder %s loaded in %.1fs", encoder.fingerprint, load_s)
    router, infos = build_router(cfg, encoder, specs)
    print_banks(infos, encoder)
    result: dict[str, Any] = {
        "mode": mode,
        "encoder_fingerprint": encoder.fingerprint,
        "encoder_load_s": load_s,
        "banks": {n: {"folder": str(i.folder), "built": i.built, "k": i.bank.k} for n, i in infos.items()},
    }
    out_dir = Path(cfg.paths.output_dir)
    if mode == "query":
        decisions = router.route_texts(encoder, questions, batch_size=int(rc.batch_size))
        print_decisions(questions, decisions)
        result["routes"] = [
            {"query": q, "route": d.domain, "scores": d.scores, "fell_back": d.fell_back}
            for q, d in zip(questions, decisions, strict=True)
        ]
        from gag_lightning.routing.answer import answer_routed

        answers = answer_routed(cfg, questions, [d.domain for d in decisions])
        result["answers"] = answers
        for q, d, a in zip(questions, decisions, answers, strict=True):
            _console().print(f"[bold]{d.domain}[/bold] | {q}\n  -> {a}")
        return result

    folders = {n: str(i.folder) for n, i in infos.items()}
    report, records, decisions = evaluate_routing(cfg, encoder, router, specs, out_dir, folders)
    print_report(report)
    log.info("routing report: %s", out_dir / REPORT_FILE)
    result.update(
        {k: report[k] for k in ("micro_accuracy", "macro_accuracy", "per_route_accuracy", "queries_per_s")}
    )
    result["report"] = str(out_dir / REPORT_FILE)
    if mode == "answer":
        from gag_lightning.routing.answer import ANSWER_REPORT, answer_mixed

        gold = gold_routes([r.dataset_name for r in records], dataset_routes(specs))
        answer_report, answers = answer_mixed(cfg, records, [d.domain for d in decisions], gold, out_dir)
        result["answer_metrics"] = answer_metrics(out_dir / ANSWER_METRICS_FILE)
        result["answer_report"] = str(out_dir / ANSWER_REPORT)
        result["answers"] = answers["routed"]
        result["memory"] = answer_report["memory"]
        result["routed_minus_oracle_fact_acc"] = answer_report["routed_minus_oracle_fact_acc"]
    return result


def answer_metrics(path: Path, system: str = "routed") -> dict[str, dict[str, Any]]:
    """Per-dataset answer quality of one system (routed, oracle, base) from the answering's metrics.json:
    fact_acc (n/a = None for sets without gold aliases) with its CI beside EM and BERTScore F1 / STS; {} when
    answering wrote none."""
    if not path.is_file():
        return {}
    routed = (json.loads(path.read_text(encoding="utf-8")).get("systems") or {}).get(system) or {}
    keys = ("n", "fact_acc", "fact_acc_ci", "em", "bertscore_f1", "sts")
    out = {name: {k: stats.get(k) for k in keys} for name, stats in (routed.get("groups") or {}).items()}
    if routed:
        out["all"] = {k: routed.get(k) for k in keys}
    return out
