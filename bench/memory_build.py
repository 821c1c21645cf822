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

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import argparse  # noqa: E402
import inspect  # noqa: E402
import logging  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("PROJECT_ROOT", str(REPO))

from gag_lightning.runtime_env import set_openmp_wait  # noqa: E402

set_openmp_wait()  # train.py's OpenMP waiting, before torch loads

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


@torch.inference_mode()
def reference_record(model, prompt: list[int], max_new: int, stops: set[int], picks: list[int],
                     compression: CompressionConfig) -> tuple[list[int], torch.Tensor]:
    """METHOD.md section 3 as the reference runs it (section 8): batch 1, token by token with a KV cache, the
    hidden states of every layer kept at every step, the memory compressed once the background is complete."""
    device = next(model.parameters()).device
    name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    out = model(input_ids=torch.tensor([prompt], device=device), use_cache=True, logits_to_keep=1)
    tokens: list[int] = []
    kept: list[tuple[torch.Tensor, ...]] = []  # per step: every layer's state at the position just fed
    while len(tokens) < max_new:
        token = int(out.logits[0, -1].argmax())
        if token in stops:
            break
        tokens.append(token)  # fed back now: its states are those of the position where it is the input
        cache = out["cache"] if "cache" in out else out["past_key_values"]
        out = model(input_ids=torch.tensor([[token]], device=device), use_cache=True, output_hidden_states=True,
                    logits_to_keep=1, **{name: cache})
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


class Setup:
    """The expert, records, prompts and settings every configuration of one model shares."""

    def __init__(self, name: str, args: argparse.Namespace) -> None:
        cfg = compose_cfg(name, args.domain, args.hardware)
        t0 = time.perf_counter()
        path = resolve_path(cfg.model.expert, args.cache_dir or cfg.paths.cache_dir)
        self.dtype = args.dtype or str(cfg.memory.generation.model_dtype)
        self.model = load_causal_lm(path, self.dtype).eval().to(args.device)
        self.tokenizer = load_tokenizer(path)
        self.path, self.load_s = path, time.perf_counter() - t0
        self.records = read_qa(args.data or cfg.domain.train)[: args.records]
        generation = OmegaConf.to_container(cfg.memory.generation, resolve=True)
        if args.max_new_tokens:
            generation["max_new_tokens"] = args.max_new_tokens
        args.max_new_tokens = generation["max_new_tokens"]
        self.config = BackgroundConfig.from_mapping(generation, seed=int(cfg.seed))
        self.compression = CompressionConfig(layer_keys=tuple(cfg.memory.compression.layer_keys),
                                             slots=int(cfg.memory.compression.slots),
                                             pooling=str(cfg.memory.compression.pooling), dtype="float16")
        self.stops = stop_token_ids(self.tokenizer, self.model.generation_config)
        fingerprint = fingerprint_dir(path)
        self.settings = background_settings(self.config, fingerprint, self.stops, split="bench")
        self.hidden = int(self.model.config.hidden_size)
        self.schema = memory_schema(fingerprint, self.hidden, self.compression, settings_fingerprint(self.settings))
        self.default = f"{cfg.memory.extract}@{int(cfg.memory.generation.batch_size)}"
        self.prompts = background_prompt_ids(self.tokenizer, self.records, self.config)
        self.picks = layer_indices(self.compression.layer_keys)
        self.ref_tokens: dict[int, list[int]] = {}
        self.ref_memories: dict[int, torch.Tensor] = {}
        self.progress = not args.no_progress

    def build(self, run: str, indices: list[int], out: Path) -> int:
        """Build the records at `indices` with configuration `run`; returns the generated tokens."""
        if run == "reference":
            for i in indices:
                self.ref_tokens[i], self.ref_memories[i] = reference_record(
                    self.model, self.prompts[i], self.config.max_new_tokens, set(self.stops), self.picks,
                    self.compression)
            return sum(len(self.ref_tokens[i]) for i in indices)
        extract, batch = run.split("@")
        records = [self.records[i] for i in indices]
        if extract == "during_generation":
            return build_in_one_pass(self.model, self.tokenizer, records, out / "bg", self.settings, self.config,
                                     self.stops, out / "bank", self.schema, self.compression, batch_size=int(batch),
                                     progress=self.progress).tokens
        job = generate_backgrounds(self.model, self.tokenizer, records, out / "bg", self.settings, self.config,
                                   self.stops, batch_size=int(batch), progress=self.progress)
        build_memory_bank(self.model, BackgroundStore.open(out / "bg").read_all(), out / "bank", self.schema,
                          self.compression, batch_size=int(batch), progress=self.progress)
        return job.tokens


