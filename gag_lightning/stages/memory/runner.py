"""The memory stage runner: backgrounds then memory banks for each split, through Lightning's predict loop.

Layout (both folders keyed by the hash of everything that determines them, see `pipeline.keys`):

    <artifacts>/<model>/<domain>/backgrounds-<hash>/<split>/   BackgroundStore (schema.json, backgrounds-rRRR.jsonl)
    <artifacts>/<model>/<domain>/backgrounds-<hash>/manifest.json
    <artifacts>/<model>/<domain>/memory-<hash>/<split>/        MemoryBank (schema.json, shard-rRRR-NNNNNN.*)
    <artifacts>/<model>/<domain>/memory-<hash>/manifest.json

The memory key includes the backgrounds key, so another S / pooling / layer set gets a new memory
folder and reuses the backgrounds (`memory.extract=teacher_forced`: a second, teacher-forced pass over them);
`memory.extract=during_generation` (the cpu preset's default) writes both stores from one decoding pass. Every step runs as a job (`open / run_batch / close`) inside
`trainer.predict`: on one device that is a plain loop; under DDP each rank takes a round-robin share
of the pending records (no padding duplicates), writes its own files, and the readers merge them by
record index. Manifests are written last, by rank 0, after all ranks have finished.
"""

from __future__ import annotations

import logging
import time
import warnings
from pathlib import Path
from typing import Any

import lightning as L
from omegaconf import DictConfig
from torch.utils.data import DataLoader

from gag_lightning.artifacts import MANIFEST, read_manifest, write_manifest
from gag_lightning.data.records import read_qa
from gag_lightning.errors import GAGError, SchemaMismatchError
from gag_lightning.fingerprints import file_digest
from gag_lightning.keys import artifact_dir, container, memory_splits, stage_key
from gag_lightning.memory.background import BackgroundConfig, BackgroundJob, background_settings
from gag_lightning.memory.bank import STORAGE_DTYPES, BackgroundStore, MemoryBank
from gag_lightning.memory.extract import CompressionConfig, MemoryJob
from gag_lightning.memory.files import settings_fingerprint
from gag_lightning.memory.metrics import background_metrics, bank_metrics
from gag_lightning.memory.onepass import EXTRACT_MODES, OnePassJob
from gag_lightning.memory.schema import memory_schema
from gag_lightning.models.loading import fingerprint_dir, load_causal_lm, load_tokenizer
from gag_lightning.prompts import stop_token_ids
from gag_lightning.splits import split_limits
from gag_lightning.stages._common.trainer import trainer_kwargs
from gag_lightning.upstream import memory_expert_path

__all__ = ["JobDataModule", "JobModule", "memory_schema", "run_memory"]

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- Lightning glue


def _first(items: list[Any]) -> Any:
    return items[0]


class JobDataModule(L.LightningDataModule):
    """Plans a job on each rank: every rank reads what is done, then all agree before anyone writes."""

    def __init__(self, job: Any) -> None:
        super().__init__()
        self.job = job
        self.batches: list[list[int]] = []

    def setup(self, stage: str) -> None:
        strategy = self.trainer.strategy
        strategy.barrier("gag-memory-plan")  # the previous job's files are complete on every rank
        self.batches = self.job.open(self.trainer.global_rank, self.trainer.world_size)
        strategy.barrier("gag-memory-planned")  # nobody writes before every rank has planned

    def predict_dataloader(self) -> DataLoader:
        # one item = one planned batch of record indices; the plan already holds this rank's share
        return DataLoader(self.batches, batch_size=1, shuffle=False, num_workers=0, collate_fn=_first)


class JobModule(L.LightningModule):
    """Runs the current job's batches on the expert; nothing is returned, every batch is written by the job."""

    def __init__(self, model: Any) -> None:
        super().__init__()
        self.model = model
        self.job: Any = None

    def predict_step(self, batch: list[int], batch_idx: int) -> None:
        self.job.run_batch(self.model, batch)


