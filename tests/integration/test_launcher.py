"""qwen-launch with 2 shards (gloo): same outputs as one shard, the per-shard generation rule, and
fault handling: kill -9 of one shard stops the other and the launcher names it, leaving no process."""

from __future__ import annotations

import os
import signal
import subprocess
import time

import pytest

from shards import start_launcher, stop


def _pb():
    from worker.pb import generate_pb2 as pb

    return pb


def _request(rid: int, ids: list[int], max_new: int, first_block: int):
    pb = _pb()
    n = len(ids) + max_new - 1
    blocks = list(range(first_block, first_block + -(-n // 16)))
    return pb.Request(
        id=rid,
        tokenized_inputs=pb.TokenizedInputs(ids=ids),
        parameters=pb.NextTokenChooserParameters(temperature=1.0, top_p=1.0, typical_p=1.0, repetition_penalty=1.0),
        stopping_parameters=pb.StoppingCriteriaParameters(max_new_tokens=max_new),
        blocks=blocks,
        slots=[b * 16 + j for b in blocks for j in range(16)][:n],
    )


def on_all(calls):
    """Run one call per shard concurrently (shards run the forward in lock-step)."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(len(calls)) as pool:
        return [f.result(timeout=60) for f in [pool.submit(c) for c in calls]]


def _children(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split()
    return [int(p) for p in out]


@pytest.fixture(scope="module")
def two(demo_dir):
    s = start_launcher(os.path.join(demo_dir, "model"), os.path.join(demo_dir, "adapters"), num_shard=2)
    yield s
    if s.proc.poll() is None:
        assert stop(s) == 0, s.log()[-3000:]


def test_two_shards_same_tokens_as_reference_and_generation_rule(two, demo_dir):
    from reference import load_checkpoint, ref_greedy

    pb = _pb()
    from worker.tokenizer import QwenTokenizer

    state, cfg = load_checkpoint(os.path.join(demo_dir, "model"))
    tok = QwenTokenizer.from_dir(os.path.join(demo_dir, "model"))
    stubs = [two.stub(0), two.stub(1)]
    assert list(stubs[0].ServiceDiscovery(pb.ServiceDiscoveryRequest()).urls) == [
        f"unix://{two.uds}-0",
        f"unix://{two.uds}-1",
    ]
    prompts = {10: [3, 4, 5, 6], 11: [7, 8], 12: [9, 10, 11], 13: [12]}
    reqs = [_request(rid, p, 6, 1 + 2 * k) for k, (rid, p) in enumerate(prompts.items())]
    batch = pb.Batch(id=5, requests=reqs, size=len(reqs))
    got = {rid: [] for rid in prompts}
    seen_by = {0: set(), 1: set()}
    responses = on_all([lambda s=s: s.Prefill(pb.PrefillRequest(batch=batch)) for s in stubs])
    while True:
        for rank, resp in enumerate(responses):
            for g in resp.generations:
                assert g.request_id % 2 == rank  # a shard answers only its own requests
                seen_by[rank].add(g.request_id)
                got[g.request_id] += list(g.next_tokens.ids)
        if not responses[0].HasField("batch"):
            break
        cached = responses[0].batch
        responses = on_all([lambda s=s, c=cached: s.Decode(pb.DecodeRequest(batches=[c])) for s in stubs])
    assert seen_by == {0: {10, 12}, 1: {11, 13}}
    for rid, p in prompts.items():
        assert got[rid] == ref_greedy(state, cfg, p, 6, stop_ids=sorted(tok.eos_token_ids))


def test_kill_one_shard_stops_all(demo_dir):
    s = start_launcher(os.path.join(demo_dir, "model"), os.path.join(demo_dir, "adapters"), num_shard=2)
    shard_pids = _children(s.proc.pid)
    assert len(shard_pids) == 2
    pb = _pb()
    stubs = [s.stub(0), s.stub(1)]
    batch = pb.Batch(id=1, requests=[_request(0, [1, 2, 3], 40, 1)], size=1)
    resp = on_all([lambda st=st: st.Prefill(pb.PrefillRequest(batch=batch)) for st in stubs])
    on_all([lambda st=st: st.Decode(pb.DecodeRequest(batches=[resp[0].batch])) for st in stubs])  # mid-decode
    victim = shard_pids[1]
    os.kill(victim, signal.SIGKILL)
    t0 = time.time()
    rc = s.proc.wait(timeout=30)  # bounded: the launcher notices and tears down
    assert rc != 0 and time.time() - t0 < 30
    log = s.log()
    assert "shard 1 exited" in log or "shard 0 exited" in log, log[-2000:]
    time.sleep(0.5)
    for pid in shard_pids:
        assert not os.path.exists(f"/proc/{pid}") or open(f"/proc/{pid}/stat").read().split()[2] == "Z"
    stop(s)


def test_two_launchers_as_two_nodes(demo_dir):
    """Multi-node path on one machine: two launchers (--nnodes 2, distinct --node-rank, one shard each)
    form one world of 2; seeded sampling gives the same tokens as a single shard, and preloaded
    adapters are reported in Info."""
    import sys
    import tempfile

    from shards import ROOT, ShardProc, dying_with_us
    from worker.launcher import free_port

    pb = _pb()
    model_dir, root = os.path.join(demo_dir, "model"), os.path.join(demo_dir, "adapters")
    d = tempfile.mkdtemp(prefix="qn", dir="/tmp")
    uds, port = os.path.join(d, "s"), free_port()
    nodes = []
    for node in (0, 1):
        log = open(os.path.join(d, f"node{node}.log"), "w")
        cmd = [
            sys.executable,
            "-m",
            "worker.launcher",
            model_dir,
            "--num-shard",
            "1",
            "--nnodes",
            "2",
            "--node-rank",
            str(node),
            "--master-addr",
            "127.0.0.1",
            "--master-port",
            str(port),
            "--uds-path",
            uds,
            "--adapter-root",
            root,
            "--max-total-tokens",
            "2048",
            "--preloaded-adapter-ids",
            "pirate",
        ]
        nodes.append(
            ShardProc(
                uds,
                subprocess.Popen(
                    cmd, cwd=ROOT, env=dict(os.environ, **dying_with_us()), stdout=log, stderr=subprocess.STDOUT
                ),
                log.name,
            )
        )
    single = start_launcher(model_dir, root, num_shard=1)
    try:
        deadline = time.time() + 120
        while not (os.path.exists(f"{uds}-0") and os.path.exists(f"{uds}-1")):
            assert all(n.proc.poll() is None for n in nodes) and time.time() < deadline, nodes[0].log()
            time.sleep(0.1)
        stubs = [nodes[0].stub(0), nodes[1].stub(1)]
        info = stubs[0].Info(pb.InfoRequest())
        assert [(a.adapter_index, list(a.adapter_parameters.adapter_ids)) for a in info.preloaded_adapters] == [
            (1, ["pirate"])
        ]
        sampled = dict(temperature=0.9, top_k=20, top_p=0.95, do_sample=True, seed=1234)

        def request(rid):
            r = _request(rid, [3, 4, 5], 8, 1 + 2 * (rid % 4))
            r.parameters.CopyFrom(pb.NextTokenChooserParameters(typical_p=1.0, repetition_penalty=1.0, **sampled))
            return r

        def run(stub_list, rids):
            out = {rid: [] for rid in rids}
            batch = pb.Batch(id=3, requests=[request(r) for r in rids], size=len(rids))
            resps = on_all([lambda s=s: s.Prefill(pb.PrefillRequest(batch=batch)) for s in stub_list])
            while True:
                for resp in resps:
                    for g in resp.generations:
                        out[g.request_id] += list(g.next_tokens.ids)
                if not resps[0].HasField("batch"):
                    return out
                cached = resps[0].batch
                resps = on_all([lambda s=s, c=cached: s.Decode(pb.DecodeRequest(batches=[c])) for s in stub_list])

        two_nodes = run(stubs, [20, 21])  # request 21 is answered by rank 1 (the second node)
        one = run([single.stub(0)], [20, 21])
        assert two_nodes == one and len(one[21]) == 8
    finally:
        stop(single)
        for n in nodes:
            n.proc.send_signal(signal.SIGTERM)
        for n in nodes:
            n.proc.wait(timeout=30)


def test_health_on_one_shard_does_not_hang(two):
    pb = _pb()
    for rank in (1, 0):
        two.stub(rank).Health(pb.HealthRequest(), timeout=10)  # no collective: answers alone
