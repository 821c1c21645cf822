"""LoRA baseline runner: frozen base + ``peft`` LoRA trained on Stage III's training records.

The comparison is only fair if the LoRA sees what the GAG adapter saw: the same records (the train split's
first ``memory.max_records``, minus the seeded validation hold-out of ``gag.val_fraction``), the same
optimizer steps, batch size and accumulation, and the answer-only loss. The artifact
``artifact_dir(cfg, "lora")`` holds the LoRA weights alone (``adapter_model.safetensors`` +
``adapter_config.json``) and ``manifest.json``, written last; the base is never copied.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

import lightning as L
from omegaconf import DictConfig

from gag_lightning.artifacts import MANIFEST, apply_umask, atomic_write_text, read_manifest, write_manifest
from gag_lightning.data.records import QARecord, read_qa
from gag_lightning.errors import GAGError, MissingArtifactError, SchemaMismatchError
from gag_lightning.keys import artifact_dir, container, stage_key
from gag_lightning.models.loading import load_causal_lm, load_tokenizer, resolve_path
from gag_lightning.splits import record_selection
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

log = logging.getLogger(__name__)

LORA_WEIGHTS = "adapter_model.safetensors"
LORA_CONFIG = "adapter_config.json"


# ---------------------------------------------------------------------------------------------- records
def train_records(cfg: DictConfig) -> list[QARecord]:
    """The records Stage III trains its adapter on (the memory bank keeps the file's first N, in order)."""
    from gag_lightning.stages.gag.datamodule import split_positions

    sel = record_selection(cfg)
    records = read_qa(str(cfg.domain.get(sel["split"])))[: sel["max_records"]]
    positions, _ = split_positions(len(records), sel["holdout"], int(cfg.seed))
    if sel["max_train_records"]:
        positions = positions[: int(sel["max_train_records"])]
    return [records[p] for p in positions]


# ---------------------------------------------------------------------------------------------- weights
def lora_config(node: DictConfig) -> Any:
    """The ``peft.LoraConfig`` of the ``lora`` config node (no bias, no embedding or head training)."""
    from peft import LoraConfig

    return LoraConfig(r=int(node.r), lora_alpha=float(node.alpha), lora_dropout=float(node.dropout),
                      target_modules=[str(m) for m in node.target_modules], bias="none", task_type="CAUSAL_LM")


def save_lora(model: Any, folder: Path) -> None:
    """Only the LoRA tensors and their config; embeddings are never saved (``save_embedding_layers=False``:
    peft's "auto" would save them whenever the vocabulary differs from the base's config)."""
    model.save_pretrained(str(folder), safe_serialization=True, save_embedding_layers=False)
    config_path = folder / LORA_CONFIG
    config = json.loads(config_path.read_text(encoding="utf-8"))
    if isinstance(config.get("target_modules"), list):  # peft keeps a set: its order varied from run to run
        config["target_modules"] = sorted(config["target_modules"])
        atomic_write_text(config_path, json.dumps(config, indent=2, sort_keys=True) + "\n")
    apply_umask(folder)  # safetensors writes its file 0600
    (folder / "README.md").unlink(missing_ok=True)  # peft's model card: not part of the artifact


def lora_bytes(folder: str | Path) -> int:
    folder = Path(folder)
    return sum((folder / n).stat().st_size for n in (LORA_WEIGHTS, LORA_CONFIG) if (folder / n).is_file())


def load_lora(base: Any, folder: str | Path) -> Any:
    """Wrap ``base`` with the saved LoRA (in place: peft inserts its layers into the base's modules).

    The returned ``PeftModel`` switches the LoRA off with ``disable_adapter()``; with it off, every layer
    computes exactly what the plain base computes.
    """
    from peft import PeftModel

    from gag_lightning.models.loading import damaged_weight_files

    try:
        model = PeftModel.from_pretrained(base, str(folder), is_trainable=False)
    except Exception as exc:  # a raw library error otherwise: name the folder and what is wrong in it
        damaged = damaged_weight_files(folder)
        if damaged:
            raise GAGError(f"{', '.join(damaged)}: cannot read the LoRA weights ({type(exc).__name__}: {exc}); the "
                           "file is truncated or damaged") from exc
        if "size mismatch" in str(exc):
            raise SchemaMismatchError(f"LoRA folder {folder}: {LORA_CONFIG} does not match the weights or the base "
                                      f"({exc})") from exc
        raise
    model.eval()
    return model


def lora_adapter_dir(cfg: DictConfig, override: str | None = None) -> Path:
    """This config's finished LoRA artifact, or an explicitly given LoRA folder."""
    from gag_lightning.upstream import upstream_dir

    folder = upstream_dir(cfg, "lora", override, "LoRA", "a LoRA folder with eval.lora_adapter=/path, or drop "
                           "lora from eval.systems", option="eval.lora_adapter", external_ok=True)
    if not (folder / LORA_CONFIG).is_file():
        raise MissingArtifactError(f"LoRA folder {folder} has no {LORA_CONFIG}")
    return folder


def check_lora_base(folder: Path, base_dir: Path) -> None:
    """Refuse a LoRA trained on another base (when its manifest says which one)."""
    from gag_lightning.models.base import base_identity

    manifest = read_manifest(folder) or {}
    have, want = manifest.get("inputs", {}).get("base_model"), base_identity(base_dir)
    if have and have != want:
        raise SchemaMismatchError(f"LoRA {folder} was trained on base {have}, this run's base is {want}; evaluate "
                                  "with the base it was trained on or retrain it")


def _final_lora(trainer: Any, model: Any, checkpoint: Any, base_dir: Path, node: DictConfig) -> Any:
    """The trained LoRA model to save: the live one, or under FSDP (sharded parameters) a fresh LoRA on the base
    with the final LoRA weights of ``last.ckpt`` (the full state Lightning gathered, ``weights_only`` load)."""
    from lightning.pytorch.strategies import FSDPStrategy

    if not isinstance(trainer.strategy, FSDPStrategy):
        return model
    from peft import get_peft_model

    from gag_lightning.callbacks import trained_state

    fresh = get_peft_model(load_causal_lm(base_dir, node.get("model_dtype", "float32")), lora_config(node))
    last = sharded_final_checkpoint(trainer, checkpoint, "lora")
    state = trained_state(last, "model.")
    missing = fresh.load_state_dict(state, strict=False)
    if missing.unexpected_keys or any("lora_" in k for k in missing.missing_keys):
        raise GAGError(f"{last} does not hold this LoRA's weights ({missing})")
    return fresh


# ---------------------------------------------------------------------------------------------- stage
def run_lora(cfg: DictConfig) -> dict[str, Any]:
    from peft import get_peft_model

    from gag_lightning.models.base import base_identity
    from gag_lightning.prompts import GENERAL_REQUEST_TEXT
    from gag_lightning.stages.gag.runner import weights_bytes
    from gag_lightning.stages.lora.datamodule import LoRADataModule
    from gag_lightning.stages.lora.module import LoRAModule

    node = cfg.lora
    out_dir = artifact_dir(cfg, "lora")
    if "eval" in cfg.run_stages and "lora" not in cfg.eval.systems:
        log.info("[lora] not among eval.systems: not trained (nothing in this run would use it); "
                 "`run_stages=[lora]` trains it anyway")
        return {"artifact": str(out_dir), "unused": True}
    manifest = read_manifest(out_dir)
    if manifest is not None:
        log.info("[lora] artifact already complete for this configuration: %s (skipping)", out_dir)
        remove_checkpoints(cfg, out_dir)  # left by a kill between the manifest and their removal
        return {"artifact": str(out_dir), "skipped": True, **manifest.get("metrics", {})}
    if out_dir.exists() and global_rank() == 0:  # an interrupted earlier attempt (no manifest): nothing is trusted
        shutil.rmtree(out_dir)

    records, selection = train_records(cfg), record_selection(cfg)
    base_dir = resolve_path(cfg.model.base, cfg.paths.cache_dir)
    tokenizer = load_tokenizer(base_dir)
    base = load_causal_lm(base_dir, node.get("model_dtype", "float32"))
    base.requires_grad_(False)
    # seeded here, after every model load (building a cached tiny model re-seeds the global RNG)
    L.seed_everything(cfg.seed, workers=True)
    model = get_peft_model(base, lora_config(node))
    datamodule = LoRADataModule(records, tokenizer, instruction=cfg.domain.instruction,
                                request_text=GENERAL_REQUEST_TEXT, max_length=int(node.max_length),
                                batch_size=int(node.batch_size), num_workers=int(node.get("num_workers", 0)),
                                enable_thinking=bool(node.get("enable_thinking", False)), seed=int(cfg.seed))
    datamodule.setup("fit")
    module = LoRAModule(model, lr=float(node.lr), warmup_ratio=float(node.warmup_ratio),
                        weight_decay=float(node.weight_decay),
                        gradient_checkpointing=bool(node.get("gradient_checkpointing", False)))
    loggers = make_loggers(cfg, "lora")
    checkpoint = stage_checkpoint(cfg, out_dir, monitor=None)  # no validation: the final weights are the result
    trainer = build_trainer(cfg, "lora", [checkpoint], loggers, limit_val_batches=0)
    resume = resume_path(checkpoint, "lora")
    trainer.fit(module, datamodule=datamodule, ckpt_path=resume, weights_only=True)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}
    finish_loggers(loggers)
    if trainer.is_global_zero:
        save_lora(_final_lora(trainer, model, checkpoint, base_dir, node), out_dir)
    trainer.strategy.barrier("lora-saved")
    size, base_size = lora_bytes(out_dir), weights_bytes(base_dir)
    metrics.update(lora_bytes=size, base_bytes=base_size, lora_to_base=size / base_size if base_size else float("nan"),
                   lora_parameters=sum(p.numel() for n, p in model.named_parameters() if "lora_" in n),
                   train_records=len(datamodule.train_set), skipped_records=datamodule.skipped)
    if trainer.is_global_zero:
        write_manifest(out_dir, "lora", config=stage_key(cfg, "lora"),
                       inputs={"train": str(cfg.domain.get(selection["split"])), "records": selection,
                               "base": str(base_dir), "base_model": base_identity(base_dir)},
                       metrics=metrics,
                       extra={"global_step": trainer.global_step, "resumed_from": resume,
                              "run_dir": str(cfg.paths.output_dir), "stage_config": container(node)})
        remove_checkpoints(cfg, out_dir)
    trainer.strategy.barrier("lora-manifest")  # no rank moves on before the artifact is complete
    log.info("[lora] done: %s (LoRA %.2f MB = %.2f%% of the base's %.1f MB; %s written last)", out_dir,
             size / 2**20, 100 * size / max(base_size, 1), base_size / 2**20, MANIFEST)
    return {"artifact": str(out_dir), **metrics}


__all__ = ["check_lora_base", "load_lora", "lora_adapter_dir", "lora_bytes", "lora_config", "record_selection",
           "run_lora", "save_lora", "train_records"]
