"""The rows of scripts/bench.py measured through the serving stack: KV capacity after Warmup (P8, an
Engine in this process) and the Decode RPC's wall time through a real shard process (P7)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from typing import Any

import torch

from bench_common import ROOT, shape_of


def bench_kv_capacity(
    model: Any, block_size: int, memory_fraction: float, kv_dtype: torch.dtype = torch.bfloat16
) -> dict[str, Any]:
    """P8: the KV cache Warmup sizes, against the free memory divided by one token's KV bytes."""
    from worker.engine.engine import Engine, EngineConfig
    from worker.engine.kv_cache import KVCache
    from worker.pb import generate_pb2 as pb

    class _Tok:  # Warmup sends token ids; only the vocabulary bound is read
        n_real_vocab = model.config.vocab_size
        eos_token_ids: frozenset[int] = frozenset()

        def encode(self, text: str) -> list[int]:
            return [1] * len(text)

    engine = Engine(
        model,
        _Tok(),  # type: ignore[arg-type]  # a stand-in: Warmup reads only what _Tok has
        model.pctx,
        EngineConfig(block_size=block_size, memory_fraction=memory_fraction, kv_cache_dtype=kv_dtype),
    )
    torch.cuda.empty_cache()
    free_before = torch.cuda.mem_get_info(model.pctx.device)[0]
    c = model.config
    per_token = KVCache.bytes_per_token(
        c.num_hidden_layers, c.num_attention_heads // model.pctx.world_size, c.head_dim, kv_dtype
    )
    req = pb.Request(
        id=0,
        tokenized_inputs=pb.TokenizedInputs(ids=[1] * 4096),
        stopping_parameters=pb.StoppingCriteriaParameters(max_new_tokens=16),
    )
    reqs = [
        pb.Request(id=i, tokenized_inputs=req.tokenized_inputs, stopping_parameters=req.stopping_parameters)
        for i in range(2)
    ]
    total = engine.warmup(
        pb.WarmupRequest(
            batch=pb.Batch(id=0, requests=reqs), max_input_length=4096, max_prefill_tokens=8192, max_new_tokens=16
        )
    )
    assert engine.kv is not None
    cache_tokens = engine.kv.num_slots
    ideal = free_before / per_token
    out = dict(
        max_supported_total_tokens=total,
        cache_tokens=cache_tokens,
        ideal_tokens=int(ideal),
        ratio=cache_tokens / ideal,
        per_token_bytes=per_token,
        free_gib=free_before / 2**30,
        kv_dtype=str(kv_dtype).replace("torch.", ""),
    )
    engine.runner = None  # frees the KV cache (the runner owns it)
    torch.cuda.empty_cache()
    return out


def same_prompt_requests(ids: list[int], size: int, max_new: int, kv: tuple[int, int] | None = None) -> list[Any]:
    """`size` greedy requests (ids 0..size-1) of prompt `ids` that ignore eos. kv (block_size, kv_tokens):
    each request owns consecutive KV blocks from block 1 with one slot per token up to kv_tokens."""
    from worker.pb import generate_pb2 as pb

    params = pb.NextTokenChooserParameters(temperature=1.0, top_p=1.0, typical_p=1.0, repetition_penalty=1.0)
    stop = pb.StoppingCriteriaParameters(max_new_tokens=max_new, ignore_eos_token=True)
    reqs = []
    for i in range(size):
        req = pb.Request(
            id=i, tokenized_inputs=pb.TokenizedInputs(ids=ids), parameters=params, stopping_parameters=stop
        )
        if kv is not None:
            bs, n = kv
            per = math.ceil(n / bs)
            req.blocks[:] = list(range(1 + i * per, 1 + (i + 1) * per))
            req.slots[:] = [b * bs + j for b in req.blocks for j in range(bs)][:n]
        reqs.append(req)
    return reqs


def bench_rpc_overhead(
    model: Any, tmp_dir: str, batch: int, ctx_len: int, forward_ms: float, serve_args: Sequence[str] = ()
) -> dict[str, Any]:
    """P7: Decode RPC wall time through a real shard process vs the in-process forward time; serve_args: more
    `worker.cli serve` options (profile_rpc.py --p7 A/Bs the look-ahead with them)."""
    import grpc

    from demo_tokenizer import train_bpe_ranks, write_tiktoken_file
    from make_demo_model import _save_sharded, hf_state
    from worker.pb import generate_pb2 as pb
    from worker.pb import generate_pb2_grpc as pb_grpc

    model_dir = os.path.join(tmp_dir, "model")
    os.makedirs(model_dir, exist_ok=True)
    t0 = time.time()
    _save_sharded({k: v.cpu() for k, v in hf_state(model).items()}, model_dir)
    write_tiktoken_file(os.path.join(model_dir, "qwen.tiktoken"), train_bpe_ranks("benchmark text", 0))
    with open(os.path.join(model_dir, "config.json"), "w") as f:
        json.dump({"model_type": "qwen", **shape_of(model.config), "bf16": True}, f)
    save_s = time.time() - t0
    uds = os.path.join(tmp_dir, "sock")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "worker.cli",
            "serve",
            model_dir,
            "--uds-path",
            uds,
            "--max-total-tokens",
            str(2 * batch * (ctx_len + 64)),
            "--log-level",
            "warning",
            *serve_args,
        ],
        cwd=ROOT,
    )
    try:
        deadline = time.time() + 300
        while not os.path.exists(f"{uds}-0"):
            if proc.poll() is not None or time.time() > deadline:
                raise RuntimeError("shard did not start")
            time.sleep(0.5)
        stub = pb_grpc.LoraxServiceStub(grpc.insecure_channel(f"unix://{uds}-0"))
        ids = [(7 * i) % 400 + 1 for i in range(ctx_len)]
        warm = pb.Batch(id=0, requests=same_prompt_requests(ids, 1, 60))
        total = stub.Warmup(
            pb.WarmupRequest(batch=warm, max_input_length=ctx_len, max_prefill_tokens=8192, max_new_tokens=60)
        ).max_supported_total_tokens
        info = stub.Info(pb.InfoRequest())
        reqs = same_prompt_requests(ids, batch, 60, (info.block_size, ctx_len + 59))
        resp = stub.Prefill(pb.PrefillRequest(batch=pb.Batch(id=1, requests=reqs, size=batch)))
        cached = resp.batch
        walls = []
        for _ in range(50):
            t = time.perf_counter()
            resp = stub.Decode(pb.DecodeRequest(batches=[cached]))
            walls.append(time.perf_counter() - t)
            cached = resp.batch
        walls = sorted(walls[5:])
        wall_ms = walls[len(walls) // 2] * 1e3
        stub.ClearCache(pb.ClearCacheRequest())
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    return dict(
        batch=batch,
        rpc_ms=wall_ms,
        forward_ms=forward_ms,
        overhead=(wall_ms - forward_ms) / wall_ms,
        checkpoint_save_s=save_s,
        max_supported_total_tokens=total,
    )
