"""The router's prefix cache and chunked scheduling measured through the whole stack: real shard
processes (worker.launcher) driven by `router_client.Router`.

P11 through the router: TTFT of a request whose `--prefix-len`-token prefix is cached (a previous
request with the same prefix and another suffix finished) against a cold one (a prefix never seen),
each alone, medians over `--rounds`. Then the inter-token latency of a running stream while
long prompts arrive, chunked (`--chunk` tokens per forward) and not.

    python scripts/make_shape_model.py --shape 7b --out /tmp/qwen7b-random --device cuda
    python scripts/bench_prefix_router.py --model-dir /tmp/qwen7b-random --out prefix_router.json
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from router_client.model_facts import read_model_facts  # noqa: E402
from router_client.router import Router, RouterConfig  # noqa: E402


def start_shards(a: argparse.Namespace, uds: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "worker.launcher", a.model_dir, "--num-shard", str(a.num_shard), "--uds-path", uds]
    cmd += ["--max-total-tokens", str(a.max_total_tokens), *a.worker_args]
    proc = subprocess.Popen(cmd, cwd=ROOT)
    deadline = time.time() + 900
    while not all(os.path.exists(f"{uds}-{r}") for r in range(a.num_shard)):
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            raise RuntimeError("the shards did not start")
        time.sleep(0.5)
    return proc


def connect(a: argparse.Namespace, uds: str, caching: bool, chunked: bool) -> Router:
    facts = read_model_facts(a.model_dir)
    config = RouterConfig(
        max_input_length=a.prefix_len + a.suffix_len + 1,
        max_total_tokens=a.prefix_len + a.suffix_len + 1 + a.new_tokens,
        max_batch_prefill_tokens=a.chunk if chunked else a.prefix_len + a.suffix_len + 1,
        prefix_caching=caching,
        chunked_prefill=chunked,
        seq_length=facts.seq_length,
        use_dynamic_ntk=facts.use_dynamic_ntk,
        call_timeout_s=600,
    )
    return Router.connect(f"{uds}-0", config=config)


def ids(rng: random.Random, n: int, vocab: int) -> list[int]:
    return [rng.randrange(10, vocab) for _ in range(n)]


def ttft(router: Router, prompt: list[int], new_tokens: int) -> tuple[float, int]:
    sent: list[int] = []
    prefill = router.client.prefill

    def spy(batch: Any, *args: Any, **kwargs: Any) -> Any:
        sent.extend(r.cache_len for r in batch.requests)
        return prefill(batch, *args, **kwargs)

    router.client.prefill = spy  # type: ignore[method-assign]
    try:
        res = router.generate(prompt, timeout=600, stopping=dict(max_new_tokens=new_tokens, ignore_eos_token=True))
    finally:
        router.client.prefill = prefill  # type: ignore[method-assign]
    return res.ttft_s, sent[0]


def bench_p11(a: argparse.Namespace, router: Router, rng: random.Random) -> dict[str, Any]:
    cold, warm, cached = [], [], []
    for _ in range(a.rounds + 1):  # the first round warms the shards up and is dropped
        prefix = ids(rng, a.prefix_len, a.vocab)
        t, n = ttft(router, prefix + ids(rng, a.suffix_len, a.vocab), 1)
        cold.append(t)
        assert n == 0, n
        t, n = ttft(router, prefix + ids(rng, a.suffix_len, a.vocab), 1)
        warm.append(t)
        cached.append(n)
    cold_s, warm_s = statistics.median(cold[1:]), statistics.median(warm[1:])
    return {
        "prefix_len": a.prefix_len,
        "suffix_len": a.suffix_len,
        "cold_ttft_ms": round(cold_s * 1e3, 2),
        "cached_ttft_ms": round(warm_s * 1e3, 2),
        "ratio": round(warm_s / cold_s, 4),
        "cache_len": cached[1:],
        "target": "<= 0.15",
    }


def bench_itl(a: argparse.Namespace, router: Router, rng: random.Random) -> dict[str, Any]:
    """Inter-token gaps of one running stream while `--arrivals` long prompts arrive one after another."""
    stream = router.submit(ids(rng, 32, a.vocab), stopping=dict(max_new_tokens=a.itl_tokens, ignore_eos_token=True))
    events = iter(stream.stream(timeout=600))
    next(events)
    stamps: list[float] = [time.perf_counter()]
    arrivals: list[Any] = []
    for _ in events:
        stamps.append(time.perf_counter())
        if len(arrivals) < a.arrivals and len(stamps) % 8 == 0:
            arrivals.append(router.submit(ids(rng, a.prefix_len, a.vocab), stopping=dict(max_new_tokens=1)))
    for handle in arrivals:
        handle.result(timeout=600)
    gaps = sorted(t1 - t0 for t0, t1 in zip(stamps, stamps[1:]))
    return {
        "median_ms": round(gaps[len(gaps) // 2] * 1e3, 2),
        "p99_ms": round(gaps[int(len(gaps) * 0.99)] * 1e3, 2),
        "max_ms": round(gaps[-1] * 1e3, 2),
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model-dir", required=True)
    p.add_argument("--num-shard", type=int, default=1)
    p.add_argument("--prefix-len", type=int, default=4096)
    p.add_argument("--suffix-len", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=16)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--chunk", type=int, default=2048, help="max_batch_prefill_tokens with chunking")
    p.add_argument("--arrivals", type=int, default=4, help="long prompts arriving during the ITL run")
    p.add_argument("--itl-tokens", type=int, default=256)
    p.add_argument("--vocab", type=int, default=150000, help="token ids are drawn below this")
    p.add_argument("--max-total-tokens", type=int, default=65536, help="the shards' --max-total-tokens")
    p.add_argument("--out", help="write the JSON here too")
    p.add_argument("worker_args", nargs="*", help="extra worker flags (after --)")
    a = p.parse_args()
    rng = random.Random(0)
    out: dict[str, Any] = {"model_dir": a.model_dir, "num_shard": a.num_shard}
    with tempfile.TemporaryDirectory(prefix="bpr", dir="/tmp") as tmp:
        uds = os.path.join(tmp, "s")
        proc = start_shards(a, uds)
        try:
            with connect(a, uds, caching=True, chunked=True) as router:
                out["p11"] = bench_p11(a, router, rng)
                out["itl_chunked"] = bench_itl(a, router, rng)
                out["prefix_cache"] = router.debug_state()["prefix_cache"]
            with connect(a, uds, caching=False, chunked=False) as router:
                out["itl_unchunked"] = bench_itl(a, router, rng)
        finally:
            proc.terminate()
            proc.wait(timeout=120)
    text = json.dumps(out, indent=2)
    print(text)
    if a.out:
        with open(a.out, "w") as f:
            f.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
