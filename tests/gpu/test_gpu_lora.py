"""The multi-LoRA Triton kernels (worker/kernels/lora.py, and lora_decode.py's one launch) on CUDA: bf16 at Qwen-7B
module shapes against the PyTorch path, captured in a CUDA graph, and the tiny model with three adapters (kernels
picked by the AdapterManager on CUDA) against the float64 reference with each adapter merged, eager and graphed decode;
the LoadAdapter fast path (pinned staging buffer, side-stream copies) fills the same slots as before.

Tolerance (bf16): the kernels and the PyTorch path round h and the delta to bf16 at the same points and
differ only in fp32 summation order, so each may land one bf16 ulp off the other; the test bounds the
kernels' error against a float64 truth by the PyTorch path's own error (x 1.5, plus a few ulps of |y|).
Run: `pytest -q -s -m gpu tests/gpu/test_gpu_lora.py`.
"""

from __future__ import annotations

import math
import os
import random
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from helpers import GPU_TINY, GPU_TRITON_MARKS, within

pytestmark = GPU_TRITON_MARKS
pytest.importorskip("triton")

from worker.kernels import lora as kernels  # noqa: E402
from worker.layers.lora import AdapterBatchData  # noqa: E402


def add_lora(y, x, a, b, ranks, data: AdapterBatchData) -> None:
    kernels.add_lora(y, x, a, b, ranks, data.starts, data.lens, data.slots, data.max_len)


def add_lora_reference(y, x, a, b, data: AdapterBatchData) -> None:
    kernels.add_lora_reference(y, x, a, b, data.token_idx, data.valid, data.slots)


CUDA = torch.device("cuda")
H, W = 4096, 11008
MODULES = {  # (P, K, N): one launch pair each
    "c_attn": (1, H, 3 * H),
    "gate_up": (2, H, W),
    "attn.c_proj": (1, H, H),
    "mlp.c_proj": (1, W, H),
}
SLOT_RANKS = {1: 8, 2: 16, 3: 64, 4: 16, 5: 4}


def make_pool(P: int, K: int, N: int, r_max: int = 64, dtype: torch.dtype = torch.bfloat16, seed: int = 0):
    """(A, B with NaN past each slot's rank and in slot 0, ranks [P, slots], clean A, clean B)."""
    g = torch.Generator(device=CUDA).manual_seed(seed)
    slots = 1 + max(SLOT_RANKS)
    a = torch.zeros(slots, P, r_max, K, device=CUDA)
    b = torch.zeros(slots, P, N, r_max, device=CUDA)
    table = torch.zeros(slots, 4, 5, dtype=torch.int32, device=CUDA)
    ranks = table[:, 2, 2 : 2 + P].t()  # [P, slots] with the pool's strides
    for s, r in SLOT_RANKS.items():
        a[s, :, :r] = torch.randn(P, r, K, generator=g, device=CUDA) / K**0.5
        b[s, :, :, :r] = torch.randn(P, N, r, generator=g, device=CUDA) / r**0.5
        ranks[:, s] = r
    clean_a, clean_b = a.to(dtype), b.to(dtype)
    for s in range(slots):
        r = SLOT_RANKS.get(s, 0)
        a[s, :, r:] = float("nan")
        b[s, :, :, r:] = float("nan")
    return a.to(dtype), b.to(dtype), ranks, clean_a, clean_b


def truth(y0: torch.Tensor, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, data: AdapterBatchData) -> torch.Tensor:
    """float64: y0 + B A x per token of each segment."""
    out = y0.double().clone()
    P, N = a.shape[1], b.shape[2]
    for seg in range(data.slots.numel()):
        s, start, n = int(data.slots[seg]), int(data.starts[seg]), int(data.lens[seg])
        if s == 0:
            continue
        xs = x[start : start + n].double()
        for p in range(P):
            out[start : start + n, p * N : (p + 1) * N] += xs @ a[s, p].double().t() @ b[s, p].double().t()
    return out


