"""Issue 18's defects: extreme sampling values, a failed Warmup, offloaded adapter indices.

- Finite but extreme sampling values are refused by name at the shard and at the router, and a row whose
  processed scores still go non-finite falls back to greedy on its raw logits without touching its batch.
- A Warmup that fails validation leaves the live batches and the KV cache as they were.
- Offloaded adapter indices are forgotten once their host copies leave the cache.
"""

from __future__ import annotations

import math
import os

import pytest
import torch

from helpers import TINY, write_checkpoint
from lora_helpers import attach_manager, load, write_adapter
from random_weights import random_checkpoint
from router_client.messages import sampling_parameters
from router_client.requests import ValidationError
from worker.distributed import ParallelContext
from worker.engine import sampling
from worker.engine.engine import Engine, EngineConfig
from worker.engine.sampling import BatchSampler, SamplingParams
from worker.errors import InvalidArgument
from worker.models.qwen import FlashQwenForCausalLM
from worker.pb import generate_pb2 as pb
from worker.tokenizer import QwenTokenizer

V, N_REAL = 37, 33

# Each overflows fp32 in the sampler: scores / 1e-40, a positive score / 1e-45, 4 x 1e38 added to a score,
# 3e38 added to a score then divided by 0.5.
EXTREME = [
    ({"temperature": 1e-40, "do_sample": True, "seed": 3}, "temperature"),
    ({"repetition_penalty": 1e-45}, "repetition_penalty"),
    ({"frequency_penalty": -1e38}, "frequency_penalty"),
    ({"presence_penalty": -3e38, "temperature": 0.5, "top_k": 5}, "presence_penalty"),
]


# ---------------------------------------------------------------- a. extreme sampling values
@pytest.mark.parametrize("kw, field_name", EXTREME)
def test_extreme_values_are_refused_by_name(kw, field_name):
    with pytest.raises(ValueError, match=field_name):
        SamplingParams(**kw).validate()
    with pytest.raises(ValidationError, match=field_name):
        sampling_parameters(kw)


@pytest.mark.parametrize(
    "kw",
    [
        {"temperature": sampling.MIN_TEMPERATURE, "do_sample": True},
        {"temperature": 0.0},
        {"repetition_penalty": 1 / sampling.MAX_PENALTY_FACTOR},
        {"repetition_penalty": sampling.MAX_PENALTY_FACTOR},
        {"frequency_penalty": -sampling.MAX_ADDITIVE_PENALTY, "presence_penalty": sampling.MAX_ADDITIVE_PENALTY},
    ],
)
def test_the_limits_themselves_pass_at_shard_and_router(kw):
    SamplingParams(**kw).validate()
    wire = sampling_parameters(kw)  # fp32 on the wire: 1e-4 arrives as 9.99999974e-05
    names = ["temperature", "do_sample", "repetition_penalty", "frequency_penalty", "presence_penalty"]
    SamplingParams(**{name: getattr(wire, name) for name in names}).validate()


def test_router_refuses_non_finite_values():
    for kw in [
        {"temperature": math.nan},
        {"top_p": math.inf},
        {"typical_p": math.nan},
        {"presence_penalty": -math.inf},
    ]:
        with pytest.raises(ValidationError, match=f"{next(iter(kw))} must be a finite number"):
            sampling_parameters(kw)


@pytest.mark.parametrize("kw, field_name", EXTREME)
def test_a_row_that_goes_non_finite_cannot_fail_the_others(kw, field_name):
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(3, V, generator=g) * 4
    best = int(logits[1, :N_REAL].argmax())
    prev = [[1, 2, 2], [best] * 4, [7]]  # the bad row repeats its best (positive) token
    good = [SamplingParams(do_sample=True, seed=11, top_p=0.9), SamplingParams(return_k_alternatives=3)]
    bad = SamplingParams(**kw)
    mixed = BatchSampler([good[0], bad, good[1]], V, N_REAL)(logits, prev)
    alone = BatchSampler(good, V, N_REAL)(logits[[0, 2]], [prev[0], prev[2]])
    assert mixed.next_ids[[0, 2]].tolist() == alone.next_ids.tolist()
    assert torch.equal(mixed.logprobs[[0, 2]], alone.logprobs)
    assert mixed.top_ids[2] == alone.top_ids[1]
    # the bad row: greedy on its raw logits, with their log-softmax as its logprob
    raw = torch.log_softmax(logits[1, :N_REAL], dim=-1)
    assert int(mixed.next_ids[1]) == best
    assert math.isfinite(float(mixed.logprobs[1])) and float(mixed.logprobs[1]) == pytest.approx(float(raw[best]))


