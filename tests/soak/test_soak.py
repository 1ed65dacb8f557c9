"""Soak: the router over real shard processes (demo model) under many concurrent clients and mixed requests.

Prompts of 1..max_input_length tokens drawn from a small pool (so identical prompts recur), greedy and
seeded sampling, penalties, stop sequences, the base model and two adapters that a churn thread offloads
and reloads while they are used (and fresh indices loaded and offloaded), cancellations mid-generation.
Claims: every request ends before its deadline; none is lost or answered twice; identical greedy requests
give identical text; a sample of greedy requests equals the float64 reference; after draining no KV block
is used (router and shard), no batch is cached, the shard's adapter slots hold exactly the adapters the
router has loaded; the shards' RSS stays flat.

Size: QWEN_SOAK_REQUESTS (CI default 300), QWEN_SOAK_CLIENTS (8), QWEN_SOAK_SHARDS (1; 2 runs TP over
gloo). `make soak` runs 2,000 requests on 2 shards. The figures are printed (RELIABILITY.md quotes them).
"""

from __future__ import annotations

import os
import random
import threading
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field

import pytest

from reference import load_checkpoint, ref_greedy
from router_client.requests import CANCELLED, GenerationResult, RequestError, ValidationError
from router_client.router import Router, RouterConfig
from shards import ShardProc, start_launcher, stop
from worker.tokenizer import QwenTokenizer

pytestmark = pytest.mark.soak
REQUESTS = int(os.environ.get("QWEN_SOAK_REQUESTS", "300"))
CLIENTS = int(os.environ.get("QWEN_SOAK_CLIENTS", "8"))
SHARDS = int(os.environ.get("QWEN_SOAK_SHARDS", "1"))
LIMITS = dict(max_input_length=64, max_total_tokens=256, max_batch_prefill_tokens=256)
DEADLINE_S = 120.0  # one request, from submit to its end
MAX_NEW = 24
REFERENCE_SAMPLE = 4  # greedy base-model requests checked against the float64 reference
RSS_GROWTH_LIMIT = 64 * 2**20  # bytes per shard between the first fifth of the run and the end


@dataclass(frozen=True)
class Spec:
    """One request as a client sends it."""

    prompt: tuple[int, ...]
    kind: str  # "greedy" | "sampled" | "penalized"
    max_new: int
    adapter: int  # 0: base; else a key of Soak.adapters
    stop: tuple[str, ...] = ()
    cancel_after_s: float | None = None


@dataclass
class Outcome:
    spec: Spec
    result: GenerationResult | None = None
    error: RequestError | None = None
    timed_out: bool = False


@dataclass
class Soak:
    router: Router
    adapters: dict[int, int]  # client's adapter key -> router index
    outcomes: list[Outcome] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    churn: Counter = field(default_factory=Counter)


def shard_pids(shard: ShardProc) -> list[int]:
    with open(f"/proc/{shard.proc.pid}/task/{shard.proc.pid}/children") as f:
        return [int(p) for p in f.read().split()]


def rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        kb = next(line.split()[1] for line in f if line.startswith("VmRSS:"))
    return int(kb) * 1024


def make_specs(rng: random.Random, n_real: int, n: int) -> list[Spec]:
    pool = [tuple(rng.randrange(n_real) for _ in range(rng.randint(1, LIMITS["max_input_length"]))) for _ in range(24)]
    pool[0] = (5,)  # the shortest prompt
    specs = []
    for _ in range(n):
        prompt = rng.choice(pool)
        kind = rng.choice(["greedy", "greedy", "sampled", "penalized"])
        stop = (rng.choice(["e", " ", "\n", "the"]),) if rng.random() < 0.2 else ()
        cancel = rng.uniform(0.0, 0.5) if rng.random() < 0.1 else None
        adapter = rng.choice([0, 0, 1, 2])
        specs.append(Spec(prompt, kind, rng.randint(1, MAX_NEW), adapter, stop, cancel))
    return specs


def parameters(spec: Spec, seed: int) -> dict:
    if spec.kind == "sampled":
        return {"do_sample": True, "temperature": 0.8, "top_k": 20, "top_p": 0.9, "seed": seed}
    if spec.kind == "penalized":
        return {"repetition_penalty": 1.3, "frequency_penalty": 0.5, "presence_penalty": 0.2}
    return {}


def client(soak: Soak, specs: list[Spec], seed: int) -> None:
    router = soak.router
    for k, spec in enumerate(specs):
        index = soak.adapters[spec.adapter] if spec.adapter else 0
        stopping = {"max_new_tokens": spec.max_new, "stop": list(spec.stop), "ignore_eos_token": True}
        handle = router.submit(
            list(spec.prompt), parameters=parameters(spec, seed * 1000 + k), stopping=stopping, adapter_index=index
        )
        outcome = Outcome(spec)
        if spec.cancel_after_s is not None:
            time.sleep(spec.cancel_after_s)
            router.cancel(handle.request_id)
        try:
            outcome.result = handle.result(timeout=DEADLINE_S)
        except RequestError as err:
            outcome.error = err
        except TimeoutError:
            outcome.timed_out = True
        with soak.lock:
            soak.outcomes.append(outcome)