def check(y0, x, pool, data, touched, add=add_lora) -> tuple[float, float]:
    a, b, ranks, clean_a, clean_b = pool
    y, ref = y0.clone(), y0.clone()
    add(y, x, a, b, ranks, data)
    add_lora_reference(ref, x, clean_a, clean_b, data)
    exact = truth(y0, x, clean_a, clean_b, data)
    assert torch.isfinite(y).all()  # nothing read past a slot's rank, nor from slot 0
    assert torch.equal(y[~touched], y0[~touched])
    err, err_ref = (y.double() - exact).abs().max().item(), (ref.double() - exact).abs().max().item()
    ulp = exact.abs().max().item() * 2**-8
    assert err <= 1.5 * err_ref + 4 * ulp, (err, err_ref, ulp)
    return err, err_ref


@pytest.mark.parametrize("module", list(MODULES))
def test_prefill_bf16_7b_shapes(module):
    P, K, N = MODULES[module]
    pool = make_pool(P, K, N, seed=len(module))
    lengths = [1, 7, 300, 33, 1024, 5, 64]
    slots = [1, 0, 2, 3, 4, 5, 2]
    T = sum(lengths)
    x = torch.randn(T, K, device=CUDA).to(torch.bfloat16)
    y0 = torch.randn(T, P * N, device=CUDA).to(torch.bfloat16)
    data = AdapterBatchData.build(slots, lengths, CUDA)
    touched = torch.tensor([s != 0 for s, n in zip(slots, lengths) for _ in range(n)], device=CUDA)
    err, err_ref = check(y0, x, pool, data, touched)
    print(f"{module} prefill: max err vs fp64 {err:.3e} (PyTorch path {err_ref:.3e})")


@pytest.mark.parametrize("module", list(MODULES))
@pytest.mark.parametrize("length", [8, 64, 128])
def test_prefill_of_one_short_prompt_at_7b_shapes(module, length):
    """One prompt alone: the K split is widest (the segments alone give one program), and the expand once unrolled its
    sum over the splits into shared memory it did not have (OutOfResources at the 7B width on an H200)."""
    P, K, N = MODULES[module]
    pool = make_pool(P, K, N, seed=length)
    x = torch.randn(length, K, device=CUDA).to(torch.bfloat16)
    y0 = torch.randn(length, P * N, device=CUDA).to(torch.bfloat16)
    data = AdapterBatchData.build([3], [length], CUDA)
    check(y0, x, pool, data, torch.ones(length, dtype=torch.bool, device=CUDA))


@pytest.mark.parametrize("module", list(MODULES))
@pytest.mark.parametrize("bs", [1, 8, 33, 128])
def test_decode_bf16_7b_shapes(module, bs):
    P, K, N = MODULES[module]
    pool = make_pool(P, K, N, seed=bs)
    slots = torch.tensor([(i % 6) for i in range(bs)], device=CUDA)  # slot 0 (base) rows among them
    x = torch.randn(bs, K, device=CUDA).to(torch.bfloat16)
    y0 = torch.randn(bs, P * N, device=CUDA).to(torch.bfloat16)
    check(y0, x, pool, AdapterBatchData.for_decode(slots), slots != 0)


@pytest.mark.parametrize("module", list(MODULES))
@pytest.mark.parametrize("bs", [1, 33])
def test_decode_local_bf16_7b_shapes(module, bs):
    """The one-launch decode kernel without counters (kernels/lora_decode.py), as the two launches above."""
    from worker.kernels.lora_decode import add_lora_decode_local

    P, K, N = MODULES[module]
    pool = make_pool(P, K, N, seed=bs)
    slots = torch.tensor([(i % 6) for i in range(bs)], device=CUDA)
    x = torch.randn(bs, K, device=CUDA).to(torch.bfloat16)
    y0 = torch.randn(bs, P * N, device=CUDA).to(torch.bfloat16)
    check(
        y0, x, pool, AdapterBatchData.for_decode(slots), slots != 0,
        lambda y, x, a, b, ranks, d: add_lora_decode_local(y, x, a, b, ranks, d.starts, d.slots),
    )  # fmt: skip


