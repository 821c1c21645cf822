"""Stage III runner: memory bank + frozen base -> injection adapter (METHOD.md section 4).

The artifact is the adapter alone (a few MB of safetensors + JSON naming the base, the memory schema, the
slot placeholder and the selection split) in ``artifact_dir(cfg, "gag")``; the base is never copied, and never
changed: no token is added to its tokenizer, no row to its embeddings (``load_base``).

``gag.val_source=test`` (choose the adapter by its loss on the test split) is refused unless
``gag.allow_test_selection=true``; then the adapter config records it and every eval report says so.

Recipe switches (METHOD.md section 5b, off by default): ``gag.loss_weights.kl`` > 0 adds KL self-distillation
from the base reading the background as text (``gag.kl_temperature``); ``gag.recon_steps`` > 0 runs that many
optimizer steps of reconstruction warm-up as a first fit (own optimizer and schedule: same lr and warmup
ratio, linear decay over the recon steps) before the QA fit, whose schedule covers ``gag.max_steps`` as
configured.
"""

from __future__ import annotations

import logging
import shutil
import warnings
from pathlib import Path
from typing import Any

import lightning as L
from hydra.utils import instantiate
from omegaconf import DictConfig

from gag_lightning.artifacts import MANIFEST, read_manifest, write_manifest
from gag_lightning.callbacks import checkpoint_step
from gag_lightning.errors import GAGError, SchemaMismatchError
from gag_lightning.keys import artifact_dir, container, stage_key, upstream_folder
from gag_lightning.models.adapter import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    AdapterConfig,
    GAGAdapter,
)
from gag_lightning.models.adapter_io import load_adapter, save_adapter
from gag_lightning.models.base import base_identity, load_base
from gag_lightning.models.loading import resolve_path
from gag_lightning.prompts import Placeholder
from gag_lightning.stages._common.trainer import (
    build_trainer,
    finish_loggers,
    global_rank,
    make_loggers,
    remove_checkpoints,
    resume_path,
    sharded_final_checkpoint,
    stage_checkpoint,
)
from gag_lightning.upstream import memory_bank_dir

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------- helpers
def expected_schema(cfg: DictConfig) -> dict[str, Any]:
    """What the configured compression promises about the bank (checked when it is opened)."""
    comp = cfg.memory.compression
    return {"slots": int(comp.slots), "layer_keys": list(comp.layer_keys)}


def weights_bytes(folder: Path) -> int:
    """On-disk size of a model directory's weight files."""
    return sum(f.stat().st_size for pattern in ("*.safetensors", "*.bin", "*.gguf") for f in folder.glob(pattern))


def check_val_source(node: DictConfig) -> str:
    """``gag.val_source``; ``test`` (selecting the adapter on the test split) only with allow_test_selection."""
    val_source = str(node.get("val_source", "split"))
    if val_source == "test" and not bool(node.get("allow_test_selection", False)):
        raise GAGError(
            f"gag.val_source=test would choose the adapter by its loss on the '{node.get('val_split', 'test')}' "
            "split, which makes every score on that split optimistic. Use gag.val_source=split (a held-out part of "
            "the train bank) or none; to do it anyway set gag.allow_test_selection=true (every eval report then "
            "says so)."
        )
    return val_source


def _adapter_config(cfg: DictConfig, schema: Any, base: Any, base_dir: Path, semantic_dim: int | None,
                    placeholder: Placeholder) -> AdapterConfig:
    node = cfg.gag.adapter
    val_source = str(cfg.gag.get("val_source", "split"))
    selection = {"val_source": val_source}
    if val_source == "test":
        selection["val_split"] = str(cfg.gag.get("val_split", "test"))
    return AdapterConfig(
        expert_hidden=schema.hidden_size,
        base_hidden=int(base.get_input_embeddings().embedding_dim),
        slots=schema.slots,
        layers=len(schema.layer_keys),
        layer_keys=list(schema.layer_keys),
        fusion=str(node.fusion),
        layer_index=int(node.get("layer_index", 0)),
        projector=str(node.projector),
        projector_hidden=node.get("projector_hidden"),
        semantic_dim=semantic_dim,
        slot_dropout=float(node.get("slot_dropout", 0.0)),
        base_model=base_identity(base_dir),
        memory_schema=schema.to_dict(),
        placeholder=placeholder.to_dict(),
        selection=selection,
    )


