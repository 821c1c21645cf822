"""Where a stage's artifact lives: a stable folder named by the hash of everything that determines it.

Two runs with the same model, data, hyper-parameters and seed share one folder (so the pipeline
can skip finished stages and sweeps reuse experts and backgrounds); anything that changes the
result (another seed, another S, another encoder) gets its own folder. No timestamps are involved.

The contract, checked by `tests/test_keys.py` over every leaf of the composed config: each leaf either changes
the key of a stage that reads it, or is in `RUNTIME_ONLY` (the one allowlist of leaves that change speed,
logging or where outputs go, never an artifact's content). Inputs enter a key by content, not location:
a data file by its sha256, a model directory by a fingerprint of its files, an upstream folder given by
path (`gag.memory_dir=`, `eval.adapter=`, `sft.init_from=`, ...) by its manifest's hash. A folder of this
project without a finished manifest (its stage was killed) is refused by every stage that reads it, unless
`allow_unfinished=true`: then its file listing enters the key and the manifests say so.
"""

from __future__ import annotations

import fnmatch
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from gag_lightning.artifacts import config_hash
from gag_lightning.fingerprints import file_digest, folder_fingerprint, upstream_folder
from gag_lightning.splits import eval_splits, memory_splits, record_selection

# The one allowlist: config leaves (dotted paths, fnmatch patterns) that never change an artifact's content.
# A leaf that is not here is in the key of every stage that reads it (tests/test_keys.py checks both ways).
RUNTIME_ONLY: dict[str, str] = {
    # run control, labels, logging
    "task_name": "names the run folder",
    "print_config": "prints the config tree",
    "tags": "logger tags",
    "stage_name": "a label of the stage preset",
    "run_stages": "which stages run, not what any of them makes",
    "sweep_name": "names the multirun folder",
    "optimized_metric": "the number a sweep reports",
    "allow_unfinished": "an unfinished upstream folder enters the key by its file listing either way; the flag "
                        "itself is stamped in the manifest and the eval report",
    "logger.*": "loggers",
    "*.log_every_n_steps": "logging cadence",
    "*.progress": "progress bars",
    # where things are written and cached: the artifact folder path holds paths.artifacts, model and domain names
    "paths.log_dir": "output location",
    "paths.artifacts": "output location (the folder path, not the hash)",
    "paths.output_dir": "output location",
    "paths.cache_dir": "cache of converted / tiny models, rebuilt identically from their specs",
    "model.name": "in the artifact folder path <artifacts>/<model>/<domain>/",
    "domain.name": "in the artifact folder path <artifacts>/<model>/<domain>/",
    # speed and placement: the same computation (up to float rounding) on other hardware or batch shapes
    "hardware.name": "a label",
    "*.num_workers": "data-loading processes",
    "hardware.generation_batch_size": "inference batch size (generation, compression, scoring)",
    "hardware.memory_batch_size": "the memory stage's decoding batch size",
    "memory.generation.batch_size": "inference batch size",
    "memory.compression.batch_size": "inference batch size",
    "memory.compression.shard_size": "records per bank file (the resume granularity)",
    "eval.decoding.batch_size": "inference batch size",
    "eval.bertscore.batch_size": "scoring batch size",
    "eval.sts.batch_size": "scoring batch size",
    "*.eval_batch_size": "validation batch size",
    "*.gradient_checkpointing": "recomputes activations instead of storing them: the same gradients",
    "*.num_sanity_val_steps": "a check before training, nothing trained",
    "checkpoint_every_n_steps": "how often the trainer's resume state is saved (a resumed run is bit-identical)",
    "keep_checkpoints": "whether the resume state is deleted after the artifact is finished",
    "trainer.accelerator": "device placement",
    "trainer.devices": "device placement",
    "trainer.num_nodes": "device placement",
    "trainer.strategy": "device placement",
    "trainer.strategy.*": "device placement",
    "trainer.deterministic": "deterministic kernels where torch has both kinds: the same computation up to float "
                             "rounding, like another device (debug presets set it)",
    # which classes implement a stage: code, and code is not in a key (the gag key predates these nodes; dapt and sft
    # name theirs in the key, through KEYED_TARGETS, since their nodes also hold the hyper-parameters)
    "gag.module._target_": "the Stage III LightningModule class (its arguments are gag.* leaves, each in the key)",
    "gag.datamodule._target_": "the Stage III DataModule class (its arguments are gag.* leaves, each in the key)",
    # outputs that are reports, not the artifact's weights
    "sft.report_before_after": "report.json of the sft artifact only (the expert does not depend on it)",
    "sft.sample_answers": "report.json of the sft artifact only",
    # not read by any stage of train.py
    "model.*.description": "help text of a model spec",
    "model.encoders.minilm.*": "a YAML anchor: its values are copied into the encoder specs when the preset loads",
    "model.encoders.tiny.*": "a YAML anchor: its values are copied into the encoder specs when the preset loads",
    "domain.router_pool": "route.py only (its prototype banks are keyed by the pool's content and the encoder)",
    "domain.general_pool": "route.py only",
    "domain.mixed_test": "route.py only",
    "domain.dataset_names": "route.py only",
    "router.*": "route.py only: prototype banks have their own key (pool content, k-means settings, encoder)",
    "mode": "route.py only",
    "query": "route.py only",
}

