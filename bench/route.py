"""Routing throughput: queries/s at batch 1 and batch 64 with the same encoder (encode + route, load excluded).

    python bench/route.py            # the smollm2 preset's router encoder (all-MiniLM-L6-v2)
    python bench/route.py --tiny     # the tiny random encoder of the test presets

The demo mixed online set is repeated to at least --min-queries queries; banks come from (or are built
into) the usual artifact folder, so only the first run pays for k-means.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("PROJECT_ROOT", str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _compose(overrides: list[str]):  # type: ignore[no-untyped-def]
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(version_base="1.3", config_dir=str(ROOT / "conf")):
        return compose(config_name="route", overrides=overrides)


def _throughput(router, encoder, queries: list[str], batch_size: int) -> float:  # type: ignore[no-untyped-def]
    t0 = time.perf_counter()
    for start in range(0, len(queries), batch_size):
        router.route_texts(encoder, queries[start : start + batch_size], batch_size=batch_size)
    return len(queries) / (time.perf_counter() - t0)


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--tiny", action="store_true", help="use model=tiny's router encoder instead of smollm2's"
    )
    parser.add_argument(
        "--min-queries", type=int, default=256, help="repeat the mixed set up to this many queries"
    )
    parser.add_argument("--batch", type=int, default=64, help="the large batch size (compared with batch 1)")
    parser.add_argument(
        "--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)"
    )
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides of conf/route.yaml")
    args = parser.parse_args(argv)

    from gag_lightning.config_tree import quiet_libraries

    quiet_libraries()
    import torch

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    from gag_lightning.data.records import read_mixed
    from gag_lightning.routing.run import build_router, load_router_encoder, pick_device

    cfg = _compose([f"model={'tiny' if args.tiny else 'smollm2'}", *args.overrides])
    encoder = load_router_encoder(
        cfg.model.encoders.router, cfg.paths.cache_dir, device=pick_device(cfg), dtype=str(cfg.router.dtype)
    )
    router, _ = build_router(cfg, encoder)
    base = [r.question for r in read_mixed(str(cfg.router.test_set))]
    queries = (base * (args.min_queries // len(base) + 1))[: max(args.min_queries, len(base))]
    # Warm-up: first calls allocate buffers and pick kernels; neither belongs in the steady-state figure.
    router.route_texts(encoder, queries[: args.batch], batch_size=args.batch)
    router.route_texts(encoder, queries[:4], batch_size=1)
    q1 = _throughput(router, encoder, queries, 1)
    qb = _throughput(router, encoder, queries, args.batch)
    print(
        f"encoder: {encoder.fingerprint} (dim {encoder.dim}), device {pick_device(cfg)}, "
        f"torch threads {torch.get_num_threads()}, {len(queries)} queries, routes {router.domains}"
    )
    print(f"batch 1:  {q1:8.1f} queries/s")
    print(f"batch {args.batch}: {qb:8.1f} queries/s")
    print(f"ratio:    {qb / q1:8.1f}x")
    return {"batch_1": q1, f"batch_{args.batch}": qb, "ratio": qb / q1}


if __name__ == "__main__":
    main()
