"""Routed serving throughput: requests/s and p50/p95 latency of `serve.py` at concurrency 1 and 16.

    python bench/serve.py                                   # smollm2, router=three_routes, on this machine
    python bench/serve.py --requests 16 --concurrency 1 16 -- experiment=smoke router=three_routes ...

Starts `serve.py` (the overrides after `--` go to it; default `router=three_routes`), waits for /health, sends the
same fixed mix of questions from the three-route online set (general, demo and demo_bio in turn) at each
concurrency level (one warm-up request first), then stops the server. Each request is a real HTTP POST to
/v1/chat/completions; latency is per request, requests/s is requests over the level's wall time. The batch sizes
the server reports are summarised too: at concurrency 16 LitServe's batching is what makes it faster.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _questions(path: Path, n: int) -> list[str]:
    """A fixed interleaving of the online set's routes: general, demo, demo_bio, general, ..."""
    by: dict[str, list[str]] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        rec = json.loads(line)
        key = rec["dataset_name"] if rec["dataset_name"] in ("demo", "demo_bio") else "general"
        by.setdefault(key, []).append(rec["question"])
    keys = sorted(by)
    return [by[keys[i % len(keys)]][(i // len(keys)) % len(by[keys[i % len(keys)]])] for i in range(n)]


def _post(url: str, question: str, timeout: float) -> tuple[float, dict]:
    body = json.dumps({"model": "gag-router", "messages": [{"role": "user", "content": question}]}).encode()
    req = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"}, method="POST")
    t0 = time.perf_counter()
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        out = json.loads(resp.read())
    return time.perf_counter() - t0, out


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    k = (len(ordered) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def run_level(url: str, questions: list[str], concurrency: int, timeout: float) -> dict:
    t0 = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as ex:
        results = list(ex.map(lambda q: _post(url, q, timeout), questions))
    wall = time.perf_counter() - t0
    latencies = [r[0] for r in results]
    return {"concurrency": concurrency, "requests": len(questions), "wall_s": wall,
            "requests_per_s": len(questions) / wall, "p50_s": statistics.median(latencies),
            "p95_s": _percentile(latencies, 0.95), "mean_s": statistics.fmean(latencies),
            "batch_sizes": dict(sorted(Counter(r[1]["batch_size"] for r in results).items())),
            "routes": dict(sorted(Counter(r[1]["route"] for r in results).items()))}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=32, help="requests per concurrency level")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--test-set", type=Path, default=ROOT / "data" / "demo_bio" / "mixed_online_3routes.jsonl")
    parser.add_argument("--startup-timeout", type=float, default=600)
    parser.add_argument("--timeout", type=float, default=600, help="per-request timeout (s)")
    parser.add_argument("--out", type=Path, default=None, help="write the figures as JSON here")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides of conf/serve.yaml (after --)")
    args = parser.parse_args(argv)
    overrides = args.overrides or ["router=three_routes"]

    port = _free_port()
    cmd = [sys.executable, str(ROOT / "serve.py"), *overrides, "print_config=false", f"serve.port={port}",
           f"serve.max_batch_size={max(args.concurrency)}", "serve.timeout=false"]
    log_path = Path(os.environ.get("TMPDIR", "/tmp")) / f"bench-serve-{port}.log"
    print(f"starting: {' '.join(cmd)}\n  log: {log_path}", flush=True)
    with log_path.open("w") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        t0 = time.perf_counter()
        while True:
            if proc.poll() is not None:
                raise SystemExit(f"serve.py exited ({proc.returncode}):\n{log_path.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"{base}/health", timeout=5) as resp:
                    if resp.status == 200:
                        break
            except (urllib.error.URLError, OSError):
                pass
            if time.perf_counter() - t0 > args.startup_timeout:
                raise SystemExit(f"serve.py not healthy after {args.startup_timeout}s; see {log_path}")
            time.sleep(1)
        startup = time.perf_counter() - t0
        url = f"{base}/v1/chat/completions"
        questions = _questions(args.test_set, args.requests)
        _post(url, questions[0], args.timeout)  # warm-up: first-call allocations are not the steady state
        levels = [run_level(url, questions, c, args.timeout) for c in args.concurrency]
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
    print(f"\nserve.py ({' '.join(overrides)}): ready in {startup:.1f}s; {args.requests} requests per level")
    print(f"{'concurrency':>11} {'req/s':>8} {'p50 s':>8} {'p95 s':>8} {'wall s':>8}  batch sizes")
    for lv in levels:
        print(f"{lv['concurrency']:>11} {lv['requests_per_s']:>8.2f} {lv['p50_s']:>8.2f} {lv['p95_s']:>8.2f} "
              f"{lv['wall_s']:>8.1f}  {lv['batch_sizes']}")
    result = {"overrides": overrides, "startup_s": startup, "levels": levels, "cpu_count": os.cpu_count()}
    if len(levels) > 1:
        result["speedup"] = levels[-1]["requests_per_s"] / levels[0]["requests_per_s"]
        print(f"requests/s at concurrency {levels[-1]['concurrency']} = {result['speedup']:.2f} x concurrency "
              f"{levels[0]['concurrency']}")
    if args.out:
        args.out.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
