"""The router's prefix cache and chunked scheduling end to end: a real shard process on the demo model
(seq_length 256, dynamic NTK and logn on), driven by Routers with the prefix cache and chunking on and
off, over real unix sockets.

Every generated token and its logprob is checked against the float64 reference (tests/reference.py)
run on the whole sequence, never against another run of the router: a reused block computed under
another adapter or NTK alpha, or a block that was never computed, shows as a wrong token or logprob.
The scenario covers prompts past seq_length (NTK alpha 3, logn on), a prefix shared by two adapters,
a prefix shared by prompts of different alpha buckets, prefill logprobs, and requests
cancelled after and during their prefill, at TP=1 and TP=2 (gloo); afterwards no KV block is held.
"""

from __future__ import annotations

import functools
import json
import math
import os
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from make_demo_model import BASE_TEXTS
from reference import merge_lora, ref_forward
from router_client.requests import RequestError
from shards import start_launcher, stop

TOL = 1e-4  # the shard computes in fp32, the reference in float64
NEW = 6  # tokens generated per request
BLOCK = 16  # the launcher's --block-size in tests/shards.py
LIMITS: dict[str, Any] = dict(max_input_length=400, max_total_tokens=448, call_timeout_s=120, prefix_log_interval_s=0)
# name -> (prefix caching, chunked prefill, max_batch_prefill_tokens): chunks of 77 cut blocks and prompts awkwardly
VARIANTS = {
    "plain": (False, False, 512),
    "prefix": (True, False, 512),
    "chunked": (False, True, 77),
    "chunked+prefix": (True, True, 77),
}


@pytest.fixture(scope="module", params=[1, 2], ids=["tp1", "tp2"])
def shard(demo_dir: str, request: Any) -> Iterator[Any]:
    """One shard, or two tensor-parallel shards over gloo (the same blocks on both)."""
    s = start_launcher(os.path.join(demo_dir, "model"), os.path.join(demo_dir, "adapters"), num_shard=request.param)
    s.world = request.param  # type: ignore[attr-defined]
    yield s
    assert stop(s) == 0, s.log()[-3000:]


@pytest.fixture(scope="module")
def texts(tok: Any) -> dict[str, list[int]]:
    """Token ids: two long prefixes (past seq_length with their tails), a mid-length one, and tails."""
    story = tok.encode(" ".join(p + c for p, c in BASE_TEXTS))
    assert len(story) >= 40
    long_a = (story * 20)[:290]
    long_b = (story[7:] + story[:7]) * 20
    return {
        "A": long_a,
        "B": long_b[:275],
        "C": (story[3:] * 10)[:150],  # alpha 1
        "D": ((story[13:] + story[:13]) * 20)[:300],
        "t1": tok.encode(" Water boils at"),
        "t2": tok.encode(" The quick brown fox"),
        "t3": tok.encode(" Qwen is a family of"),
    }


@pytest.fixture(scope="module")
def logprobs(ref_model: Any, demo_dir: str, tok: Any) -> Any:
    """`logprobs(adapter, ids, prompt_len)`: float64 log-softmax over the real vocabulary at every position
    of `ids` [len(ids), n_real_vocab], with the adapter merged into the weights ("" for the base model)."""
    state, cfg = ref_model

    @functools.cache
    def weights(adapter: str) -> Any:
        if not adapter:
            return state
        path = os.path.join(demo_dir, "adapters", adapter)
        with open(os.path.join(path, "adapter_config.json")) as f:
            acfg = json.load(f)
        return merge_lora(state, load_file(os.path.join(path, "adapter_model.safetensors")), acfg)

    @functools.cache
    def run(adapter: str, ids: tuple[int, ...], prompt_len: int) -> torch.Tensor:
        logits = ref_forward(weights(adapter), cfg, list(ids), prompt_len=prompt_len)
        return torch.log_softmax(logits[:, : tok.n_real_vocab], dim=-1)

    return run


def check(logprobs: Any, adapter: str, prompt: list[int], events: list[Any]) -> None:
    """Each generated token is the reference's greedy choice, with the reference's logprob."""
    generated = [e.id for e in events]
    rows = logprobs(adapter, tuple(prompt + generated), len(prompt))[len(prompt) - 1 :]
    for k, event in enumerate(events):
        assert event.id == int(rows[k].argmax()), (adapter, len(prompt), k)
        assert math.isclose(event.logprob, float(rows[k, event.id]), abs_tol=TOL), (k, event.logprob)


def shard_stats(shard: Any, rank: int) -> dict[str, Any]:
    from worker.pb import generate_pb2 as pb

    _, call = shard.stub(rank).Health.with_call(pb.HealthRequest())
    return dict(json.loads(dict(call.trailing_metadata())["x-qwen-worker-stats"]))


