"""Entry point: compose the Hydra config, print it, seed, run the requested stage(s).

    python train.py                                   # the full pipeline on the demo domain
    python train.py stage=sft domain=materials        # one stage
    python train.py -m experiment=smoke seed=1,2      # a multirun
"""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("PROJECT_ROOT", str(Path(__file__).resolve().parent))

from gag_lightning.runtime_env import set_openmp_wait  # noqa: E402

set_openmp_wait()  # before torch loads

import hydra  # noqa: E402
import lightning as L  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from gag_lightning.config_tree import print_config_tree, quiet_libraries, run_reporting_errors  # noqa: E402


@hydra.main(version_base="1.3", config_path="conf", config_name="train.yaml")
def main(cfg: DictConfig) -> float | None:
    # a GAGError (bad input, unfinished upstream, NaN) exits 1 with its message only (HYDRA_FULL_ERROR=1: traceback)
    return run_reporting_errors(_main, cfg)


def _main(cfg: DictConfig) -> float | None:
    quiet_libraries()
    if cfg.get("print_config", True):
        print_config_tree(cfg, save_to=Path(cfg.paths.output_dir) / "config_tree.log")
    L.seed_everything(cfg.seed, workers=True)
    from gag_lightning.results import write_run_results
    from gag_lightning.stages import run

    results = run(cfg)
    write_run_results(cfg, results)  # <output_dir>/results.json, read by `python -m gag_lightning.summarize`
    last = results[cfg.run_stages[-1]] if results else {}
    metric = cfg.get("optimized_metric")
    return float(last[metric]) if metric and metric in last else None


if __name__ == "__main__":
    main()
