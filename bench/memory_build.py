"""Memory building throughput: batch 1 vs batch 16 on the same records and expert, and bytes on disk per record.

    python bench/memory_build.py                      # tiny and smollm2, 64 records, the domain's max new tokens
    python bench/memory_build.py --model smollm2 --records 64 --max-new-tokens 48 --batch-sizes 1 16 32

For each batch size it runs the memory stage's own code (BackgroundJob -> BackgroundStore, MemoryJob ->
MemoryBank) in a temporary folder and prints records/s and generated tokens/s for the generation step,
the extraction step and both together (wall clock, and per CPU-second of this process), whether the backgrounds equal those of the first batch size, and
the bank's bytes per record next to the K*S*H_e*2 floor of a float16 memory plus its JSON metadata.
The reference release decodes one question at a time (METHOD.md section 8); the ratio column is the
speed-up of batching on this machine.
"""

from __future__ import annotations

import os

# Passive OpenMP waiting: on a shared or busy CPU, spinning worker threads slow decoding by 10x or more.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import argparse  # noqa: E402
import logging  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("PROJECT_ROOT", str(REPO))

import torch  # noqa: E402
from hydra import compose, initialize_config_dir  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

from gag_lightning.data.records import read_qa  # noqa: E402
from gag_lightning.memory.background import BackgroundConfig, background_settings, generate_backgrounds  # noqa: E402
from gag_lightning.memory.bank import BackgroundStore, MemoryBank  # noqa: E402
from gag_lightning.memory.extract import CompressionConfig, build_memory_bank  # noqa: E402
from gag_lightning.models.loading import fingerprint_dir, load_causal_lm, load_tokenizer, resolve_path  # noqa: E402
from gag_lightning.pipeline.memory import memory_schema  # noqa: E402
from gag_lightning.prompts import stop_token_ids  # noqa: E402


def compose_cfg(model: str, domain: str):
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose("train.yaml", overrides=[f"model={model}", f"domain={domain}", "stage=memory",
                                                "paths.output_dir=" + tempfile.gettempdir()])


def folder_bytes(folder: Path) -> dict[str, int]:
    sizes = {"safetensors": 0, "jsonl": 0, "json": 0}
    for path in folder.iterdir():
        suffix = path.suffix.lstrip(".")
        if path.is_file() and suffix in sizes:
            sizes[suffix] += path.stat().st_size
    return sizes


