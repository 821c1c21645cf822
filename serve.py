"""Entry point of the routed GAG server: compose the Hydra config, print it, serve (LitServe).

python serve.py router=three_routes                 # POST /v1/chat/completions, GET /v1/models, GET /health
python serve.py experiment=smoke serve.port=8123    # tiny models, seconds
"""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("PROJECT_ROOT", str(Path(__file__).resolve().parent))

from gag_lightning.runtime_env import set_openmp_wait  # noqa: E402

set_openmp_wait()  # before torch loads

import hydra  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from gag_lightning.config_tree import print_config_tree, quiet_libraries  # noqa: E402

SERVE_ORDER = ("serve", "router", "model", "domain", "hardware", "paths")


@hydra.main(version_base="1.3", config_path="conf", config_name="serve.yaml")
def main(cfg: DictConfig) -> None:
    quiet_libraries()
    if cfg.get("print_config", True):
        print_config_tree(cfg, order=SERVE_ORDER, save_to=Path(cfg.paths.output_dir) / "config_tree.log")
    from gag_lightning.serving.server import serve

    serve(cfg)


if __name__ == "__main__":
    main()