def _resume_adapter(path: str, config: AdapterConfig) -> GAGAdapter:
    """An adapter saved earlier (learned layer mix included) to continue from; must fit this run."""
    adapter = load_adapter(path)
    have = adapter.config
    diffs = [name for name in ("expert_hidden", "base_hidden", "slots", "layers", "layer_keys", "fusion",
                               "projector") if getattr(have, name) != getattr(config, name)]
    if config.semantic_dim and have.semantic_dim != config.semantic_dim:
        diffs.append("semantic_dim")
    if diffs:
        raise SchemaMismatchError(
            f"gag.init_adapter={path} does not fit this run: {', '.join(diffs)} differ "
            f"({ {n: (getattr(have, n), getattr(config, n)) for n in diffs} })"
        )
    if have.base_model and config.base_model and have.base_model != config.base_model:
        log.warning("init adapter was trained on base %s, this run uses %s", have.base_model, config.base_model)
    have.base_model, have.memory_schema = config.base_model, config.memory_schema
    have.placeholder, have.selection = config.placeholder, config.selection
    return adapter


# ---------------------------------------------------------------------------------------------- stage
def _recon_fit(cfg: DictConfig, datamodule: Any, tokenizer: Any, loggers: list[Any], out_dir: Path,
               ) -> tuple[Any, Any, str | None]:
    """(trainer, datamodule, resume checkpoint) of the reconstruction warm-up on the QA fit's training records, or
    (None, None, None). Its checkpoints live in ``<artifact>.ckpt/recon/``."""
    from gag_lightning.stages.gag.recon import ReconDataModule

    node = cfg.gag
    steps = int(node.get("recon_steps", 0) or 0)
    if steps <= 0:
        return None, None, None
    recon_dm = ReconDataModule(datamodule.open_bank(), tokenizer, positions=datamodule.positions["train"],
                               max_length=int(node.max_length), batch_size=int(node.batch_size),
                               num_workers=int(node.get("num_workers", 0)),
                               enable_thinking=bool(node.get("enable_thinking", False)),
                               placeholder_id=datamodule.placeholder_id, seed=int(cfg.seed))
    recon_dm.setup("fit")
    checkpoint = stage_checkpoint(cfg, out_dir, monitor=None, subdir="recon")
    trainer = build_trainer(cfg, "gag", [checkpoint], loggers, max_steps=steps, limit_val_batches=0,
                            num_sanity_val_steps=0)
    return trainer, recon_dm, resume_path(checkpoint, "gag-recon")


def adapter_bytes(folder: str | Path) -> int:
    """On-disk size of an adapter folder's weights and config."""
    folder = Path(folder)
    return sum((folder / name).stat().st_size for name in (ADAPTER_WEIGHTS, ADAPTER_CONFIG)
               if (folder / name).is_file())


def trained_adapter(config: AdapterConfig, module: Any, trainer: L.Trainer, checkpoint: Any,
                    path: Path | None) -> GAGAdapter:
    """A CPU copy of the adapter: from the checkpoint at ``path`` (``weights_only`` load), else the final weights
    (under FSDP read back from ``checkpoint``'s ``last.ckpt``, the full state Lightning gathered)."""
    from lightning.pytorch.strategies import FSDPStrategy

    from gag_lightning.callbacks import trained_state

    if path is None and isinstance(trainer.strategy, FSDPStrategy):
        path = sharded_final_checkpoint(trainer, checkpoint, "gag")
    state = trained_state(path, "adapter.") if path is not None else module.adapter.state_dict()
    adapter = GAGAdapter(config)
    adapter.load_state_dict({k: v.detach().cpu() for k, v in state.items()}, strict=True)
    return adapter


