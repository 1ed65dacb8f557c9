"""Fixtures: a real shard process on the demo model, and a Router driving it."""

from __future__ import annotations

import os

import pytest

from helpers import ROUTER_LIMITS
from shards import start_launcher, stop


@pytest.fixture(scope="module")
def shard(demo_dir):
    s = start_launcher(os.path.join(demo_dir, "model"), os.path.join(demo_dir, "adapters"))
    yield s
    assert stop(s) == 0, s.log()[-3000:]


@pytest.fixture(scope="session")
def tok(demo_dir):
    from worker.tokenizer import QwenTokenizer

    return QwenTokenizer.from_dir(os.path.join(demo_dir, "model"))


@pytest.fixture(scope="session")
def ref_model(demo_dir):
    """(state, cfg) of the demo checkpoint in float64, for tests/reference.py."""
    from reference import load_checkpoint

    return load_checkpoint(os.path.join(demo_dir, "model"))


@pytest.fixture(scope="module")
def router(shard, tok):
    """One Router on the module's shard, through LoRAX's startup sequence."""
    from router_client.router import Router, RouterConfig

    with Router.connect(f"{shard.uds}-0", tokenizer=tok, config=RouterConfig(**ROUTER_LIMITS)) as r:
        yield r


@pytest.fixture(scope="module")
def shard_stats(shard):
    """`shard_stats()`: the shard's own bookkeeping (live batches, shard-owned KV blocks, adapter
    slots), read from Health's trailing metadata."""
    return shard.stats


@pytest.fixture(scope="module")
def wire(router):
    """What the router sends from here on, in order: ("prefill", a copy of the Batch) and
    ("decode", [request ids of each CachedBatch]); a spy on its ShardedClient for the module."""
    from worker.pb import generate_pb2 as pb

    sent: list[tuple[str, object]] = []
    prefill, decode = router.client.prefill, router.client.decode

    def spy_prefill(batch, *args, **kwargs):
        sent.append(("prefill", pb.Batch.FromString(batch.SerializeToString())))
        return prefill(batch, *args, **kwargs)

    def spy_decode(batches, *args, **kwargs):
        sent.append(("decode", [list(b.request_ids) for b in batches]))
        return decode(batches, *args, **kwargs)

    router.client.prefill, router.client.decode = spy_prefill, spy_decode
    yield sent
    del router.client.prefill, router.client.decode
