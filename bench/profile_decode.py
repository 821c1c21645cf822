"""Where a decoding step's time goes: the model's forward versus the loop around it, before and after.

    python bench/profile_decode.py --model smollm2 --records 64 --batch-size 64 --max-new-tokens 32

Decodes the same background prompts twice, interleaved: `generate_batched` (eval/generation.py, continuous batching
over Hugging Face `generate`, the memory stage's decoder before memory.extract=during_generation) and the memory
stage's `StreamingDecoder` (memory/decode.py, with the state capture of during_generation). For each it prints the
wall time, the time inside the expert's forward (timed by hooks on the top module and its body), the rest per
forward call (the loop's own work: logits processing, stop tests, cache bookkeeping, admissions; for the stream
decoder also its screened output head, which runs outside the body), and, with --profile, the top ops of
torch.profiler by self CPU time.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import argparse  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("PROJECT_ROOT", str(REPO))

from gag_lightning.runtime_env import set_openmp_wait  # noqa: E402

set_openmp_wait()  # train.py's OpenMP waiting, before torch loads

import torch  # noqa: E402

from gag_lightning.eval.generation import DecodingConfig, generate_batched  # noqa: E402
from gag_lightning.memory.compression import layer_indices  # noqa: E402
from gag_lightning.memory.decode import StreamingDecoder  # noqa: E402

sys.path.insert(0, str(REPO / "bench"))
from memory_build import Setup  # noqa: E402


class ForwardTimer:
    """Seconds spent inside the model's forward, and how many calls: the top module's, or its body's where the
    caller runs the body alone (the stream decoder's screened head: its argmax then counts outside)."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.seconds, self.calls, self._t, self._depth = 0.0, 0, 0.0, 0
        modules = [model, model.get_decoder()] if hasattr(model, "get_decoder") else [model]
        self._handles = [h for m in modules if m is not None
                         for h in (m.register_forward_pre_hook(self._pre), m.register_forward_hook(self._post))]

    def _pre(self, *_: object) -> None:
        self._depth += 1
        if self._depth == 1:
            self._t = time.perf_counter()

    def _post(self, *_: object) -> None:
        self._depth -= 1
        if self._depth == 0:
            self.seconds += time.perf_counter() - self._t
            self.calls += 1

    def remove(self) -> None:
        for h in self._handles:
            h.remove()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--records", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--profile", action="store_true", help="also print torch.profiler's top ops")
    args = parser.parse_args()
    setup_args = argparse.Namespace(domain="demo", hardware="cpu", cache_dir=None, dtype=None, device="cpu",
                                    records=args.records, data=None, max_new_tokens=args.max_new_tokens,
                                    no_progress=True)
    setup = Setup(args.model, setup_args)
    model, tokenizer, prompts, stops = setup.model, setup.tokenizer, setup.prompts, setup.stops
    order = sorted(range(len(prompts)), key=lambda i: (len(prompts[i]), i))

    def before() -> int:
        gens = generate_batched(model, tokenizer, prompts, DecodingConfig(max_new_tokens=args.max_new_tokens,
                                                                          batch_size=args.batch_size),
                                stops, share_prefix=True, continuous=True)
        return sum(len(g.token_ids) for g in gens)

    def after() -> int:
        count = [0]

        def done(ended, states) -> None:
            count[0] += sum(len(e.token_ids) for e in ended)

        StreamingDecoder(model, dict(enumerate(prompts)), stops, args.max_new_tokens, args.batch_size,
                         capture=setup.picks, pad_id=tokenizer.pad_token_id or 0).run(order, done)
        return count[0]

    runs = {"before: generate_batched (HF generate rounds)": before,
            "after: StreamingDecoder (+ capture of K layers)": after}
    totals = {name: [0.0, 0.0, 0, 0] for name in runs}
    for k in range(args.repeats):
        for name in runs if k % 2 == 0 else list(reversed(runs)):
            timer = ForwardTimer(model)
            start = time.perf_counter()
            tokens = runs[name]()
            wall = time.perf_counter() - start
            timer.remove()
            t = totals[name]
            t[0] += wall
            t[1] += timer.seconds
            t[2] += timer.calls
            t[3] += tokens
    print(f"\n{args.records} records, batch {args.batch_size}, max {args.max_new_tokens} new tokens, "
          f"{args.repeats} interleaved repeats, load average {os.getloadavg()[0]:.1f}, layers {layer_indices(('last',))}")
    print(f"{'decoder':50} {'wall s':>7} {'tok/s':>7} {'forward s':>9} {'calls':>6} {'outside fwd ms/call':>19}")
    for name, (wall, fwd, calls, tokens) in totals.items():
        print(f"{name:50} {wall:>7.2f} {tokens / wall:>7.1f} {fwd:>9.2f} {calls:>6} "
              f"{1000 * (wall - fwd) / max(calls, 1):>19.2f}")
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        for name, fn in runs.items():
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                fn()
            print(f"\n== {name}: top ops by self CPU time")
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))


if __name__ == "__main__":
    main()