def connect(shard: Any, tok: Any, variant: str) -> Any:
    from router_client.router import Router, RouterConfig

    caching, chunked, budget = VARIANTS[variant]
    config = RouterConfig(
        **LIMITS, max_batch_prefill_tokens=budget, prefix_caching=caching, chunked_prefill=chunked, seq_length=256
    )
    try:
        router = Router.connect(f"{shard.uds}-0", tokenizer=tok, config=config)
    except ValueError as err:
        if chunked and "without chunked prefill" in str(err):
            pytest.skip("the shard does not offer chunked prefill yet (Info.chunked_prefill=false)")
        raise
    assert router.info is not None and (router.info.chunked_prefill or not chunked)
    return router


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_tokens_and_logprobs_equal_the_reference_with_the_cache_and_chunking_on_and_off(
    shard: Any, tok: Any, texts: dict[str, list[int]], logprobs: Any, variant: str
) -> None:
    caching, chunked, _ = VARIANTS[variant]
    with connect(shard, tok, variant) as router:
        sent: list[int] = []  # cache_len of every request Prefill carried
        prefill = router.client.prefill

        def spy(batch: Any, *args: Any, **kwargs: Any) -> Any:
            sent.extend(r.cache_len for r in batch.requests)
            return prefill(batch, *args, **kwargs)

        router.client.prefill = spy
        pirate = router.load_adapter("pirate")
        a, b, c, t1, t2, t3 = (texts[k] for k in ("A", "B", "C", "t1", "t2", "t3"))

        def run(prompt: list[int], adapter: int = 0, **kw: Any) -> int:
            """Generate alone and check against the reference; returns the cache_len its Prefill carried."""
            before = len(sent)
            handle = router.submit(prompt, stopping=dict(max_new_tokens=NEW), adapter_index=adapter, **kw)
            check(logprobs, "pirate" if adapter else "", prompt, list(handle.stream(timeout=120)))
            (cache_len,) = sent[before:]
            return cache_len

        def reused(prefix: list[int]) -> int:
            return BLOCK * (len(prefix) // BLOCK) if caching else 0

        assert run(a + t1) == 0  # alpha 3 (290+ tokens > seq_length 256), logn on
        assert run(a + t2) == reused(a)
        assert run(a[:200] + t1) == 0  # the same first blocks, but alpha 1: never the alpha-3 ones
        assert run(a + t1, pirate) == 0  # another adapter
        assert run(a + t2, pirate) == reused(a)
        assert run(c + t1) == 0
        assert run(c + t2) == reused(c)  # alpha 1 reuses alpha 1
        whole = c[: reused(c) or BLOCK * (len(c) // BLOCK)]  # a prompt of cached blocks only
        assert run(whole) == max(reused(c) - BLOCK, 0)  # its last block is computed again

        before = len(sent)
        prompt = a + t3
        res = router.generate(prompt, timeout=120, stopping=dict(max_new_tokens=1), prefill_logprobs=True)
        assert sent[before:] == [0]  # prefill logprobs need every prompt token computed: no cache
        rows = logprobs("", tuple(prompt), len(prompt))
        pre = res.prefill_tokens
        assert [t.id for t in pre] == prompt and math.isnan(pre[0].logprob)
        for i in range(1, len(prompt)):
            assert math.isclose(pre[i].logprob, float(rows[i - 1, prompt[i]]), abs_tol=TOL), i

        cancelled = router.submit(b + t1, stopping=dict(max_new_tokens=160, ignore_eos_token=True))
        next(iter(cancelled.stream(timeout=120)))  # its first token: its prefill is complete
        router.cancel(cancelled.request_id)
        with pytest.raises(RequestError) as err:
            cancelled.result(timeout=120)
        assert err.value.code == "CANCELLED"
        assert run(b + t2) == reused(b)  # the cancelled request's prompt blocks, reused

        # cancelled right after its first Prefill: chunked, only 77 of its 300 tokens were computed
        d = texts["D"]
        armed = [True]

        def cancel_all(step: Any) -> None:
            if armed[0] and step.method == "prefill":
                armed[0] = False
                for rid in router.debug_state()["in_flight"]:
                    router.cancel(rid)

        router.step_observer = cancel_all
        with pytest.raises(RequestError) as err:
            router.generate(d + t1, timeout=120, stopping=dict(max_new_tokens=NEW))
        assert err.value.code == "CANCELLED" and not armed[0]
        router.step_observer = None
        assert run(d + t2) == (0 if chunked else reused(d))  # blocks never computed are never reused

        state = router.debug_state()
        assert state["used_blocks"] == 0 and not state["in_flight"] and state["running_batch"] is None
        assert (state["cached_blocks"] > 0) == caching
        router.clear_prefix_cache()
        state = router.debug_state()
        assert state["allocator_free_blocks"] == state["usable_blocks"] and state["cached_blocks"] == 0
    for rank in range(shard.world):
        stats = shard_stats(shard, rank)
        assert stats["batches"] == 0 and stats["shard_blocks_free"] == stats["shard_blocks_total"], rank
