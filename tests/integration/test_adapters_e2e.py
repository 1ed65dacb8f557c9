"""LoRA adapters end to end: the demo's two PEFT adapters loaded through the Router into a real shard,
served side by side with the base model in one batch, offloaded and reloaded (by hand and by the
router's adapter memory budget), and refused cleanly when the index or the id is bad.

Expectations: each adapter's trained continuation of STORY_PROMPT (scripts/make_demo_model.py) and
the float64 reference with the adapter merged into the weights (tests/reference.py).
"""

from __future__ import annotations

import functools
import json
import os

import grpc
import pytest
from safetensors.torch import load_file

from make_demo_model import ADAPTERS, BASE_TEXTS, STORY_PROMPT
from reference import merge_lora, ref_greedy
from shards import start_launcher, stop

STORY = dict(max_new_tokens=48)
BASE_STORY = dict(BASE_TEXTS)[STORY_PROMPT]


@pytest.fixture(scope="module", params=["torch", "triton"])
def shard(demo_dir, request):
    """Room for two resident adapters: the router's adapter budget (DownloadAdapter answers 1/2 per
    adapter) then holds exactly the demo's two, and a third load must offload one. Both LoRA backends:
    the batched-bmm path and the Triton kernels (in the Triton interpreter on a CPU)."""
    s = start_launcher(
        os.path.join(demo_dir, "model"),
        os.path.join(demo_dir, "adapters"),
        extra=("--max-adapter-slots", "2", "--lora-backend", request.param),
    )
    yield s
    assert stop(s) == 0, s.log()[-3000:]


@pytest.fixture(scope="module")
def adapters(router):
    """name -> index, loaded through the router (DownloadAdapter on shard 0, LoadAdapter everywhere)."""
    return {name: router.load_adapter(name) for name in ADAPTERS}


@pytest.fixture(scope="module")
def expected(ref_model, tok, demo_dir):
    """`expected(name)`: the reference's greedy token ids of STORY_PROMPT with adapter `name`
    merged into the weights ("base": no adapter); `expected(name, n)`: its first n, past the end of text."""
    state, cfg = ref_model
    prompt = tok.encode(STORY_PROMPT)
    eos = sorted(tok.eos_token_ids)

    @functools.cache
    def run(name: str, past_eos: int = 0) -> list[int]:
        weights = state
        if name != "base":
            path = os.path.join(demo_dir, "adapters", name)
            with open(os.path.join(path, "adapter_config.json")) as f:
                acfg = json.load(f)
            weights = merge_lora(state, load_file(os.path.join(path, "adapter_model.safetensors")), acfg)
        if past_eos:
            return ref_greedy(weights, cfg, prompt, past_eos)
        return ref_greedy(weights, cfg, prompt, STORY["max_new_tokens"], stop_ids=eos)

    return run


def continuation(name: str) -> str:
    return BASE_STORY if name == "base" else ADAPTERS[name][2]


def check_story(result, name: str, expected) -> None:
    assert result.text == continuation(name), name
    assert result.finish_reason == "eos_token" and result.token_ids == expected(name), name


def test_base_and_both_adapters_in_one_batch(router, adapters, expected, wire):
    """STORY_PROMPT three times at once (base, pirate, robot) next to other base prompts: one batch,
    each row its own adapter, each its own trained continuation."""
    assert sorted(adapters.values()) == [1, 2]
    start = len(wire)
    story = {
        name: router.submit(STORY_PROMPT, stopping=STORY, adapter_index=adapters.get(name, 0))
        for name in ("base", "pirate", "robot")
    }
    others = [(router.submit(p, stopping=STORY), c) for p, c in BASE_TEXTS if p != STORY_PROMPT]
    for name, handle in story.items():
        check_story(handle.result(timeout=60), name, expected)
    for handle, text in others:
        assert handle.result(timeout=60).text == text
    # the three story rows shared decode steps (one forward, three adapters)
    ids = {h.request_id for h in story.values()}
    shared = [batches for kind, batches in wire[start:] if kind == "decode" and ids <= {i for b in batches for i in b}]
    assert len(shared) >= 20
    # the adapters changed the story, and differently
    assert len({tuple(expected(n)) for n in ("base", "pirate", "robot")}) == 3


def test_offload_and_reload(router, adapters, expected, shard_stats):
    from router_client.requests import ValidationError

    pirate, robot = adapters["pirate"], adapters["robot"]
    busy = router.submit(STORY_PROMPT, stopping=STORY, adapter_index=pirate)
    with pytest.raises(ValidationError, match=f"adapter index {pirate} is in use"):
        router.offload_adapter(pirate)  # refused while a request uses it
    check_story(busy.result(timeout=60), "pirate", expected)

    used = shard_stats()["adapter_slots_used"]
    router.offload_adapter(pirate)
    assert shard_stats()["adapter_slots_used"] == used - 1
    assert router.debug_state()["adapters"][pirate]["loaded"] is False

    # a request for the offloaded index: the router loads it back before admitting it
    again = router.submit(STORY_PROMPT, stopping=STORY, adapter_index=pirate)
    side = router.submit(STORY_PROMPT, stopping=STORY, adapter_index=robot)
    check_story(again.result(timeout=60), "pirate", expected)
    check_story(side.result(timeout=60), "robot", expected)
    assert router.debug_state()["adapters"][pirate]["loaded"] is True
    assert shard_stats()["adapter_slots_used"] == used

    # offloaded and loaded anew under a fresh index: indices are never reused
    router.offload_adapter(pirate)
    fresh = router.load_adapter("pirate")
    assert fresh not in (pirate, robot) and fresh > max(pirate, robot)
    results = {
        name: router.submit(STORY_PROMPT, stopping=STORY, adapter_index=i)
        for name, i in (("pirate", fresh), ("robot", robot), ("base", 0))
    }
    for name, handle in results.items():
        check_story(handle.result(timeout=60), name, expected)