def probe_rss(name: str, run: str, records: int, args: argparse.Namespace) -> int:
    """Peak RSS (bytes) of a fresh process that loads the expert and builds `records` records with `run`: one
    process per configuration, so that no configuration inherits another's heap."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--model", name, "--probe", run, "--records", str(records),
           "--domain", args.domain, "--hardware", args.hardware, "--device", args.device, "--no-progress",
           "--max-new-tokens", str(args.max_new_tokens)]
    for flag, value in (("--dtype", args.dtype), ("--threads", args.threads), ("--data", args.data),
                        ("--cache-dir", args.cache_dir)):
        if value:
            cmd += [flag, str(value)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    for line in proc.stdout.splitlines():
        if line.startswith("PEAK_RSS_BYTES="):
            return int(line.split("=", 1)[1])
    raise RuntimeError(f"RSS probe of {run} failed:\n{proc.stderr[-2000:]}")


def bench_model(name: str, args: argparse.Namespace) -> list[dict]:
    setup = Setup(name, args)
    print(f"\n== {name}: {setup.path} (loaded in {setup.load_s:.1f}s), {args.device} {setup.dtype}, "
          f"torch threads {torch.get_num_threads()}, hardware={args.hardware}")
    sizes = args.batch_sizes or [int(setup.default.split("@")[1])]
    names = (["reference"] if args.against == "reference" else []) + [
        f"{e}@{b}" for e in args.extract or [setup.default.split("@")[0]] for b in sizes]
    stats = {n: {"s": 0.0, "cpu": 0.0, "rec": 0, "tok": 0, "rss": 0, "cuda": 0} for n in names}
    n_records = len(setup.records)
    rounds = max(1, min(args.rounds, n_records)) if args.against == "reference" else 1
    n_ref = min(n_records, args.reference_records or n_records)
    slices = [list(range(n_ref))[k::rounds] for k in range(rounds)]
    last: dict[str, Path] = {}
    cuda = args.device.startswith("cuda")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for k in range(rounds):
            for run in names if k % 2 == 0 else list(reversed(names)):
                st = stats[run]
                if cuda:
                    torch.cuda.synchronize()
                    torch.cuda.reset_peak_memory_stats()
                cpu, start = time.process_time(), time.perf_counter()
                indices = slices[k] if run == "reference" else list(range(n_records))
                last[run] = tmp / f"{run}-{k}"
                st["tok"] += setup.build(run, indices, last[run])
                st["rec"] += len(indices)
                if cuda:
                    torch.cuda.synchronize()
                    st["cuda"] = max(st["cuda"], torch.cuda.max_memory_allocated())
                st["s"] += time.perf_counter() - start
                st["cpu"] += time.process_time() - cpu
                print(f"  round {k + 1}/{rounds} {run}: {len(indices)} records in {time.perf_counter() - start:.1f}s "
                      f"(load {os.getloadavg()[0]:.1f})", file=sys.stderr, flush=True)
        rows = []
        first_tokens = None
        for run in names:
            st = stats[run]
            # the reference's peak does not grow with the record count (one record's states at a time)
            st["rss"] = probe_rss(name, run, min(n_records, 4) if run == "reference" else n_records, args)
            row = {"model": name, "run": run, "rec_s": st["rec"] / st["s"], "tok_s": st["tok"] / st["s"],
                   "rec_cpu": st["rec"] / st["cpu"], "tok_rec": st["tok"] / st["rec"], "rss": st["rss"],
                   "cuda": st["cuda"], "default": run == setup.default, "same": "", "agree": "", "diff": None,
                   "bytes": None, "tensor": None,
                   "floor": len(setup.compression.layer_keys) * setup.compression.slots * setup.hidden * 2}
            if run != "reference":
                bank = MemoryBank.open(last[run] / "bank")
                tokens = [b["token_ids"] for b in BackgroundStore.open(last[run] / "bg").read_all()]
                compared = sorted(setup.ref_tokens) or list(range(n_records))
                want = [setup.ref_tokens[i] for i in compared] if setup.ref_tokens else first_tokens
                first_tokens = first_tokens or tokens
                if want is not None:
                    same = sum(tokens[i] == w for i, w in zip(compared, want, strict=True))
                    row["same"] = f"{same}/{len(compared)}"
                if setup.ref_memories:
                    ref = torch.stack([setup.ref_memories[i] for i in compared])
                    diff = (bank.memories()[compared] - ref).abs()
                    row["diff"] = float(diff.max())
                    # float16 storage rounds |x| by up to 2^-11 |x|; beyond that the memories must agree to 1e-3
                    row["agree"] = "yes" if bool((diff <= 1e-3 + ref.abs() * 2.0**-11).all()) else "NO"
                n, sizes_b = len(bank), folder_bytes(last[run] / "bank")
                row["bytes"] = sum(sizes_b.values()) / n
                row["tensor"] = sizes_b["safetensors"] / n
            rows.append(row)
    return rows


def run_probe(args: argparse.Namespace) -> None:
    """--probe: build the records with one configuration in this fresh process and print its peak RSS."""
    setup = Setup(args.model[0], args)
    with tempfile.TemporaryDirectory() as tmp:
        setup.build(args.probe, list(range(len(setup.records))), Path(tmp) / "probe")
    # VmHWM, not getrusage's ru_maxrss: Linux carries ru_maxrss across exec, so a child would report its parent's
    # RSS at fork time whenever that is higher
    with open("/proc/self/status") as handle:
        peak = next(int(line.split()[1]) * 1024 for line in handle if line.startswith("VmHWM:"))
    print(f"PEAK_RSS_BYTES={peak}")


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
    parser.add_argument("--reference-records", type=int, default=None,
                        help="the reference builds only the first N records (default: all; its records/s and the "
                             "agreement are measured on those)")
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
    parser.add_argument("--probe", default=None, help=argparse.SUPPRESS)  # internal: one configuration's peak RSS
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.probe:
        run_probe(args)
        return
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