STAGES = ("dapt", "sft", "backgrounds", "memory", "gag", "lora", "eval")


def runtime_only(path: str) -> bool:
    """Whether the dotted config path is in the allowlist `RUNTIME_ONLY`."""
    return any(fnmatch.fnmatchcase(path, pattern) for pattern in RUNTIME_ONLY)


# Classes moved by the `stages/<name>/` layout, keyed by the import path they had when their stages' keys were first
# computed: where code lives is not what it computes, and a key must not change when a file moves (a changed class
# body does not change a key either: keys cover config and data, not code).
KEYED_TARGETS: dict[str, str] = {
    "gag_lightning.stages.expert.module.CausalLMModule": "gag_lightning.stages.causal_lm.CausalLMModule",
    "gag_lightning.stages.expert.corpus.KnowledgeBaseDataModule": "gag_lightning.data.corpus.KnowledgeBaseDataModule",
    "gag_lightning.stages.expert.qa.SFTDataModule": "gag_lightning.data.qa.SFTDataModule",
}


def _strip(node: Any, prefix: str) -> Any:
    """Drop allowlisted leaves; a string naming an existing data file is keyed by the file's content digest.

    With paths in the key, a moved checkout or another mount point of the same data would recompute
    every stage; with digests, an edited file still invalidates what was built from it.
    """
    if isinstance(node, dict):
        out = {}
        for k, v in node.items():
            path = f"{prefix}.{k}" if prefix else str(k)
            if not runtime_only(path):
                out[k] = _strip(v, path)
        return out
    if isinstance(node, list):
        return [_strip(v, prefix) for v in node]
    if prefix.endswith("._target_") and isinstance(node, str):
        return KEYED_TARGETS.get(node, node)
    if isinstance(node, str) and "/" in node and Path(node).is_file():
        return f"file:{file_digest(node)}"
    return node


def container(node: Any) -> Any:
    if isinstance(node, DictConfig) or OmegaConf.is_config(node):
        return OmegaConf.to_container(node, resolve=True)
    return node


_MODEL_SPEC_DROP = ("description",)


def model_identity(spec: Any) -> dict[str, Any]:
    """A model spec (model.expert, model.base, model.encoders.*) as it enters a key: the spec, and for a local
    directory also a fingerprint of its files (new weights at the same path change the key)."""
    node = {k: v for k, v in dict(container(spec)).items() if k not in _MODEL_SPEC_DROP}
    node = _strip(node, "")
    if node.get("source", "local") == "local" and node.get("path"):
        path = Path(str(node["path"])).expanduser()
        if path.is_dir():
            node["fingerprint"] = folder_fingerprint(path)
    return node


# ------------------------------------------------------------------------------------------ stage keys
def _node(cfg: DictConfig, stage: str) -> dict[str, Any]:
    if stage == "backgrounds":
        return _strip(container(cfg.memory.generation), "memory.generation")
    if stage == "memory":
        return _strip(container(cfg.memory.compression), "memory.compression")
    node = _strip(container(cfg[stage]), stage)
    if stage == "gag":  # the class nodes hold only their allowlisted _target_: no trace in the key (it predates them)
        for name in ("module", "datamodule"):
            if node.get(name) == {}:
                node.pop(name)
    return node


def _drop_recipe_switches_when_off(node: dict[str, Any]) -> None:
    """The METHOD.md 5b switches leave the gag key while off (kl weight 0, no recon steps), so adding them kept
    every earlier adapter's hash; switched on, they and their settings are in it like any other gag key."""
    weights = node.get("loss_weights")
    if isinstance(weights, dict) and not float(weights.get("kl", 0.0) or 0.0):
        weights.pop("kl", None)
        node.pop("kl_temperature", None)
    if not int(node.get("recon_steps", 0) or 0):
        node.pop("recon_steps", None)


