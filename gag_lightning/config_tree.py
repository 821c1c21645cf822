"""Start-up helpers for the Hydra entry points: the rich config tree, logging, environment."""

from __future__ import annotations

import logging
import os
import sys
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)

DEFAULT_ORDER = ("stage_name", "run_stages", "model", "domain", "hardware", "trainer", "logger", "paths")


def print_config_tree(cfg: DictConfig, order: Sequence[str] = DEFAULT_ORDER, save_to: str | Path | None = None) -> None:
    """Print the composed config as a rich tree (main groups first) and save it as config_tree.log."""
    import rich
    import rich.syntax
    import rich.tree

    tree = rich.tree.Tree("CONFIG", style="dim", guide_style="dim")
    keys = [k for k in order if k in cfg] + [k for k in cfg if k not in order]
    for key in keys:
        branch = tree.add(str(key), style="bold", guide_style="dim")
        node = cfg[key]
        text = OmegaConf.to_yaml(node, resolve=False) if isinstance(node, DictConfig) else str(node)
        branch.add(rich.syntax.Syntax(text, "yaml"))
    rich.print(tree)
    if save_to is not None:
        Path(save_to).parent.mkdir(parents=True, exist_ok=True)
        with open(save_to, "w") as handle:
            rich.print(tree, file=handle)


def quiet_libraries() -> None:
    """Offline and quiet by default: nothing in this project may download at run time."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("WANDB_SILENT", "true")
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=".*GPU available but not used.*")
    logging.getLogger("transformers").setLevel(logging.ERROR)


def run_reporting_errors(fn: Callable[[DictConfig], Any], cfg: DictConfig) -> Any:
    """Run an entry point; a `GAGError` (bad input, missing or unfinished artifact, NaN) ends it with exit status 1
    and its message alone, no traceback (the message names the file, line and field, or the folder, to fix).
    `HYDRA_FULL_ERROR=1` re-raises it for the full traceback, as Hydra does for every other error."""
    from gag_lightning.errors import GAGError

    try:
        return fn(cfg)
    except GAGError as exc:
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        message = f"Error ({type(exc).__name__}): {exc}"
        record = log.makeRecord(log.name, logging.ERROR, __file__, 0, message, None, None)
        for handler in logging.getLogger().handlers:  # the run's log file gets it too
            if isinstance(handler, logging.FileHandler):
                handler.handle(record)
        print(f"{message}\n(set HYDRA_FULL_ERROR=1 for the traceback)", file=sys.stderr, flush=True)
        raise SystemExit(1) from None