def test_decode_kernels_in_a_cuda_graph():
    """Captured once over static buffers; new slots and inputs each replay give the eager result."""
    P, K, N = MODULES["gate_up"]
    a, b, ranks, clean_a, clean_b = make_pool(P, K, N, seed=7)
    bs = 16
    x = torch.zeros(bs, K, dtype=torch.bfloat16, device=CUDA)
    y = torch.zeros(bs, P * N, dtype=torch.bfloat16, device=CUDA)
    slots = torch.zeros(bs, dtype=torch.long, device=CUDA)
    data = AdapterBatchData.for_decode(slots)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        add_lora(y, x, a, b, ranks, data)  # compile outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        add_lora(y, x, a, b, ranks, data)
    for step in range(3):
        g = torch.Generator(device=CUDA).manual_seed(step)
        y0 = torch.randn(bs, P * N, generator=g, device=CUDA).to(torch.bfloat16)
        x.copy_(torch.randn(bs, K, generator=g, device=CUDA))
        slots.copy_(torch.randint(0, 6, (bs,), generator=g, device=CUDA))
        y.copy_(y0)
        graph.replay()
        eager = y0.clone()
        add_lora(eager, x, a, b, ranks, AdapterBatchData.for_decode(slots.clone()))
        assert torch.equal(y, eager)
        ref = y0.clone()
        add_lora_reference(ref, x, clean_a, clean_b, AdapterBatchData.for_decode(slots.clone()))
        torch.testing.assert_close(y.float(), ref.float(), atol=0.1, rtol=0.02)


# ------------------------------------------------------------------------------------------ model
CFG = GPU_TINY


def lora_model(tmp_path, dtype, overlap: bool = True, loaded: int = 3, **kw):
    """The tiny model with adapters a4, a8 and a16 written (the first `loaded` of them loaded as indices 1..3) and a
    manager of 4 slots of max rank 16 (`kw`: the manager's other arguments, e.g. pool_rank)."""
    from helpers import write_checkpoint
    from lora_helpers import attach_manager, load, write_adapter
    from random_weights import random_checkpoint
    from reference import merge_lora
    from worker.distributed import ParallelContext
    from worker.layers.attention_triton import TritonAttention
    from worker.models.qwen import FlashQwenForCausalLM

    state = random_checkpoint(CFG, seed=3)
    path = write_checkpoint(str(tmp_path / "ckpt"), CFG, state)
    pctx = ParallelContext(0, 1, CUDA)
    model = FlashQwenForCausalLM.from_pretrained(path, pctx, dtype, TritonAttention(), progress=False)
    root = str(tmp_path / "adapters")
    adapters = [
        write_adapter(root, "a4", CFG, 4, 8, seed=1),
        write_adapter(root, "a8", CFG, 8, 16, seed=2),
        write_adapter(root, "a16", CFG, 16, 16, seed=3, targets=("c_attn", "w2", "mlp.c_proj")),
    ]
    mgr, engine = attach_manager(model, root, max_rank=16, num_slots=4, **kw)
    terms = [getattr(t.owner, t.attr).lora for t in model.lora_targets()]
    assert all(term.kernels is not None for term in terms)  # the Triton path on CUDA
    assert all(term.stream is not None for term in terms)  # shrink beside the base matmul
    if not overlap:
        for term in terms:
            term.stream = None
    for i, name in enumerate(["a4", "a8", "a16"][:loaded], start=1):
        load(mgr, i, name)
    merged = [state] + [merge_lora(state, *ad) for ad in adapters]
    return model, mgr, merged


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-3), (torch.bfloat16, 0.15)])
def test_mixed_adapter_model_vs_reference(tmp_path, dtype, tol):
    from paged import Paged
    from reference import ref_forward
    from worker.layers.rotary import ntk_alpha

    model, mgr, merged = lora_model(tmp_path, dtype)
    g = torch.Generator().manual_seed(5)
    lengths = [6, 17, 3, 70, 11]
    which = [0, 1, 2, 3, 1]  # base and three adapters; adapter 1 twice
    prompts = [torch.randint(0, 512, (n,), generator=g).tolist() for n in lengths]
    alphas = [ntk_alpha(n, 32, True) for n in lengths]
    slots = [mgr.entries[i].slot if i else 0 for i in which]
    p = Paged(model, num_blocks=256)
    out = p.step(list(range(5)), prompts, [0] * 5, alphas, True, slots)
    worst = max(
        (o.double().cpu() - ref_forward(merged[a], CFG, s)).abs().max().item() for s, a, o in zip(prompts, which, out)
    )
    seqs = [list(x) for x in prompts]
    for _ in range(4):
        for s, o in zip(seqs, out):
            s.append(int(o[-1].argmax()))
        out = p.step(list(range(5)), seqs, [len(s) - 1 for s in seqs], alphas, False, slots)
        for s, x, a, o in zip(seqs, prompts, which, out):
            ref = ref_forward(merged[a], CFG, s, prompt_len=len(x))[-1]
            worst = max(worst, (o[-1].double().cpu() - ref).abs().max().item())
    print(f"{dtype}: max abs logit diff vs float64 merged reference {worst:.2e} (bound {tol})")
    assert worst <= tol
    effect = (ref_forward(merged[1], CFG, prompts[1]) - ref_forward(merged[0], CFG, prompts[1])).abs().max()
    assert effect > 10 * tol  # the adapters change the logits far beyond the tolerance


