"""The router's prefix cache and chunked scheduling end to end: a real shard process on the demo model
(seq_length 256, dynamic NTK and logn on), driven by Routers with the prefix cache and chunking on and
off, over real unix sockets, at TP=1 and TP=2 (gloo).

Every generated token and its logprob is checked against the float64 reference (tests/reference.py)
run on the whole sequence, never against another run of the router: a reused block computed under
another adapter or NTK alpha, or a block that was never computed, shows as a wrong token or logprob.
The scenario (tests/prefix_scenario.py) covers prompts past seq_length (NTK alpha 3, logn on), a
prefix shared by two adapters, a prefix shared by prompts of different alpha buckets, a prompt of
cached blocks only, prefill logprobs, and requests cancelled after and during their prefill;
afterwards no KV block is held by the router or any shard.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from typing import Any

import pytest

import prefix_scenario as ps
from shards import start_launcher, stop

TOL = 1e-4  # the shard computes in fp32, the reference in float64


@pytest.fixture(scope="module", params=[1, 2], ids=["tp1", "tp2"])
def shard(demo_dir: str, request: Any) -> Iterator[Any]:
    """One shard, or two tensor-parallel shards over gloo (the same blocks on both)."""
    s = start_launcher(os.path.join(demo_dir, "model"), os.path.join(demo_dir, "adapters"), num_shard=request.param)
    s.world = request.param  # type: ignore[attr-defined]
    yield s
    assert stop(s) == 0, s.log()[-3000:]


@pytest.fixture(scope="module")
def logprobs(ref_model: Any, demo_dir: str, tok: Any) -> Any:
    return ps.reference(ref_model, demo_dir, tok.n_real_vocab)


def shard_stats(shard: Any, rank: int) -> dict[str, Any]:
    from worker.pb import generate_pb2 as pb

    _, call = shard.stub(rank).Health.with_call(pb.HealthRequest())
    return dict(json.loads(dict(call.trailing_metadata())["x-qwen-worker-stats"]))


@pytest.mark.parametrize("variant", list(ps.VARIANTS))
def test_tokens_and_logprobs_equal_the_reference_with_the_cache_and_chunking_on_and_off(
    shard: Any, tok: Any, logprobs: Any, variant: str
) -> None:
    from router_client.router import Router

    caching, chunked, _ = ps.VARIANTS[variant]
    with Router.connect(f"{shard.uds}-0", tokenizer=tok, config=ps.router_config(variant)) as router:
        assert router.info is not None and router.info.chunked_prefill  # the chunked variants really chunk
        scenario = ps.Scenario(router, ps.texts(tok), logprobs, caching, chunked, TOL)
        scenario.play()
        scenario.assert_no_leak()
    for rank in range(shard.world):
        stats = shard_stats(shard, rank)
        assert stats["batches"] == 0 and stats["shard_blocks_free"] == stats["shard_blocks_total"], rank
