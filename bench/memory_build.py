"""Memory building throughput, side by side with the reference algorithm, on the same records, expert and prompts.

    python bench/memory_build.py --model smollm2 --records 64 --max-new-tokens 64 --against reference
    python bench/memory_build.py --model tiny --batch-sizes 16 64 --extract during_generation teacher_forced

Every configuration builds the same records' backgrounds and memories with the memory stage's own code in a
temporary folder (`extract=during_generation`: `OnePassJob`, one decoding pass; `teacher_forced`: `BackgroundJob`
then `MemoryJob`). Without `--batch-sizes` / `--extract` it runs the memory stage's default configuration for the
chosen hardware preset (`memory.extract`, `memory.generation.batch_size`).

`--against reference` adds a batch-1 builder written from METHOD.md sections 3 and 8: one question at a time,
token by token with a KV cache, the hidden states of every layer kept at every step, compression afterwards
(`compression.build_memory`, the per-record specification). Load on a shared machine drifts over minutes, so the
configurations run interleaved: in each round the reference builds one slice of the records and every other
configuration builds all of them again (rounds alternate the order); records/s is records over seconds summed
over rounds. Printed per configuration: records/s, generated tokens/s, the ratio to the reference (wall clock
and per CPU-second of this process), peak RSS (and peak CUDA memory) while it ran, whether its backgrounds equal
the reference's (else the first configuration's) token for token, whether its memories agree with the
reference's (|diff| <= 1e-3 + the float16 storage rounding), and bytes per record next to K*S*H_e*2.
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
import threading  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("PROJECT_ROOT", str(REPO))

import torch  # noqa: E402
from hydra import compose, initialize_config_dir  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

from gag_lightning.data.records import read_qa  # noqa: E402
from gag_lightning.memory.background import (  # noqa: E402
    BackgroundConfig,
    background_prompt_ids,
    background_settings,
    generate_backgrounds,
)
from gag_lightning.memory.bank import BackgroundStore, MemoryBank, settings_fingerprint  # noqa: E402
from gag_lightning.memory.compression import build_memory, layer_indices  # noqa: E402
from gag_lightning.memory.extract import CompressionConfig, build_memory_bank  # noqa: E402
from gag_lightning.memory.onepass import build_in_one_pass  # noqa: E402
from gag_lightning.memory.schema import memory_schema  # noqa: E402
from gag_lightning.models.loading import fingerprint_dir, load_causal_lm, load_tokenizer, resolve_path  # noqa: E402
from gag_lightning.prompts import stop_token_ids  # noqa: E402


def compose_cfg(model: str, domain: str, hardware: str):
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose("train.yaml", overrides=[f"model={model}", f"domain={domain}", f"hardware={hardware}",
                                                "stage=memory", "paths.output_dir=" + tempfile.gettempdir()])


class PeakRSS:
    """Highest resident set size of this process while a block runs (sampled every 5 ms from /proc)."""

    def __init__(self) -> None:
        self.peak = 0
        self._stop = threading.Event()
        self._page = os.sysconf("SC_PAGE_SIZE")

    def _rss(self) -> int:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * self._page

    def _watch(self) -> None:
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, self._rss())

    def __enter__(self) -> PeakRSS:
        self.peak = self._rss()
        self._stop.clear()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._rss())


@torch.inference_mode()
def reference_record(model, prompt: list[int], max_new: int, stops: set[int], picks: list[int],
                     compression: CompressionConfig) -> tuple[list[int], torch.Tensor]:
    """METHOD.md section 3 as the reference runs it (section 8): batch 1, token by token with a KV cache, the
    hidden states of every layer kept at every step, the memory compressed once the background is complete."""
    device = next(model.parameters()).device
    out = model(input_ids=torch.tensor([prompt], device=device), use_cache=True, logits_to_keep=1)
    tokens: list[int] = []
    kept: list[tuple[torch.Tensor, ...]] = []  # per step: every layer's state at the position just fed
    while len(tokens) < max_new:
        token = int(out.logits[0, -1].argmax())
        if token in stops:
            break
        tokens.append(token)  # fed back now: its states are those of the position where it is the input
        out = model(input_ids=torch.tensor([[token]], device=device), past_key_values=out.past_key_values,
                    use_cache=True, output_hidden_states=True, logits_to_keep=1)
        kept.append(tuple(h[0, -1].detach().clone() for h in out.hidden_states))
    hidden = model.config.hidden_size
    layers = [torch.stack([step[i] for step in kept]) if kept else torch.zeros((0, hidden), device=device)
              for i in picks]
    memory = build_memory(layers, compression.slots, compression.pooling, compression.temperature)
    return tokens, memory.cpu()


def folder_bytes(folder: Path) -> dict[str, int]:
    sizes = {"safetensors": 0, "jsonl": 0, "json": 0}
    for path in folder.iterdir():
        suffix = path.suffix.lstrip(".")
        if path.is_file() and suffix in sizes:
            sizes[suffix] += path.stat().st_size
    return sizes


def bench_model(name: str, args: argparse.Namespace) -> list[dict]:
    cfg = compose_cfg(name, args.domain, args.hardware)
    t0 = time.perf_counter()
    path = resolve_path(cfg.model.expert, args.cache_dir or cfg.paths.cache_dir)
    dtype = args.dtype or str(cfg.memory.generation.model_dtype)
    model = load_causal_lm(path, dtype).eval().to(args.device)
    tokenizer = load_tokenizer(path)
    print(f"\n== {name}: {path} (loaded in {time.perf_counter() - t0:.1f}s), {args.device} {dtype}, "
          f"torch threads {torch.get_num_threads()}, hardware={args.hardware}")
    records = read_qa(args.data or cfg.domain.train)[: args.records]
    generation = OmegaConf.to_container(cfg.memory.generation, resolve=True)
    if args.max_new_tokens:
        generation["max_new_tokens"] = args.max_new_tokens
    args.max_new_tokens = generation["max_new_tokens"]
    config = BackgroundConfig.from_mapping(generation, seed=int(cfg.seed))
    compression = CompressionConfig(layer_keys=tuple(cfg.memory.compression.layer_keys),
                                    slots=int(cfg.memory.compression.slots),
                                    pooling=str(cfg.memory.compression.pooling), dtype="float16")
    stops = stop_token_ids(tokenizer, model.generation_config)
    fingerprint = fingerprint_dir(path)
    settings = background_settings(config, fingerprint, stops, split="bench")
    hidden = int(model.config.hidden_size)
    schema = memory_schema(fingerprint, hidden, compression, settings_fingerprint(settings))
    extracts = args.extract or [str(cfg.memory.extract)]
    sizes = args.batch_sizes or [int(cfg.memory.generation.batch_size)]
    configs = [(e, b) for e in extracts for b in sizes]
    default = (str(cfg.memory.extract), int(cfg.memory.generation.batch_size))
    names = (["reference"] if args.against == "reference" else []) + [f"{e}@{b}" for e, b in configs]
    stats = {n: {"s": 0.0, "cpu": 0.0, "rec": 0, "tok": 0, "rss": 0, "cuda": 0} for n in names}
    prompts = background_prompt_ids(tokenizer, records, config)
    ref_tokens: dict[int, list[int]] = {}
    ref_memories: dict[int, torch.Tensor] = {}
    picks = layer_indices(compression.layer_keys)
    rounds = max(1, min(args.rounds, len(records))) if args.against == "reference" else 1
    slices = [list(range(len(records)))[k::rounds] for k in range(rounds)]
    last: dict[str, Path] = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for k in range(rounds):
            for run in names if k % 2 == 0 else list(reversed(names)):
                st = stats[run]
                if args.device.startswith("cuda"):
                    torch.cuda.synchronize()
                    torch.cuda.reset_peak_memory_stats()
                cpu, start = time.process_time(), time.perf_counter()
                with PeakRSS() as rss:
                    if run == "reference":
                        for i in slices[k]:
                            ref_tokens[i], ref_memories[i] = reference_record(
                                model, prompts[i], config.max_new_tokens, set(stops), picks, compression)
                            st["tok"] += len(ref_tokens[i])
                        st["rec"] += len(slices[k])
                    else:
                        extract, batch = run.split("@")
                        out = tmp / f"{run}-{k}"
                        if extract == "during_generation":
                            job = build_in_one_pass(model, tokenizer, records, out / "bg", settings, config, stops,
                                                    out / "bank", schema, compression, batch_size=int(batch),
                                                    progress=not args.no_progress)
                        else:
                            job = generate_backgrounds(model, tokenizer, records, out / "bg", settings, config,
                                                       stops, batch_size=int(batch), progress=not args.no_progress)
                            build_memory_bank(model, BackgroundStore.open(out / "bg").read_all(), out / "bank",
                                              schema, compression, batch_size=int(batch),
                                              progress=not args.no_progress)
                        st["rec"] += len(records)
                        st["tok"] += job.tokens
                        last[run] = out
                    if args.device.startswith("cuda"):
                        torch.cuda.synchronize()
                st["s"] += time.perf_counter() - start
                st["cpu"] += time.process_time() - cpu
                st["rss"] = max(st["rss"], rss.peak)
                if args.device.startswith("cuda"):
                    st["cuda"] = max(st["cuda"], torch.cuda.max_memory_allocated())
        rows = []
        first_tokens = None
        for run in names:
            st = stats[run]
            row = {"model": name, "run": run, "rec_s": st["rec"] / st["s"], "tok_s": st["tok"] / st["s"],
                   "rec_cpu": st["rec"] / st["cpu"], "tok_rec": st["tok"] / st["rec"], "rss": st["rss"],
                   "cuda": st["cuda"], "default": run == f"{default[0]}@{default[1]}", "same": "", "agree": "", "diff": None,
                   "bytes": None, "tensor": None, "floor": len(compression.layer_keys) * compression.slots * hidden * 2}
            if run != "reference":
                bank = MemoryBank.open(last[run] / "bank")
                tokens = [b["token_ids"] for b in BackgroundStore.open(last[run] / "bg").read_all()]
                want = [ref_tokens[i] for i in range(len(records))] if ref_tokens else first_tokens
                first_tokens = first_tokens or tokens
                if want is not None:
                    row["same"] = f"{sum(a == b for a, b in zip(tokens, want, strict=True)) / len(tokens):.0%}"
                if ref_memories:
                    ref = torch.stack([ref_memories[i] for i in range(len(records))])
                    got = bank.memories()
                    diff = (got - ref).abs()
                    row["diff"] = float(diff.max())
                    # float16 storage rounds |x| by up to 2^-11 |x|; beyond that the memories must agree to 1e-3
                    row["agree"] = "yes" if bool((diff <= 1e-3 + ref.abs() * 2.0**-11).all()) else "NO"
                n, sizes_b = len(bank), folder_bytes(last[run] / "bank")
                row["bytes"] = sum(sizes_b.values()) / n
                row["tensor"] = sizes_b["safetensors"] / n
            rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", nargs="+", default=["smollm2"], help="model presets (conf/model)")
    parser.add_argument("--domain", default="demo")
    parser.add_argument("--hardware", default="cpu", help="hardware preset whose memory defaults are benched")
    parser.add_argument("--data", default=None, help="QA file (default: the domain's train split)")
    parser.add_argument("--records", type=int, default=64)
    parser.add_argument("--max-new-tokens", type=int, default=None,
                        help="default: the domain's background_max_new_tokens (48 for demo)")
    parser.add_argument("--against", choices=["reference"], default=None,
                        help="also run the reference's batch-1 builder (METHOD.md section 8) and compare")
    parser.add_argument("--rounds", type=int, default=4, help="interleaving rounds with --against reference")
    parser.add_argument("--extract", nargs="+", choices=["during_generation", "teacher_forced"], default=None,
                        help="default: the preset's memory.extract")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=None,
                        help="default: the preset's memory.generation.batch_size")
    parser.add_argument("--device", default="cpu", help="torch device of the expert (cpu, cuda, cuda:1, ...)")
    parser.add_argument("--dtype", default=None, help="expert dtype (default: the preset's memory.generation."
                                                      "model_dtype)")
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
          f"load average {load} (configurations interleaved)")
    head = (f"{'model':8} {'configuration':26} {'rec/s':>7} {'tok/s':>7} {'x ref':>6} {'x ref cpu':>9} {'tok/rec':>7} "
            f"{'peak RSS MB':>11} {'same tok':>8} {'agree':>5} {'max diff':>8} {'bytes/rec':>9} {'tensor':>7} "
            f"{'K*S*H*2':>7}")
    print(head)
    print("-" * len(head))
    base: dict[str, dict] = {}
    for r in rows:
        b = base.setdefault(r["model"], r)
        label = r["run"] + (" (default)" if r["default"] else "")
        cuda = f" / {r['cuda'] / 2**20:.0f} cuda" if r["cuda"] else ""
        print(f"{r['model']:8} {label:26} {r['rec_s']:>7.2f} {r['tok_s']:>7.1f} {r['rec_s'] / b['rec_s']:>6.1f} "
              f"{r['rec_cpu'] / b['rec_cpu']:>9.1f} {r['tok_rec']:>7.1f} {r['rss'] / 2**20:>11.0f}{cuda} "
              f"{r['same']:>8} {r['agree']:>5} {'' if r['diff'] is None else format(r['diff'], '.1e'):>8} "
              f"{'' if r['bytes'] is None else format(r['bytes'], '.0f'):>9} "
              f"{'' if r['tensor'] is None else format(r['tensor'], '.0f'):>7} {r['floor']:>7}")
    print("x ref: records/s relative to the first row (the reference builder with --against reference); 'cpu': per "
          "CPU-second of this process, which a busy machine distorts less. same tok: backgrounds equal to the "
          "reference's (else the first configuration's). agree: |memory - reference| <= 1e-3 + float16 rounding.")
    print("bytes/rec = safetensors (tensor: memories + index + header) + JSON metadata (id, question, answer, "
          "background, lengths + schema); the float16 memory floor is K*S*H*2.")


if __name__ == "__main__":
    main()