def test_greedy_rows_never_report_nan_logprobs():
    logits = torch.randn(2, V, generator=torch.Generator().manual_seed(9))
    prev = [[int(logits[0, :N_REAL].argmax())] * 2, [1]]
    out = BatchSampler([SamplingParams(repetition_penalty=1e-45), SamplingParams()], V, N_REAL)(logits, prev)
    assert torch.isfinite(out.logprobs).all()


# ---------------------------------------------------------------- b. Warmup validates first
def _request(rid: int, ids: list[int], max_new: int = 8, **sampling_kw) -> pb.Request:
    params = pb.NextTokenChooserParameters(
        **{"temperature": 1.0, "top_p": 1.0, "typical_p": 1.0, "repetition_penalty": 1.0, **sampling_kw}
    )
    return pb.Request(
        id=rid,
        inputs="",
        tokenized_inputs=pb.TokenizedInputs(ids=ids),
        parameters=params,
        stopping_parameters=pb.StoppingCriteriaParameters(max_new_tokens=max_new, ignore_eos_token=True),
    )


@pytest.fixture(scope="module")
def engine(demo_dir) -> Engine:
    model_dir = os.path.join(demo_dir, "model")
    model = FlashQwenForCausalLM.from_pretrained(model_dir, dtype=torch.float32, progress=False)
    cfg = EngineConfig(max_total_tokens=1024, shard_block_fraction=0.5, cuda_graphs=False, look_ahead=False)
    return Engine(model, QwenTokenizer.from_dir(model_dir), ParallelContext(), cfg)


def test_a_failed_warmup_leaves_batches_and_cache_as_they_were(engine):
    engine.warmup(pb.WarmupRequest(batch=pb.Batch(id=0, requests=[_request(0, [1, 2, 3])]), max_input_length=16))
    _, batch = engine.prefill(pb.Batch(id=1, requests=[_request(1, [5, 6, 7])]), None)
    assert batch is not None
    runner, free, live = engine.runner, engine.allocator.free, dict(engine.batches)
    vocab = engine.tokenizer.n_real_vocab
    bad = pb.WarmupRequest(batch=pb.Batch(id=0, requests=[_request(0, [1, vocab])]), max_input_length=16)
    with pytest.raises(InvalidArgument, match="not a valid token"):
        engine.warmup(bad)
    assert engine.runner is runner and engine.allocator.free == free and engine.batches == live
    engine.decode([batch.info()])  # the live batch still decodes
    engine.clear(None)


def test_extreme_sampling_is_refused_at_prefill_and_leaves_the_live_batch(engine):
    engine.warmup(pb.WarmupRequest(batch=pb.Batch(id=0, requests=[_request(0, [1, 2, 3])]), max_input_length=16))
    _, batch = engine.prefill(pb.Batch(id=1, requests=[_request(1, [5, 6, 7])]), None)
    free = engine.allocator.free
    for kw, field_name in EXTREME:
        with pytest.raises(InvalidArgument, match=f"request 2: {field_name}"):
            engine.prefill(pb.Batch(id=2, requests=[_request(2, [8, 9], **kw)]), None)
    engine.decode([batch.info()])
    assert engine.allocator.free == free and list(engine.batches) == [1]
    engine.clear(None)


# ---------------------------------------------------------------- c. offloaded adapter indices
def test_offloaded_indices_do_not_grow_without_bound(tmp_path):
    cfg = {**TINY, "seq_length": 16}
    model = FlashQwenForCausalLM.from_pretrained(
        write_checkpoint(str(tmp_path / "ckpt"), cfg, random_checkpoint(cfg, seed=2)),
        dtype=torch.float32,
        progress=False,
    )
    root = str(tmp_path / "adapters")
    write_adapter(root, "a", cfg, 4, 8, seed=1)
    mgr, _ = attach_manager(model, root, max_rank=4, num_slots=2)
    mgr.host_cache = 2
    load(mgr, 1, "a")  # stays loaded
    for index in range(2, 42):
        load(mgr, index, "a")
        mgr.offload(pb.OffloadAdapterRequest(adapter_index=index))
    assert len(mgr.entries) <= 1 + mgr.host_cache
    assert mgr.has(1) and mgr.entries[1].slot is not None
    assert mgr.has(41)  # the most recent offloaded ones are still remembered (reload without a disk read)
    load(mgr, 2, "a")  # a forgotten index loads again
    assert mgr.entries[2].slot is not None


def test_router_and_shard_share_the_limits():
    from router_client import messages

    assert (messages.MIN_TEMPERATURE, messages.MAX_PENALTY_FACTOR, messages.MAX_ADDITIVE_PENALTY) == (
        sampling.MIN_TEMPERATURE,
        sampling.MAX_PENALTY_FACTOR,
        sampling.MAX_ADDITIVE_PENALTY,
    )
