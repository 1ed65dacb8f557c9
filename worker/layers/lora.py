"""Adapter-aware wrappers around the parallel linears (the LoRA TP cut rules: worker/layers/lora_tp.py).

y += (x Aᵀ) Bᵀ per token, for the adapter of the token's request, read from the ForwardContext. Adapter
weights live in slot pools (slot 0 = the base model, all zeros) with a part dim:
A [slots, P, r_max, in], B [slots, P, out/P, r_max] (P = 2 for the merged gate_up, w2 then w1; else 1),
and each slot's true rank per part in `ranks` [P, slots] int32. Here r_max is the pools' lanes a slot
(worker/adapters/slots.py `SlotPool.rank`: it grows with the adapters' ranks, up to --max-lora-rank, and the
terms are then pointed at the new views). A step's adapter requests form segments;
each module then costs two kernel launches over all segments (worker/kernels/lora.py on CUDA), or two
batched matmuls per part (the PyTorch reference) elsewhere.

Under TP, a column-parallel linear keeps A whole and cuts B by output rows within each packed block
(c_attn: q, k, v each by heads); a row-parallel one cuts A by input columns, keeps B whole, and adds
(x_r A_rᵀ) Bᵀ into its partial sum before the layer's one all-reduce.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

import torch
from torch import nn

from worker.kernels.lora_reference import add_lora_reference
from worker.layers.decode_kernels import DecodeKernels
from worker.layers.linear import ColumnParallelLinear, RowParallelLinear


@dataclass
class AdapterBatchData:
    token_idx: torch.Tensor  # [S, L] long: token rows of each segment (padded with 0)
    valid: torch.Tensor  # [S, L] bool: real (not padding) positions
    slots: torch.Tensor  # [S] long: adapter slot of each segment (0 only for base rows of graphed decode)
    starts: torch.Tensor  # [S] int32: first token row of each segment (segments are runs of rows)
    lens: torch.Tensor  # [S] int32: tokens of each segment
    max_len: int  # host-side max of lens (the kernels' grid; no host sync)
    # every request of the step (adapter or not) one token, so the rows are the requests: each row's slot (0: base);
    # None at a step with a longer request
    row_slots: torch.Tensor | None = None

    @staticmethod
    def build(
        slot_per_request: Sequence[int], tokens_per_request: Sequence[int], device: torch.device | str
    ) -> AdapterBatchData | None:
        """Segments for the requests whose slot is not 0; None when the step uses no adapter."""
        starts, lens, slots = [], [], []
        offset = 0
        for slot, n in zip(slot_per_request, tokens_per_request):
            if slot:
                starts.append(offset)
                lens.append(n)
                slots.append(slot)
            offset += n
        if not slots:
            return None
        decode = all(n == 1 for n in tokens_per_request)
        row_slots = torch.tensor(list(slot_per_request), device=device) if decode else None
        L = max(lens)
        ar = torch.arange(L)
        start_t, len_t = torch.tensor(starts), torch.tensor(lens)
        valid = ar[None, :] < len_t[:, None]
        token_idx = torch.where(valid, start_t[:, None] + ar[None, :], torch.zeros_like(ar)[None, :])
        return AdapterBatchData(
            token_idx.to(device),
            valid.to(device),
            torch.tensor(slots, device=device),
            start_t.to(device=device, dtype=torch.int32),
            len_t.to(device=device, dtype=torch.int32),
            L,
            row_slots,
        )

    @staticmethod
    def for_decode(slots: torch.Tensor) -> AdapterBatchData:
        """One segment per row of a decode batch, row i on adapter slot slots[i] (0: base, skipped by the
        kernels, exact zeros on the torch path). `slots` may be a static buffer a CUDA graph reads."""
        n, dev = slots.shape[0], slots.device
        rows = torch.arange(n, device=dev)
        return AdapterBatchData(
            rows[:, None],
            torch.ones(n, 1, dtype=torch.bool, device=dev),
            slots,
            rows.to(torch.int32),
            torch.ones(n, dtype=torch.int32, device=dev),
            1,
            slots,
        )


# ---------------------------------------------------------------- the wrappers
def lora_kernels(device: torch.device, interpreter: bool = False) -> ModuleType | None:
    """worker.kernels.lora on CUDA when Triton imports (on a CPU only when the process runs Triton's
    interpreter: `interpreter`), else None (the PyTorch path)."""
    if device.type != "cuda" and not interpreter:
        return None
    try:
        from worker.kernels import lora
    except ImportError:
        return None
    return lora


DECODE_MODES = ("two", "sync", "local", "side", "side_store", "gemm")
LORA_DECODE = ("auto", "gemm", "side")  # serve --lora-decode: how worker/adapters/slots.py picks among DECODE_MODES


def check_lora_decode(choice: str) -> str:
    """`choice` when it is one of LORA_DECODE, else ValueError naming it."""
    if choice not in LORA_DECODE:
        raise ValueError(f"--lora-decode {choice!r}, expected one of {LORA_DECODE}")
    return choice


JOINT_MIN_ROWS = 9  # "gemm" serves decode batches of more rows than the Triton GEMV's (linear.GEMV_MAX_M)


@dataclass(frozen=True)
class JointWeight:
    """A base linear's weight and its A pool in one allocation (worker/adapters/slots.py `joint_layout`):
    weight [out + slots·P·r_max, in] = the base rows, then A [slots, P, r_max, in] flattened; bias: the base
    bias then zeros (a column-parallel base with a bias), else None; out: the base's output rows. lanes: where the
    layout has them (one part), [out, in + slots·r_max] = the base rows, then every slot's B as extra input columns
    (slot s's lanes at in + s·r_max; the B pool is a view of them), so linear(input with h in its slot's lanes,
    lanes) = base + term in one GEMM (DecodeKernels.lora_k_lanes); else None."""

    weight: torch.Tensor
    bias: torch.Tensor | None
    out: int
    lanes: torch.Tensor | None = None

    def lane_count(self) -> int:
        """The input columns after the base's that hold B (slots·r_max), 0 without lanes."""
        return 0 if self.lanes is None else self.lanes.shape[1] - self.weight.shape[1]


