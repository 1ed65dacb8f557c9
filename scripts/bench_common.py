"""What the GPU benchmark and profiling scripts share: model shapes, timing, the card's measured floors,
a random-weight model, static decode inputs. Imports nothing from the other scripts."""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from worker.config import QwenConfig  # noqa: E402
from worker.distributed import ParallelContext  # noqa: E402
from worker.layers.context import Seqlen  # noqa: E402

SHAPES: dict[str, dict[str, int]] = {
    "7b": dict(
        hidden_size=4096,
        num_attention_heads=32,
        num_hidden_layers=32,
        intermediate_size=22016,
        vocab_size=151936,
        seq_length=8192,
    ),
    "1.8b": dict(
        hidden_size=2048,
        num_attention_heads=16,
        num_hidden_layers=24,
        intermediate_size=11008,
        vocab_size=151936,
        seq_length=8192,
    ),
    "tiny": dict(
        hidden_size=256,
        num_attention_heads=2,
        num_hidden_layers=2,
        intermediate_size=1024,
        vocab_size=1024,
        seq_length=8192,
    ),
}


def cuda_time(fn: Callable[[], object], iters: int = 20, warmup: int = 3) -> float:
    """Median seconds per call, with CUDA events."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    times.sort()
    return times[len(times) // 2]


# The 7B linears as (K, N) of the GEMV layout: c_attn, attn.c_proj, mlp's gate|up (w2|w1) and mlp.c_proj
LINEARS_7B = {"c_attn": (4096, 12288), "attn.c_proj": (4096, 4096), "w2|w1": (4096, 22016), "mlp.c_proj": (11008, 4096)}


def graphed_time(fn: Callable[[int], object], copies: int) -> float:
    """Median seconds per call of fn(i) for i over 0 .. copies - 1 (each on its own copy of the weights, so that
    together they pass L2), captured in one CUDA graph."""
    fn(0)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(copies):
            fn(i)
    return cuda_time(graph.replay, iters=20) / copies


def gptq_library_ready(device: torch.device) -> bool:
    """Whether gemv_cuda's CUDA GPTQ library built for `device` (else says why); prints the card and its copy
    bandwidth (the gpu_check_* scripts' header)."""
    from worker.kernels.gemv_cuda import library

    lib = library(*torch.cuda.get_device_capability(device))
    if isinstance(lib, str):
        print("library:", lib)
        return False
    print(f"{torch.cuda.get_device_name(device)}: copy {copy_bandwidth(device) / 1e12:.2f} TB/s")
    return True


def each_7b_linear(shape: Callable[[str, int, int, torch.Generator, torch.device], object]) -> None:
    """shape(name, K, N, generator, device) for each of LINEARS_7B on cuda:0 with one generator seeded 0, after the
    gpu_check_* header (`gptq_library_ready`); nothing more where the CUDA GPTQ library did not build."""
    dev = torch.device("cuda", 0)
    if not gptq_library_ready(dev):
        return
    g = torch.Generator(device=dev).manual_seed(0)
    for name, (K, N) in LINEARS_7B.items():
        shape(name, K, N, g, dev)


def random_int4_linear(K: int, N: int, g: torch.Generator, device: torch.device) -> tuple[torch.Tensor, ...]:
    """A random Int4 GPTQ linear as the 7B checks use it (groups of 128, sym): qweight, qzeros, bf16 scales, g_idx."""
    G = K // 128
    qweight = torch.randint(-(2**31), 2**31 - 1, (K // 8, N), device=device, dtype=torch.int32, generator=g)
    qzeros = torch.full((G, N // 8), 0x77777777, device=device, dtype=torch.int32)
    scales = (torch.rand(G, N, device=device, generator=g) * 0.02 + 0.001).to(torch.bfloat16)
    g_idx = (torch.arange(K, device=device) // 128).to(torch.int32)
    return qweight, qzeros, scales, g_idx


def copies_past_l2(nbytes: int) -> int:
    """Copies of an nbytes weight that together pass L2 (>= 256 MB), at least 2."""
    return max(2, -(-256 * 2**20 // nbytes))


def print_kernel_table(fn: Callable[[], object], top: int = 20, reps: int = 5, warmup: int = 1) -> None:
    """GPU time per kernel name of one call of fn (a graph replay too: CUPTI sees the graph's kernels), largest
    first, with the sum of kernel times (gaps between kernels are not in it)."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            fn()
        torch.cuda.synchronize()
    rows = sorted(
        ((e.key, e.device_time_total / reps, e.count // reps) for e in prof.key_averages() if e.device_time_total > 0),
        key=lambda r: -r[1],
    )
    print(f"GPU kernel time per call: {sum(r[1] for r in rows) / 1e3:.3f} ms over {sum(r[2] for r in rows)} kernels")
    for name, us, n in rows[:top]:
        print(f"{us / 1e3:8.3f} ms  {n:5d}x  {us / max(n, 1):7.2f} us  {name[:100]}")


def copy_bandwidth(device: torch.device) -> float:
    """Bytes per second of a 2 GiB device-to-device copy (read + write)."""
    x = torch.empty(2 * 2**30, dtype=torch.uint8, device=device)
    y = torch.empty_like(x)
    t = cuda_time(lambda: y.copy_(x), iters=10)
    return 2 * 2 * 2**30 / t


def matmul_rate(device: torch.device) -> float:
    """bf16 FLOP/s of an 8192^3 matmul."""
    a = torch.randn(8192, 8192, dtype=torch.bfloat16, device=device)
    b = torch.randn(8192, 8192, dtype=torch.bfloat16, device=device)
    t = cuda_time(lambda: a @ b, iters=10)
    return 2 * 8192**3 / t


def build_model(shape: str, pctx: ParallelContext, backend_name: str) -> Any:
    """FlashQwenForCausalLM of a named shape with random bf16 weights (norm weights 1)."""
    from worker.layers.attention import make_backend
    from worker.models.qwen import FlashQwenForCausalLM

    cfg = QwenConfig.from_dict({"model_type": "qwen", **SHAPES[shape]})
    model = FlashQwenForCausalLM(cfg, pctx, torch.bfloat16, make_backend(backend_name, pctx.device))
    g = torch.Generator(device=pctx.device).manual_seed(pctx.rank)
    for name, p in model.named_parameters():
        if "ln_" in name:
            p.data.fill_(1.0)
        else:
            p.data.normal_(0.0, 0.02, generator=g)
    return model


def with_decode_kernels(model: Any, spec: str) -> str:
    """Give `model` the decode kernels `serve --decode-kernels SPEC` would run on its device; their names."""
    from worker.layers.decode_kernels import apply_decode_kernels, parse_decode_kernels, where_applies

    kernels = where_applies(parse_decode_kernels(spec), model.pctx.device, fused=model.use_fused)
    apply_decode_kernels(model.transformer, kernels)
    return kernels.describe()


def add_decode_kernels_arg(ap: Any) -> None:
    """The benchmarks' --decode-kernels, as serve's (default: the served set)."""
    from worker.layers.decode_kernels import SERVED

    ap.add_argument(
        "--decode-kernels",
        default=",".join(SERVED),
        help="as serve's flag: 'none' or a comma list of DecodeKernels fields (default: the served set)",
    )


def weight_bytes(model: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def shape_of(c: QwenConfig) -> dict[str, int]:
    return dict(
        hidden_size=c.hidden_size,
        num_attention_heads=c.num_attention_heads,
        num_hidden_layers=c.num_hidden_layers,
        intermediate_size=c.intermediate_size,
        vocab_size=c.vocab_size,
        seq_length=c.seq_length,
    )


@dataclass
class DecodeInputs:
    """One decode step's static inputs: `batch` sequences, each with ctx_len cached tokens, one new token."""

    ids: torch.Tensor  # [B] long
    positions: torch.Tensor  # [B] long
    block_tables: torch.Tensor  # [B, blocks per sequence] int32
    slots: torch.Tensor  # [B] long: the new token's KV slot
    seqlen: Seqlen
    max_s: int  # ctx_len + 1

    @classmethod
    def build(cls, model: Any, batch: int, ctx_len: int, block_size: int) -> DecodeInputs:
        dev = model.pctx.device
        per_seq = math.ceil((ctx_len + 1) / block_size)
        tables = torch.arange(1, 1 + batch * per_seq, dtype=torch.int32, device=dev).view(batch, per_seq)
        slots = tables[:, ctx_len // block_size].long() * block_size + ctx_len % block_size
        seqlen = Seqlen(
            input_lengths=torch.full((batch,), ctx_len + 1, dtype=torch.int32, device=dev),
            cache_lengths=torch.full((batch,), ctx_len, dtype=torch.int32, device=dev),
            cu_seqlen_q=torch.arange(batch + 1, dtype=torch.int32, device=dev),
            max_q=1,
            max_k=ctx_len + 1,
            ntk_alpha=torch.ones(batch, device=dev),
        )
        ids = torch.randint(0, 1000, (batch,), device=dev)
        pos = torch.full((batch,), ctx_len, dtype=torch.long, device=dev)
        return cls(ids, pos, tables, slots, seqlen, ctx_len + 1)

    def step(self, model: Any, kv_layers: Any) -> Callable[[], torch.Tensor]:
        """The decode forward on these inputs, as a no-argument call (to time or capture)."""

        def run() -> torch.Tensor:
            with torch.inference_mode():
                return model(
                    self.ids, self.positions, None, kv_layers, self.block_tables, self.slots, self.seqlen, self.max_s
                )[0]

        return run