def churn(soak: Soak, stop_event: threading.Event, rng: random.Random) -> None:
    """Offload the two adapters now and then (refused while used: they reload when a request needs them), and
    load and offload fresh indices (the shard must forget them)."""
    router = soak.router
    while not stop_event.wait(0.3):
        key = rng.choice([1, 2])
        try:
            router.offload_adapter(soak.adapters[key])
            soak.churn["offloaded"] += 1
        except ValidationError:
            soak.churn["offload refused (in use)"] += 1
        if rng.random() < 0.3:
            index = router.load_adapter("robot")
            router.offload_adapter(index)
            soak.churn["fresh index loaded and offloaded"] += 1


@pytest.fixture(scope="module")
def soak_shard(demo_dir):
    s = start_launcher(
        os.path.join(demo_dir, "model"), os.path.join(demo_dir, "adapters"), num_shard=SHARDS, extra=("--eager",)
    )
    yield s
    assert stop(s) == 0, s.log()[-3000:]


def test_soak(soak_shard, demo_dir):
    tok = QwenTokenizer.from_dir(os.path.join(demo_dir, "model"))
    rng = random.Random(18)
    specs = make_specs(rng, tok.n_real_vocab, REQUESTS)
    t0 = time.perf_counter()
    with Router.connect(f"{soak_shard.uds}-0", tokenizer=tok, config=RouterConfig(**LIMITS)) as router:
        soak = Soak(router, {1: router.load_adapter("pirate"), 2: router.load_adapter("robot")})
        pids = shard_pids(soak_shard)
        assert len(pids) == SHARDS
        stop_event = threading.Event()
        churner = threading.Thread(target=churn, args=(soak, stop_event, random.Random(7)), daemon=True)
        churner.start()
        per_client = [specs[c::CLIENTS] for c in range(CLIENTS)]
        first, rest = [s[: len(s) // 5] for s in per_client], [s[len(s) // 5 :] for s in per_client]
        for part in (first, rest):
            threads = [threading.Thread(target=client, args=(soak, p, c)) for c, p in enumerate(part)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(timeout=DEADLINE_S * len(specs))
            assert not any(t.is_alive() for t in threads), "a client hangs"
            if part is first:
                rss_start = [rss(p) for p in pids]
        stop_event.set()
        churner.join(timeout=60)
        elapsed = time.perf_counter() - t0
        rss_end = [rss(p) for p in pids]
        state = router.debug_state()
        loaded = sum(a.loaded for a in router.adapters.values())
    stats = soak_shard.stats()
    outcomes = soak.outcomes

    # every request ended, once, before its deadline; only the cancelled ones may have failed (cancelled)
    assert len(outcomes) == len(specs) and not any(o.timed_out for o in outcomes)
    results = [o.result for o in outcomes if o.result is not None]
    assert len({r.request_id for r in results}) == len(results)
    failed = [o for o in outcomes if o.error is not None]
    assert all(o.spec.cancel_after_s is not None and o.error.code == CANCELLED for o in failed), [
        (o.spec, str(o.error)) for o in failed if o.spec.cancel_after_s is None or o.error.code != CANCELLED
    ]
    for o in outcomes:
        if o.result is not None:
            r = o.result
            assert r.generated_tokens == len(r.token_ids) <= o.spec.max_new
            assert r.finish_reason == "length" or (r.finish_reason == "stop_sequence" and o.spec.stop)
    # identical greedy requests give identical text
    texts: dict[tuple, set[str]] = defaultdict(set)
    for o in outcomes:
        if o.result is not None and o.spec.kind == "greedy" and o.spec.cancel_after_s is None:
            texts[(o.spec.prompt, o.spec.max_new, o.spec.adapter, o.spec.stop)].add(o.result.text)
    assert all(len(v) == 1 for v in texts.values())
    # a sample of greedy base-model requests equals the float64 reference
    state_dict, cfg = load_checkpoint(os.path.join(demo_dir, "model"))
    sample = [
        o
        for o in outcomes
        if o.result is not None and o.spec.kind == "greedy" and not o.spec.adapter and not o.spec.stop
    ][:REFERENCE_SAMPLE]
    assert sample
    for o in sample:
        assert o.result is not None
        assert o.result.token_ids == ref_greedy(state_dict, cfg, list(o.spec.prompt), o.spec.max_new)
    # drained: no block used, nothing cached, adapter slots = the adapters the router has loaded
    assert state["used_blocks"] == 0 and not state["queued"] and not state["in_flight"]
    assert state["running_batch"] is None
    assert stats["batches"] == 0 and stats["shard_blocks_free"] == stats["shard_blocks_total"]
    assert stats["adapter_slots_used"] == loaded
    assert stats["adapters_known"] <= loaded + 32  # offloaded indices beyond the host cache are forgotten
    growth = [end - start for start, end in zip(rss_start, rss_end)]
    tokens = sum(r.generated_tokens for r in results)
    print(
        f"\nsoak: {len(specs)} requests ({Counter(o.spec.kind for o in outcomes)}), {CLIENTS} clients, {SHARDS} "
        f"shard(s), {elapsed:.1f} s, {tokens} tokens; finished {len(results)}, cancelled {len(failed)}, lost 0, "
        f"hangs 0; adapter churn {dict(soak.churn)}; RSS growth per shard (MiB) "
        f"{[round(g / 2**20, 1) for g in growth]}"
    )
    assert all(g <= RSS_GROWTH_LIMIT for g in growth), growth
