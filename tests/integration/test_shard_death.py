"""A shard killed with SIGKILL in the middle of generation (issue 18), with real processes on real sockets.

Claims: every request in flight fails with a clear error instead of hanging (the router library: a
RequestError naming the shard; the HTTP front: a 424 JSON `{"error", "error_type"}` for a plain request and
an error event for a stream that already started), within a bound (30 s: arrival, not speed); new requests
fail the same way; the front's `/health` turns 503 and the front itself keeps answering; the launcher
notices, stops the other shard and exits non-zero naming the dead one.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
from collections.abc import Iterator

import httpx
import pytest

from fronts import FrontProc, start_front, stop_front
from shards import ShardProc, start_launcher, stop

BOUND_S = 30.0  # every failure must arrive within this (a hang guard, not a speed claim)
LONG = 200  # new tokens: generation still runs when the shard is killed (the front allows 256 in all)


def shard_pids(launcher: ShardProc) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(launcher.proc.pid)], capture_output=True, text=True).stdout.split()
    return [int(p) for p in out]


def wait_for(predicate, what: str, bound: float = BOUND_S) -> None:
    deadline = time.time() + bound
    while not predicate():
        assert time.time() < deadline, f"{what}: not within {bound:g} s"
        time.sleep(0.05)


def launcher_exit(launcher: ShardProc, dead_rank: int) -> None:
    """The launcher notices, exits non-zero and names the dead shard."""
    try:
        rc = launcher.proc.wait(timeout=BOUND_S)
    except subprocess.TimeoutExpired:
        pytest.fail("the launcher did not exit after a shard was killed:\n" + launcher.log()[-3000:])
    log = launcher.log()
    assert rc != 0, log[-3000:]
    assert f"shard {dead_rank} exited with code -9" in log, log[-3000:]


# ------------------------------------------------------------------------------------ the router library


def test_router_fails_every_request_naming_the_shard(demo_dir, tok):
    """Two shards (TP over gloo); shard 1 is killed while a batch decodes. Shard 0's collective breaks
    (or the launcher stops it); every request fails naming the dead shard 1 (UNAVAILABLE), none hangs."""
    from router_client.requests import RequestError
    from router_client.router import Router, RouterConfig

    launcher = start_launcher(os.path.join(demo_dir, "model"), os.path.join(demo_dir, "adapters"), num_shard=2)
    try:
        pids = shard_pids(launcher)
        assert len(pids) == 2
        config = RouterConfig(max_input_length=64, max_total_tokens=256, max_batch_prefill_tokens=256)
        with Router.connect(f"{launcher.uds}-0", tokenizer=tok, config=config) as router:
            assert router.health_probe()
            stopping = {"max_new_tokens": LONG, "ignore_eos_token": True}
            handles = [router.submit(f"story number {i}", {"temperature": 0}, stopping) for i in range(6)]
            for h in handles:  # every request has produced its first token: all are in the running batch
                next(h.stream(timeout=BOUND_S))
            os.kill(pids[1], signal.SIGKILL)
            for h in handles:
                with pytest.raises(RequestError) as err:
                    h.result(timeout=BOUND_S)
                assert "shard 1 " in str(err.value) and "UNAVAILABLE" in str(err.value), str(err.value)
            # a new request fails too, and the probe says unhealthy; nothing waits forever
            with pytest.raises(RequestError, match="shard [01] "):
                router.generate("after the kill", timeout=BOUND_S, stopping={"max_new_tokens": 4})
            assert router.health_probe() is False
            state = router.debug_state()
            assert state["in_flight"] == [] and state["queued"] == [] and state["running_batch"] is None
            assert state["used_blocks"] == 0  # the router's own block pool is consistent again
        launcher_exit(launcher, dead_rank=1)
    finally:
        if launcher.proc.poll() is None:
            stop(launcher)


# ------------------------------------------------------------------------------------------- the HTTP front


@pytest.fixture(scope="module")
def doomed(demo_dir) -> Iterator[tuple[ShardProc, FrontProc]]:
    """A shard and a front of this module's own: the test kills the shard."""
    launcher = start_launcher(os.path.join(demo_dir, "model"), os.path.join(demo_dir, "adapters"))
    front = start_front(launcher, demo_dir)
    yield launcher, front
    assert stop_front(front) == 0, front.log()[-3000:]
    if launcher.proc.poll() is None:
        stop(launcher)


