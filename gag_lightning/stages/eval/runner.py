"""Evaluation runner: all systems on every eval split's memory bank, one run, one decoding path.

Decoding runs as Lightning's predict loop over the planned batches (``stages.eval``): under DDP every rank loads
the models and decodes its share of the batches, the predictions are gathered, and rank 0 scores them and writes
the artifact. The predictions are the same on any number of processes (whole batches are dealt, see
``stages.eval.datamodule``).
"""

from __future__ import annotations

import logging
import shutil
import warnings
from pathlib import Path
from typing import Any

import lightning as L
from omegaconf import DictConfig

from gag_lightning.artifacts import atomic_write_text, read_manifest, unfinished_inputs, write_manifest
from gag_lightning.errors import GAGError, SchemaMismatchError
from gag_lightning.eval.settings import build_scorers, decoding_config
from gag_lightning.keys import artifact_dir, container, eval_splits, stage_key
from gag_lightning.memory.bank import MemoryBank
from gag_lightning.stages._common.trainer import finish_loggers, global_rank, make_loggers, trainer_kwargs

log = logging.getLogger(__name__)


def eval_trainer(cfg: DictConfig) -> L.Trainer:
    """The predict Trainer: the hardware preset's accelerator, devices, nodes and strategy.

    A sharded training strategy (FSDP, DeepSpeed) becomes DDP: each rank holds the whole frozen models for
    inference. Precision is ``32-true``: the models are loaded in ``hardware.base_dtype`` as before, and no
    autocast changes their numerics.
    """
    kwargs = trainer_kwargs(cfg, None)
    kept = {k: kwargs[k] for k in ("accelerator", "devices", "num_nodes", "strategy") if k in kwargs}
    strategy = kept.get("strategy", "auto")
    name = strategy if isinstance(strategy, str) else type(strategy).__name__
    if "fsdp" in name.lower() or "deepspeed" in name.lower():
        log.info("[eval] trainer.strategy -> ddp: each rank holds the whole frozen models for inference")
        kept["strategy"] = "ddp"
    return L.Trainer(**kept, precision="32-true", logger=False, enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False,
                     default_root_dir=str(Path(cfg.paths.output_dir) / "eval"))


def split_title(cfg: DictConfig, split: str, n_records: int) -> str:
    """The heading of a split's report and table: model / domain / split (N records)."""
    return f"{cfg.model.name} / {cfg.domain.name} / {split} ({n_records} records)"


def _print_manifest_reports(manifest: dict[str, Any], cfg: DictConfig) -> None:
    """Every split's table from a finished artifact's manifest (the `skipping` path)."""
    from gag_lightning.eval.report import print_report

    summary, settings = manifest.get("summary") or {}, manifest.get("settings") or {}
    for split in manifest.get("splits") or []:
        if summary.get(split):
            n = (settings.get(split) or {}).get("num_records", 0)
            print_report(summary[split], split_title(cfg, split, n))


