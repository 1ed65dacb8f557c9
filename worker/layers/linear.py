"""Tensor-parallel linear layers. Each owns its sharding rule and loads its own slice.

Weights are [out, in] as in the checkpoint. `pctx` is the ParallelContext (rank, world size, group).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from worker.distributed import ParallelContext
from worker.layers.decode_kernels import ACT_GEMV_MAX_M, DecodeKernels
from worker.weights import Weights, shard_range


def _param(shape: Sequence[int], dtype: torch.dtype, device: torch.device) -> nn.Parameter:
    return nn.Parameter(torch.empty(*shape, dtype=dtype, device=device), requires_grad=False)


GEMV_MAX_M = 8  # decode batches up to this many rows may take the Triton GEMV (worker/kernels/gemv.py)


def _gemv_counters(in_features: int, out_features: int, device: torch.device) -> torch.Tensor | None:
    """The split-K counters of the Triton GEMV where it was measured faster than cuBLAS for this shape at
    some decode M (worker/kernels/gemv_dense.py's DENSE_GEMV_PLAN, CUDA only), else None: F.linear."""
    if device.type != "cuda":
        return None
    try:
        from worker.kernels.gemv import counters_for
        from worker.kernels.gemv_dense import DENSE_GEMV_PLAN
    except ImportError:
        return None
    return counters_for(out_features, device) if (in_features, out_features) in DENSE_GEMV_PLAN else None


def _linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    counters: torch.Tensor | None,
    pdl: bool = False,
) -> torch.Tensor:
    """x W^T (+ bias) through the GEMV for decode batches of a chosen shape and M (counters), else cuBLAS."""
    if counters is not None and x.shape[0] <= GEMV_MAX_M:
        from worker.kernels import gemv_dense

        tiles = gemv_dense.dense_tiles(weight.shape[1], weight.shape[0], x.shape[0])
        if tiles is not None:
            return gemv_dense.dense_gemv(x, weight, bias, counters, tiles, pdl=pdl)
    return nn.functional.linear(x, weight, bias)