def bench_model(name: str, args: argparse.Namespace) -> list[dict]:
    cfg = compose_cfg(name, args.domain)
    t0 = time.perf_counter()
    path = resolve_path(cfg.model.expert, args.cache_dir or cfg.paths.cache_dir)
    model = load_causal_lm(path, args.dtype).eval().to(args.device)
    tokenizer = load_tokenizer(path)
    print(f"\n== {name}: {path} (loaded in {time.perf_counter() - t0:.1f}s), {args.device} {args.dtype}, "
          f"torch threads {torch.get_num_threads()}")
    records = read_qa(args.data or cfg.domain.train)[: args.records]
    generation = OmegaConf.to_container(cfg.memory.generation, resolve=True)
    if args.max_new_tokens:
        generation["max_new_tokens"] = args.max_new_tokens
    args.max_new_tokens = generation["max_new_tokens"]
    config = BackgroundConfig.from_mapping(generation, seed=int(cfg.seed))
    compression = CompressionConfig(layer_keys=tuple(cfg.memory.compression.layer_keys),
                                    slots=int(cfg.memory.compression.slots), dtype="float16")
    stops = stop_token_ids(tokenizer, model.generation_config)
    fingerprint = fingerprint_dir(path)
    settings = background_settings(config, fingerprint, stops, split="bench")
    hidden = int(model.config.hidden_size)
    # Load on a shared machine drifts over minutes: run the batch sizes interleaved, one chunk of records
    # at a time, alternating their order, so every batch size sees the same load. A chunk is the memory
    # stage's own job unit (queue_batches decoding batches of the largest size), so continuous batching
    # refills rows exactly as it does in `stage=memory`.
    chunk = max(args.batch_sizes) * args.queue_batches
    stats = {b: {"gen_s": 0.0, "gen_cpu": 0.0, "gen_rec": 0, "gen_tok": 0, "ext_s": 0.0, "ext_cpu": 0.0, "ext_rec": 0}
             for b in args.batch_sizes}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for k, start in enumerate(range(0, len(records), chunk)):
            upto = records[: start + chunk]
            for batch in args.batch_sizes if k % 2 == 0 else list(reversed(args.batch_sizes)):
                cpu = time.process_time()
                gen = generate_backgrounds(model, tokenizer, upto, tmp / f"bg{batch}", settings, config, stops,
                                           batch_size=batch, progress=not args.no_progress,
                                           queue_batches=args.queue_batches)
                gen_cpu, cpu = time.process_time() - cpu, time.process_time()
                store = BackgroundStore.open(tmp / f"bg{batch}")
                schema = memory_schema(fingerprint, hidden, compression, store.fingerprint)
                ext = build_memory_bank(model, store.read_all(), tmp / f"bank{batch}", schema, compression,
                                        batch_size=batch, progress=not args.no_progress)
                ext_cpu = time.process_time() - cpu
                st = stats[batch]
                st["gen_cpu"] += gen_cpu
                st["ext_cpu"] += ext_cpu
                st["gen_s"] += gen.seconds
                st["gen_rec"] += gen.records
                st["gen_tok"] += gen.tokens
                st["ext_s"] += ext.seconds
                st["ext_rec"] += ext.records
        rows, reference = [], None
        for batch in args.batch_sizes:
            tokens = [b["token_ids"] for b in BackgroundStore.open(tmp / f"bg{batch}").read_all()]
            reference = reference or tokens
            n = len(MemoryBank.open(tmp / f"bank{batch}"))
            sizes = folder_bytes(tmp / f"bank{batch}")
            st = stats[batch]
            rows.append({
                "model": name, "batch": batch, "records": n,
                "gen_rec_s": st["gen_rec"] / st["gen_s"], "gen_tok_s": st["gen_tok"] / st["gen_s"],
                "ext_rec_s": st["ext_rec"] / st["ext_s"], "total_rec_s": n / (st["gen_s"] + st["ext_s"]),
                "gen_rec_cpu": st["gen_rec"] / st["gen_cpu"], "total_rec_cpu": n / (st["gen_cpu"] + st["ext_cpu"]),
                "mean_tokens": st["gen_tok"] / max(st["gen_rec"], 1),
                "same_tokens": sum(a == b for a, b in zip(tokens, reference, strict=True)) / len(tokens),
                "tensor_b": sizes["safetensors"] / n, "meta_b": (sizes["jsonl"] + sizes["json"]) / n,
                "floor_b": len(compression.layer_keys) * compression.slots * hidden * 2,
            })
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", nargs="+", default=["tiny", "smollm2"], help="model presets (conf/model)")
    parser.add_argument("--domain", default="demo")
    parser.add_argument("--data", default=None, help="QA file (default: the domain's train split)")
    parser.add_argument("--records", type=int, default=64)
    parser.add_argument("--queue-batches", type=int, default=4,
                        help="decoding batches per job chunk (the memory stage's default is 4)")
    parser.add_argument("--max-new-tokens", type=int, default=None,
                        help="default: the domain's background_max_new_tokens (48 for demo)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--device", default="cpu", help="torch device of the expert (cpu, cuda, cuda:1, ...)")
    parser.add_argument("--dtype", default="float32", help="expert weights dtype (float32, bfloat16, float16)")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--cache-dir", default=None)
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = [row for name in args.model for row in bench_model(name, args)]
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    print(f"\n{args.records} records, max {args.max_new_tokens} new tokens, {os.cpu_count()} CPUs, "
          f"load average {load} (batch sizes run interleaved)")
    head = (f"{'model':8} {'batch':>5} {'gen rec/s':>9} {'gen tok/s':>9} {'x b1':>5} {'x b1 cpu':>8} "
            f"{'extract rec/s':>13} {'total rec/s':>11} {'x b1':>5} {'x b1 cpu':>8} {'tok/rec':>7} {'same':>5} "
            f"{'bytes/rec':>9} {'tensor':>7} {'meta':>5} {'K*S*H*2':>7}")
    print(head)
    print("-" * len(head))
    base: dict[str, dict] = {}
    for r in rows:
        b = base.setdefault(r["model"], r)
        print(f"{r['model']:8} {r['batch']:>5} {r['gen_rec_s']:>9.2f} {r['gen_tok_s']:>9.1f} "
              f"{r['gen_rec_s'] / b['gen_rec_s']:>5.2f} {r['gen_rec_cpu'] / b['gen_rec_cpu']:>8.2f} "
              f"{r['ext_rec_s']:>13.1f} {r['total_rec_s']:>11.2f} {r['total_rec_s'] / b['total_rec_s']:>5.2f} "
              f"{r['total_rec_cpu'] / b['total_rec_cpu']:>8.2f} {r['mean_tokens']:>7.1f} {r['same_tokens']:>5.0%} "
              f"{r['tensor_b'] + r['meta_b']:>9.0f} {r['tensor_b']:>7.0f} {r['meta_b']:>5.0f} {r['floor_b']:>7}")
    print("x b1: records/s relative to batch 1 (wall clock; 'cpu': per CPU-second of this process, which a busy "
          "machine distorts less).")
    print("bytes/rec = safetensors (tensor: memories + index + header) + JSON metadata (meta: id, question, answer, "
          "background, lengths + schema); the float16 memory floor is K*S*H*2.")


if __name__ == "__main__":
    main()