@dataclass
class LoraTerm:
    """The adapter term of one module: pools with a part dim, per-part slot ranks, the kernels module
    (None: the PyTorch reference) and an optional side stream on which the kernels' shrink runs beside the
    base matmul (both only read x; the expand waits for both). decode: how decode steps (one token per
    segment) run the term: "two" launches as above; "sync", one launch whose expands wait on the shrinks'
    counters; "local", one launch whose programs each recompute their row's h (both after the base matmul,
    no side stream; worker/kernels/lora_decode.py); "side", shrink and expand both on the side stream into
    a buffer added to the base output after both; "side_store", "side" whose expand writes every row of
    the buffer (one launch fewer: no zeroing) when each row is its own segment (graphed decode); "gemm", the
    shrink inside the base matmul over `joint` (the base weight and the A pool in one allocation), then one
    expand that writes the output (worker/kernels/lora_rows.py), for decode steps (one token per request:
    `AdapterBatchData.row_slots`; a step mixing prefill rows runs the segments) of at least JOINT_MIN_ROWS rows
    ("side_store" below). per_sm: the programs per SM the side modes' shrink aims its K split at
    (worker/kernels/lora.py `_plan`); pdl: the "gemm" expand launches with PDL (DecodeKernels.lora_pdl)."""

    a_pool: torch.Tensor  # [slots, P, r_max, in]
    b_pool: torch.Tensor  # [slots, P, out / P, r_max]
    ranks: torch.Tensor  # [P, slots] int32
    kernels: ModuleType | None = None
    stream: torch.cuda.Stream | None = None
    decode: str = "two"  # one of DECODE_MODES (see above)
    per_sm: int = 2
    sync: Any = field(default=None, repr=False)  # "sync"'s counters (a DecodeWorkspace, made on first use)
    joint: JointWeight | None = None
    pdl: bool = False
    act_shrink: bool = False  # DecodeKernels.lora_act_shrink: a gate|up target's expand computes its consumer's h
    term_first: bool = False  # DecodeKernels.lora_term_first: apply_partials' term before the GEMM, as its C
    norm_shrink: bool = False  # DecodeKernels.lora_norm_shrink: c_attn's h from the norm before it (`shrink_pool`)
    k_lanes: bool = False  # DecodeKernels.lora_k_lanes: the producer writes h into the joint's K lanes (`input_lanes`)

    def __post_init__(self) -> None:
        if self.decode not in DECODE_MODES:
            raise ValueError(f"LoraTerm: decode {self.decode!r}, expected one of {DECODE_MODES}")
        if self.decode == "gemm" and self.joint is None:
            raise ValueError("LoraTerm: decode 'gemm' needs the joint weight of the base and its A pool")

    def apply(self, base: Callable[[], torch.Tensor], x: torch.Tensor, data: AdapterBatchData) -> torch.Tensor:
        """base() + lora(x): y [T, out] from the base matmul, the adapter term added in place."""
        if self.kernels is None:
            y = base()
            add_lora_reference(y, x, self.a_pool, self.b_pool, data.token_idx, data.valid, data.slots)
            return y
        if self.decode == "gemm" and data.max_len == 1:
            joint = self._joint_gemm(x, data)
            if joint is not None:
                return self.kernels.lora_expand_rows(*joint, self.pdl)
            return self._beside(base, x, data)
        if self.decode.startswith("side") and data.max_len == 1:
            return self._beside(base, x, data)
        if self.decode != "two" and data.max_len == 1:
            y = base()
            self._one_launch(y, x, data)
            return y
        k = self.kernels
        segments = (data.starts, data.lens, data.slots, data.max_len)
        if self.stream is None:
            y = base()
            k.lora_expand(y, k.lora_shrink(x, self.a_pool, self.ranks, *segments), self.b_pool, self.ranks, *segments)
            return y
        main = torch.cuda.current_stream(x.device)
        # allocated on the main stream, which frees it after the expand
        h = k.shrink_buffer(x, self.a_pool, data.slots.shape[0], data.max_len)
        self.stream.wait_stream(main)  # x is ready
        with torch.cuda.stream(self.stream):
            k.lora_shrink(x, self.a_pool, self.ranks, *segments, h)
        y = base()
        main.wait_stream(self.stream)
        k.lora_expand(y, h, self.b_pool, self.ranks, *segments)
        return y

    def apply_silu_mul(
        self, x: torch.Tensor, data: AdapterBatchData, then: LoraTerm | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None] | None:
        """up · silu(gate) of base + term for a gate|up target (P = 2) where "gemm" serves the step: the expand
        and the activation in one launch (fused.silu_mul's values, bit for bit); None elsewhere. With
        `act_shrink` and the consumer's term `then` (mlp.c_proj, one part, also "gemm"), the same launch also
        computes the consumer's h (fp32 partials per tile: then.apply_partials), else that is None."""
        if self.decode != "gemm" or data.row_slots is None or self.b_pool.shape[1] != 2 or self.kernels is None:
            return None
        joint = self._joint_gemm(x, data)
        if joint is None:
            return None
        shrink = None
        if self.act_shrink and then is not None and then.decode == "gemm" and then.a_pool.shape[1] == 1:
            shrink = then.a_pool
        lanes = shrink is not None and then is not None and then.input_lanes()
        return self.kernels.lora_expand_rows_silu_mul(*joint, self.pdl, shrink=shrink, lanes=lanes)

    def apply_partials(
        self, base: Callable[[], torch.Tensor], x: torch.Tensor, parts: torch.Tensor, data: AdapterBatchData
    ) -> torch.Tensor:
        """base() + term where the producer computed h (`apply_silu_mul`'s or `rms_norm_shrink`'s partials, in
        "gemm" mode): the base matmul alone, as without adapters, then one expand that sums the partials
        (worker/kernels/lora_rows.py). With `term_first` the term (plus the base's bias, a column-parallel one) is
        computed first and the base GEMM over the joint weight's base rows adds it as C (cuBLAS's epilogue: one
        rounding) instead. Where the producer wrote h into K lanes (`input_lanes`: apply_silu_mul's), `parts` is the
        whole input [T, in + lanes] (x its first columns) and one GEMM over the joint's lanes gives base + term."""
        k, slots, joint = self.kernels, data.row_slots, self.joint
        assert k is not None and slots is not None and joint is not None
        bias = joint.bias[: joint.out] if joint.bias is not None else None
        if parts.dim() == 2:
            assert joint.lanes is not None and parts.shape[1] == joint.lanes.shape[1]
            return nn.functional.linear(parts, joint.lanes, bias)
        if self.term_first:
            c = k.lora_term_rows_partials(parts, self.b_pool, slots, self.pdl, bias=bias)
            return c.addmm_(x, joint.weight[: joint.out].t())
        return k.lora_expand_rows_partials(base(), parts, self.b_pool, slots, self.pdl)

    def shrink_pool(self, rows: int, data: AdapterBatchData | None) -> torch.Tensor | None:
        """The A pool [slots, 1, r_max, in] the producer of this term's input (the norm before c_attn) computes h
        with (`rms_norm_shrink`), at a decode step that "gemm" serves with `norm_shrink` on; else None."""
        on = self.norm_shrink and self.decode == "gemm" and self.kernels is not None and self.a_pool.shape[1] == 1
        if not on or data is None or data.row_slots is None or rows < JOINT_MIN_ROWS:
            return None
        return self.a_pool

    def input_lanes(self) -> bool:
        """Whether the producer that computes this term's h (`apply_silu_mul`'s `then`) writes it into the input's K
        lanes instead of partials: `k_lanes` on and the joint layout has lanes (JointWeight.lanes)."""
        return self.k_lanes and self.joint is not None and self.joint.lanes is not None

    def set_decode_kernels(self, opts: DecodeKernels) -> None:
        """The term's share of the decode kernels (the base linear takes its own)."""
        self.pdl = opts.lora_pdl
        self.act_shrink = opts.lora_act_shrink
        self.term_first = opts.lora_term_first
        self.norm_shrink = opts.lora_norm_shrink
        self.k_lanes = opts.lora_k_lanes

    def _joint_gemm(self, x: torch.Tensor, data: AdapterBatchData) -> tuple | None:
        """The "gemm" mode at a decode step of >= JOINT_MIN_ROWS rows: the joint GEMM output [T, out + slots·P·r_max]
        (the base output, then every slot's h) and the expand's other arguments; None below that size."""
        joint, slots = self.joint, data.row_slots
        if joint is None or slots is None or x.shape[0] < JOINT_MIN_ROWS:
            return None
        out = nn.functional.linear(x, joint.weight, joint.bias)
        return out, joint.out, self.b_pool, slots

    def _beside(self, base: Callable[[], torch.Tensor], x: torch.Tensor, data: AdapterBatchData) -> torch.Tensor:
        """Shrink and expand both on the side stream (when there is one), beside the base matmul, into a
        zeroed buffer (or one the expand writes whole: "side_store"); then one add. The critical path keeps
        one small launch instead of the expand."""
        k, segments = self.kernels, (data.starts, data.lens, data.slots, data.max_len)
        assert k is not None
        side = self.stream
        main = torch.cuda.current_stream(x.device) if side is not None else None
        # allocated on the main stream, which frees them after the add
        h = k.shrink_buffer(x, self.a_pool, data.slots.shape[0], data.max_len, self.per_sm)
        delta = torch.empty(x.shape[0], self.b_pool.shape[1] * self.b_pool.shape[2], dtype=x.dtype, device=x.device)
        if side is not None and main is not None:
            side.wait_stream(main)  # x is ready
        store = self.decode in ("side_store", "gemm") and data.slots.shape[0] == x.shape[0]  # a segment a row
        with torch.cuda.stream(side) if side is not None else contextlib.nullcontext():
            if not store:
                delta.zero_()  # base rows (slot 0) add exact zeros
            h = k.lora_shrink(x, self.a_pool, self.ranks, *segments, h, per_sm=self.per_sm)
            k.lora_expand(delta, h, self.b_pool, self.ranks, *segments, store=store)
        y = base()
        if side is not None and main is not None:
            main.wait_stream(side)
        return y.add_(delta)  # y + the rounded term, rounded once: the reference's numerics

    def _one_launch(self, y: torch.Tensor, x: torch.Tensor, data: AdapterBatchData) -> None:
        from worker.kernels import lora_decode

        args = (y, x, self.a_pool, self.b_pool, self.ranks, data.starts, data.slots)
        if self.decode == "local":
            lora_decode.add_lora_decode_local(*args)
            return
        from worker.kernels.paged_decode import DecodeWorkspace

        self.sync = self.sync or DecodeWorkspace()
        lora_decode.add_lora_decode(*args, self.sync)