def run_eval(cfg: DictConfig) -> dict[str, Any]:
    """Every system on every eval split (`eval.splits`, by default `domain.eval_splits`), models loaded once.

    Writes `<artifact>/<split>/{predictions.jsonl, metrics.json, report.md}`, then `<artifact>/report.md` (the
    splits' reports in turn) and `<artifact>/metrics.json` ({split: {systems, settings}}); logs and returns the
    flat metrics `eval/<split>/<system>/<metric>`.
    """
    from gag_lightning.eval.harness import SYSTEMS, EvalHarness, items_from_metas
    from gag_lightning.eval.report import flat_metrics, print_report, write_outputs, write_split_outputs
    from gag_lightning.models.adapter_io import adapter_placeholder, load_adapter, selection_note
    from gag_lightning.models.base import base_identity, load_base
    from gag_lightning.models.loading import load_causal_lm, load_tokenizer
    from gag_lightning.stages.gag.datamodule import check_bank_against_adapter
    from gag_lightning.upstream import gag_adapter_dir, memory_bank_dir

    node = cfg.eval
    out_dir = artifact_dir(cfg, "eval")
    manifest = read_manifest(out_dir)
    if manifest is not None:
        log.info("[eval] artifact already complete for this configuration: %s (skipping)", out_dir)
        _print_manifest_reports(manifest, cfg)
        return {"artifact": str(out_dir), "skipped": True, **manifest.get("metrics", {})}
    splits = eval_splits(cfg)
    if not splits:
        raise GAGError("eval.splits is empty; name at least one QA split of the domain (domain.eval_splits)")
    systems = list(node.systems)
    unknown = [s for s in systems if s not in SYSTEMS]
    if unknown:
        raise GAGError(f"unknown eval system(s) {unknown}; choose from {list(SYSTEMS)}")
    needs_gag = any(s in ("gag", "gag_shuffled") for s in systems)
    bank_dirs = {split: memory_bank_dir(cfg, split, cfg.gag.get("memory_dir")) for split in splits}
    adapter_dir = gag_adapter_dir(cfg, node.get("adapter")) if needs_gag else None
    lora_dir = None
    if "lora" in systems:
        from gag_lightning.stages.lora.runner import check_lora_base, load_lora, lora_adapter_dir, lora_bytes

        lora_dir = lora_adapter_dir(cfg, node.get("lora_adapter"))
    if out_dir.exists() and global_rank() == 0:
        shutil.rmtree(out_dir)
    trainer = eval_trainer(cfg)
    device = trainer.strategy.root_device  # this rank's device (every rank decodes its share)
    unfinished = unfinished_inputs(stage_key(cfg, "eval"))
    if unfinished:
        log.warning("[eval] allow_unfinished=true: reading unfinished upstream folder(s) %s", unfinished)

    # ---- what every split shares: the base (+ adapter, LoRA, expert), the scorers, the RAG index
    base, tokenizer, placeholder, base_dir = load_base(cfg)
    base.to(device)
    adapter = None
    notes: list[str] = []
    if needs_gag:
        adapter = load_adapter(adapter_dir, device=device)
        adapter.eval()
        have, want = adapter.config.base_model, base_identity(base_dir)
        if have and have != want:
            raise SchemaMismatchError(f"adapter {adapter_dir} was trained on base {have}, this run's base is {want}; "
                                      "evaluate with the base it was trained on or retrain the adapter")
        placeholder = adapter_placeholder(adapter.config, tokenizer)  # what training marked the slots with
        note = selection_note(adapter.config)
        if note:
            log.warning("[eval] %s", note)
            notes.append(note)
    lora = None
    if lora_dir is not None:  # after base.to(device): peft puts the LoRA layers beside the base's weights
        check_lora_base(lora_dir, base_dir)
        lora = load_lora(base, lora_dir)
    expert = expert_tok = None
    if "expert" in systems:
        from gag_lightning.upstream import sft_expert_path

        expert_dir = sft_expert_path(cfg)
        expert_tok = load_tokenizer(expert_dir)
        expert = load_causal_lm(expert_dir, cfg.hardware.get("base_dtype", "float32")).to(device).eval()
    rag_index = None
    if "rag" in systems:
        from gag_lightning.baselines.rag import build_rag_index, rag_retrieval

        rag_index = build_rag_index(cfg, device=str(device))

    # ---- each split: its bank and records, the same harness settings
    harnesses, split_items, retrievals = {}, {}, {}
    for split in splits:
        bank = MemoryBank.open(bank_dirs[split])
        if adapter is not None:
            check_bank_against_adapter(bank, adapter.config)
        metas = bank.metas()
        memories = bank.memories(dtype=None)
        if node.get("max_records"):
            metas, memories = metas[: int(node.max_records)], memories[: int(node.max_records)]
        items = items_from_metas(metas)
        retrieval = rag_retrieval(cfg, items, index=rag_index, label=split) if rag_index is not None else None
        harness = EvalHarness(base, tokenizer, decoding_config(cfg), adapter=adapter, gag_token_id=placeholder.id,
                              memories=memories, request_text=cfg.domain.request_text,
                              instruction=str(cfg.domain.instruction or ""), expert=expert,
                              expert_tokenizer=expert_tok, shuffle_seed=int(node.shuffle_seed),
                              enable_thinking=bool(node.get("enable_thinking", False)),
                              retrieved=retrieval.passages if retrieval else None,
                              retrieval_summary=retrieval.summary() if retrieval else None, lora=lora,
                              share_prefix=bool(node.get("share_prefix", True)))
        harness.check_systems(items, systems)
        harnesses[split], split_items[split], retrievals[split] = harness, items, retrieval

    # ---- decoding: Lightning's predict loop over the planned batches (shared out across ranks under DDP)
    from gag_lightning.stages.eval.datamodule import EvalDataModule, plan_eval
    from gag_lightning.stages.eval.module import (
        EvalModule,
        all_gather_predictions,
        assemble,
        decoded_per_rank,
    )

    plan = plan_eval(harnesses, split_items, systems)
    log.info("[eval] %d batches (%s x %d systems) over %d process(es)", len(plan),
             ", ".join(f"{s}: {len(split_items[s])} records" for s in splits), len(systems), trainer.world_size)
    with warnings.catch_warnings():  # the predict loop's own advice on workers does not apply: no data loading
        warnings.filterwarnings("ignore", message=".*does not have many workers.*")
        local = trainer.predict(EvalModule(harnesses, split_items), datamodule=EvalDataModule(plan),
                                return_predictions=True)
    predictions = all_gather_predictions([p for batch in local or [] for p in batch])
    per_rank = decoded_per_rank(predictions)
    log.info("[eval] answers decoded per rank: %s", per_rank)
    if trainer.global_rank != 0:  # rank 0 scores and writes the artifact
        return {"artifact": str(out_dir), "rank": trainer.global_rank, "decoded": per_rank.get(trainer.global_rank, 0)}
    generations = assemble(predictions, plan, {s: len(split_items[s]) for s in splits})
    scorers = build_scorers(cfg, device)

    # ---- each split: scores and its own outputs
    results, titles, paths, metrics = {}, {}, {}, {}
    for split in splits:
        harness, items, retrieval = harnesses[split], split_items[split], retrievals[split]
        result = harness.score(items, systems, generations[split], scorers)
        result.settings.update(decoded_per_rank={str(r): n for r, n in per_rank.items()})
        result.settings.update(split=split, bank=str(bank_dirs[split]),
                               adapter=str(adapter_dir) if adapter_dir else None, base=str(base_dir),
                               bertscore_max_tokens=scorers["bertscore_f1"].max_tokens,
                               bertscore_layer=scorers["bertscore_f1"].num_layers, notes=list(notes))
        if adapter is not None:
            result.settings["adapter_selection"] = dict(adapter.config.selection)
        if retrieval is not None:
            result.settings["rag"].update(retrieval.settings, passage_ids=retrieval.passage_ids)
        if lora_dir is not None:
            result.settings.update(lora=str(lora_dir), lora_bytes=lora_bytes(lora_dir))
        if unfinished:
            result.settings.update(allow_unfinished=True, unfinished_inputs=unfinished)
        results[split], titles[split] = result, split_title(cfg, split, len(items))
        paths[split] = write_outputs(out_dir / split, result, titles[split])
        metrics.update(flat_metrics(result.summary, prefix=f"eval/{split}"))
    top = write_split_outputs(out_dir, results, titles)
    if unfinished:  # stamped at the top of the report: these numbers came from folders whose stage did not finish
        stamp = ("> **allow_unfinished=true**: evaluated with upstream folder(s) whose stage did not finish (no "
                 f"manifest.json): {', '.join(unfinished)}\n\n")
        atomic_write_text(top["report"], stamp + top["report"].read_text(encoding="utf-8"))

    loggers = make_loggers(cfg, "eval")
    for logger in loggers:
        logger.log_metrics(metrics, step=0)
    finish_loggers(loggers)
    for split in splits:
        print_report(results[split].summary, titles[split])
    outputs = {**{k: str(v) for k, v in top.items()},
               "splits": {split: {k: str(v) for k, v in p.items()} for split, p in paths.items()}}
    write_manifest(out_dir, "eval", config=stage_key(cfg, "eval"),
                   inputs={"banks": {split: str(d) for split, d in bank_dirs.items()},
                           "adapter": str(adapter_dir) if adapter_dir else None,
                           "base": str(base_dir), "lora": str(lora_dir) if lora_dir else None,
                           "knowledge_base": str(cfg.domain.knowledge_base) if rag_index else None},
                   metrics=metrics,
                   extra={"splits": splits, "summary": {split: r.summary for split, r in results.items()},
                          "settings": {split: r.settings for split, r in results.items()}, "outputs": outputs,
                          "run_dir": str(cfg.paths.output_dir), "stage_config": container(node)})
    log.info("[eval] done: %s", top["report"])
    return {"artifact": str(out_dir), **metrics}


__all__ = ["eval_trainer", "run_eval", "split_title"]