class _Runner:
    """One Trainer and one expert for every job of the stage (DDP processes are launched once)."""

    def __init__(self, cfg: DictConfig, expert_path: Path, model_dtype: str) -> None:
        self.cfg = cfg
        self.expert_path = expert_path
        self.model_dtype = model_dtype
        self.trainer: L.Trainer | None = None
        self.module: JobModule | None = None

    @property
    def is_global_zero(self) -> bool:
        return self.trainer is None or self.trainer.is_global_zero

    def barrier(self, name: str) -> None:
        """Hold every rank until rank 0 has written what the next step (or stage) reads."""
        if self.trainer is not None:
            self.trainer.strategy.barrier(name)

    def run(self, job: Any) -> tuple[Any, float]:
        if self.trainer is None:
            kwargs = trainer_kwargs(self.cfg, self.cfg.memory.get("trainer"))
            if _is_sharded(self.cfg):
                log.info("[memory] trainer.strategy -> ddp: each rank holds the whole frozen expert for inference")
                kwargs["strategy"] = "ddp"
            self.trainer = L.Trainer(**kwargs, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                                     enable_model_summary=False, use_distributed_sampler=False,
                                     default_root_dir=str(Path(self.cfg.paths.output_dir) / "memory"))
            model = load_causal_lm(self.expert_path, self.model_dtype)
            model.eval()
            self.module = JobModule(model)
        assert self.module is not None
        self.module.job = job
        start = time.perf_counter()
        try:
            with warnings.catch_warnings():  # every batch is written by the job, so predict returns None on purpose
                warnings.filterwarnings("ignore", message=".*predict returned None.*")
                self.trainer.predict(self.module, datamodule=JobDataModule(job), return_predictions=False)
        except BaseException:
            job.close(flush=False)
            raise
        stats = job.close()
        self.trainer.strategy.barrier("gag-memory-job-done")
        return stats, time.perf_counter() - start


def _is_sharded(cfg: DictConfig) -> bool:
    """A sharded training strategy (FSDP) that the inference-only memory stage replaces by DDP."""
    strategy = cfg.trainer.get("strategy")
    target = strategy.get("_target_", "") if isinstance(strategy, DictConfig) else str(strategy)
    return "fsdp" in target.lower()


# --------------------------------------------------------------------------- inputs


def _split_files(cfg: DictConfig) -> dict[str, Path]:
    """The QA file of every split in `memory_splits(cfg)` (`memory.splits`, or gag's train split + the domain's
    eval splits)."""
    splits = memory_splits(cfg)
    if not splits:
        raise GAGError("memory.splits is empty; name at least one QA split of the domain (train, test, ...), or "
                       "set it to null for gag.train_split + domain.eval_splits")
    files = {}
    for split in splits:
        path = cfg.domain.get(split)
        if path is None:
            raise GAGError(f"the memory stage builds split '{split}' (memory splits {splits}) but domain.{split} is "
                           f"not set; give its QA file with `domain.{split}=/path/file.jsonl` (or "
                           f"`+domain.{split}=...` for a new key)")
        if not Path(str(path)).is_file():
            raise GAGError(f"domain.{split}={path}: no such file")
        files[split] = Path(str(path))
    return files


def _hidden_size(expert_path: Path) -> int:
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(str(expert_path))
    size = getattr(config, "hidden_size", None)
    if size is None and hasattr(config, "get_text_config"):
        size = getattr(config.get_text_config(), "hidden_size", None)
    if size is None:
        raise GAGError(f"{expert_path}/config.json has no hidden_size; cannot size the memory bank")
    return int(size)


def _generation_config(expert_path: Path) -> Any:
    from transformers import GenerationConfig

    try:
        return GenerationConfig.from_pretrained(str(expert_path))
    except OSError:
        return None


# --------------------------------------------------------------------------- metrics


