"""The adapter slot pool: A and B tensors for every LoRA target of the model, one slot per resident adapter.

Slot 0 is the base model (zeros). The pools keep their shapes between loads, so decode can be captured in CUDA
graphs; their lanes a slot grow with the largest rank loaded (`SlotPool.set_rank`), and the graphs that read them are
then captured again.
A target's parts share one stacked pool (gate_up: w2 then w1, one kernel launch), and
`ranks[slot, layer, module]` holds each slot's true rank per module (0: empty), which bounds the kernels'
work. A fill copies this rank's shard, cut by the LoRA layer's rule, with the scale folded into B.
"""

from __future__ import annotations

import math
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

# the pools' lanes a slot at start-up where --max-lora-rank allows (they grow when a larger adapter loads: SlotPool):
# the rank most published adapters have, and the one the decode step was measured at (P2)
START_RANK = 16
# "auto" takes "gemm" where the A rows add at most this share to the base GEMM's rows, with pools of up to
# JOINT_SHARE_LANES lanes a slot; past them at most JOINT_MAX_SHARE_WIDE. Measured (H200, 7B shape, batch 32,
# scripts/bench_lora.py --no-peer --modes auto,gemm,side_store [--mix R:1]; the c_projs' A rows 25-52 % of their base):
# - up to 32 lanes "gemm" on every target was the fastest at each share tried: 32 slots of rank 32 P2 0.798 against
#   0.726 with side_store on the c_projs; 31 of rank 16 and one of rank 32, 0.798 against 0.772; 128 slots of rank
#   16, 32 of them in the batch, 0.849 against 0.820;
# - at 64 lanes it won by little where every adapter had rank 64 (0.574 against 0.563) and lost much where one had
#   (31 of rank 16: 0.570 against 0.670): every slot's 64 A rows are read whatever its rank, where side_store reads
#   each row's own rank.
JOINT_MAX_SHARE = 0.55
JOINT_MAX_SHARE_WIDE = 0.25
JOINT_SHARE_LANES = 32
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


RELAYOUT_BYTES = 64 * 2**20  # the most `_relayout` copies aside at once


