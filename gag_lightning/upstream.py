"""Where a stage finds its inputs: an explicitly given, finished folder or this configuration's finished artifact.

Stages, eval, routing and the server all resolve the expert, the memory banks and the adapter here, so library
code never imports a stage's runner to find a folder.
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig

from gag_lightning.artifacts import require_artifact
from gag_lightning.errors import GAGError, MissingArtifactError
from gag_lightning.fingerprints import upstream_folder
from gag_lightning.keys import artifact_dir, memory_splits
from gag_lightning.models.loading import resolve_path


def upstream_dir(cfg: DictConfig, stage: str, override: str | None, what: str, how: str, option: str | None = None,
                  external_ok: bool = False) -> Path:
    """An explicitly given folder (config `option`: must exist and be finished, see `keys.upstream_folder`), else
    this config's finished `stage` artifact."""
    if override:
        return upstream_folder(cfg, option or f"{what} folder", override, external_ok=external_ok)[0]
    folder = artifact_dir(cfg, stage)
    require_artifact(folder, stage, hint=(
        f"Run `python train.py stage={stage} model={cfg.model.name} domain={cfg.domain.name}` first (same "
        f"overrides), or give {how}."))
    return folder


def memory_root(cfg: DictConfig, override: str | None = None) -> Path:
    """The memory artifact folder (holding one bank per split): an explicit path or this config's artifact."""
    return upstream_dir(cfg, "memory", override, "memory", "the folder of an existing memory artifact with "
                         "gag.memory_dir=/path", option="gag.memory_dir")


def memory_bank_dir(cfg: DictConfig, split: str, override: str | None = None) -> Path:
    folder = memory_root(cfg, override) / split
    if not (folder / "schema.json").is_file():
        raise MissingArtifactError(
            f"the memory artifact has no bank for split '{split}' ({folder}); the memory stage builds "
            f"{memory_splits(cfg)} (memory.splits, or gag.train_split + domain.eval_splits): add it there and rerun "
            "the memory stage"
        )
    return folder


def gag_adapter_dir(cfg: DictConfig, override: str | None = None) -> Path:
    """The trained adapter for this config (what the eval stage reads), or an explicit folder."""
    return upstream_dir(cfg, "gag", override, "adapter", "a trained adapter folder with eval.adapter=/path",
                         option="eval.adapter")


def sft_expert_path(cfg: DictConfig) -> Path:
    """The finished Stage II expert for this model/domain (what the memory stage reads)."""
    folder = artifact_dir(cfg, "sft")
    require_artifact(folder, "sft", hint=(
        f"Run `python train.py stage=sft model={cfg.model.name} domain={cfg.domain.name}` first (same overrides)."))
    return folder


def memory_expert_path(cfg: DictConfig) -> Path:
    """The expert that writes the backgrounds: the sft (default) or dapt artifact, the preset's model, or a path."""
    spec = cfg.memory.get("expert", "sft")
    if spec == "sft":
        return sft_expert_path(cfg)
    if spec == "dapt":
        folder = artifact_dir(cfg, "dapt")
        require_artifact(folder, "dapt", hint=(
            f"Run `python train.py stage=dapt model={cfg.model.name} domain={cfg.domain.name}` first (same overrides)."))
        return folder
    if spec in (None, "base"):
        return resolve_path(cfg.model.expert, cfg.paths.cache_dir)
    path, _ = upstream_folder(cfg, "memory.expert", spec, external_ok=True)  # refuses an unfinished artifact
    if not (path / "config.json").is_file():
        raise GAGError(f"memory.expert={spec}: not a Hugging Face model directory (no config.json); use sft, dapt, "
                       f"base or a model directory")
    return path


__all__ = ["gag_adapter_dir", "memory_bank_dir", "memory_expert_path", "memory_root", "sft_expert_path",
           "upstream_dir"]
