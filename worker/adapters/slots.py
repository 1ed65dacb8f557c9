"""The adapter slot pool: fixed-shape A and B tensors for every LoRA target of the model, one slot per
resident adapter.

Slot 0 is the base model (zeros). Slots never change shape, so decode can be captured in a CUDA graph.
A target's parts share one stacked pool (gate_up: w2 then w1, one kernel launch), and
`ranks[slot, layer, module]` holds each slot's true rank per module (0: empty), which bounds the kernels'
work. A fill copies this rank's shard, cut by the LoRA layer's rule, with the scale folded into B.
"""

from __future__ import annotations

from collections.abc import Sequence
from types import ModuleType

import torch

from worker.adapters.host import HostAdapter, Key, Pair
from worker.adapters.peft import MODULES
from worker.distributed import ParallelContext
from worker.layers.decode_kernels import DecodeKernels
from worker.layers.linear import ColumnParallelLinear, RowParallelLinear
from worker.layers.lora import JointWeight, LoraTerm, check_lora_decode, wrap_lora
from worker.layers.lora_tp import LoraPart, lora_parts
from worker.models.lora_targets import LANE_TARGETS
from worker.models.qwen import LoraTarget

JOINT_MAX_SHARE = 0.25  # "auto" takes "gemm" where the A rows add at most this share to the base GEMM's rows
# ... and the pool's r_max is at most this: past it the "gemm" mode's kernels spill (scripts/lora_compile.py: the
# gate|up launch ~1 KB a thread at r_max 128; none up to 64)
GEMM_MAX_RANK = 64
# A joint layout with K lanes rounds its row pitch up to this many elements: the base GEMM over the strided view then
# ran about as fast as over a contiguous weight (H200, scripts/gpu_check_lora_kexpand.py, mlp.c_proj at batch 32:
# 26.47 vs 26.40 us a layer at 256, 26.53 vs 26.36 at 64, 27.04 vs 26.33 unaligned), and so did the GEMM over the lanes.
LANE_ALIGN = 256
LANES_MAX_SHARE = 0.25  # a target gets K lanes where slots·r_max is at most this share of its input width


