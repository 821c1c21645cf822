"""Stage I (dapt) and Stage II (sft) runners: load, train, export the expert, write the manifest."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

import lightning as L
from hydra.utils import instantiate
from lightning.pytorch.strategies import FSDPStrategy
from omegaconf import DictConfig

from gag_lightning.artifacts import (
    MANIFEST,
    apply_umask,
    atomic_write_text,
    read_manifest,
    require_artifact,
    write_manifest,
)
from gag_lightning.callbacks import StageCheckpoint, checkpoint_step, trained_state
from gag_lightning.errors import GAGError
from gag_lightning.eval.generation import DecodingConfig, generate_batched
from gag_lightning.keys import artifact_dir, container, stage_key, upstream_folder
from gag_lightning.models.loading import fingerprint_dir, load_causal_lm, load_tokenizer, resolve_path
from gag_lightning.prompts import PromptSettings, build_messages, encode_prompt, stop_token_ids
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


def expert_init_path(cfg: DictConfig, stage: str) -> Path:
    """The weights a stage starts from: the preset's expert, the dapt artifact, or an explicit directory."""
    init = cfg[stage].get("init_from")
    if init in (None, "base"):
        return resolve_path(cfg.model.expert, cfg.paths.cache_dir)
    if init == "dapt":
        folder = artifact_dir(cfg, "dapt")
        require_artifact(folder, "dapt", hint=(
            f"Run `python train.py stage=dapt model={cfg.model.name} domain={cfg.domain.name}` first "
            f"(same overrides), or start from the preset's expert with `sft.init_from=base`, "
            f"or give a model directory with `sft.init_from=/path/to/model`."))
        return folder
    path, _ = upstream_folder(cfg, f"{stage}.init_from", init, external_ok=True)  # refuses an unfinished artifact
    if not (path / "config.json").is_file():
        raise GAGError(f"{stage}.init_from={init}: not a Hugging Face model directory (no config.json)")
    return path


def _sample_answers(model: Any, tokenizer: Any, records: list, instruction: str, n: int,
                    max_new_tokens: int) -> list[dict[str, str]]:
    if n <= 0 or not records:
        return []
    picked = records[:n]
    settings = PromptSettings(instruction=instruction)
    prompts = [encode_prompt(tokenizer, build_messages("sft", r, settings)) for r in picked]
    was_training = model.training
    model.eval()
    outs = generate_batched(model, tokenizer, prompts, DecodingConfig(max_new_tokens=max_new_tokens, batch_size=n),
                            stop_token_ids(tokenizer, model.generation_config))
    model.train(was_training)
    return [{"question": r.question, "reference": r.answer, "prediction": o.text} for r, o in zip(picked, outs,
                                                                                                   strict=True)]


def export_expert(trainer: L.Trainer, module: Any, checkpoint: StageCheckpoint, out_dir: Path, tokenizer: Any,
                  init_path: Path, dtype: str) -> int:
    """Save the best checkpoint's weights (the final ones without validation, or without any checkpoint as under
    ``fast_dev_run``) as a Hugging Face folder; returns the step they come from.

    On rank 0, from the checkpoint file (``weights_only`` load): under FSDP that is the full state dict Lightning
    gathered (``state_dict_type: full``), never the live sharded parameters; elsewhere the best weights are loaded
    into the trained model, which then holds them for what follows (the SFT report).
    """
    best = checkpoint.best_path
    step = checkpoint_step(best) if best is not None else trainer.global_step
    if trainer.is_global_zero:
        model = module.model
        state = trained_state(best, "model.") if best is not None else None
        if isinstance(trainer.strategy, FSDPStrategy):
            if getattr(trainer.strategy, "_state_dict_type", "full") != "full":
                raise GAGError("the expert export reads a full state dict from the checkpoint: use FSDPStrategy("
                               "state_dict_type='full') (hardware=fsdp does)")
            model = load_causal_lm(init_path, dtype)
            if state is None:
                state = trained_state(sharded_final_checkpoint(trainer, checkpoint, "expert export"), "model.")
        if state is not None:
            model.load_state_dict(state, strict=True)
        out_dir.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(out_dir)
        tokenizer.save_pretrained(out_dir)
        apply_umask(out_dir)  # safetensors writes model.safetensors 0600
    trainer.strategy.barrier("expert-export")
    return step


