"""Soak through the HTTP front with client disconnects (issue 18): a real shard, `qwen-router serve` as a
process, many concurrent streaming requests (LoRAX `/generate_stream` and OpenAI `/v1/chat/completions`
with `stream`, the base model and the demo adapters), a fraction of whose clients disconnect mid-stream
(after a few events) or before the first byte.

Claims: every request that was not abandoned completes, with exactly `max_new_tokens` tokens (eos ignored;
a chat choice may also end on a chat stop string, with fewer), finish reason and usage to match, and no
error event; no request is refused (no 429: a disconnect gives its concurrency slot back; the limit is
twice the client count, as a client that left may start its next request before the front has noticed, so
slots leaked by a fraction of the run's disconnects would show) and no stream hangs (each has a deadline);
the front noticed disconnects mid-generation (`lorax_request_failure{err="cancelled"}`); afterwards the
router holds no request, queue entry or KV block (`/metrics`), the shard no batch and all its own KV blocks
free (Health's `x-qwen-worker-stats`), and the front still serves: `/health` 200 and greedy requests give
the texts the demo model and adapters were trained on; the front's and the shard's RSS grow by less than
64 MiB from the end of the first fifth of the run to its end.

And, in order: a client that leaves a stream is cancelled in the router at once: streams that start after a
long one and would outlast it are left after their first event; when the long one ends, no other request is
in flight and no KV block is held (without the cancellation they would still be generating).

Size: QWEN_HTTP_SOAK_REQUESTS (CI default 160), QWEN_HTTP_SOAK_CLIENTS (12), QWEN_HTTP_SOAK_DISCONNECT
(fraction, 0.3). `make soak` runs a long one. The figures are printed (RELIABILITY.md quotes them).
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import subprocess
import time
from collections import Counter
from dataclasses import dataclass

import httpx
import pytest

from fronts import FrontProc, start_front, stop_front
from make_demo_model import ADAPTERS, BASE_TEXTS, STORY_PROMPT
from shards import ShardProc, start_launcher, stop

pytestmark = pytest.mark.soak
REQUESTS = int(os.environ.get("QWEN_HTTP_SOAK_REQUESTS", "160"))
CLIENTS = int(os.environ.get("QWEN_HTTP_SOAK_CLIENTS", "12"))
DISCONNECT = float(os.environ.get("QWEN_HTTP_SOAK_DISCONNECT", "0.3"))
DEADLINE_S = 120.0  # one request, from send to its end (a hang guard)
BOUND_S = 30.0  # settling after the load (a hang guard)
MAX_NEW = 24
ABANDONED_MAX_NEW = 160  # what a disconnecting client asks for: still generating when it leaves
RSS_GROWTH_LIMIT_MIB = 64  # front and shard, from the end of the first fifth of the run to its end
PROMPTS = [p for p, _ in BASE_TEXTS] + [STORY_PROMPT, "a", "the river and the sea " * 4]


@dataclass(frozen=True)
class Spec:
    route: str  # "lorax" | "chat"
    adapter: str  # "" for the base model
    prompt: str
    max_new: int
    greedy: bool
    leave_after: int | None  # events read before disconnecting; 0: before the first byte; None: read to the end


@dataclass
class Outcome:
    spec: Spec
    status: int = 0
    events: int = 0  # token events (LoRAX) or content chunks (chat)
    generated: int | None = None  # generated_tokens / completion_tokens of the end event
    finish: str | None = None
    error: object = None
    done: bool = False  # [DONE] (chat) / the final event (LoRAX)
    left: bool = False


def make_specs(rng: random.Random) -> list[Spec]:
    specs = []
    for _ in range(REQUESTS):
        leave = rng.random() < DISCONNECT
        specs.append(
            Spec(
                route=rng.choice(("lorax", "chat")),
                adapter=rng.choice(("", "", *ADAPTERS)),
                prompt=rng.choice(PROMPTS),
                max_new=ABANDONED_MAX_NEW if leave else rng.randint(1, MAX_NEW),
                greedy=rng.random() < 0.5,
                leave_after=(0 if rng.random() < 0.2 else rng.randint(1, 4)) if leave else None,
            )
        )
    return specs


def request_of(spec: Spec) -> tuple[str, dict]:
    sampling: dict[str, object] = {"temperature": 0} if spec.greedy else {"temperature": 0.8, "top_p": 0.9, "seed": 7}
    if spec.route == "lorax":
        params: dict[str, object] = {"max_new_tokens": spec.max_new, "ignore_eos_token": True, **sampling}
        if not spec.greedy:
            params["do_sample"] = True
        if spec.adapter:
            params["adapter_id"] = spec.adapter
        return "/generate_stream", {"inputs": spec.prompt, "parameters": params}
    body = {
        "model": spec.adapter,
        "messages": [{"role": "user", "content": spec.prompt}],
        "max_tokens": spec.max_new,
        "ignore_eos_token": True,
        "stream": True,
        "stream_options": {"include_usage": True},
        **sampling,
    }
    return "/v1/chat/completions", body


async def one(client: httpx.AsyncClient, spec: Spec) -> Outcome:
    out = Outcome(spec)
    path, body = request_of(spec)
    if spec.leave_after == 0:  # gone before the first byte: the task is cancelled while it waits
        task = asyncio.ensure_future(client.post(path, json=body))
        await asyncio.sleep(random.uniform(0.0, 0.05))
        task.cancel()
        try:
            await task
        except (asyncio.CancelledError, httpx.HTTPError):
            pass
        else:
            out.status = task.result().status_code
        out.left = True
        return out
    async with client.stream("POST", path, json=body) as r:
        out.status = r.status_code
        if r.status_code != 200:
            out.error = json.loads(await r.aread())
            return out
        async for line in r.aiter_lines():
            if not line.startswith("data: "):
                continue
            data = line[6:]
            if data == "[DONE]":
                out.done = True
                continue
            event = json.loads(data)
            if "error" in event:
                out.error = event
                continue
            if spec.route == "lorax":
                out.events += 1
                if event["details"] is not None:
                    out.generated, out.finish = event["details"]["generated_tokens"], event["details"]["finish_reason"]
                    out.done = True
            else:
                if event["choices"]:
                    choice = event["choices"][0]
                    out.finish = choice["finish_reason"] or out.finish
                    if choice["delta"].get("content"):
                        out.events += 1
                if event.get("usage"):
                    out.generated = event["usage"]["completion_tokens"]
            if spec.leave_after is not None and out.events >= spec.leave_after:
                out.left = True  # leaving the block closes the connection mid-stream
                return out
    return out


async def drive(url: str, specs: list[Spec]) -> list[Outcome]:
    todo = list(specs)
    outcomes: list[Outcome] = []
    limits = httpx.Limits(max_connections=CLIENTS + 4, max_keepalive_connections=CLIENTS)
    async with httpx.AsyncClient(base_url=url, timeout=httpx.Timeout(DEADLINE_S), limits=limits) as client:

        async def worker() -> None:
            while todo:
                spec = todo.pop()
                outcomes.append(await asyncio.wait_for(one(client, spec), DEADLINE_S))

        await asyncio.gather(*(worker() for _ in range(CLIENTS)))
    return outcomes


def rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))


def shard_pid(shard: ShardProc) -> int:
    out = subprocess.run(["pgrep", "-P", str(shard.proc.pid)], capture_output=True, text=True).stdout.split()
    assert len(out) == 1, out
    return int(out[0])


def metrics(url: str) -> dict[str, float]:
    return metrics_text(httpx.get(f"{url}/metrics", timeout=BOUND_S).text)


def metrics_text(text: str) -> dict[str, float]:
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out


@pytest.fixture(scope="module")
def stack(demo_dir):
    shard = start_launcher(os.path.join(demo_dir, "model"), os.path.join(demo_dir, "adapters"))
    try:
        front = start_front(shard, demo_dir, ("--max-concurrent-requests", str(2 * CLIENTS)))
    except BaseException:
        stop(shard)
        raise
    yield shard, front
    assert stop_front(front) == 0, front.log()[-3000:]
    assert stop(shard) == 0, shard.log()[-3000:]


def test_http_soak_with_disconnects(stack: tuple[ShardProc, FrontProc]) -> None:
    shard, front = stack
    specs = make_specs(random.Random(18))
    start = time.perf_counter()
    warm = len(specs) // 5
    outcomes = asyncio.run(drive(front.url, specs[:warm]))
    rss_before = rss(front.proc.pid), rss(shard_pid(shard))
    outcomes += asyncio.run(drive(front.url, specs[warm:]))
    rss_after = rss(front.proc.pid), rss(shard_pid(shard))
    elapsed = time.perf_counter() - start
    assert len(outcomes) == len(specs)

    kept = [o for o in outcomes if o.spec.leave_after is None]
    bad = [o for o in kept if o.status != 200 or o.error is not None or not o.done]
    assert not bad, bad[:5]  # no refusal (429 included), no error event, no stream cut short
    for o in kept:
        if o.spec.route == "lorax" or o.finish == "length":
            assert (o.generated, o.finish) == (o.spec.max_new, "length"), o
        else:  # a chat choice may end on a chat stop string
            assert o.finish == "stop" and o.generated is not None and o.generated <= o.spec.max_new, o
        if o.spec.route == "lorax":
            assert o.events == o.spec.max_new, o  # one event per token, the last with the details
    left = [o for o in outcomes if o.left]
    assert all(o.status in (0, 200) and o.error is None for o in left), [o for o in left if o.error][:5]

    # afterwards: nothing held anywhere (bounded wait: cancellations land between router steps)
    deadline = time.time() + BOUND_S
    while True:
        m, st = metrics(front.url), shard.stats(timeout=BOUND_S)
        settled = (
            m["lorax_requests_in_flight"] == 0
            and m["lorax_queue_length"] == 0
            and m["lorax_kv_blocks_used"] == 0
            and st["batches"] == 0
            and st["shard_blocks_free"] == st["shard_blocks_total"]
        )
        if settled or time.time() > deadline:
            break
        time.sleep(0.2)
    assert settled, (
        {k: v for k, v in m.items() if k.startswith(("lorax_requests_in", "lorax_queue", "lorax_kv", "lorax_batch_c"))},
        st,
    )
    mid_stream = sum(1 for o in left if o.spec.leave_after)
    cancelled = m.get('lorax_request_failure{err="cancelled"}', 0.0)
    if mid_stream:
        assert cancelled >= 1, "the front never noticed a client leaving mid-generation"

    # the front still serves, exactly what the demo model and adapters were trained on
    assert httpx.get(f"{front.url}/health", timeout=BOUND_S).status_code == 200
    prompt, continuation = BASE_TEXTS[0]
    r = httpx.post(f"{front.url}/generate", json={"inputs": prompt, "parameters": {"max_new_tokens": 48}}, timeout=60)
    assert r.status_code == 200 and r.json()["generated_text"] == continuation, r.text
    for name, (_, _, text) in ADAPTERS.items():
        body = {"inputs": STORY_PROMPT, "parameters": {"max_new_tokens": 48, "adapter_id": name}}
        r = httpx.post(f"{front.url}/generate", json=body, timeout=60)
        assert r.status_code == 200 and r.json()["generated_text"] == text, r.text

    growth = [(after - before) / 2**20 for before, after in zip(rss_before, rss_after)]
    assert max(growth) < RSS_GROWTH_LIMIT_MIB, f"RSS growth (front, shard) in MiB: {growth}"
    tokens = sum(o.generated or 0 for o in kept)
    routes = Counter((o.spec.route, o.spec.adapter or "base") for o in outcomes)
    print(
        f"\nHTTP soak: {len(outcomes)} requests ({dict(routes)}), {CLIENTS} clients, {elapsed:.1f} s; "
        f"{len(kept)} completed ({tokens} tokens, finish {dict(Counter(o.finish for o in kept))}); "
        f"{len(left)} clients left ({mid_stream} mid-stream, {len(left) - mid_stream} before the first byte); "
        f"front counted {cancelled:.0f} cancelled; RSS growth after the first fifth (front, shard): "
        f"{growth[0]:.1f}, {growth[1]:.1f} MiB; shard after: {st}"
    )


def test_a_client_that_leaves_is_cancelled(stack: tuple[ShardProc, FrontProc]) -> None:
    """Ordering, not speed: the leavers need as many steps as the anchor and start after it, so unless
    the front cancels them when their clients go, they are still running when the anchor ends."""
    shard, front = stack
    steps = 200
    leavers = [
        (
            "/generate_stream",
            {"inputs": f"leaver {i}", "parameters": {"max_new_tokens": steps, "ignore_eos_token": True}},
        )
        for i in range(3)
    ] + [
        (
            "/v1/chat/completions",
            {
                "model": model,
                "messages": [{"role": "user", "content": "hi"}],
                "max_tokens": steps,
                "ignore_eos_token": True,
                "stream": True,
            },
        )
        for model in ("", "pirate")
    ]

    async def first_data(lines) -> dict:
        async for line in lines:
            if line.startswith("data: "):
                return json.loads(line[6:])
        raise AssertionError("the stream ended without an event")

    async def scenario() -> tuple[dict, dict[str, float]]:
        async with httpx.AsyncClient(base_url=front.url, timeout=httpx.Timeout(DEADLINE_S)) as client:
            anchor = {"inputs": "anchor", "parameters": {"max_new_tokens": steps, "ignore_eos_token": True}}
            async with client.stream("POST", "/generate_stream", json=anchor) as a:
                assert a.status_code == 200
                lines = a.aiter_lines()
                await first_data(lines)
                for path, body in leavers:
                    async with client.stream("POST", path, json=body) as r:
                        assert r.status_code == 200, await r.aread()
                        await first_data(r.aiter_lines())  # admitted and prefilled; then the client leaves
                last: dict = {}
                async for line in lines:
                    if line.startswith("data: "):
                        last = json.loads(line[6:])
                m = metrics_text((await client.get("/metrics")).text)
            return last, m

    last, m = asyncio.run(asyncio.wait_for(scenario(), DEADLINE_S))
    assert last["details"]["generated_tokens"] == steps, last
    assert m["lorax_requests_in_flight"] == 0 and m["lorax_kv_blocks_used"] == 0, m
