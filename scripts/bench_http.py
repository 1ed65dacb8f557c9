"""P13 (performance.md): end-to-end tokens/s through the HTTP front at 64 concurrent streams, against
the same load through the router directly, on the same shard process(es) in the same run.

    python scripts/bench_http.py [--model-dir D] [--num-shard 1] [--streams 64] [--requests 256]
                                 [--max-new-tokens 64] [--rounds 2] [--json bench_http.json] [--shard-arg=...]

Each round runs the direct load (a Router in this process, one thread streaming each request), then
the HTTP load (`qwen-router serve` as its own process, one streaming `POST /generate_stream` per
request from a minimal asyncio client). Greedy, `ignore_eos_token`, so every request generates exactly
`--max-new-tokens`. Without `--model-dir` the demo model is built in .demo (seconds). P13 is the best
round of each mode; the median of each round's own ratio is printed too (robust to a machine whose
load drifts between rounds); a short table is printed last and every number written as JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "scripts"))

PROMPTS = ["The capital of France is", "Qwen is a family of", "The quick brown fox", "Tell me a story:"]
LIMITS = {"max_input_length": 64, "max_total_tokens": 256, "max_batch_prefill_tokens": 2048}


@dataclass
class Load:
    mode: str  # direct | http
    requests: int
    streams: int
    tokens: int
    wall_s: float
    ttft_p50_s: float

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.wall_s


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * q / 100))]


def run_direct(uds: str, model_dir: str, a: argparse.Namespace) -> Load:
    from router_client.router import Router, RouterConfig
    from worker.tokenizer import QwenTokenizer

    stopping = {"max_new_tokens": a.max_new_tokens, "ignore_eos_token": True}
    config = RouterConfig(
        max_input_length=LIMITS["max_input_length"],
        max_total_tokens=LIMITS["max_total_tokens"],
        max_batch_prefill_tokens=LIMITS["max_batch_prefill_tokens"],
    )
    with Router.connect(f"{uds}-0", QwenTokenizer.from_dir(model_dir), config) as router:

        def one(i: int) -> tuple[int, float]:
            handle = router.submit(PROMPTS[i % len(PROMPTS)], stopping=stopping)
            tokens, first = 0, 0.0
            for _ in handle.stream(timeout=300):
                tokens += 1
                first = first or time.perf_counter() - handle.submitted_at
            return tokens, first

        start = time.perf_counter()
        with ThreadPoolExecutor(max_workers=a.streams) as pool:
            results = list(pool.map(one, range(a.requests)))
        wall = time.perf_counter() - start
    return Load(
        "direct", a.requests, a.streams, sum(t for t, _ in results), wall, percentile([f for _, f in results], 50)
    )


async def _stream(port: int, body: bytes) -> tuple[int, float]:
    """One streaming request over a raw connection; (events, seconds to the first event)."""
    start = time.perf_counter()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(
        b"POST /generate_stream HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\n"
        b"Connection: close\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
    )
    data, first = b"", 0.0
    while chunk := await reader.read(65536):
        data += chunk
        first = first or (time.perf_counter() - start if b"data:" in data else 0.0)
    writer.close()
    if b" 200 " not in data.split(b"\r\n", 1)[0]:
        raise RuntimeError(f"HTTP error: {data[:300]!r}")
    return data.count(b"data:"), first


async def _http_load(port: int, a: argparse.Namespace) -> tuple[list[tuple[int, float]], float]:
    gate = asyncio.Semaphore(a.streams)

    async def one(i: int) -> tuple[int, float]:
        body = json.dumps(
            {
                "inputs": PROMPTS[i % len(PROMPTS)],
                "parameters": {"max_new_tokens": a.max_new_tokens, "ignore_eos_token": True},
            }
        ).encode()
        async with gate:
            return await _stream(port, body)

    start = time.perf_counter()
    results = await asyncio.gather(*(one(i) for i in range(a.requests)))
    return list(results), time.perf_counter() - start


def run_http(uds: str, model_dir: str, a: argparse.Namespace) -> Load:
    from http_front import front_command, start_front
    from worker.launcher import free_port

    port = free_port()
    limits = [f"--{k.replace('_', '-')}={v}" for k, v in LIMITS.items()]
    cmd = front_command(uds, model_dir, port, "--max-concurrent-requests", str(max(128, a.streams)), *limits)
    front = start_front(cmd, port, timeout_s=300)
    try:
        results, wall = asyncio.run(_http_load(port, a))
    finally:
        front.send_signal(signal.SIGTERM)
        front.wait(timeout=60)
    return Load(
        "http", a.requests, a.streams, sum(t for t, _ in results), wall, percentile([f for _, f in results], 50)
    )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model-dir", default=None)
    ap.add_argument("--num-shard", type=int, default=1)
    ap.add_argument("--streams", type=int, default=64)
    ap.add_argument("--requests", type=int, default=256)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--json", default="bench_http.json")
    ap.add_argument("--shard-arg", action="append", default=[], help="passed to qwen-launch (e.g. --shard-arg=--eager)")
    a = ap.parse_args()
    model_dir = a.model_dir
    if model_dir is None:
        from make_demo_model import ensure

        model_dir = os.path.join(ensure(os.path.join(ROOT, ".demo")), "model")
    tmp = tempfile.mkdtemp(prefix="qwb")
    uds = os.path.join(tmp, "s")
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    with open(os.path.join(tmp, "shards.log"), "w") as log:
        launcher = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "worker.launcher",
                model_dir,
                "--num-shard",
                str(a.num_shard),
                "--uds-path",
                uds,
                "--max-total-tokens",
                "32768",
                *a.shard_arg,
            ],
            cwd=ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        while not all(os.path.exists(f"{uds}-{r}") for r in range(a.num_shard)):
            if launcher.poll() is not None:
                raise RuntimeError("the shards did not start: " + open(os.path.join(tmp, "shards.log")).read()[-2000:])
            time.sleep(0.2)
        loads = []
        for _ in range(a.rounds):
            loads += [run_direct(uds, model_dir, a), run_http(uds, model_dir, a)]
    finally:
        launcher.send_signal(signal.SIGTERM)
        launcher.wait(timeout=60)
    best = {
        mode: max((x for x in loads if x.mode == mode), key=lambda x: x.tokens_per_s) for mode in ("direct", "http")
    }
    ratio = best["http"].tokens_per_s / best["direct"].tokens_per_s
    pairs = sorted(h.tokens_per_s / d.tokens_per_s for d, h in zip(loads[0::2], loads[1::2]))
    median_pair = (
        pairs[len(pairs) // 2] if len(pairs) % 2 else (pairs[len(pairs) // 2 - 1] + pairs[len(pairs) // 2]) / 2
    )
    out: dict[str, Any] = {
        "model_dir": model_dir,
        "num_shard": a.num_shard,
        "max_new_tokens": a.max_new_tokens,
        "rounds": [dict(asdict(x), tokens_per_s=x.tokens_per_s) for x in loads],
        "p13": ratio,
        "p13_median_round": median_pair,
    }
    with open(a.json, "w") as f:
        json.dump(out, f, indent=2)
    print(
        f"\nP13: {a.requests} requests x {a.max_new_tokens} tokens, {a.streams} concurrent streams "
        f"({os.path.basename(os.path.normpath(model_dir))}, {a.num_shard} shard(s)); full numbers in {a.json}"
    )
    print(f"{'mode':8s} {'tokens/s':>10s} {'wall s':>8s} {'TTFT p50 ms':>12s}")
    for x in loads:
        print(f"{x.mode:8s} {x.tokens_per_s:10.0f} {x.wall_s:8.2f} {x.ttft_p50_s * 1000:12.1f}")
    print(
        f"P13 = http / direct (best rounds) = {ratio:.3f}, median of the rounds' ratios {median_pair:.3f}  "
        "(target >= 0.9)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