def test_budget_offloads_the_least_recently_used_adapter(router, adapters, expected, shard_stats, wire):
    """Two adapters fit (--max-adapter-slots 2). Loading a third makes the router offload the idle
    one used longest ago; requests for all three at once still each get their own adapter, the
    router taking turns as adapters go idle."""
    pirate, robot = adapters["pirate"], adapters["robot"]
    for name in ("pirate", "robot"):  # robot is now the most recently used
        check_story(
            router.generate(STORY_PROMPT, stopping=STORY, adapter_index=adapters[name], timeout=60), name, expected
        )
    state = router.debug_state()["adapters"]
    assert state[pirate]["loaded"] and state[robot]["loaded"]

    third = router.load_adapter("robot")  # a second copy: same weights, a new index
    state = router.debug_state()["adapters"]
    assert state[third]["loaded"] and state[robot]["loaded"] and not state[pirate]["loaded"]
    assert sum(a["loaded"] for a in state.values()) == 2 and shard_stats()["adapter_slots_used"] <= 2

    start = len(wire)
    handles = [
        (router.submit(STORY_PROMPT, stopping=STORY, adapter_index=i), name)
        for i, name in ((pirate, "pirate"), (robot, "robot"), (third, "robot"))
    ]
    for handle, name in handles:
        check_story(handle.result(timeout=60), name, expected)
    assert shard_stats()["adapter_slots_used"] <= 2
    # never all three in one step: the third waited until an adapter went idle and could be offloaded
    ids = {h.request_id for h, _ in handles}
    steps = [{i for b in batches for i in b} for kind, batches in wire[start:] if kind == "decode"]
    assert steps and not any(ids <= step for step in steps)


def test_unknown_adapter_index_is_refused_while_others_run(router, adapters, expected, shard_stats):
    from router_client.requests import ValidationError

    running = [router.submit(STORY_PROMPT, stopping=STORY, adapter_index=adapters[n]) for n in ("pirate", "robot")]
    stream = running[0].stream(timeout=60)
    next(stream)
    with pytest.raises(ValidationError, match="adapter index 99 is not loaded"):
        router.submit(STORY_PROMPT, stopping=STORY, adapter_index=99)
    assert not running[0].done
    for handle, name in zip(running, ("pirate", "robot")):
        check_story(handle.result(timeout=60), name, expected)
    assert router.debug_state()["in_flight"] == [] and shard_stats()["batches"] == 0


@pytest.mark.parametrize(
    "adapter_id, code, needle",
    [
        ("../x", grpc.StatusCode.INVALID_ARGUMENT, "contains '..'"),
        ("pirate/../../model", grpc.StatusCode.INVALID_ARGUMENT, "contains '..'"),
        ("/etc", grpc.StatusCode.INVALID_ARGUMENT, "outside the adapter root"),
        ("no-such-adapter", grpc.StatusCode.NOT_FOUND, "not found under the adapter root"),
    ],
)
def test_bad_adapter_id_is_refused_and_serving_goes_on(router, adapters, expected, adapter_id, code, needle):
    from router_client.client import ShardError

    known = set(router.debug_state()["adapters"])
    running = router.submit(STORY_PROMPT, stopping=STORY, adapter_index=adapters["robot"])
    with pytest.raises(ShardError) as err:
        router.load_adapter(adapter_id)
    assert err.value.code == code and needle in str(err.value) and repr(adapter_id) in str(err.value)
    assert set(router.debug_state()["adapters"]) == known  # no index was given out
    check_story(running.result(timeout=60), "robot", expected)
    check_story(
        router.generate(STORY_PROMPT, stopping=STORY, adapter_index=adapters["pirate"], timeout=60), "pirate", expected
    )


def test_pools_grow_while_a_request_runs(demo_dir, tok, expected):
    """A shard whose pools start at 4 lanes a slot (--lora-pool-rank 4): robot (rank 4) fits; pirate (rank 8), loaded
    while a robot request is being generated (96 tokens, past its end of text), re-lays the pools out (logged). The
    running request, a pirate story and a base one are then each their reference's tokens."""
    from helpers import ROUTER_LIMITS
    from router_client.router import Router, RouterConfig

    long = dict(max_new_tokens=96, ignore_eos_token=True)
    shard = start_launcher(
        os.path.join(demo_dir, "model"), os.path.join(demo_dir, "adapters"), extra=("--lora-pool-rank", "4")
    )
    try:
        with Router.connect(f"{shard.uds}-0", tokenizer=tok, config=RouterConfig(**ROUTER_LIMITS)) as router:
            robot = router.load_adapter("robot")
            assert shard.stats()["adapter_pool_lanes"] == 4
            running = router.submit(STORY_PROMPT, stopping=long, adapter_index=robot)
            stream = running.stream(timeout=60)
            for _ in range(3):
                next(stream)
            pirate = router.load_adapter("pirate")
            assert not running.done and shard.stats()["adapter_pool_lanes"] == 8
            later = {}
            for name, index in (("pirate", pirate), ("base", 0)):
                later[name] = router.submit(STORY_PROMPT, stopping=STORY, adapter_index=index)
            assert running.result(timeout=60).token_ids == expected("robot", 96)
            for name, handle in later.items():
                check_story(handle.result(timeout=60), name, expected)
        log = shard.log()
    finally:
        rc = stop(shard)
    assert rc == 0
    assert "4 lanes a slot until a larger adapter loads" in log and "re-laid out at 8 lanes a slot (were 4)" in log