def run_causal_stage(cfg: DictConfig, stage: str) -> dict[str, Any]:
    out_dir = artifact_dir(cfg, stage)
    key = stage_key(cfg, stage)
    if read_manifest(out_dir) is not None:
        log.info("[%s] artifact already complete for this configuration: %s (skipping)", stage, out_dir)
        remove_checkpoints(cfg, out_dir)  # left by a kill between the manifest and their removal
        return {"artifact": str(out_dir), "skipped": True, **read_manifest(out_dir).get("metrics", {})}
    init_path = expert_init_path(cfg, stage)
    log.info("[%s] starting from %s; artifact -> %s", stage, init_path, out_dir)
    if out_dir.exists() and global_rank() == 0:  # an interrupted earlier attempt: no manifest, nothing in it trusted
        shutil.rmtree(out_dir)
    L.seed_everything(cfg.seed, workers=True)
    tokenizer = load_tokenizer(init_path)
    model = load_causal_lm(init_path, cfg.model.dtype)
    node = cfg[stage]
    datamodule = instantiate(node.datamodule, tokenizer=tokenizer)
    datamodule.setup("fit")
    module = instantiate(node.module, model=model)
    monitor = node.get("monitor", "val/loss")
    checkpoint = stage_checkpoint(cfg, out_dir, monitor)
    loggers = make_loggers(cfg, stage)
    trainer = build_trainer(cfg, stage, [checkpoint], loggers)
    resume = resume_path(checkpoint, stage)
    report: dict[str, Any] = {}
    wants_report = stage == "sft" and node.get("report_before_after", False)
    test_records = datamodule.records.get("test", []) if wants_report else []
    n_samples = int(node.get("sample_answers", 0))
    max_new = int(cfg.domain.answer_max_new_tokens)
    if wants_report and test_records:
        report["before"] = {"test_loss": trainer.test(module, datamodule=datamodule, verbose=False)[0]["test/loss"],
                            "samples": _sample_answers(model, tokenizer, test_records, cfg.domain.instruction,
                                                       n_samples, max_new)}
    trainer.fit(module, datamodule=datamodule, ckpt_path=resume, weights_only=True)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}
    best_step = export_expert(trainer, module, checkpoint, out_dir, tokenizer, init_path, cfg.model.dtype)
    if checkpoint.best_score is not None:
        metrics["best_" + monitor] = checkpoint.best_score
    if wants_report and test_records:
        best = load_causal_lm(out_dir, cfg.model.dtype)
        module.model = best
        report["after"] = {"test_loss": trainer.test(module, datamodule=datamodule, verbose=False)[0]["test/loss"],
                           "samples": _sample_answers(best, tokenizer, test_records, cfg.domain.instruction,
                                                      n_samples, max_new)}
        metrics["test/loss_before"] = report["before"]["test_loss"]
        metrics["test/loss_after"] = report["after"]["test_loss"]
    finish_loggers(loggers)
    if trainer.is_global_zero:
        if report:
            atomic_write_text(out_dir / "report.json", json.dumps(report, indent=2))
            _print_report(stage, report)
        write_manifest(out_dir, stage, config=key, inputs={"init": str(init_path),
                                                           "init_fingerprint": fingerprint_dir(init_path)},
                       metrics=metrics, extra={"best_step": best_step, "global_step": trainer.global_step,
                                               "resumed_from": resume, "run_dir": str(cfg.paths.output_dir),
                                               "stage_config": container(node)})
        remove_checkpoints(cfg, out_dir)
    trainer.strategy.barrier(f"{stage}-manifest")  # no rank moves on before the artifact is complete
    log.info("[%s] done: %s (%s written last)", stage, out_dir, MANIFEST)
    return {"artifact": str(out_dir), **metrics}


def _print_report(stage: str, report: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{stage}: held-out test before / after")
    table.add_column("")
    table.add_column("before")
    table.add_column("after")
    table.add_row("test/loss", f"{report['before']['test_loss']:.4f}", f"{report['after']['test_loss']:.4f}")
    for b, a in zip(report["before"]["samples"], report["after"]["samples"], strict=True):
        table.add_row(f"Q: {b['question']}\nref: {b['reference']}", b["prediction"], a["prediction"])
    Console().print(table)


def run_dapt(cfg: DictConfig) -> dict[str, Any]:
    return run_causal_stage(cfg, "dapt")


def run_sft(cfg: DictConfig) -> dict[str, Any]:
    return run_causal_stage(cfg, "sft")
