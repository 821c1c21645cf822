"""Entry point of PPR routing: compose the Hydra config, print it, build missing banks, route.

python route.py                                   # evaluate routing on the mixed online test set
python route.py mode=query query="What is ...?"   # the route and the score per domain, and the answer
python route.py router=three_routes mode=answer   # general + demo + demo_bio: routed vs oracle vs base alone
python route.py experiment=smoke                  # tiny encoder, seconds
"""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("PROJECT_ROOT", str(Path(__file__).resolve().parent))

from gag_lightning.runtime_env import set_openmp_wait  # noqa: E402

set_openmp_wait()  # before torch loads

import hydra  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from gag_lightning.config_tree import print_config_tree, quiet_libraries, run_reporting_errors  # noqa: E402

ROUTE_ORDER = ("mode", "query", "router", "model", "domain", "hardware", "paths")


@hydra.main(version_base="1.3", config_path="conf", config_name="route.yaml")
def main(cfg: DictConfig) -> float | None:
    # a GAGError (bad input, unfinished upstream) exits 1 with its message only (HYDRA_FULL_ERROR=1: traceback)
    return run_reporting_errors(_main, cfg)


def _main(cfg: DictConfig) -> float | None:
    quiet_libraries()
    if cfg.get("print_config", True):
        print_config_tree(cfg, order=ROUTE_ORDER, save_to=Path(cfg.paths.output_dir) / "config_tree.log")
    from gag_lightning.routing.run import run

    result = run(cfg)
    accuracy = result.get("micro_accuracy")
    return None if accuracy is None else float(accuracy)


if __name__ == "__main__":
    main()