def _expert_source(cfg: DictConfig, option: str, init: Any, memo: dict[str, Any]) -> dict[str, Any]:
    """Key part naming the expert weights: an upstream artifact's hash, the preset's model, or a folder."""
    if init in ("dapt", "sft"):
        return {"upstream": _upstream_hash(cfg, init, memo)}
    if init in (None, "base"):
        return {"model": model_identity(cfg.model.expert)}
    return {"model_dir": upstream_folder(cfg, option, init, external_ok=True)[1]}


def _memory_source(cfg: DictConfig, memo: dict[str, Any]) -> dict[str, Any]:
    """The memory banks gag and eval read: `gag.memory_dir` by its manifest, else this config's memory artifact."""
    override = cfg.gag.get("memory_dir") if cfg.get("gag") is not None else None
    if override:
        return {"memory_dir": upstream_folder(cfg, "gag.memory_dir", override)[1]}
    return {"upstream": _upstream_hash(cfg, "memory", memo)}


def _gag_key(cfg: DictConfig, key: dict[str, Any], memo: dict[str, Any]) -> None:
    node = key["config"]
    node.pop("memory_dir", None)
    init_adapter = node.pop("init_adapter", None)
    key.update(seed=cfg.seed, precision=str(cfg.trainer.precision), base=model_identity(cfg.model.base),
               base_dtype=str(cfg.hardware.get("base_dtype", "float32")), request_text=cfg.domain.request_text,
               instruction=cfg.domain.instruction)
    source = _memory_source(cfg, memo)
    key["upstream" if "upstream" in source else "memory_dir"] = next(iter(source.values()))
    if init_adapter:
        key["init_adapter"] = upstream_folder(cfg, "gag.init_adapter", init_adapter)[1]
    weights = node.get("loss_weights") or {}
    if float(weights.get("sem", 0.0) or 0.0) > 0:  # the semantic target's encoder (METHOD.md section 4)
        key["semantic_encoder"] = model_identity(cfg.model.encoders.semantic)
    if str(node.get("init", "random")) == "token_alignment" and not init_adapter:
        # the projector is fitted on the memory expert's reading of the backgrounds (and the knowledge base)
        alignment = node.get("alignment") or {}
        key["alignment_inputs"] = {
            "expert": _expert_source(cfg, "memory.expert", cfg.memory.get("expert", "sft"), memo),
            "generation": _node(cfg, "backgrounds"),
            "knowledge_base": file_digest(cfg.domain.knowledge_base) if alignment.get("knowledge_base", True) else None,
        }
    _drop_recipe_switches_when_off(node)


def _eval_key(cfg: DictConfig, key: dict[str, Any], memo: dict[str, Any]) -> None:
    node = key["config"]
    adapter, lora_adapter = node.pop("adapter", None), node.pop("lora_adapter", None)
    # the evaluated splits, however they were named (`eval.splits`, a legacy `eval.split`)
    node["splits"] = eval_splits(cfg)
    node.pop("split", None)
    systems = [str(s) for s in (cfg.eval.get("systems") or [])]
    enc = cfg.model.encoders
    key.update(base=model_identity(cfg.model.base), base_dtype=str(cfg.hardware.get("base_dtype", "float32")),
               instruction=cfg.domain.instruction, request_text=cfg.domain.request_text,
               scorers={"bertscore": model_identity(enc.bertscore), "sts": model_identity(enc.sts)},
               banks=_memory_source(cfg, memo))
    if any(s in ("gag", "gag_shuffled") for s in systems):
        if adapter:
            key["adapter"] = upstream_folder(cfg, "eval.adapter", adapter)[1]
        else:
            key["upstream"] = _upstream_hash(cfg, "gag", memo)
    if "expert" in systems:
        key["expert"] = _upstream_hash(cfg, "sft", memo)
    # eval.rag is in the config with the rest of the eval node; the rag system also reads the knowledge base (and
    # the dense retriever the router encoder). Without rag none of it matters, and its settings leave the key
    if "rag" in systems:
        key["knowledge_base"] = file_digest(cfg.domain.knowledge_base)
        if str(cfg.eval.rag.get("retriever")) == "dense":
            key["rag_encoder"] = model_identity(enc.router)
    else:
        node.pop("rag", None)
    if "lora" in systems:
        if lora_adapter:
            key["lora_adapter"] = upstream_folder(cfg, "eval.lora_adapter", lora_adapter, external_ok=True)[1]
        else:
            key["lora"] = _upstream_hash(cfg, "lora", memo)