class StreamReader(threading.Thread):
    """Reads one SSE response: its status, its `data:` payloads, and whether the body ended."""

    def __init__(self, url: str, body: dict) -> None:
        super().__init__(daemon=True)
        self.url, self.body = url, body
        self.status: int | None = None
        self.events: list[object] = []
        self.first = threading.Event()
        self.ended = threading.Event()
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            with httpx.stream("POST", self.url, json=self.body, timeout=httpx.Timeout(60.0)) as r:
                self.status = r.status_code
                if r.status_code != 200:
                    self.events.append(json.loads(r.read() or b"null"))
                    return
                for line in r.iter_lines():
                    if line.startswith("data: "):
                        data = line[6:]
                        self.events.append(data if data == "[DONE]" else json.loads(data))
                        self.first.set()
        except BaseException as err:  # reported by the test
            self.error = err
        finally:
            self.first.set()
            self.ended.set()


class PlainRequest(threading.Thread):
    def __init__(self, url: str, body: dict) -> None:
        super().__init__(daemon=True)
        self.url, self.body = url, body
        self.response: httpx.Response | None = None
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self.response = httpx.post(self.url, json=self.body, timeout=60.0)
        except BaseException as err:
            self.error = err


def is_error_body(body: object) -> bool:
    return (
        isinstance(body, dict)
        and set(body) == {"error", "error_type"}
        and isinstance(body["error"], str)
        and bool(body["error"])
        and body["error_type"] == "generation"
    )


def test_front_reports_a_killed_shard_to_every_request(doomed):
    launcher, front = doomed
    pids = shard_pids(launcher)
    assert len(pids) == 1
    params = {"max_new_tokens": LONG, "ignore_eos_token": True}
    streams = [
        StreamReader(f"{front.url}/generate_stream", {"inputs": f"tale {i}", "parameters": params}) for i in range(3)
    ]
    streams += [
        StreamReader(
            f"{front.url}/v1/chat/completions",
            {
                "model": "",
                "messages": [{"role": "user", "content": f"hello {i}"}],
                "max_tokens": LONG,
                "ignore_eos_token": True,
                "temperature": 0,
                "stream": True,
            },
        )
        for i in range(3)
    ]
    for s in streams:
        s.start()
    for s in streams:
        assert s.first.wait(BOUND_S), "a stream did not start"
        assert s.status == 200 and s.error is None, (s.status, s.events, s.error)
    # plain requests submitted before the kill: in flight (or queued) when it happens
    plain = [PlainRequest(f"{front.url}/generate", {"inputs": f"plain {i}", "parameters": params}) for i in range(2)]
    for p in plain:
        p.start()
    wait_for(lambda: all(len(s.events) >= 3 for s in streams), "streams advanced")
    os.kill(pids[0], signal.SIGKILL)

    for s in streams:
        assert s.ended.wait(BOUND_S), f"a stream hung after the kill: {s.events[-3:]}"
        assert s.error is None, s.error
        last = s.events[-1]
        assert is_error_body(last), s.events[-3:]  # the stream's last event names the failure; no [DONE]
        assert last["error"].startswith("shard 0 "), last  # names the shard, without its socket path
        assert "unix:" not in last["error"], last
    for p in plain:
        p.join(BOUND_S)
        assert not p.is_alive(), "a plain request hung after the kill"
        assert p.error is None and p.response is not None, p.error
        assert p.response.status_code == 424, p.response.text
        assert is_error_body(p.response.json()), p.response.text
        assert p.response.json()["error"].startswith("shard 0 "), p.response.text

    # new requests: a clear error too, not a hang
    r = httpx.post(f"{front.url}/generate", json={"inputs": "after", "parameters": {"max_new_tokens": 4}}, timeout=60)
    assert r.status_code in (424, 503) and set(r.json()) == {"error", "error_type"}, r.text
    body = {"inputs": "after", "parameters": {"max_new_tokens": 4, "adapter_id": "robot"}}  # not loaded yet
    r = httpx.post(f"{front.url}/generate", json=body, timeout=60)
    assert r.status_code == 424 and set(r.json()) == {"error", "error_type"}, r.text
    assert "shard 0 DownloadAdapter failed: UNAVAILABLE" in r.json()["error"], r.text
    assert httpx.get(f"{front.url}/health", timeout=60).status_code == 503
    assert httpx.get(f"{front.url}/metrics", timeout=60).status_code == 200  # the front still answers
    launcher_exit(launcher, dead_rank=0)
    assert httpx.get(f"{front.url}/health", timeout=60).status_code == 503
    assert front.proc.poll() is None  # the front did not fall over either