@pytest.mark.parametrize(
    "mode,overlap,per_sm",
    [("two", True, 2), ("two", False, 2), ("local", False, 2), ("side", True, 2), ("side_store", True, 8)]
    + [("gemm", True, 2), ("gemm+lora_term_first", True, 2), ("gemm+lora_term_first+lora_norm_shrink", True, 2)]
    + [("gemm+lora_norm_shrink", True, 2)],
)
def test_graphed_adapter_decode_equals_eager(tmp_path, monkeypatch, mode, overlap, per_sm):
    """The served decode path with adapters (GraphedDecode(adapter_pools=True)) equals eager decode, with
    the shrink on the side stream (captured as a fork/join in the graph) or serial, or with another decode
    mode of LoraTerm ("side": the whole term on the side stream; "side_store": its expand writes the whole
    buffer, here with a finer K split; "gemm": the shrink inside the base matmul, then one expand; with
    lora_term_first mlp.c_proj's GEMM adds its term; with lora_norm_shrink c_attn's h comes from ln_1; with
    lora_k_lanes both h go into their GEMMs' K lanes, where the layout has them)."""
    from worker.engine.cuda_graphs import GraphedDecode
    from worker.engine.kv_cache import KVCache
    from worker.layers import lora as lora_layer

    monkeypatch.setattr(lora_layer, "JOINT_MIN_ROWS", 1)  # "gemm" at this bucket (8 rows) too
    model, mgr, _ = lora_model(tmp_path, torch.bfloat16, overlap)
    mode, *extra = mode.split("+")
    if mode == "gemm":  # with the served decode kernels (PDL on the expands, RoPE + store)
        from worker.layers.decode_kernels import SERVED, apply_decode_kernels, parse_decode_kernels

        apply_decode_kernels(model, parse_decode_kernels(",".join([*SERVED, *extra])))
        lanes = {t.key for t in model.lora_targets() if getattr(t.owner, t.attr).lora.input_lanes()}
        assert lanes == {"mlp.c_proj"}  # lora_k_lanes is served
    for t in model.lora_targets():
        getattr(t.owner, t.attr).lora.decode = mode
        getattr(t.owner, t.attr).lora.per_sm = per_sm
    c = model.config
    kv = KVCache(c.num_hidden_layers, 200, 16, c.num_attention_heads, c.head_dim, torch.bfloat16, CUDA)
    graphs = GraphedDecode(model, kv, max_batch=16, max_blocks_per_seq=16, scratch_block=199, adapter_pools=True)
    _check_graphed_adapter_decode(model, mgr, kv, graphs, mode == "gemm")


