"""The prefix-cache scenario shared by tests/integration/test_prefix_cache_e2e.py (CPU, fp32) and
tests/gpu/test_gpu_prefix_router.py: requests run one at a time through a Router on the demo model,
each generated token and logprob checked against the float64 reference (tests/reference.py) on the
whole sequence, and the cache_len each Prefill carried checked against what the cache must reuse.
"""

from __future__ import annotations

import functools
import json
import math
import os
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from make_demo_model import BASE_TEXTS
from reference import merge_lora, ref_forward
from router_client.requests import RequestError

NEW = 6  # tokens generated per request
BLOCK = 16  # the launcher's --block-size in tests/shards.py
LIMITS: dict[str, Any] = dict(max_input_length=400, max_total_tokens=448, call_timeout_s=300, prefix_log_interval_s=0)
# name -> (prefix caching, chunked prefill, max_batch_prefill_tokens): chunks of 77 cut blocks and prompts awkwardly
VARIANTS = {
    "plain": (False, False, 512),
    "prefix": (True, False, 512),
    "chunked": (False, True, 77),
    "chunked+prefix": (True, True, 77),
}


def texts(tok: Any) -> dict[str, list[int]]:
    """Token ids: long prefixes (past seq_length 256 with their tails: NTK alpha 3), a mid-length one
    (alpha 1), and tails."""
    story = tok.encode(" ".join(p + c for p, c in BASE_TEXTS))
    assert len(story) >= 40
    return {
        "A": (story * 20)[:290],
        "B": ((story[7:] + story[:7]) * 20)[:275],
        "C": (story[3:] * 10)[:150],
        "D": ((story[13:] + story[:13]) * 20)[:300],
        "t1": tok.encode(" Water boils at"),
        "t2": tok.encode(" The quick brown fox"),
        "t3": tok.encode(" Qwen is a family of"),
    }


def reference(ref_model: Any, demo_dir: str, n_real_vocab: int) -> Any:
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
        return torch.log_softmax(logits[:, :n_real_vocab], dim=-1)

    return run


def router_config(variant: str) -> Any:
    from router_client.router import RouterConfig

    caching, chunked, budget = VARIANTS[variant]
    return RouterConfig(
        **LIMITS, max_batch_prefill_tokens=budget, prefix_caching=caching, chunked_prefill=chunked, seq_length=256
    )


@dataclass
class Scenario:
    router: Any
    texts: dict[str, list[int]]
    logprobs: Any
    caching: bool
    chunked: bool
    tol: float  # |logprob - reference| allowed

    def __post_init__(self) -> None:
        self.sent: list[int] = []  # cache_len of every request a Prefill carried
        prefill = self.router.client.prefill

        def spy(batch: Any, *args: Any, **kwargs: Any) -> Any:
            self.sent.extend(r.cache_len for r in batch.requests)
            return prefill(batch, *args, **kwargs)

        self.router.client.prefill = spy

    def check(self, adapter: str, prompt: list[int], events: list[Any]) -> None:
        """Each generated token has the reference's logprob (on the sequence the shard generated) and is
        the reference's greedy choice wherever its top-2 margin exceeds twice the tolerance."""
        generated = [e.id for e in events]
        rows = self.logprobs(adapter, tuple(prompt + generated), len(prompt))[len(prompt) - 1 :]
        for k, event in enumerate(events):
            top = rows[k].topk(2).values
            if float(top[0] - top[1]) > 2 * self.tol:
                assert event.id == int(rows[k].argmax()), (adapter, len(prompt), k)
            assert math.isclose(event.logprob, float(rows[k, event.id]), abs_tol=self.tol), (k, event.logprob)

    def run(self, prompt: list[int], adapter: int = 0) -> int:
        """Generate alone and check against the reference; returns the cache_len its Prefill carried."""
        before = len(self.sent)
        handle = self.router.submit(prompt, stopping=dict(max_new_tokens=NEW), adapter_index=adapter)
        self.check("pirate" if adapter else "", prompt, list(handle.stream(timeout=300)))
        (cache_len,) = self.sent[before:]
        return int(cache_len)

    def reused(self, prefix: list[int]) -> int:
        return BLOCK * (len(prefix) // BLOCK) if self.caching else 0

    def play(self) -> None:
        """Shared prefixes past seq_length (alpha 3, logn on) and below it (alpha 1), under two adapters; a
        prompt made only of cached blocks; prefill logprobs; requests cancelled after and during their prefill."""
        router, run, reused = self.router, self.run, self.reused
        pirate = router.load_adapter("pirate")
        a, b, c, d, t1, t2, t3 = (self.texts[k] for k in ("A", "B", "C", "D", "t1", "t2", "t3"))
        assert run(a + t1) == 0
        assert run(a + t2) == reused(a)
        assert run(a[:200] + t1) == 0  # the same first blocks, but alpha 1: never the alpha-3 ones
        assert run(a + t1, pirate) == 0  # another adapter
        assert run(a + t2, pirate) == reused(a)
        assert run(c + t1) == 0
        assert run(c + t2) == reused(c)  # alpha 1 reuses alpha 1
        whole = c[: BLOCK * (len(c) // BLOCK)]  # a prompt of cached blocks only
        assert run(whole) == max(reused(c) - BLOCK, 0)  # its last block is computed again

        before = len(self.sent)
        prompt = a + t3
        res = router.generate(prompt, timeout=300, stopping=dict(max_new_tokens=1), prefill_logprobs=True)
        assert self.sent[before:] == [0]  # prefill logprobs need every prompt token computed: no cache
        rows = self.logprobs("", tuple(prompt), len(prompt))
        pre = res.prefill_tokens
        assert [t.id for t in pre] == prompt and math.isnan(pre[0].logprob)
        for i in range(1, len(prompt)):
            assert math.isclose(pre[i].logprob, float(rows[i - 1, prompt[i]]), abs_tol=self.tol), i

        cancelled = router.submit(b + t1, stopping=dict(max_new_tokens=160, ignore_eos_token=True))
        next(iter(cancelled.stream(timeout=300)))  # its first token: its prefill is complete
        router.cancel(cancelled.request_id)
        with pytest.raises(RequestError) as err:
            cancelled.result(timeout=300)
        assert err.value.code == "CANCELLED"
        assert run(b + t2) == reused(b)  # the cancelled request's prompt blocks, reused

        # cancelled right after its first Prefill: chunked, only its first chunk was computed
        armed = [True]

        def cancel_all(step: Any) -> None:
            if armed[0] and step.method == "prefill":
                armed[0] = False
                for rid in router.debug_state()["in_flight"]:
                    router.cancel(rid)

        router.step_observer = cancel_all
        with pytest.raises(RequestError) as err:
            router.generate(d + t1, timeout=300, stopping=dict(max_new_tokens=NEW))
        assert err.value.code == "CANCELLED" and not armed[0]
        router.step_observer = None
        assert run(d + t2) == (0 if self.chunked else reused(d))  # blocks never computed are never reused

    def assert_no_leak(self) -> None:
        state = self.router.debug_state()
        assert state["used_blocks"] == 0 and not state["in_flight"] and state["running_batch"] is None
        assert (state["cached_blocks"] > 0) == self.caching
        self.router.clear_prefix_cache()
        state = self.router.debug_state()
        assert state["allocator_free_blocks"] == state["usable_blocks"] and state["cached_blocks"] == 0