class _LoraLinear(nn.Module):
    """A base linear plus its adapter term; without adapter data in the context, just the base."""

    def __init__(self, base: nn.Module, lora: LoraTerm):
        super().__init__()
        self.base = base
        self.lora = lora

    def set_decode_kernels(self, opts: DecodeKernels) -> None:
        """The adapter term's share of the decode kernels (the base, a child module, gets them itself)."""
        self.lora.set_decode_kernels(opts)

    def forward(self, x: torch.Tensor, ctx: object = None) -> torch.Tensor:
        data = getattr(ctx, "adapter_data", None)
        if data is None:
            return self.base(x, ctx)
        return self.with_adapters(x, ctx, data)

    def with_adapters(self, x: torch.Tensor, ctx: object, data: AdapterBatchData) -> torch.Tensor:
        raise NotImplementedError


class LoraColumnParallelLinear(_LoraLinear):
    """A column-parallel linear plus adapters; the pool's parts cover the output columns in order."""

    base: ColumnParallelLinear

    def with_adapters(self, x: torch.Tensor, ctx: object, data: AdapterBatchData) -> torch.Tensor:
        return self.lora.apply(lambda: self.base(x, ctx), x, data)  # [T, out_per_rank]

    def silu_mul(
        self, x: torch.Tensor, ctx: object, then: LoraTerm | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None] | None:
        """A gate|up target's up · silu(gate), its adapter term and the activation in one launch where LoraTerm
        serves that (`apply_silu_mul`), with the consumer's (`then`) h partials or None; None: the caller runs
        forward and the activation itself."""
        data = getattr(ctx, "adapter_data", None)
        return None if data is None else self.lora.apply_silu_mul(x, data, then)

    def forward_partials(self, x: torch.Tensor, ctx: object, parts: torch.Tensor) -> torch.Tensor:
        """forward where the producer computed this term's h (partials from `rms_norm_shrink`): the base matmul,
        then the term from them, or (term_first) the term plus the bias first, added by the base GEMM."""
        data = getattr(ctx, "adapter_data", None)
        assert data is not None  # the partials come from a step with adapters
        return self.lora.apply_partials(lambda: self.base(x, ctx), x, parts, data)