def _check_graphed_adapter_decode(model, mgr, kv, graphs, gemm: bool) -> None:
    """Six requests on adapters 1, base, 2, 3, 1, base: the graphed decode step equals the eager one (within two bf16
    ulps), its base rows equal the base-only graph's, and its adapter rows differ from them."""
    from worker.engine.runner import Runner
    from worker.layers.rotary import ntk_alpha

    free = list(range(1, 199))
    random.Random(0).shuffle(free)
    reqs = []
    for n in (3, 40, 100, 7, 200, 9):
        blocks = [free.pop() for _ in range(-(-(n + 1) // 16))]
        slots = [blocks[p // 16] * 16 + p % 16 for p in range(n + 1)]
        reqs.append(
            SimpleNamespace(
                ids=torch.randint(0, 512, (n,)).tolist(),
                blocks=blocks,
                slots=slots,
                ntk_alpha=ntk_alpha(n, 32, True),
                n_cached=0,
                prefill_logprobs=False,
            )
        )
    adapter_slots = [mgr.entries[i].slot if i else 0 for i in (1, 0, 2, 3, 1, 0)]
    batch: Any = SimpleNamespace(requests=reqs)  # a Batch as far as the runner and the graphs read it
    runner = Runner(model, kv, CUDA)
    runner.forward(batch, True, adapter_slots)
    for r in reqs:
        r.ids.append(5)
    eager = runner.forward(batch, False, adapter_slots).last
    for r in reqs:
        r.n_cached -= 1
    graphed = graphs.run(batch, adapter_slots).clone()  # a view of the graph's static output
    diff = (eager.float() - graphed.float()).abs().max().item()
    scale = eager.float().abs().max().item()
    ulp = 2.0 ** (math.floor(math.log2(scale)) - 7)  # bf16's spacing at the largest logit
    print(f"graphed vs eager adapter decode: max abs diff {diff:.2e} (bf16 ulp at max |logit| {scale:.2f}: {ulp:.2e})")
    # the graph's segments are all rows (eager: adapter rows only), so the shrink may split K differently:
    # fp32 sums in another order, each logit at most a couple of bf16 ulps apart
    assert diff <= 2 * ulp
    for r in reqs:
        r.n_cached -= 1
    base = graphs.run(batch, None).clone()  # the base-only graph of the same bucket
    on = torch.tensor(adapter_slots, device=CUDA) != 0
    if gemm:  # the base rows come from a wider GEMM (its A rows appended): cuBLAS may sum otherwise
        assert (graphed[~on].float() - base[~on].float()).abs().max().item() <= 2 * ulp
    else:
        assert torch.equal(graphed[~on], base[~on])  # base rows of the adapter graph: the kernels skipped them
    assert (graphed[on].float() - base[on].float()).abs().max() > 0.1  # adapter rows: the adapters act


@pytest.mark.parametrize("mode", ["gemm", "side_store"])
def test_pool_growth_recaptures_the_adapter_graphs(tmp_path, monkeypatch, mode):
    """Pools that start at 4 lanes a slot, graphs captured over them with adapter a4 loaded; loading a8 and a16 grows
    the pools twice (slots.SlotPool.set_rank), each time through the engine's hook (Engine.adapter_pool_changed:
    GraphedDecode.recapture_adapters), and graphed decode over all three adapters then equals eager decode."""
    from lora_helpers import load
    from worker.engine.cuda_graphs import GraphedDecode
    from worker.engine.engine import Engine
    from worker.engine.kv_cache import KVCache
    from worker.layers import lora as lora_layer
    from worker.layers.decode_kernels import SERVED, apply_decode_kernels, parse_decode_kernels

    monkeypatch.setattr(lora_layer, "JOINT_MIN_ROWS", 1)  # "gemm" at this bucket (8 rows) too
    model, mgr, _ = lora_model(tmp_path, torch.bfloat16, True, loaded=1, pool_rank=4, lora_decode="gemm")
    apply_decode_kernels(model, parse_decode_kernels(",".join(SERVED)))  # the served set (K lanes on mlp.c_proj)
    if mode != "gemm":
        mgr.slots.choice = "side"  # the modes set_rank chooses again: side_store on every target
    for t in model.lora_targets():
        getattr(t.owner, t.attr).lora.decode = "gemm" if mode == "gemm" else "side_store"
    c = model.config
    kv = KVCache(c.num_hidden_layers, 200, 16, c.num_attention_heads, c.head_dim, torch.bfloat16, CUDA)
    graphs = GraphedDecode(model, kv, max_batch=16, max_blocks_per_seq=16, scratch_block=199, adapter_pools=True)
    captured = len(graphs.graphs)
    mgr.engine.runner = SimpleNamespace(graphs=graphs)
    mgr.engine.adapter_pool_changed = lambda: Engine.adapter_pool_changed(mgr.engine)
    # the static inputs as a step of 16 rows left them, in block 1, which a live request may hold now: the
    # captures' warm-up steps must not write K/V there (GraphedDecode._point_at_scratch)
    graphs.slots.copy_(torch.arange(16, 32, device=CUDA))
    graphs.tables[:, 0] = 1
    before = [t.clone() for layer in kv.layers for t in layer]
    load(mgr, 2, "a8")
    load(mgr, 3, "a16")
    assert mgr.slots.rank == 16 and len(graphs.graphs) == captured and graphs.has_lora
    after = [t for layer in kv.layers for t in layer]
    assert all(torch.equal(a[:199], b[:199]) for a, b in zip(after, before))  # all but the scratch block
    modes = {getattr(t.owner, t.attr).lora.decode for t in model.lora_targets()}
    assert modes == ({"gemm"} if mode == "gemm" else {"side_store"}), modes
    _check_graphed_adapter_decode(model, mgr, kv, graphs, mode == "gemm")


@pytest.mark.parametrize("file_dtype", [torch.bfloat16, torch.float32])
def test_load_fast_path_fills_the_same_slots(tmp_path, file_dtype):
    """Cold loads read the file's bytes into the pinned staging buffer and fold the scale into B on the GPU:
    each slot holds exactly read_adapter's A and B (scale applied in fp32, rounded once to bf16), ranks
    set. The pinning thread is held back while three adapters go through the staging buffer, so each load
    must first keep a copy of the bytes the previous one left there (an fp32 rank-16 file does not fit the
    staging buffer and goes through read_adapter instead); released, it pins every host copy. Offload
    zeroes the slots; reloads from the pinned host copies (scale folded in on the host, bf16; files deleted)
    restore them bit for bit."""
    import shutil
    import threading

    from lora_helpers import load, write_adapter
    from worker.adapters.peft import read_adapter
    from worker.pb import generate_pb2 as pb

    model, mgr, _ = lora_model(tmp_path, torch.bfloat16)
    root = str(tmp_path / "adapters")
    mgr.wait_pinned()
    specs = {4: ("x0", 8, 7.0), 5: ("x1", 16, 5.0), 6: ("x2", 4, 3.0)}  # scales 7/8, 5/16, 3/4
    gate = threading.Event()
    mgr.copies.staging.pinner.submit(gate.wait)  # the pinning thread waits behind this
    try:
        for index, (name, rank, alpha) in specs.items():
            write_adapter(root, name, CFG, rank, alpha, seed=10 + index, dtype=file_dtype)
            load(mgr, index, name)
        hosts = {i: mgr.entries[i].host for i in specs}
        staging = mgr.copies.staging.buf.data_ptr()
        assert not any(h.pinned for h in hosts.values())
        assert hosts[6].buf.data_ptr() == staging and hosts[6].scale == 0.75  # the last one's bytes: staging
        assert hosts[4].buf.data_ptr() != staging and hosts[4].scale == 7 / 8  # kept before staging was reused
        assert hosts[5].scale == (1.0 if file_dtype == torch.float32 else 5 / 16)  # fp32 r16: read_adapter
    finally:
        gate.set()
    torch.cuda.synchronize()
    for index, (name, rank, _) in specs.items():
        slot = mgr.entries[index].slot
        expect = read_adapter(os.path.join(root, name), model.config, 16, dtype=torch.bfloat16)
        for key, (a, b) in expect.weights.items():
            a_pool, b_pool = mgr.slots.pools[key]
            assert torch.equal(a_pool[slot, :rank].cpu(), a) and torch.equal(b_pool[slot, :, :rank].cpu(), b)
            assert not a_pool[slot, rank:].any() and not b_pool[slot, :, rank:].any()
        assert mgr.slots.ranks[slot].tolist() == [[rank] * 5] * CFG["num_hidden_layers"]
    before = {
        i: {
            k: (a[mgr.entries[i].slot].clone(), b[mgr.entries[i].slot].clone())
            for k, (a, b) in mgr.slots.stacked.items()
        }
        for i in specs
    }
    mgr.wait_pinned()  # released: the background thread moved every host copy into pinned memory, folded
    for index in specs:
        h = mgr.entries[index].host
        assert h.pinned and h.buf.is_pinned() and h.buf.data_ptr() != staging and h.scale == 1.0
        assert all(a.dtype == b.dtype == torch.bfloat16 for a, b in h.tensors().values())
    for index, (name, _, _) in specs.items():
        slot = mgr.entries[index].slot
        mgr.offload(pb.OffloadAdapterRequest(adapter_index=index))
        assert not mgr.slots.ranks[slot].any() and all(not a[slot].any() for a, _ in mgr.slots.stacked.values())
        shutil.rmtree(os.path.join(root, name))  # a reload must come from the host cache
    for index in specs:
        load(mgr, index, specs[index][0])  # straight from the pinned host copy
    torch.cuda.synchronize()
    for index in specs:
        slot = mgr.entries[index].slot
        assert all(
            torch.equal(a[slot], before[index][k][0]) and torch.equal(b[slot], before[index][k][1])
            for k, (a, b) in mgr.slots.stacked.items()
        )


# ------------------------------------------------------------------ multi-LoRA decode, one launch
@pytest.mark.parametrize("P,K,N", [(1, 4096, 3 * 4096), (2, 4096, 11008), (1, 11008, 4096)])
def test_lora_decode_one_launch_in_cuda_graph(P, K, N):
    """kernels/lora_decode.py at 7B module shapes in bf16: 32 decode rows (4 base), replayed from one CUDA
    graph twice with other slots, against the reference and the two-launch kernels."""
    from worker.kernels.lora import add_lora
    from worker.kernels.lora_decode import add_lora_decode
    from worker.kernels.lora_reference import add_lora_reference
    from worker.kernels.paged_decode import DecodeWorkspace
    from worker.layers.lora import AdapterBatchData

    g = torch.Generator(device=CUDA).manual_seed(P * K)
    dtype, slots_n, r_max = torch.bfloat16, 9, 16
    a = (torch.randn(slots_n, P, r_max, K, generator=g, device=CUDA) / K**0.5).to(dtype)
    b = (torch.randn(slots_n, P, N, r_max, generator=g, device=CUDA) / r_max**0.5).to(dtype)
    a[0], b[0] = 0, 0
    ranks = torch.full((P, slots_n), r_max, dtype=torch.int32, device=CUDA)
    ranks[:, 0] = 0
    x = torch.randn(32, K, generator=g, device=CUDA).to(dtype)
    y0 = torch.randn(32, P * N, generator=g, device=CUDA).to(dtype)
    slots = torch.zeros(32, dtype=torch.long, device=CUDA)
    data = AdapterBatchData.for_decode(slots)
    y, sync = y0.clone(), DecodeWorkspace()

    def step() -> None:
        y.copy_(y0)
        add_lora_decode(y, x, a, b, ranks, data.starts, data.slots, sync)

    slots.copy_(torch.arange(32, device=CUDA) % slots_n)
    step()  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    for seed in (1, 2):
        slots.copy_(torch.randint(0, slots_n, (32,), generator=torch.Generator().manual_seed(seed)).to(CUDA))
        graph.replay()
        ref, two = y0.clone(), y0.clone()
        add_lora_reference(ref, x, a, b, data.token_idx, data.valid, data.slots)
        add_lora(two, x, a, b, ranks, data.starts, data.lens, data.slots, 1)
        within(y, ref, 2e-2)
        within(y, two, 1e-2)  # the two-launch kernels: same partial sums, reduction order may differ
        (counters,) = sync.buffers[y.device]
        assert not counters.any()
