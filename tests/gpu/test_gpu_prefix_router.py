"""The router's prefix cache and chunked scheduling on the GPU: real shard processes with the Triton
attention backend (paged prefill over cached blocks, chunked mixed steps) serving the demo model in
fp32, driven through the router; the shared scenario of tests/prefix_scenario.py, checked against the
float64 reference (margin-aware: Triton's fp32 dots run in TF32)."""

from __future__ import annotations

import os

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
TOL = 5e-3  # TF32 in the Triton attention kernels


@pytest.mark.parametrize("num_shard", [1, 2])
@pytest.mark.parametrize("variant", ["plain", "chunked+prefix", "prefix"])
def test_prefix_cache_through_router_on_gpu(demo_dir, num_shard, variant):
    if num_shard > torch.cuda.device_count():
        pytest.skip(f"needs {num_shard} GPUs")
    import prefix_scenario as ps
    from reference import load_checkpoint
    from router_client.router import Router
    from shards import start_launcher, stop
    from worker.tokenizer import QwenTokenizer

    model_dir = os.path.join(demo_dir, "model")
    tok = QwenTokenizer.from_dir(model_dir)
    extra = ("--dtype", "float32", "--attention-backend", "triton")
    shard = start_launcher(model_dir, os.path.join(demo_dir, "adapters"), num_shard, extra)
    try:
        caching, chunked, _ = ps.VARIANTS[variant]
        with Router.connect(f"{shard.uds}-0", tokenizer=tok, config=ps.router_config(variant)) as router:
            logprobs = ps.reference(load_checkpoint(model_dir), demo_dir, tok.n_real_vocab)
            scenario = ps.Scenario(router, ps.texts(tok), logprobs, caching, chunked, TOL)
            scenario.play()
            scenario.assert_no_leak()
    except BaseException:
        print(shard.log()[-4000:])
        raise
    finally:
        assert stop(shard) == 0, shard.log()[-3000:]