def run_gag(cfg: DictConfig) -> dict[str, Any]:
    """Stage III: the GAG LightningModule and DataModule from ``gag.module`` / ``gag.datamodule`` (``_target_``),
    trained against the frozen base; the artifact is the adapter alone."""
    from gag_lightning.models.encoders import SemanticTargetEncoder
    from gag_lightning.stages.gag.module import fit_with_recon, kl_weight, loss_weights_tuple

    node = cfg.gag
    val_source = check_val_source(node)
    out_dir = artifact_dir(cfg, "gag")
    manifest = read_manifest(out_dir)
    if manifest is not None:
        log.info("[gag] artifact already complete for this configuration: %s (skipping)", out_dir)
        remove_checkpoints(cfg, out_dir)  # left by a kill between the manifest and their removal
        return {"artifact": str(out_dir), "skipped": True, **manifest.get("metrics", {})}
    mem_override = node.get("memory_dir")
    train_bank = memory_bank_dir(cfg, node.get("train_split", "train"), mem_override)
    val_bank = memory_bank_dir(cfg, node.get("val_split", "test"), mem_override) if val_source == "test" else None
    if out_dir.exists() and global_rank() == 0:  # an interrupted earlier attempt (no manifest): nothing is trusted
        shutil.rmtree(out_dir)

    base, tokenizer, placeholder, base_dir = load_base(cfg)
    weight_map = container(node.loss_weights)
    weights = loss_weights_tuple(weight_map)
    distill = kl_weight(weight_map) > 0
    encoder = None
    if weights[1] > 0:
        spec = cfg.model.encoders.semantic
        encoder = SemanticTargetEncoder(resolve_path(spec, cfg.paths.cache_dir), int(spec.get("max_length", 512)))
    datamodule = instantiate(
        node.datamodule, train_bank, tokenizer, instruction=cfg.domain.instruction, request_text=cfg.domain.request_text,
        val_bank=val_bank, val_source=val_source, val_fraction=float(node.get("val_fraction", 0.05)),
        max_length=int(node.max_length), batch_size=int(node.batch_size),
        eval_batch_size=int(node.get("eval_batch_size", 8)), num_workers=int(node.get("num_workers", 0)),
        seed=cfg.seed, max_train_records=node.get("max_train_records"),
        max_val_records=node.get("max_val_records"), enable_thinking=bool(node.get("enable_thinking", False)),
        semantic_encoder=encoder, expect=expected_schema(cfg), teacher_context=distill,
        placeholder_id=placeholder.id, _convert_="partial",
    )
    schema = datamodule.schema
    # seeded here, after every model load: building a cached tiny model re-seeds the global RNG
    L.seed_everything(cfg.seed, workers=True)
    config = _adapter_config(cfg, schema, base, base_dir, encoder.dim if encoder else None, placeholder)
    init = node.get("init_adapter")
    if init:  # a finished adapter artifact (or the `last/` of one), refused when unfinished
        init = upstream_folder(cfg, "gag.init_adapter", init)[0]
    adapter = _resume_adapter(str(init), config) if init else GAGAdapter(config)
    init_mode = str(node.get("init", "random"))
    alignment = None
    if init_mode == "token_alignment" and not init:
        from gag_lightning.stages.gag.alignment import align_adapter

        alignment = align_adapter(cfg, adapter, base, tokenizer, train_bank)
        L.seed_everything(cfg.seed, workers=True)  # the expert load must not change the training RNG stream
    elif init_mode not in ("random", "token_alignment"):
        raise GAGError(f"gag.init={init_mode!r}: choose random or token_alignment")
    datamodule.check_adapter(adapter.config)
    datamodule.setup("fit")
    del encoder
    datamodule.semantic_encoder = None  # targets are precomputed; free the encoder

    module = instantiate(node.module, base, adapter, placeholder.id, _convert_="partial", loss_weights=weight_map, lr=float(node.lr),
                       warmup_ratio=float(node.warmup_ratio), weight_decay=float(node.weight_decay),
                       gradient_checkpointing=bool(node.get("gradient_checkpointing", False)),
                       kl_temperature=float(node.get("kl_temperature", 1.0)))
    has_val = "val" in datamodule.sets
    keep = str(node.get("checkpoint", "best")) if has_val else "last"
    if keep not in ("best", "last"):
        raise GAGError(f"gag.checkpoint={keep!r}: choose best or last")
    checkpoint = stage_checkpoint(cfg, out_dir, monitor="val/loss" if has_val else None)
    loggers = make_loggers(cfg, "gag")
    accum = int(node.trainer.get("accumulate_grad_batches", 1) or 1)
    overrides: dict[str, Any] = {}
    if has_val:  # every val_every_n_steps optimizer steps, and the final step (StageCheckpoint)
        overrides.update(val_check_interval=max(1, int(node.get("val_every_n_steps", 50))) * accum,
                         check_val_every_n_epoch=None)
    else:
        overrides.update(limit_val_batches=0)
    trainer = build_trainer(cfg, "gag", [checkpoint], loggers, **overrides)
    recon_trainer, recon_dm, recon_resume = _recon_fit(cfg, datamodule, tokenizer, loggers, out_dir)
    resume = resume_path(checkpoint, "gag")
    # the frozen base is in eval mode on purpose (GAGModule.train keeps it there)
    warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode at the start of training.*")
    fit_with_recon(module, trainer, datamodule, recon_trainer, recon_dm, ckpt_path=resume,
                   recon_ckpt_path=recon_resume)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}
    if recon_trainer is not None:
        metrics.update({k: float(v) for k, v in recon_trainer.callback_metrics.items() if v.numel() == 1},
                       recon_steps=recon_trainer.global_step, recon_records=len(recon_dm.dataset))
    best = checkpoint.best_path if keep == "best" else None
    if best is None:  # no best checkpoint (fast_dev_run writes none, or no validation ran): the final adapter
        keep = "last"
    best_step = checkpoint_step(best) if best is not None else trainer.global_step
    if checkpoint.best_score is not None:
        metrics["best_val/loss"] = checkpoint.best_score
    finish_loggers(loggers)
    if trainer.is_global_zero:  # the kept adapter; the final one in last/ when that is another step's
        save_adapter(trained_adapter(adapter.config, module, trainer, checkpoint, best), out_dir)
        if best_step != trainer.global_step:
            save_adapter(trained_adapter(adapter.config, module, trainer, checkpoint, None), out_dir / "last")
    trainer.strategy.barrier("gag-export")
    size = adapter_bytes(out_dir)
    base_bytes = weights_bytes(base_dir)
    metrics.update(adapter_bytes=size, base_bytes=base_bytes,
                   adapter_to_base=size / base_bytes if base_bytes else float("nan"),
                   adapter_parameters=sum(p.numel() for p in adapter.parameters()),
                   train_records=len(datamodule.sets["train"]),
                   val_records=len(datamodule.sets["val"]) if has_val else 0)
    metrics.update({k: float(v) for k, v in module.mix_metrics().items()})
    if alignment is not None:
        metrics.update(alignment_tokens=alignment.tokens, alignment_token_acc=alignment.train_token_acc)
    if trainer.is_global_zero:
        write_manifest(out_dir, "gag", config=stage_key(cfg, "gag"),
                       inputs={"train_bank": str(train_bank), "val_bank": str(val_bank) if val_bank else None,
                               "memory_schema": schema.to_dict(), "base": str(base_dir),
                               "base_model": config.base_model, "init_adapter": str(init) if init else None},
                       metrics=metrics,
                       extra={"kept": keep, "best_step": best_step, "global_step": trainer.global_step,
                              "resumed_from": resume, "run_dir": str(cfg.paths.output_dir),
                              "stage_config": container(node),
                              "route": _route_metadata(cfg)})
        remove_checkpoints(cfg, out_dir)
    trainer.strategy.barrier("gag-manifest")  # no rank moves on before the artifact is complete
    log.info("[gag] done: %s (adapter %.2f MB = %.2f%% of the base's %.1f MB; %s written last)", out_dir,
             size / 2**20, 100 * size / max(base_bytes, 1), base_bytes / 2**20, MANIFEST)
    return {"artifact": str(out_dir), **metrics}


def _route_metadata(cfg: DictConfig) -> dict[str, Any]:
    """What a router needs to answer with this adapter that no other artifact records (routing.profiles)."""
    from gag_lightning.routing.profiles import route_metadata

    return route_metadata(cfg)


__all__ = ["adapter_bytes", "check_val_source", "run_gag",
           "weights_bytes"]
