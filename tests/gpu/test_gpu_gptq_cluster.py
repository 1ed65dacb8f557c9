"""DecodeKernels.gptq_cluster on the GPU: gptq_tc's K splits of a column tile run as one thread block cluster whose
rank 0 adds the blocks' sums from their shared memory (gptq_tc.cu, gemv_cuda.cuda_gemv's cluster).

- The kernel: the same values bit for bit as the splits through fp32 partials and the arrival counters (the sums are
  added in the same order), and within the fp32 reference's rounding, on awkward shapes (a partial column tile, the
  last split shorter, groups of 256, a bias, asym zeros) at 1 to 8 rows and 2 to 8 splits; the residual add + RMSNorm
  producer (kNorm 1) too; under graph replay; the counters untouched; more splits than a cluster holds refused.
- A GPTQ model whose mlp.c_proj splits K (intermediate size 4096, the plan's threshold lowered) decodes the same
  logits bit for bit with the clusters as without, and a CUDA graph's replay equals eager."""

from __future__ import annotations

import pytest
import torch

from helpers import GPU_TINY, replayed
from random_weights import random_checkpoint
from worker.distributed import ParallelContext

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
CUDA = torch.device("cuda", 0)


def _int4(K: int, N: int, group: int, asym: bool, g: torch.Generator):
    from worker.kernels.gemv import gemv_weights

    qweight = torch.randint(-(2**31), 2**31 - 1, (K // 8, N), device=CUDA, dtype=torch.int32, generator=g)
    G = -(-K // group)
    if asym:
        qzeros = torch.randint(-(2**31), 2**31 - 1, (G, N // 8), device=CUDA, dtype=torch.int32, generator=g)
    else:
        qzeros = torch.full((G, N // 8), 0x77777777, device=CUDA, dtype=torch.int32)
    scales = (torch.rand(G, N, device=CUDA, generator=g) * 0.02 + 0.001).to(torch.bfloat16)
    g_idx = (torch.arange(K, device=CUDA) // group).to(torch.int32)
    return gemv_weights(qweight, qzeros, scales, 4, 1, group, 0), (qweight, qzeros, scales, g_idx)


@pytest.mark.parametrize("M", [1, 2, 5, 8])
@pytest.mark.parametrize(
    "K,N,group,asym,bias,splits,warps",
    [
        (11008, 4096, 128, False, False, None, None),  # 7B mlp.c_proj at its plan (4 warps x 3 splits)
        (11008, 4104, 128, True, True, 8, 4),  # a partial column tile, 11 chunks a split, the last 9
        (2048, 264, 256, True, False, 2, 8),  # groups of 256
        (640, 152, 128, True, True, 5, 1),  # one chunk a split
    ],
)  # fmt: skip
def test_the_cluster_adds_the_splits_as_the_partials_do(K, N, group, asym, bias, splits, warps, M):
    from worker.kernels.gemv_cuda import cuda_gemv
    from worker.kernels.gptq_reference import gptq_matmul_reference

    g = torch.Generator(device=CUDA).manual_seed(K + N + M)
    w, (qweight, qzeros, scales, g_idx) = _int4(K, N, group, asym, g)
    b = (torch.randn(N, device=CUDA, generator=g) * 0.5).to(torch.bfloat16) if bias else None
    x = torch.randn(M, K, device=CUDA, generator=g).to(torch.bfloat16)
    kw = dict(pdl=True, tc=True, stage=False, splits=splits, warps=warps)
    partials = cuda_gemv(x, w, b, **kw)
    clustered = cuda_gemv(x, w, b, cluster=True, **kw)
    assert torch.equal(clustered, partials)
    ref = gptq_matmul_reference(x.float(), qweight, qzeros, scales.float(), g_idx, 4, 1).double()
    ref = ref if b is None else ref + b.double()
    err = (clustered.double() - ref).abs().max().item()
    rounding = (ref.to(torch.bfloat16).double() - ref).abs().max().item()
    assert err <= rounding + 1e-3 * ref.abs().max().item(), (err, rounding)
    assert torch.equal(replayed(lambda: cuda_gemv(x, w, b, cluster=True, **kw)), clustered)
    assert not w.counters.any()


@pytest.mark.parametrize("M", [1, 2])
def test_the_cluster_producer_writes_the_partials_values(M):
    """kNorm 1 (mlp.c_proj's residual add + RMSNorm numerator + squares) over 3 splits: y, s and the squares equal the
    partials' bit for bit."""
    from worker.kernels.gemv_cuda import TC_COLS, cuda_gemv

    K, N = 11008, 4096
    g = torch.Generator(device=CUDA).manual_seed(M)
    w, _ = _int4(K, N, 128, True, g)
    x = torch.randn(M, K, device=CUDA, generator=g).to(torch.bfloat16)
    residual = torch.randn(M, N, device=CUDA, generator=g).to(torch.bfloat16)
    weight = (torch.rand(N, device=CUDA, generator=g) + 0.5).to(torch.bfloat16)

    def run(cluster: bool):
        sums = torch.empty(M, N, device=CUDA, dtype=torch.bfloat16)
        squares = torch.full((M, N // TC_COLS), float("nan"), device=CUDA)
        y = cuda_gemv(x, w, None, pdl=True, tc=True, stage=False, splits=3, warps=4, cluster=cluster,
                      norm_out=(residual, weight), sums=sums, squares=squares)  # fmt: skip
        return y, sums, squares

    want, got = run(False), run(True)
    assert all(torch.equal(a, b) for a, b in zip(got, want))
    assert all(torch.equal(a, b) for a, b in zip(replayed(lambda: run(True)), want))


def test_more_splits_than_a_cluster_holds_are_refused():
    from worker.kernels.gemv_cuda import cuda_gemv

    w, _ = _int4(2048, 256, 128, False, torch.Generator(device=CUDA).manual_seed(0))
    x = torch.randn(1, 2048, device=CUDA).to(torch.bfloat16)
    with pytest.raises(ValueError, match="9 K splits, more than a cluster's 8 blocks"):
        cuda_gemv(x, w, tc=True, stage=False, splits=9, warps=1, cluster=True)
    with pytest.raises(ValueError, match="gptq_tc's"):
        cuda_gemv(x, w, cluster=True)


def _model(tmp_path, cluster: bool):
    from gptq_helpers import gptq_checkpoint
    from worker.layers.attention_triton import TritonAttention
    from worker.layers.decode_kernels import SERVED, parse_decode_kernels, where_applies
    from worker.models.qwen import FlashQwenForCausalLM

    config = dict(GPU_TINY, intermediate_size=4096)  # mlp.c_proj: 32 chunks of K
    state = random_checkpoint(config, seed=17)
    path, _ = gptq_checkpoint(str(tmp_path / "q"), config, state, 4, 128, False, False)
    names = [n for n in SERVED if n != "gptq_cluster"] + (["gptq_cluster"] if cluster else [])
    kernels = where_applies(parse_decode_kernels(",".join(names)), CUDA)
    assert kernels.gptq_cluster == cluster
    return FlashQwenForCausalLM.from_pretrained(
        path, ParallelContext(0, 1, CUDA), torch.bfloat16, TritonAttention(), progress=False, decode_kernels=kernels
    )


@pytest.mark.parametrize("batch", [1, 2])
def test_a_gptq_model_decodes_the_same_with_the_clusters(tmp_path, batch, monkeypatch):
    from helpers import decode_requests
    from worker.engine.cuda_graphs import GraphedDecode
    from worker.engine.kv_cache import KVCache
    from worker.engine.runner import Runner
    from worker.kernels import gemv_cuda

    monkeypatch.setattr(gemv_cuda, "TC_LONG_K", 1)  # mlp.c_proj splits K with or without the clusters
    monkeypatch.setattr(gemv_cuda, "TC_LONG_K_CLUSTER", 1)
    launched = []
    real = gemv_cuda.cuda_gemv

    def spy(x, w, *a, **k):
        if k.get("cluster") and k.get("norm_out") is not None:
            m, k_, n = x.shape[0], x.shape[1], w.scales.shape[1]
            launched.append(gemv_cuda.plan_tc(n, k_, gemv_cuda._sms(0), m, False, True)[1])
        return real(x, w, *a, **k)

    monkeypatch.setattr(gemv_cuda, "cuda_gemv", spy)
    results = {}
    for cluster in (False, True):
        model = _model(tmp_path / str(cluster), cluster)
        c = model.config
        kv = KVCache(c.num_hidden_layers, 200, 16, c.num_attention_heads, c.head_dim, torch.bfloat16, CUDA)
        graphs = GraphedDecode(model, kv, max_batch=4, max_blocks_per_seq=16, scratch_block=199, adapter_pools=False)
        step = decode_requests([3, 40][:batch])
        runner = Runner(model, kv, CUDA)
        runner.forward(step, True)
        for r in step.requests:
            r.ids.append(5)
        eager = runner.forward(step, False).last
        for r in step.requests:
            r.n_cached -= 1  # the same decode step again, replayed from the graph
        assert torch.equal(eager, graphs.run(step, None))
        results[cluster] = eager
    assert launched and all(s > 1 for s in launched), launched  # the clusters' split path ran
    assert torch.equal(results[True], results[False])