def _flatten(per_split: dict[str, dict[str, Any]], prefix: str = "") -> dict[str, Any]:
    return {f"{prefix}{split}/{k}": v for split, metrics in per_split.items() for k, v in metrics.items()}


# --------------------------------------------------------------------------- the stage


def run_memory(cfg: DictConfig) -> dict[str, Any]:
    """Backgrounds (step 1) and memory banks (step 2) for every split of `memory_splits(cfg)`; resumable,
    skippable."""
    bg_root, mem_root = artifact_dir(cfg, "backgrounds"), artifact_dir(cfg, "memory")
    bg_manifest, mem_manifest = read_manifest(bg_root), read_manifest(mem_root)
    expert_path = memory_expert_path(cfg)
    expert_fp = fingerprint_dir(expert_path)
    for manifest, root in ((bg_manifest, bg_root), (mem_manifest, mem_root)):
        if manifest is not None and manifest["inputs"].get("expert_fingerprint") != expert_fp:
            raise SchemaMismatchError(
                f"{root} was built by another expert ({manifest['inputs'].get('expert_fingerprint')}, now {expert_fp} "
                f"at {expert_path}); delete {root} to rebuild it with the current expert")
    if bg_manifest is not None and mem_manifest is not None:
        log.info("[memory] artifacts already complete for this configuration: %s, %s (skipping)", bg_root, mem_root)
        return {"artifact": str(mem_root), "backgrounds": str(bg_root), "skipped": True,
                **_flatten_prefixed(bg_manifest["metrics"], "backgrounds/"), **mem_manifest["metrics"]}

    files = _split_files(cfg)
    limits = split_limits(cfg, list(files))
    records = {split: read_qa(path)[: limits[split]] for split, path in files.items()}
    tokenizer = load_tokenizer(expert_path)
    stop_ids = stop_token_ids(tokenizer, _generation_config(expert_path))
    generation = container(cfg.memory.generation)
    model_dtype = str(generation.get("model_dtype") or cfg.model.dtype)
    bg_config = BackgroundConfig.from_mapping(generation, seed=int(cfg.seed))
    compression = CompressionConfig.from_mapping(container(cfg.memory.compression))
    if compression.dtype not in STORAGE_DTYPES:
        raise GAGError(f"memory.compression.dtype={compression.dtype}; choose one of {', '.join(STORAGE_DTYPES)}")
    settings = {split: background_settings(bg_config, expert_fp, stop_ids, split=split, data=file_digest(path),
                                           model_dtype=model_dtype)
                for split, path in files.items()}
    progress = bool(cfg.memory.get("progress", True))
    extract = str(cfg.memory.get("extract") or "teacher_forced")
    if extract not in EXTRACT_MODES:
        raise GAGError(f"memory.extract={extract}: choose one of {', '.join(EXTRACT_MODES)}")
    runner = _Runner(cfg, expert_path, model_dtype)
    log.info("[memory] expert %s (%s); backgrounds -> %s; memory -> %s", expert_path, expert_fp, bg_root, mem_root)

    hidden_size = _hidden_size(expert_path)
    batch_size = int(cfg.memory.generation.batch_size)
    bg_metrics: dict[str, dict[str, Any]] = {}
    mem_metrics: dict[str, dict[str, Any]] = {}
    if extract == "during_generation":  # backgrounds and memories out of one decoding pass (memory/onepass.py)
        for split in files:
            schema = memory_schema(expert_fp, hidden_size, compression, settings_fingerprint(settings[split]))
            job = OnePassJob(tokenizer, records[split], bg_root / split, settings[split], bg_config, stop_ids,
                             mem_root / split, schema, compression, batch_size=batch_size,
                             shard_size=int(cfg.memory.compression.shard_size), progress=progress,
                             desc=f"memories[{split}]")
            _, seconds = runner.run(job)
            if runner.is_global_zero:
                store = BackgroundStore.open(bg_root / split, expect=settings[split])
                bg_metrics[split] = background_metrics(store, records[split], job.bg_done_at_open, seconds)
                wanted = {r.index for r in records[split]}
                backgrounds = [b for b in store.read_all() if b["index"] in wanted]
                mem_metrics[split] = bank_metrics(MemoryBank.open(mem_root / split), records[split],
                                                  job.done_at_open, seconds, backgrounds)
                log.info("[memory] memories[%s] (one pass): %s", split, _fmt(mem_metrics[split]))
    elif bg_manifest is None:  # step 1 of teacher_forced: backgrounds
        for split in files:
            job = BackgroundJob(tokenizer, records[split], bg_root / split, settings[split], bg_config, stop_ids,
                                batch_size=batch_size, progress=progress, desc=f"backgrounds[{split}]")
            _, seconds = runner.run(job)
            if runner.is_global_zero:
                store = BackgroundStore.open(bg_root / split, expect=settings[split])
                bg_metrics[split] = background_metrics(store, records[split], job.done_at_open, seconds)
                log.info("[memory] backgrounds[%s]: %s", split, _fmt(bg_metrics[split]))
    if bg_manifest is None:
        if runner.is_global_zero:
            write_manifest(bg_root, "backgrounds", config=stage_key(cfg, "backgrounds"),
                           inputs=_inputs(expert_path, expert_fp, files), metrics=_flatten(bg_metrics),
                           extra={"settings": settings, "run_dir": str(cfg.paths.output_dir)})
        runner.barrier("backgrounds-manifest")
        bg_flat = _flatten(bg_metrics)
    else:
        log.info("[memory] backgrounds already complete: %s (reusing)", bg_root)
        for split in files:
            BackgroundStore.open(bg_root / split, expect=settings[split])
        bg_flat = dict(bg_manifest["metrics"])

    if extract == "teacher_forced":  # step 2: a teacher-forced pass over the stored backgrounds
        for split in files:
            store = BackgroundStore.open(bg_root / split, expect=settings[split])
            wanted = {r.index for r in records[split]}
            backgrounds = [b for b in store.read_all() if b["index"] in wanted]
            schema = memory_schema(expert_fp, hidden_size, compression, store.fingerprint)
            job = MemoryJob(backgrounds, mem_root / split, schema, compression,
                            batch_size=int(cfg.memory.compression.batch_size),
                            shard_size=int(cfg.memory.compression.shard_size),
                            progress=progress, desc=f"memories[{split}]")
            _, seconds = runner.run(job)
            if runner.is_global_zero:
                bank = MemoryBank.open(mem_root / split)
                mem_metrics[split] = bank_metrics(bank, records[split], job.done_at_open, seconds, backgrounds)
                log.info("[memory] memories[%s]: %s", split, _fmt(mem_metrics[split]))
    metrics = _flatten(mem_metrics)
    if runner.is_global_zero:
        write_manifest(mem_root, "memory", config=stage_key(cfg, "memory"),
                       inputs={**_inputs(expert_path, expert_fp, files), "backgrounds": str(bg_root)},
                       metrics=metrics,
                       extra={"schema": {s: MemoryBank.open(mem_root / s).schema.to_dict() for s in files},
                              "splits": list(files), "run_dir": str(cfg.paths.output_dir), "extract": extract})
        log.info("[memory] done: %s (%s written last)", mem_root, MANIFEST)
    runner.barrier("memory-manifest")
    return {"artifact": str(mem_root), "backgrounds": str(bg_root), **_flatten_prefixed(bg_flat, "backgrounds/"),
            **metrics}


def _flatten_prefixed(metrics: dict[str, Any], prefix: str) -> dict[str, Any]:
    return {f"{prefix}{k}": v for k, v in metrics.items()}


def _inputs(expert_path: Path, expert_fp: str, files: dict[str, Path]) -> dict[str, Any]:
    return {"expert": str(expert_path), "expert_fingerprint": expert_fp,
            "data": {split: {"path": str(path), "sha256_16": file_digest(path)} for split, path in files.items()}}


def _fmt(metrics: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items())