class LoraRowParallelLinear(_LoraLinear):
    """A row-parallel linear plus adapters (one part), added to this rank's partial sum before the
    layer's one all-reduce."""

    base: RowParallelLinear

    def with_adapters(self, x: torch.Tensor, ctx: object, data: AdapterBatchData) -> torch.Tensor:
        return self.base.reduce(self.lora.apply(lambda: self.base.partial(x), x, data))  # [T, out]

    def forward_partials(self, x: torch.Tensor, ctx: object, parts: torch.Tensor) -> torch.Tensor:
        """forward where the producer computed this term's h (partials from LoraColumnParallelLinear.silu_mul): the
        base partial sum plus the term from them, before the all-reduce."""
        data = getattr(ctx, "adapter_data", None)
        assert data is not None  # the partials come from a step with adapters
        return self.base.reduce(self.lora.apply_partials(lambda: self.base.partial(x), x, parts, data))


def unwrapped(linear: nn.Module) -> nn.Module:
    """The base linear of an adapter-aware wrapper (what it runs without adapter data), else the linear itself."""
    return linear.base if isinstance(linear, _LoraLinear) else linear


def wrap_lora(base: nn.Module, lora: LoraTerm) -> _LoraLinear:
    """The adapter-aware wrapper of a parallel linear."""
    if isinstance(base, RowParallelLinear):
        return LoraRowParallelLinear(base, lora)
    if isinstance(base, ColumnParallelLinear):
        return LoraColumnParallelLinear(base, lora)
    raise TypeError(f"no LoRA wrapper for {type(base).__name__}")