def joint_layout(
    base: object, a_shape: tuple[int, ...], dtype: torch.dtype, device: torch.device, lanes: int = 0
) -> JointWeight | None:
    """Move a float base linear's weight (and bias) into the top left of one allocation whose rows below are its
    zeroed A pool of `a_shape` [slots, P, r_max, in] and, with `lanes` (slots·r_max, one part), whose columns after
    the base's hold every slot's B (zeroed; the row pitch rounded up to LANE_ALIGN elements): the base keeps views of
    the same values (its forward and `load` are unchanged); None for other linears (quantized, another dtype, width
    or device than the pool's: a model on the meta device only shapes a pool)."""
    if type(base) not in (ColumnParallelLinear, RowParallelLinear):
        return None
    w = base.weight  # type: ignore[attr-defined]
    same_device = w.device.type == device.type and device.index in (None, w.device.index)
    if w.dtype != dtype or w.shape[1] != a_shape[-1] or not same_device:
        return None
    (out, k), extra = w.shape, a_shape[0] * a_shape[1] * a_shape[2]
    pitch = -(-(k + lanes) // LANE_ALIGN) * LANE_ALIGN if lanes else k
    block = torch.zeros(out + extra, pitch, dtype=w.dtype, device=w.device)
    weight = block[:, :k]
    weight[:out].copy_(w)
    w.data = weight[:out]
    bias = None
    b = getattr(base, "bias", None)
    if isinstance(base, ColumnParallelLinear) and b is not None:  # a row-parallel bias is added after the reduce
        bias = torch.zeros(out + extra, dtype=b.dtype, device=b.device)
        bias[:out].copy_(b)
        b.data = bias[:out]
    return JointWeight(weight, bias, out, block[:out, : k + lanes] if lanes else None)


class SlotPool:
    """A [slots, P, r_max, in] and B [slots, P, out/P, r_max] per (layer, target), this rank's shard: A in the rows
    below a float base weight, B (one part, a target of LANE_TARGETS, slots·r_max at most a share of its
    input width: LANES_MAX_SHARE) in K lanes beside it (`joint_layout`), else tensors of their own."""

    def __init__(
        self, targets: Sequence[LoraTarget], pctx: ParallelContext, dtype: torch.dtype, max_rank: int, num_slots: int
    ):
        self.targets = list(targets)
        self.pctx = pctx
        self.max_rank = max_rank
        self.num_slots = num_slots
        self.stacked: dict[tuple[int, str], Pair] = {}  # (layer, target key) -> (A, B) with the part dim
        self.pools: dict[Key, Pair] = {}  # (layer, module) -> (A, B): views of its part
        self.parts: dict[Key, LoraPart] = {}  # (layer, module) -> full sizes and TP cut
        self.joints: dict[tuple[int, str], JointWeight] = {}  # (layer, target key) -> base weight + A pool
        layers = 1 + max(t.layer for t in self.targets)
        self.ranks = torch.zeros(num_slots + 1, layers, len(MODULES), dtype=torch.int32, device=pctx.device)
        for t in self.targets:
            parts = lora_parts(getattr(t.owner, t.attr), len(t.modules))
            dims = {p.shard_dims(pctx.world_size) for p in parts}
            if len(dims) != 1:
                raise ValueError(f"{t.key}: LoRA parts of different sizes {sorted(dims)} cannot share a pool")
            ((d_in, d_out),) = dims
            a_shape = (num_slots + 1, len(parts), max_rank, d_in)
            lanes = (num_slots + 1) * max_rank
            if t.key not in LANE_TARGETS or len(parts) != 1 or lanes > LANES_MAX_SHARE * d_in:
                lanes = 0
            joint = joint_layout(getattr(t.owner, t.attr), a_shape, dtype, pctx.device, lanes)
            if joint is not None:
                self.joints[(t.layer, t.key)] = joint
                a = joint.weight[joint.out :].view(a_shape)
            else:
                a = torch.zeros(a_shape, dtype=dtype, device=pctx.device)
            if joint is not None and joint.lanes is not None:  # B [slots, 1, out, r_max] in the lanes
                b = joint.lanes[:, d_in:].view(d_out, num_slots + 1, max_rank).permute(1, 0, 2).unsqueeze(1)
            else:
                b = torch.zeros(num_slots + 1, len(parts), d_out, max_rank, dtype=dtype, device=pctx.device)
            self.stacked[(t.layer, t.key)] = (a, b)
            for p, (module, part) in enumerate(zip(t.modules, parts)):
                self.pools[(t.layer, module)] = (a[:, p], b[:, p])
                self.parts[(t.layer, module)] = part
        self.slot_bytes = sum(
            a[0].numel() * a.element_size() + b[0].numel() * b.element_size() for a, b in self.stacked.values()
        )

    def adapter_bytes(self, dtype: torch.dtype) -> int:
        """Bytes of a whole (unsharded) adapter at the maximum rank on every module, in `dtype`."""
        return sum(self.max_rank * (p.d_in + p.d_out) for p in self.parts.values()) * dtype.itemsize

    def decode_mode(self, key: tuple[int, str], kernels: ModuleType | None, stream: object, choice: str) -> str:
        """LoraTerm's decode mode for one target under `--lora-decode choice` (lora.LORA_DECODE). On the H200 (batch 32,
        32 rank-16 adapters, 32 layers of the 7B shape): "gemm" (the shrink inside the base GEMM, one expand
        writing the output) costs 0.93-1.09 ms a step beside the base matmuls, "side_store" 1.31-1.38 ms
        (scripts/gpu_check_lora_gemm.py); in the decode step P2 0.884-0.898 vs 0.831-0.843 (bench_lora.py).
        "side_store" runs the whole term on the side stream, its expand writing every row of the term buffer;
        without a stream "two". "auto" takes "gemm" where the A rows add at most JOINT_MAX_SHARE to the base rows and
        r_max is at most GEMM_MAX_RANK."""
        check_lora_decode(choice)
        joint = self.joints.get(key)
        if kernels is not None and joint is not None and choice != "side":
            share = joint.weight.shape[0] - joint.out <= JOINT_MAX_SHARE * joint.out
            if choice == "gemm" or (share and self.max_rank <= GEMM_MAX_RANK):
                return "gemm"
        return "side_store" if stream is not None else "two"

    def wrap_targets(
        self, kernels: ModuleType | None, stream: torch.cuda.Stream | None, decode: str = "auto"
    ) -> dict[str, int]:
        """Replace each target linear of the model by its adapter-aware wrapper over this pool; returns how many
        targets took each decode mode (`decode`: serve's --lora-decode)."""
        modes: dict[str, int] = {}
        for t in self.targets:
            k = MODULES.index(t.modules[0])  # a target's modules are adjacent on the module axis
            mode = self.decode_mode((t.layer, t.key), kernels, stream, decode)
            modes[mode] = modes.get(mode, 0) + 1
            base = getattr(t.owner, t.attr)
            term = LoraTerm(
                *self.stacked[(t.layer, t.key)],
                self.ranks[:, t.layer, k : k + len(t.modules)].t(),  # [P, slots]
                kernels,
                stream,
                decode=mode,
                joint=self.joints.get((t.layer, t.key)),
            )
            # the base's choices so far (later ones reach the wrapper's set_decode_kernels)
            term.set_decode_kernels(getattr(base, "decode_kernels", None) or DecodeKernels())
            setattr(t.owner, t.attr, wrap_lora(base, term))
        return modes

    def ranks_of(self, host: HostAdapter) -> torch.Tensor:
        """An adapter's rank per module: [layers, modules] int32 on the host (0: not targeted)."""
        ranks = torch.zeros(self.ranks.shape[1:], dtype=torch.int32)
        for layer, module in host.layout:
            ranks[layer, MODULES.index(module)] = host.rank
        return ranks

    def cut(self, key: Key, a: torch.Tensor, b: torch.Tensor) -> Pair:
        """This rank's shard of a module's (A, B)."""
        return self.parts[key].cut(a, b, self.pctx.rank, self.pctx.world_size)

    def zero(self, slot: int) -> None:
        for a_pool, b_pool in self.stacked.values():
            a_pool[slot].zero_()
            b_pool[slot].zero_()
        self.ranks[slot].zero_()

    def copy_into(
        self, slot: int, host: HostAdapter, src: torch.Tensor, ranks: torch.Tensor, non_blocking: bool
    ) -> None:
        """Each module's (A, B) of rank r, laid out in `src` as in `host`, into the slot's first r lanes:
        this rank's shard, B times the host's scale (in fp32, rounded once to the pool dtype, as
        read_adapter does); then the slot's ranks."""
        dev, world, r = self.pctx.device, self.pctx.world_size, host.rank
        on_cuda = dev.type == "cuda"
        for key, (a, b) in host.tensors(src).items():
            a_pool, b_pool = self.pools[key]
            dst_a, dst_b = a_pool[slot, :r], b_pool[slot, :, :r]
            if world > 1 and not host.cut:  # whole tensors over, cut on the device (c_attn's B per q/k/v)
                a, b = self.cut(key, a.to(dev, non_blocking=non_blocking), b.to(dev, non_blocking=non_blocking))
            dst_a.copy_(a, non_blocking=non_blocking)
            if host.scale == 1.0:
                dst_b.copy_(b, non_blocking=non_blocking)
            elif on_cuda and b.dtype == dst_b.dtype:  # the kernel multiplies in fp32 and rounds once
                dst_b.copy_(b, non_blocking=non_blocking).mul_(host.scale)
            else:
                dst_b.copy_(b.to(dev, non_blocking=non_blocking).float() * host.scale)  # never b itself
        self.ranks[slot].copy_(ranks, non_blocking=non_blocking)