def _relayout(old: Pair, new: Pair, keep: int, grow: bool) -> None:
    """Move every slot's first `keep` lanes of A [slots, P, r, in] and B [slots, P, out, r] from the old views to the
    new ones over the same storage (the rest of the new lanes zeroed). Slots go a group at a time through a copy of
    the group (at most RELAYOUT_BYTES, no allocation the size of a pool), in the order that never writes over a slot
    not yet moved: from the last when growing (a slot's new lanes start at or after its old ones, past every earlier
    slot's old lanes), from the first when shrinking."""
    (a_old, b_old), (a_new, b_new) = old, new
    slots = a_old.shape[0]
    per_slot = (a_old[0].numel() + b_old[0].numel()) * a_old.element_size()
    group = max(1, RELAYOUT_BYTES // max(1, per_slot))
    starts = range(0, slots, group)
    for s0 in reversed(starts) if grow else starts:
        s1 = min(slots, s0 + group)
        a, b = a_old[s0:s1, :, :keep].clone(), b_old[s0:s1, ..., :keep].clone()
        a_new[s0:s1].zero_()
        a_new[s0:s1, :, :keep].copy_(a)
        b_new[s0:s1].zero_()
        b_new[s0:s1, ..., :keep].copy_(b)


class SlotPool:
    """A [slots, P, r, in] and B [slots, P, out/P, r] per (layer, target), this rank's shard: A in the rows below a
    float base weight, B (one part, a target of LANE_TARGETS, slots·r_max at most a share of its input width:
    LANES_MAX_SHARE) in K lanes beside it (`joint_layout`), else tensors of their own.

    The allocations hold r_max (--max-lora-rank) lanes a slot; the pools are views of their first r lanes a slot
    (`rank`: START_RANK or r_max if smaller, at start). Every step's kernels and joint GEMMs read all r lanes of
    every slot, so a pool whose adapters have rank 16 would move 4x their bytes at r = 64: `set_rank` re-lays the
    pools out at more lanes (the slots' values kept) when a larger adapter loads (AdapterManager: then the decode
    graphs with adapters are captured again)."""

    def __init__(
        self,
        targets: Sequence[LoraTarget],
        pctx: ParallelContext,
        dtype: torch.dtype,
        max_rank: int,
        num_slots: int,
        rank: int | None = None,
    ):
        self.targets = list(targets)
        self.pctx = pctx
        self.max_rank = max_rank  # the allocations' lanes a slot: the largest rank an adapter may have
        self.rank = min(max_rank, START_RANK) if rank is None else rank  # the pools' lanes a slot now
        if not 1 <= self.rank <= max_rank:
            raise ValueError(f"--lora-pool-rank {self.rank} outside 1..{max_rank} (--max-lora-rank)")
        self.num_slots = num_slots
        self.choice = "auto"  # --lora-decode (wrap_targets), for the modes `set_rank` chooses again
        self.terms: dict[tuple[int, str], LoraTerm] = {}  # (layer, target key) -> its wrapper's term (wrap_targets)
        self.stacked: dict[tuple[int, str], Pair] = {}  # (layer, target key) -> (A, B) with the part dim
        self.pools: dict[Key, Pair] = {}  # (layer, module) -> (A, B): views of its part
        self.parts: dict[Key, LoraPart] = {}  # (layer, module) -> full sizes and TP cut
        self.joints: dict[tuple[int, str], JointWeight] = {}  # (layer, target key) -> base weight + A pool
        # (layer, target key) -> the allocations at r_max lanes: a joint weight, or flat A and B buffers
        self.storage: dict[tuple[int, str], tuple[JointWeight | None, torch.Tensor | None, torch.Tensor | None]] = {}
        self.shapes: dict[tuple[int, str], tuple[int, int, int]] = {}  # (layer, target key) -> (P, in, out per part)
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
            key = (t.layer, t.key)
            joint = joint_layout(getattr(t.owner, t.attr), a_shape, dtype, pctx.device, lanes)
            a_buf = b_buf = None
            if joint is None:
                a_buf = torch.zeros(math.prod(a_shape), dtype=dtype, device=pctx.device)
            if joint is None or joint.lanes is None:
                b_buf = torch.zeros((num_slots + 1) * len(parts) * d_out * max_rank, dtype=dtype, device=pctx.device)
            self.storage[key] = (joint, a_buf, b_buf)
            self.shapes[key] = (len(parts), d_in, d_out)
            for module, part in zip(t.modules, parts):
                self.parts[(t.layer, module)] = part
            self._view(t, self.rank)
        # a slot's share of the allocations (r_max lanes of A [P, r, in] and B [P, out, r] per target)
        self.slot_bytes = sum(p * (d_in + d_out) for p, d_in, d_out in self.shapes.values()) * max_rank * dtype.itemsize

    def _view(self, t: LoraTarget, r: int) -> None:
        """Point the target's pools (and its joint weight) at the first r lanes a slot of its allocations."""
        key = (t.layer, t.key)
        (joint, a_buf, b_buf), (parts, d_in, d_out) = self.storage[key], self.shapes[key]
        slots = self.num_slots + 1
        a_shape = (slots, parts, r, d_in)
        view = None
        if joint is not None:
            rows = joint.out + slots * parts * r
            bias = joint.bias[:rows] if joint.bias is not None else None
            lanes = joint.lanes[:, : d_in + slots * r] if joint.lanes is not None else None
            view = JointWeight(joint.weight[:rows], bias, joint.out, lanes)
            self.joints[key] = view
            a = view.weight[view.out :].view(a_shape)
        else:
            assert a_buf is not None
            a = a_buf[: math.prod(a_shape)].view(a_shape)
        if view is not None and view.lanes is not None:  # B [slots, 1, out, r] in the lanes
            b = view.lanes[:, d_in:].view(d_out, slots, r).permute(1, 0, 2).unsqueeze(1)
        else:
            assert b_buf is not None
            b = b_buf[: slots * parts * d_out * r].view(slots, parts, d_out, r)
        self.stacked[key] = (a, b)
        for p, module in enumerate(t.modules):
            self.pools[(t.layer, module)] = (a[:, p], b[:, p])

    def rank_for(self, rank: int) -> int:
        """The pools' lanes a slot that hold an adapter of `rank` (at most r_max): the current ones where it fits,
        else the next power of two from it (so that a few larger adapters re-lay the pools out a few times)."""
        if rank <= self.rank:
            return self.rank
        return min(self.max_rank, 1 << (rank - 1).bit_length())

    def set_rank(self, r: int) -> None:
        """Re-lay every pool out at r lanes a slot (at least the largest rank a slot holds), each slot's values
        kept, and point the wrapped targets' terms at the new views (their decode modes chosen again for them).
        Tensors and CUDA graphs that captured the old views must not run after this (the caller re-captures)."""
        if not 1 <= r <= self.max_rank:
            raise ValueError(f"adapter pool rank {r} outside 1..{self.max_rank} (--max-lora-rank)")
        held = int(self.ranks.max())
        if r < held:
            raise ValueError(f"adapter pool rank {r} below the rank {held} a slot holds")
        if r == self.rank:
            return
        keep, grow = min(r, self.rank), r > self.rank
        for t in self.targets:
            old = self.stacked[(t.layer, t.key)]
            self._view(t, r)
            _relayout(old, self.stacked[(t.layer, t.key)], keep, grow)
        self.rank = r
        for key, term in self.terms.items():
            term.a_pool, term.b_pool = self.stacked[key]
            term.joint = self.joints.get(key)
            term.decode = self.decode_mode(key, term.kernels, term.stream, self.choice)

    def adapter_bytes(self, dtype: torch.dtype) -> int:
        """Bytes of a whole (unsharded) adapter at the maximum rank on every module, in `dtype`."""
        return sum(self.max_rank * (p.d_in + p.d_out) for p in self.parts.values()) * dtype.itemsize

    def decode_mode(self, key: tuple[int, str], kernels: ModuleType | None, stream: object, choice: str) -> str:
        """LoraTerm's decode mode for one target under `--lora-decode choice` (lora.LORA_DECODE). On the H200 (batch 32,
        32 rank-16 adapters, 32 layers of the 7B shape): "gemm" (the shrink inside the base GEMM, one expand
        writing the output) costs 0.93-1.09 ms a step beside the base matmuls, "side_store" 1.31-1.38 ms
        (scripts/gpu_check_lora_gemm.py); in the decode step P2 0.884-0.898 vs 0.831-0.843 (bench_lora.py).
        "side_store" runs the whole term on the side stream, its expand writing every row of the term buffer;
        without a stream "two". "auto" takes "gemm" where the A rows add at most JOINT_MAX_SHARE to the base rows
        (JOINT_MAX_SHARE_WIDE past JOINT_SHARE_LANES lanes a slot) and the pools' lanes a slot are at most
        GEMM_MAX_RANK."""
        check_lora_decode(choice)
        joint = self.joints.get(key)
        if kernels is not None and joint is not None and choice != "side":
            limit = JOINT_MAX_SHARE if self.rank <= JOINT_SHARE_LANES else JOINT_MAX_SHARE_WIDE
            share = joint.weight.shape[0] - joint.out <= limit * joint.out
            if choice == "gemm" or (share and self.rank <= GEMM_MAX_RANK):
                return "gemm"
        return "side_store" if stream is not None else "two"

    def wrap_targets(
        self, kernels: ModuleType | None, stream: torch.cuda.Stream | None, decode: str = "auto"
    ) -> dict[str, int]:
        """Replace each target linear of the model by its adapter-aware wrapper over this pool; returns how many
        targets took each decode mode (`decode`: serve's --lora-decode)."""
        modes: dict[str, int] = {}
        self.choice = decode
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
            self.terms[(t.layer, t.key)] = term
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