class ColumnParallelLinear(nn.Module):
    """y_r = x W_r^T (+ b_r): the output dim is split across ranks, no communication.

    Packed layers (fused q/k/v, merged gate/up) split each packed block on its own, so rank r holds
    [block0_r; block1_r; ...]. `packed_sizes` are the blocks' total sizes (one block = plain column).
    """

    gemv_counters: torch.Tensor | None = None  # set where the Triton GEMV serves this shape's decode
    decode_kernels = DecodeKernels()

    def __init__(
        self,
        in_features: int,
        packed_sizes: Sequence[int],
        bias: bool,
        pctx: ParallelContext,
        dtype: torch.dtype,
        what: str = "linear",
    ):
        super().__init__()
        self.pctx = pctx
        self.in_features = in_features
        self.packed_sizes_total = list(packed_sizes)
        for size in packed_sizes:
            shard_range(size, pctx.rank, pctx.world_size, f"{what} output")  # clear error if not divisible
        self.packed_sizes = [s // pctx.world_size for s in packed_sizes]  # per rank
        self.out_features = sum(self.packed_sizes)  # per rank
        self.bias = _param((self.out_features,), dtype, pctx.device) if bias else None
        self.allocate(dtype)

    def allocate(self, dtype: torch.dtype) -> None:
        """The weight storage (quantized subclasses hold other tensors)."""
        self.weight = _param((self.out_features, self.in_features), dtype, self.pctx.device)
        self.gemv_counters = _gemv_counters(self.in_features, self.out_features, self.pctx.device)

    def load(self, weights: Weights, names: Sequence[str]) -> None:
        """`names`: one checkpoint prefix per stored tensor; a single name may hold all packed blocks
        (c_attn), several names are concatenated as the packed blocks (w2 then w1)."""
        r, n = self.pctx.rank, self.pctx.world_size
        if len(names) == 1:
            name = names[0]
            w = weights.get_packed_sharded(
                f"{name}.weight", 0, self.packed_sizes_total, r, n, (sum(self.packed_sizes_total), self.in_features)
            )
            b = (
                weights.get_packed_sharded(
                    f"{name}.bias", 0, self.packed_sizes_total, r, n, (sum(self.packed_sizes_total),)
                )
                if self.bias is not None
                else None
            )
        else:
            if len(names) != len(self.packed_sizes_total):
                raise ValueError(f"{len(names)} tensors for {len(self.packed_sizes_total)} packed blocks")
            w = torch.cat(
                [
                    weights.get_sharded(f"{nm}.weight", 0, r, n, (size, self.in_features))
                    for nm, size in zip(names, self.packed_sizes_total)
                ]
            )
            b = (
                torch.cat(
                    [
                        weights.get_sharded(f"{nm}.bias", 0, r, n, (size,))
                        for nm, size in zip(names, self.packed_sizes_total)
                    ]
                )
                if self.bias is not None
                else None
            )
        self.store(w, b)

    def store(self, w: torch.Tensor, b: torch.Tensor | None) -> None:
        """Keep this rank's weight w [out_per_rank, in] and bias."""
        self.weight.data.copy_(w)
        if self.bias is not None and b is not None:
            self.bias.data.copy_(b)

    def set_decode_kernels(self, opts: DecodeKernels) -> None:
        self.decode_kernels = opts

    def forward(self, x: torch.Tensor, ctx: object = None) -> torch.Tensor:
        # x: [T, in] -> [T, out_per_rank]; ctx is read only by LoRA wrappers
        return _linear(x, self.weight, self.bias, self.gemv_counters, self.decode_kernels.pdl)


class RowParallelLinear(nn.Module):
    """y = sum_r x_r W_r^T (+ b): the input dim is split; one all-reduce in `forward`; bias added once,
    after the reduction. `partial(x)` gives this rank's un-reduced term (LoRA adds into it)."""

    gemv_counters: torch.Tensor | None = None  # set where the Triton GEMV serves this shape's decode
    decode_kernels = DecodeKernels()
    act_counters: torch.Tensor | None = None  # the act GEMV's split-K counters (DecodeKernels.act_gemv)

    def __init__(
        self,
        in_features_total: int,
        out_features: int,
        bias: bool,
        pctx: ParallelContext,
        dtype: torch.dtype,
        what: str = "linear",
    ):
        super().__init__()
        self.pctx = pctx
        start, stop = shard_range(in_features_total, pctx.rank, pctx.world_size, f"{what} input")
        self.in_features = stop - start  # per rank
        self.out_features = out_features
        self.bias = _param((out_features,), dtype, pctx.device) if bias else None
        self.allocate(dtype)

    def allocate(self, dtype: torch.dtype) -> None:
        """The weight storage (quantized subclasses hold other tensors)."""
        self.weight = _param((self.out_features, self.in_features), dtype, self.pctx.device)
        self.gemv_counters = _gemv_counters(self.in_features, self.out_features, self.pctx.device)

    def load(self, weights: Weights, name: str) -> None:
        r, n = self.pctx.rank, self.pctx.world_size
        w = weights.get_sharded(f"{name}.weight", 1, r, n, (self.out_features, self.in_features * n))
        self.store(w, weights.get(f"{name}.bias", (self.out_features,)) if self.bias is not None else None)

    def store(self, w: torch.Tensor, b: torch.Tensor | None) -> None:
        """Keep this rank's weight w [out, in_per_rank] and the (whole) bias."""
        self.weight.data.copy_(w)
        if self.bias is not None and b is not None:
            self.bias.data.copy_(b)

    def partial(self, x: torch.Tensor) -> torch.Tensor:
        # x: [T, in_per_rank] -> [T, out] (this rank's share of the sum)
        return _linear(x, self.weight, None, self.gemv_counters, self.decode_kernels.pdl)

    def set_decode_kernels(self, opts: DecodeKernels) -> None:
        """Keep `opts`; act_gemv on a float weight on CUDA allocates the act GEMV's counters once (before capture;
        kept when switched off, since graphs captured with them may still replay)."""
        self.decode_kernels = opts
        if opts.act_gemv and self.act_counters is None and type(self) is RowParallelLinear:
            if self.weight.device.type == "cuda":
                from worker.kernels.gemv import counters_for

                self.act_counters = counters_for(self.out_features, self.weight.device)

    def fuses_act(self, gate_up: torch.Tensor) -> bool:
        """Whether `forward_act(gate_up)` runs the act GEMV (else the caller applies the activation itself): only
        decode batches of <= ACT_GEMV_MAX_M rows (1), where it measured faster than cuBLAS + SiLU-mul; each
        captured CUDA graph's batch size decides once, at capture."""
        rows = gate_up.shape[0]
        return self.decode_kernels.act_gemv and self.act_counters is not None and rows <= ACT_GEMV_MAX_M

    def forward_act(self, gate_up: torch.Tensor) -> torch.Tensor:
        """forward(up * silu(gate)) for gate_up [T, 2 * in_per_rank] = [gate | up], the activation computed
        inside the Triton GEMV (fused.silu_mul's rounding; `fuses_act` says when this applies)."""
        from worker.kernels import gemv_dense

        m = gate_up.shape[0]
        tiles = gemv_dense.act_tiles(self.in_features, self.out_features, m)
        y = gemv_dense.dense_gemv(
            gate_up, self.weight, None, self.act_counters, tiles, act=True, pdl=self.decode_kernels.pdl
        )
        return self.reduce(y)

    def reduce(self, y: torch.Tensor) -> torch.Tensor:
        y = self.pctx.all_reduce(y)
        return y + self.bias if self.bias is not None else y

    def forward(self, x: torch.Tensor, ctx: object = None) -> torch.Tensor:
        return self.reduce(self.partial(x))


def make_qkv(
    hidden: int, heads_total: int, head_dim: int, pctx: ParallelContext, dtype: torch.dtype, bias: bool = True
) -> ColumnParallelLinear:
    """Fused c_attn: q, k, v each split by heads (so each rank's heads keep their q, k and v)."""
    if heads_total % pctx.world_size:
        raise ValueError(f"{heads_total} attention heads do not divide across {pctx.world_size} shards")
    size = heads_total * head_dim
    return ColumnParallelLinear(hidden, [size, size, size], bias, pctx, dtype, "c_attn")