def _upstream_hash(cfg: DictConfig, stage: str, memo: dict[str, Any]) -> str:
    """An upstream stage's key hash, computed once per top-level `stage_key` call."""
    if stage not in memo:
        memo[stage] = config_hash(_stage_key(cfg, stage, memo))
    return memo[stage]


def stage_key(cfg: DictConfig, stage: str) -> dict[str, Any]:
    """Everything that determines `stage`'s artifact, upstream stages' keys included (by hash).

    Stages: dapt, sft, backgrounds (expert generations), memory (compressed bank), gag (adapter), lora (the
    LoRA baseline), eval (keyed by each evaluated system's inputs). Raises for an upstream folder given by
    path that does not exist or is unfinished (see `upstream_folder`).
    """
    return _stage_key(cfg, stage, {})


def stage_hashes(cfg: DictConfig, stages: tuple[str, ...] = STAGES) -> dict[str, str]:
    """The key hash of every stage, each computed once (the folder names are `<stage>-<hash[:10]>`)."""
    memo: dict[str, Any] = {}
    return {stage: _upstream_hash(cfg, stage, memo) for stage in stages}


def _stage_key(cfg: DictConfig, stage: str, memo: dict[str, Any]) -> dict[str, Any]:
    key: dict[str, Any] = {"stage": stage, "config": _node(cfg, stage)}
    if stage in ("dapt", "sft"):
        init = key["config"].pop("init_from", None)
        key.update(seed=cfg.seed, precision=str(cfg.trainer.precision), model_dtype=str(cfg.model.dtype),
                   **_expert_source(cfg, f"{stage}.init_from", init, memo))
        if stage == "dapt":
            key["data"] = file_digest(cfg.domain.knowledge_base)
        else:
            key.update(instruction=cfg.domain.instruction, data=[file_digest(cfg.domain.train),
                                                                 file_digest(cfg.domain.get("dev"))])
    elif stage == "backgrounds":
        splits = memory_splits(cfg)
        key.update(data={s: file_digest(cfg.domain.get(s)) for s in splits},
                   **_expert_source(cfg, "memory.expert", cfg.memory.get("expert", "sft"), memo))
        if cfg.memory.get("max_records") is not None:
            key["max_records"] = container(cfg.memory.max_records)
        if key["config"].get("do_sample"):
            key["seed"] = cfg.seed
    elif stage == "memory":
        key["upstream"] = _upstream_hash(cfg, "backgrounds", memo)
        if str(cfg.memory.get("extract") or "teacher_forced") != "teacher_forced":  # teacher_forced keys as before
            key["extract"] = str(cfg.memory.extract)
    elif stage == "gag":
        _gag_key(cfg, key, memo)
    elif stage == "lora":
        key.update(seed=cfg.seed, precision=str(cfg.trainer.precision), base=model_identity(cfg.model.base),
                   instruction=cfg.domain.instruction, records=record_selection(cfg))
    elif stage == "eval":
        _eval_key(cfg, key, memo)
    else:
        raise ValueError(f"no artifact key defined for stage '{stage}'")
    if stage in TRAINED:
        _debug_trainer_key(cfg, key)
    return key


# stages whose Trainer takes a debug preset's `debug.trainer` flags (stages._common.trainer.build_trainer)
TRAINED = ("dapt", "sft", "gag", "lora")


def _debug_trainer_key(cfg: DictConfig, key: dict[str, Any]) -> None:
    """A debug preset's Trainer flags (fast_dev_run, limit_*_batches, overfit_batches, epochs) change what a
    training stage makes: in its key (and through the upstream hashes in every later stage's), only when set, so
    the keys of ordinary runs are unchanged."""
    node = OmegaConf.select(cfg, "debug.trainer", default=None)
    flags = _strip(container(node), "debug.trainer") if node else {}
    if flags:
        key["debug_trainer"] = flags


def artifact_dir(cfg: DictConfig, stage: str) -> Path:
    """`<artifacts>/<model>/<domain>/<stage>-<hash>`: stable across runs, unique per result."""
    return Path(cfg.paths.artifacts) / str(cfg.model.name) / str(cfg.domain.name) / (
        f"{stage}-{config_hash(stage_key(cfg, stage))[:10]}"
    )
