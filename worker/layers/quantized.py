"""GPTQ (Int4/Int8) column- and row-parallel linears, and the factory that picks a model's linears.

Per linear (K = in, N = out, P = 32 // bits, G groups; worker/quant/gptq_format.py has the layout):
- Column parallel (c_attn per q/k/v head range, merged w2|w1): each packed block is split on N, so rank r
  holds qweight [K/P, N_r], scales [G, N_r], qzeros [G, N_r/P] (the split in packed units: each block's
  share must be a multiple of P) and its bias; g_idx [K] whole.
- Row parallel (attn.c_proj, mlp.c_proj): qweight split on its packed rows [K_r/P, N] and g_idx on K
  [K_r]; every rank keeps the full scales [G, N] and qzeros [G, N/P] and finds each row's group through
  g_idx, so K_r need not be a whole number of groups (Qwen-14B's mlp.c_proj at any TP, 7B at TP 4) and act
  order works at any TP; K_r must only be a multiple of P.
The subclasses keep the float layers' attributes (in_features, out_features, packed_sizes_total), so LoRA
wraps them unchanged with dims from the config, never from the packed shapes.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from worker.distributed import ParallelContext
from worker.kernels.gptq_reference import gptq_matmul_reference, group_order
from worker.layers.decode_kernels import DecodeKernels
from worker.layers.fp8_linear import FP8ColumnParallelLinear, FP8RowParallelLinear
from worker.layers.linear import ColumnParallelLinear, RowParallelLinear
from worker.layers.norm import Deferred, RMSNorm
from worker.quant.config import FP8Config, GPTQConfig, QuantConfig
from worker.quant.gptq_format import check_tiles, default_g_idx, tile_words, tiles, unpack_cols, untile_words
from worker.weights import WeightError, Weights, shard_range

log = logging.getLogger("worker")
GPTQMatmul = Callable[..., torch.Tensor]  # gptq_matmul_reference's signature
GEMV_MAX_M = 8  # decode batches up to this many rows take worker/kernels/gemv.py on CUDA
CUDA_GEMV_MAX_M = 2  # ... or, with DecodeKernels.gptq_cuda where it serves, worker/kernels/gemv_cuda.py (its MAX_ROWS)
# DecodeKernels.gptq_mma: steps of more rows than the above, up to this many by bits, on gemv_cuda's tensor cores (the
# kernel serves 64 Int4 rows; on the H200 the 7B step at 64 rows measured 15.5 ms with it against 13.5 with dequantize +
# cuBLAS, at 48 11.9 against 12.5; Int8: the kernel's 32)
MMA_MAX_M = {4: 48, 8: 32}
# ... and from this many: Int8 one-row steps measured 3.91 ms on the matmul against 3.34 on the Triton GEMV (7B, H200),
# two rows not measured, so the Triton GEMV keeps both; at 8 rows the matmul took 4.86 against 6.30
MMA_MIN_M = {4: 1, 8: 3}
# DecodeKernels.gptq_tc: Int4 steps of these rows take gemv_cuda's tensor-core GEMV (weights as mma's A) instead of the
# FMA GEMVs (it serves 1-8), x loaded by each warp (TC_STAGE False). 7B on the H200: batch 1 2.462 ms against
# 2.615-2.637, batch 2 2.909 against 3.749-3.768 (x staged by the block: 3.219 / 3.222); at 3-8 rows gptq_mma's matmul
# measured alike or faster per linear, so it keeps them
TC_MIN_M, TC_MAX_M = 1, 2
TC_STAGE = False  # gptq_tc's x staged in shared memory by the block (else loaded by each warp with its chunks)


@functools.cache
def _warn_once(message: str) -> None:
    log.warning(message)


def gptq_matmul_for(device: torch.device) -> GPTQMatmul:
    """The Triton kernels on CUDA (when Triton imports), else the dequantize-then-matmul reference."""
    if device.type == "cuda":
        try:
            from worker.kernels.gptq import gptq_matmul
        except ImportError:
            return gptq_matmul_reference
        return gptq_matmul
    return gptq_matmul_reference


class _GPTQ:
    """Storage, checks and the matmul shared by both GPTQ layers."""

    quant: GPTQConfig
    pctx: ParallelContext
    qweight: torch.Tensor
    qzeros: torch.Tensor
    scales: torch.Tensor
    g_idx: torch.Tensor
    matmul: GPTQMatmul
    group_hint: int = 0
    k_offset: int = 0
    perm: torch.Tensor | None = None  # act order: rows stored in group order, x[:, perm] per call
    gemv: Any = None  # worker.kernels.gemv.GPTQGemvWeights (CUDA, rows whose tiles lie in one group)
    _cuda_gemv: bool | None = None  # whether the CUDA GEMV serves decode steps of <= 2 rows (None: not decided)
    _cuda_mma: bool | None = None  # whether the CUDA tensor-core matmul serves (decided with the above)
    tiled: bool = False  # qweight in gptq_format.tile_words' layout (DecodeKernels.gptq_tiled)
    decode_kernels: DecodeKernels  # the float linears' (pdl: the GEMV launches with PDL)
    register_buffer: Callable[..., None]

    def _allocate_gptq(self, k: int, n: int, k_groups: int, n_zeros: int, dtype: torch.dtype) -> None:
        """qweight [k/P, n], g_idx [k]; scales [G, n_zeros] and qzeros [G, n_zeros/P] for G groups of k_groups."""
        q, dev = self.quant, self.pctx.device
        for size, what in ((k, "input rows"), (n_zeros, "output columns")):
            if size % q.pack:
                raise WeightError(f"{size} {what} per shard do not pack into whole {q.bits}-bit words of {q.pack}")
        g = q.groups(k_groups)
        self.register_buffer("qweight", torch.empty(k // q.pack, n, dtype=torch.int32, device=dev))
        self.register_buffer("qzeros", torch.empty(g, n_zeros // q.pack, dtype=torch.int32, device=dev))
        self.register_buffer("scales", torch.empty(g, n_zeros, dtype=dtype, device=dev))
        self.register_buffer("g_idx", torch.empty(k, dtype=torch.int32, device=dev))
        self.matmul = gptq_matmul_for(dev)

    def _check_int(self, weights: Weights, name: str) -> None:
        found = weights.dtype_of(name)
        if found != "I32":
            raise WeightError(f"tensor {name!r}: expected int32 (I32) packed words, found {found}")

    def _read_g_idx(self, weights: Weights, name: str, k_total: int, rank: int, world: int) -> torch.Tensor:
        """This rank's g_idx rows (missing g_idx: k // group_size, unless the checkpoint is act-order)."""
        if f"{name}.g_idx" not in weights and not self.quant.desc_act:
            full = default_g_idx(k_total, self.quant.group_size)
            start, stop = shard_range(k_total, rank, world, f"{name}.g_idx")
            return full[start:stop]
        self._check_int(weights, f"{name}.g_idx")
        g_idx = weights.get_sharded(f"{name}.g_idx", 0, rank, world, (k_total,))
        groups = self.quant.groups(k_total)
        if g_idx.numel() and (int(g_idx.min()) < 0 or int(g_idx.max()) >= groups):
            raise WeightError(
                f"tensor {name + '.g_idx'!r}: group indices must lie in [0, {groups}) (G = ceil(K / group_size))"
            )
        return g_idx

    def _check_zeros(self, name: str, qzeros: torch.Tensor) -> None:
        """A sym checkpoint in the v1 convention stores 2^(bits−1) − 1; stored 2^(bits−1) everywhere is v2."""
        q = self.quant
        if q.sym and q.zero_offset == 1 and qzeros.numel():
            stored = unpack_cols(qzeros.cpu(), q.bits)
            if bool((stored == 1 << (q.bits - 1)).all()):
                raise WeightError(
                    f"tensor {name + '.qzeros'!r}: every stored zero is {1 << (q.bits - 1)}, the true zero of the v2 "
                    f"convention (GPTQModel >= 5), but {q.source} declares v1 (stored {(1 << (q.bits - 1)) - 1}); "
                    'add "checkpoint_format": "gptq_v2" to the quantization_config to serve it'
                )

    def _copy(
        self, qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, g_idx: torch.Tensor, k_offset: int
    ) -> None:
        """Keep the tensors with the rows in group order (act order: stably sorted by g_idx, the permutation
        applied to x per call: the same sum). Sorted g_idx of rows k_offset.. equal to (k_offset + k) //
        group_size lets the kernels read one zero/scale row per aligned K tile (`group_hint`; 0: gather
        through g_idx), and on CUDA the decode GEMV take them."""
        qweight, perm = group_order(qweight, g_idx, self.quant.bits)
        self.perm = None if perm is None else perm.to(self.pctx.device)
        if perm is not None:
            g_idx = g_idx[perm]
        for dst, src in ((self.qweight, qweight), (self.qzeros, qzeros), (self.scales, scales), (self.g_idx, g_idx)):
            dst.copy_(src)
        self.tiled = False  # the checkpoint's row-major words
        gs = self.quant.group_size
        plain = gs > 0 and torch.equal(g_idx.cpu(), default_g_idx(k_offset + g_idx.numel(), gs)[k_offset:])
        self.group_hint = gs if plain else 0
        self.k_offset = k_offset
        if self.pctx.device.type == "cuda":
            self.build_gemv()
        self.set_tiled(self._wants_tiled())  # a reload under gptq_tiled

    def build_gemv(self) -> None:
        """The decode GEMV's view of the current buffers (None where it does not apply or Triton is absent)."""
        self.gemv, self._cuda_gemv, self._cuda_mma = None, None, None
        gs, grouped = self.quant.group_size, self.group_hint > 0
        if not grouped and gs == -1:
            grouped = not bool(self.g_idx.any())
        try:
            from worker.kernels.gemv import default_tiles, gemv_fits, gemv_weights
        except ImportError:
            return
        if grouped:
            q = self.quant
            w = gemv_weights(self.qweight, self.qzeros, self.scales, q.bits, q.zero_offset, gs, self.k_offset)
            w.tiled = self.tiled
            self.gemv = w if gemv_fits(w, default_tiles(q.bits)) else None
        if self.gemv is not None and (self.decode_kernels.gptq_cuda or self.decode_kernels.gptq_mma):
            self._cuda_gemv_serves(self.scales.dtype)  # decided (and built) now, not inside a graph capture

    def set_decode_kernels(self, opts: DecodeKernels) -> None:
        """The float linears' choices (pdl), and gptq_cuda's / gptq_mma's decision for loaded weights made now; the
        words tiled or back to row-major as gptq_tiled asks (`_wants_tiled`)."""
        super().set_decode_kernels(opts)  # type: ignore[misc]
        if self.gemv is not None and (opts.gptq_cuda or opts.gptq_mma):
            self._cuda_gemv_serves(self.scales.dtype)
        self.set_tiled(self._wants_tiled())

    def _wants_tiled(self) -> bool:
        """DecodeKernels.gptq_tiled: Int4 words that tile, where the CUDA kernels serve every decode step up to
        MMA_MAX_M rows (gptq_tc at 1-2 rows, gptq_mma above: the FMA GEMVs and the Triton GEMV read row-major words)."""
        k = self.decode_kernels
        if not (k.gptq_tiled and k.gptq_cuda and k.gptq_tc and k.gptq_mma) or self.quant.bits != 4:
            return False
        if self.gemv is None or not tiles(self.qweight):
            return False
        return self._cuda_gemv_serves(self.scales.dtype) and self._cuda_mma_serves(self.scales.dtype)

    def set_tiled(self, on: bool) -> None:
        """qweight re-laid out in place (gptq_format.tile_words, or back; the decode GEMV's view shares it and is told),
        so every path that reads the words reads that layout (the matmuls take `tiled`). Before graphs are captured:
        they keep the layout their kernels were launched for."""
        if on == self.tiled:
            return
        if on:
            check_tiles(self.qweight, self.quant.bits)
        self.qweight.copy_(tile_words(self.qweight) if on else untile_words(self.qweight))
        self.tiled = on
        if self.gemv is not None:
            self.gemv.tiled = on
        log.debug("GPTQ words %s: %s", "tiled" if on else "row-major", tuple(self.qweight.shape))

    def _cuda_gemv_serves(self, dtype: torch.dtype) -> bool:
        """DecodeKernels.gptq_cuda: whether the CUDA GEMV (worker/kernels/gemv_cuda.py) serves this linear's decode
        steps of 1-2 rows; decided once per load with `_cuda_mma_serves` (the first decision builds the library), at
        load or when the choices arrive."""
        if self._cuda_gemv is None:
            from worker.kernels.gemv_cuda import library, supports

            assert self.gemv is not None
            lib = library(*torch.cuda.get_device_capability(self.qweight.device))
            why = lib if isinstance(lib, str) else supports(self.gemv, dtype)
            why_mma = lib if isinstance(lib, str) else supports(self.gemv, dtype, mma=True)
            if why_mma:
                _warn_once(
                    f"--decode-kernels gptq_cuda/gptq_mma: the Triton kernels serve decode steps where {why_mma}"
                )
            elif why and self.decode_kernels.gptq_cuda:
                _warn_once(f"--decode-kernels gptq_cuda: gptq_mma or the Triton GEMV serves 1-2 rows where {why}")
            self._cuda_gemv, self._cuda_mma = not why, not why_mma
        return self._cuda_gemv

    def _cuda_mma_serves(self, dtype: torch.dtype) -> bool:
        """DecodeKernels.gptq_mma: whether the CUDA tensor-core matmul serves this linear (decided with the GEMV)."""
        self._cuda_gemv_serves(dtype)
        return bool(self._cuda_mma)

    def _takes_tc(self, m: int) -> bool:
        """DecodeKernels.gptq_tc (with gptq_cuda serving): TC_MIN_M to TC_MAX_M rows."""
        return self.decode_kernels.gptq_tc and TC_MIN_M <= m <= TC_MAX_M

    def folds_norm(self, m: int) -> bool:
        """DecodeKernels.norm_fold: a residual add + RMSNorm beside this linear can fold into its gptq_tc launch at m
        rows (`forward_norm` before the norm, `forward_scaled` or `forward_silu_mul` after it): gptq_tc serves m rows
        unstaged, the rows in checkpoint order (no act order) and one rank (the product is the whole sum)."""
        k = self.decode_kernels
        if not (k.norm_fold and k.gptq_cuda and self._takes_tc(m)) or TC_STAGE or self.perm is not None:
            return False
        return self.gemv is not None and self.pctx.world_size == 1 and self._cuda_gemv_serves(self.scales.dtype)

    def forward_norm(self, x: torch.Tensor, residual: torch.Tensor, norm: RMSNorm) -> tuple[Deferred, torch.Tensor]:
        """(norm(s) deferred, s) for s = forward(x) + residual (`folds_norm`): one gptq_tc launch computes the
        product, s rounded as the norm's residual add, rn(s * norm.weight) and the squares (gptq_tc.cu's kNorm 1)."""
        from worker.kernels.gemv_cuda import TC_COLS, cuda_gemv

        m, n = x.shape[0], self.scales.shape[1]
        sums = torch.empty(m, n, dtype=x.dtype, device=x.device)
        squares = torch.empty(m, -(-n // TC_COLS), dtype=torch.float32, device=x.device)
        y = cuda_gemv(
            x, self.gemv, getattr(self, "bias", None), pdl=self.decode_kernels.pdl, tc=True, stage=False,
            norm_out=(residual, norm.weight), sums=sums, squares=squares,
        )  # fmt: skip
        return Deferred(y, squares, norm.eps), sums

    def forward_scaled(self, x: Deferred) -> torch.Tensor:
        """forward(RMSNorm's output) from its deferred form (`folds_norm`): the product's rows scaled in gptq_tc's
        epilogue before the bias (kNorm 2)."""
        from worker.kernels.gemv_cuda import cuda_gemv

        return cuda_gemv(
            x.x, self.gemv, getattr(self, "bias", None), pdl=self.decode_kernels.pdl, tc=True, stage=False,
            row_scale=(x.squares, x.eps),
        )  # fmt: skip

    def _in_group_order(self, x: torch.Tensor) -> torch.Tensor:
        """x's columns in the stored rows' order (act order: x[:, perm]; else x itself)."""
        return x if self.perm is None else x.index_select(1, self.perm)

    def _mm(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        q = self.quant
        x = self._in_group_order(x)
        m, k = x.shape[0], self.decode_kernels
        if self.gemv is not None and m <= MMA_MAX_M.get(q.bits, 0) and (k.gptq_cuda or k.gptq_mma):
            from worker.kernels.gemv_cuda import cuda_gemv

            if m <= CUDA_GEMV_MAX_M and k.gptq_cuda and self._cuda_gemv_serves(x.dtype):
                tc: dict[str, Any] = dict(tc=True, stage=TC_STAGE) if self._takes_tc(m) else {}
                return cuda_gemv(x, self.gemv, bias, pdl=k.pdl, **tc)
            if k.gptq_mma and m >= MMA_MIN_M[q.bits] and self._cuda_mma_serves(x.dtype):
                return cuda_gemv(x, self.gemv, bias, pdl=k.pdl, mma=True)
        if self.gemv is not None and m <= GEMV_MAX_M and not self.tiled:
            from worker.kernels.gemv import quant_gemv

            return quant_gemv(x, self.gemv, bias, pdl=self.decode_kernels.pdl)
        return self.matmul(
            x,
            self.qweight,
            self.qzeros,
            self.scales,
            self.g_idx,
            q.bits,
            q.zero_offset,
            bias,
            group_size=self.group_hint,
            k_offset=self.k_offset,
            tiled=self.tiled,
        )


class GPTQColumnParallelLinear(_GPTQ, ColumnParallelLinear):
    """y_r = x W_r (+ b_r) over this rank's columns of each packed block (see the module docstring)."""

    def __init__(
        self,
        in_features: int,
        packed_sizes: Sequence[int],
        bias: bool,
        pctx: ParallelContext,
        dtype: torch.dtype,
        quant: GPTQConfig,
        what: str = "linear",
    ):
        super().__init__(in_features, packed_sizes, bias, pctx, dtype, what)
        self.quant = quant
        for size in self.packed_sizes:
            if size % quant.pack:
                raise WeightError(f"{what}: {size} output columns per shard do not pack into {quant.bits}-bit words")
        self._allocate_gptq(in_features, self.out_features, in_features, self.out_features, dtype)

    def allocate(self, dtype: torch.dtype) -> None:
        """No float weight: the GPTQ buffers are registered once `quant` is known."""

    def load(self, weights: Weights, names: Sequence[str]) -> None:
        r, n, p, k = self.pctx.rank, self.pctx.world_size, self.quant.pack, self.in_features
        sizes, g = self.packed_sizes_total, self.quant.groups(k)
        if len(names) != 1 and len(names) != len(sizes):
            raise ValueError(f"{len(names)} tensors for {len(sizes)} packed blocks")
        blocks = [(names[0], sizes)] if len(names) == 1 else [(nm, [s]) for nm, s in zip(names, sizes)]
        parts: dict[str, list[torch.Tensor]] = {"qweight": [], "qzeros": [], "scales": [], "bias": []}
        g_idx: torch.Tensor | None = None
        for name, block in blocks:
            for t in ("qweight", "qzeros"):
                self._check_int(weights, f"{name}.{t}")
            total = sum(block)
            parts["qweight"].append(weights.get_packed_sharded(f"{name}.qweight", 1, block, r, n, (k // p, total)))
            zeros = weights.get_packed_sharded(f"{name}.qzeros", 1, [s // p for s in block], r, n, (g, total // p))
            self._check_zeros(name, zeros)
            parts["qzeros"].append(zeros)
            parts["scales"].append(weights.get_packed_sharded(f"{name}.scales", 1, block, r, n, (g, total)))
            if self.bias is not None:
                parts["bias"].append(weights.get_packed_sharded(f"{name}.bias", 0, block, r, n, (total,)))
            gi = self._read_g_idx(weights, name, k, 0, 1)
            if g_idx is not None and not torch.equal(gi, g_idx):
                raise WeightError(
                    f"tensor {name + '.g_idx'!r} differs from {names[0] + '.g_idx'!r}: merged layers need one row order"
                )
            g_idx = gi
        assert g_idx is not None
        qweight, qzeros, scales = (torch.cat(parts[t], dim=1) for t in ("qweight", "qzeros", "scales"))
        self._copy(qweight, qzeros, scales, g_idx, 0)
        if self.bias is not None:
            self.bias.data.copy_(torch.cat(parts["bias"]))

    def forward(self, x: torch.Tensor, ctx: object = None) -> torch.Tensor:
        # x: [T, in] -> [T, out_per_rank]
        return self._mm(x, self.bias)

    def forward_silu_mul(self, x: torch.Tensor | Deferred) -> torch.Tensor | None:
        """DecodeKernels.gptq_act_out: for mlp's gate_up (two equal parts, gate then up) at a decode step that gptq_tc
        serves, up * silu(gate) [T, out_per_rank / 2] from its GEMV's epilogue (each half rounded as the GEMV's output,
        then fused.silu_mul's rounding: the values of forward then the SiLU-mul kernel); None elsewhere. x Deferred
        (norm_fold, where `folds_norm`): each row of the product scaled first (gptq_tc.cu's kNorm 2)."""
        k, rows = self.decode_kernels, x.x if isinstance(x, Deferred) else x
        m, sizes = rows.shape[0], self.packed_sizes_total
        if not (k.gptq_act_out and k.gptq_cuda and self._takes_tc(m) and len(sizes) == 2 and sizes[0] == sizes[1]):
            return None
        if self.gemv is None or not self._cuda_gemv_serves(rows.dtype):  # (it serves Int4 only: gemv_cuda.supports)
            return None
        from worker.kernels.gemv_cuda import cuda_gemv

        if isinstance(x, Deferred):
            return cuda_gemv(
                x.x, self.gemv, self.bias, pdl=k.pdl, tc=True, stage=False, pair=True, row_scale=(x.squares, x.eps)
            )
        return cuda_gemv(self._in_group_order(x), self.gemv, self.bias, pdl=k.pdl, tc=True, stage=False, pair=True)


class GPTQRowParallelLinear(_GPTQ, RowParallelLinear):
    """sum_r x_r W_r (+ b): K split in packed rows, full scales/zeros on every rank (module docstring)."""

    def __init__(
        self,
        in_features_total: int,
        out_features: int,
        bias: bool,
        pctx: ParallelContext,
        dtype: torch.dtype,
        quant: GPTQConfig,
        what: str = "linear",
    ):
        super().__init__(in_features_total, out_features, bias, pctx, dtype, what)
        self.quant = quant
        self.in_features_total = in_features_total
        self._allocate_gptq(self.in_features, out_features, in_features_total, out_features, dtype)

    def allocate(self, dtype: torch.dtype) -> None:
        """No float weight: the GPTQ buffers are registered once `quant` is known."""

    def load(self, weights: Weights, name: str) -> None:
        r, n, p, k = self.pctx.rank, self.pctx.world_size, self.quant.pack, self.in_features_total
        g, out = self.quant.groups(k), self.out_features
        for t in ("qweight", "qzeros"):
            self._check_int(weights, f"{name}.{t}")
        qweight = weights.get_sharded(f"{name}.qweight", 0, r, n, (k // p, out))
        qzeros = weights.get(f"{name}.qzeros", (g, out // p))
        self._check_zeros(name, qzeros)
        scales = weights.get(f"{name}.scales", (g, out))
        self._copy(qweight, qzeros, scales, self._read_g_idx(weights, name, k, r, n), r * self.in_features)
        if self.bias is not None:
            self.bias.data.copy_(weights.get(f"{name}.bias", (out,)))

    def partial(self, x: torch.Tensor) -> torch.Tensor:
        # x: [T, in_per_rank] -> [T, out] (this rank's share of the sum)
        return self._mm(x, None)

    def fuses_act(self, gate_up: torch.Tensor) -> bool:
        """DecodeKernels.gptq_act: one decode row (two with gptq_tc), rows in checkpoint order (no act order), and the
        CUDA GEMV serving this linear (gptq_cuda): `forward_act` then computes the activation inside it."""
        k = self.decode_kernels
        return (
            k.gptq_act
            and k.gptq_cuda
            and (gate_up.shape[0] == 1 or (gate_up.shape[0] == 2 and k.gptq_tc))
            and self.perm is None
            and self.gemv is not None
            and self._cuda_gemv_serves(gate_up.dtype)
        )

    def forward_act(self, gate_up: torch.Tensor) -> torch.Tensor:
        """forward(up * silu(gate)) for gate_up [m, 2 * in_per_rank] = [gate | up] (m as `fuses_act` allows), the
        activation computed while the CUDA GEMV stages its input (fused.silu_mul's rounding)."""
        from worker.kernels.gemv_cuda import cuda_gemv

        # where gptq_act_out is off (gate_up gives the activation itself where it is on). Two rows: gptq_tc with x
        # staged (each warp recomputing the activation for its chunks was far slower); one: the FMA GEMV's act kernel
        tc: dict[str, Any] = (
            dict(tc=True, stage=True) if gate_up.shape[0] == 2 or self.tiled else {}
        )  # (FMA: row-major)
        return self.reduce(cuda_gemv(gate_up, self.gemv, None, pdl=self.decode_kernels.pdl, act=True, **tc))


@dataclass(frozen=True)
class LinearFactory:
    """The model's linears for a quantization: float (None), GPTQ or FP8 quantized at load."""

    quant: QuantConfig | None
    pctx: ParallelContext
    dtype: torch.dtype

    def column(self, in_features: int, packed_sizes: Sequence[int], bias: bool, what: str) -> ColumnParallelLinear:
        args = (in_features, packed_sizes, bias, self.pctx, self.dtype)
        if isinstance(self.quant, GPTQConfig):
            return GPTQColumnParallelLinear(*args, self.quant, what)
        if isinstance(self.quant, FP8Config):
            return FP8ColumnParallelLinear(*args, what)
        return ColumnParallelLinear(*args, what)

    def row(self, in_features_total: int, out_features: int, bias: bool, what: str) -> RowParallelLinear:
        args = (in_features_total, out_features, bias, self.pctx, self.dtype)
        if isinstance(self.quant, GPTQConfig):
            return GPTQRowParallelLinear(*args, self.quant, what)
        if isinstance(self.quant, FP8Config):
            return FP8RowParallelLinear(*args, what)
        return RowParallelLinear(*args, what)

    def qkv(self, hidden: int, heads_total: int, head_dim: int, bias: bool = True) -> ColumnParallelLinear:
        """Fused c_attn: q, k, v each split by heads (so each rank's heads keep their q, k and v)."""
        if heads_total % self.pctx.world_size:
            raise ValueError(f"{heads_total} attention heads do not divide across {self.pctx.world_size} shards")
        size = heads_total * head_dim
        return self.column(hidden, [size, size, size], bias, "c_attn")
