"""Qwen (v1), exactly as the published reference computes it, over a paged KV cache.

The seven classes of LoRAX's flash_qwen_modeling.py, with its forward I/O contract. Inside, every
layer receives one ForwardContext. Sharding lives in the parallel layers; this file holds only the
mapping from checkpoint names to layers.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import nn

from worker.config import QwenConfig
from worker.distributed import ParallelContext
from worker.layers.activation import SiluAndMul
from worker.layers.attention import AttentionBackend, TorchAttention
from worker.layers.context import ForwardContext, RotarySettings, Seqlen
from worker.layers.decode_kernels import DecodeKernels, apply_decode_kernels
from worker.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from worker.layers.kv_scales import CheckpointScales, KVScales, backend_kwargs, every_layer, read_checkpoint_scales
from worker.layers.linear import RowParallelLinear
from worker.layers.lora import unwrapped
from worker.layers.medusa import MedusaCheckpoint, MedusaHeads, MedusaSet
from worker.layers.norm import Deferred, RMSNorm
from worker.layers.quantized import LinearFactory
from worker.layers.rotary import Rotary
from worker.models.loading import checkpoint_settings, layer_progress
from worker.models.lora_targets import LoraTarget, lora_targets
from worker.quant.config import QuantConfig
from worker.weights import Weights

__all__ = [
    "QwenConfig",
    "QwenRMSNorm",
    "FlashQwenAttention",
    "QwenMLP",
    "FlashQwenLayer",
    "FlashQwenModel",
    "FlashQwenForCausalLM",
]

KVLayer = tuple[torch.Tensor, torch.Tensor]  # one layer's (K cache, V cache)


class QwenRMSNorm(RMSNorm):
    """ln_1 / ln_2 / ln_f (replicated on every rank)."""


@dataclass(frozen=True)
class Build:
    """What every part of the model is built from: shapes, this rank's slice, dtype, attention backend,
    fused kernels or the PyTorch reference, and the linears' quantization (None: float)."""

    config: QwenConfig
    pctx: ParallelContext
    dtype: torch.dtype
    backend: AttentionBackend
    fused: bool = False
    quant: QuantConfig | None = None

    def linears(self) -> LinearFactory:
        return LinearFactory(self.quant, self.pctx, self.dtype)

    def norm(self) -> QwenRMSNorm:
        return QwenRMSNorm(
            self.config.hidden_size, self.config.layer_norm_epsilon, self.dtype, self.pctx.device, self.fused
        )


class FlashQwenAttention(nn.Module):
    """c_attn (fused q/k/v, with bias; column parallel by heads) → RoPE (+ logn on q) → paged
    attention → c_proj (row parallel, one all-reduce).

    fp8 KV: `kv_scales` holds this layer's (k_scale, v_scale) (0-d fp32 views into the KVCache's
    per-layer scales, set by `FlashQwenForCausalLM.set_kv_scales`), None for unscaled caches;
    `checkpoint_kv_scales` the checkpoint's `attn.k_scale`/`attn.v_scale` when it has them."""

    def __init__(self, b: Build):
        super().__init__()
        config, linears = b.config, b.linears()
        self.kv_scales: KVScales | None = None
        self.checkpoint_kv_scales: CheckpointScales | None = None
        self.num_heads_total = config.num_attention_heads
        self.num_heads = self.num_heads_total // b.pctx.world_size  # per rank
        self.head_dim = config.head_dim
        self.scale = 1.0 / math.sqrt(self.head_dim)
        self.backend = b.backend
        self.c_attn = linears.qkv(config.hidden_size, self.num_heads_total, self.head_dim, bias=True)
        self.rotary = Rotary(b.fused)
        self.c_proj = linears.row(config.hidden_size, config.hidden_size, not config.no_bias, "attn.c_proj")

    def set_decode_kernels(self, opts: DecodeKernels) -> None:
        """The backend's decode kernels take them too (PDL for the paged decode attention)."""
        setter = getattr(self.backend, "set_decode_kernels", None)
        if setter is not None:
            setter(opts)

    def load(self, weights: Weights, prefix: str) -> None:
        self.c_attn.load(weights, [f"{prefix}.c_attn"])
        self.c_proj.load(weights, f"{prefix}.c_proj")
        self.checkpoint_kv_scales = read_checkpoint_scales(weights, prefix)

    def shrink_pool(self, rows: int, ctx: ForwardContext) -> torch.Tensor | None:
        """c_attn's A pool where its adapter term takes h from the norm before it (LoraTerm.shrink_pool), else None."""
        term = getattr(self.c_attn, "lora", None)
        return term.shrink_pool(rows, ctx.adapter_data) if term is not None else None

    def forward(
        self, x: torch.Tensor, ctx: ForwardContext, kv: KVLayer | None, parts: torch.Tensor | None = None
    ) -> torch.Tensor:
        # x: [T, H]; parts: c_attn's adapter h in partials from the norm (`shrink_pool`), or None
        return self.c_proj(self.attend(x, ctx, kv, parts), ctx)

    def forward_norm(
        self, x: torch.Tensor | Deferred, ctx: ForwardContext, kv: KVLayer | None, norm: RMSNorm, residual: torch.Tensor
    ) -> tuple[Deferred, torch.Tensor]:
        """norm(forward(x) + residual) deferred, and the sum (DecodeKernels.norm_fold: FlashQwenModel.folds_norms):
        c_proj's launch adds the residual; x may be deferred itself (ln_1 folded into the previous block)."""
        return unwrapped(self.c_proj).forward_norm(self.attend(x, ctx, kv), residual, norm)  # type: ignore[operator]

    def attend(
        self, x: torch.Tensor | Deferred, ctx: ForwardContext, kv: KVLayer | None, parts: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Everything before c_proj: its input [T, heads * head_dim] (x Deferred: norm_fold's c_attn)."""
        if isinstance(x, Deferred):
            qkv = unwrapped(self.c_attn).forward_scaled(x)  # type: ignore[operator]
        elif parts is not None:
            qkv = self.c_attn.forward_partials(x, ctx, parts)  # type: ignore[operator]
        else:
            qkv = self.c_attn(x, ctx)  # [T, 3 * heads * head_dim] (this rank's heads)
        T = qkv.shape[0]
        q, k, v = qkv.view(T, 3, self.num_heads, self.head_dim).unbind(1)  # each [T, heads, head_dim]
        k_cache, v_cache = kv if kv is not None else (None, None)
        scales = backend_kwargs(self.kv_scales)
        o = None
        if kv is not None and ctx.slots is not None and self.rotary.stores(q, kv[0], bool(scales)):
            fused = getattr(self.backend, "decode_rope", None)  # RoPE + store inside the decode attention
            o = fused(q, k, v, kv[0], kv[1], ctx, self.scale) if fused is not None else None
            if o is None:
                self.rotary.rotate_and_store(q, k, v, ctx.cos, ctx.sin, ctx.logn, kv[0], kv[1], ctx.slots)
        else:
            q, k = self.rotary(q, k, ctx.cos, ctx.sin, ctx.logn)
            if kv is not None and ctx.slots is not None:
                self.backend.store(k, v, kv[0], kv[1], ctx.slots, **scales)
        if o is None:
            o = self.backend.attend(q, k, v, k_cache, v_cache, ctx, self.scale, **scales)  # [T, heads, head_dim]
        return o.reshape(T, self.num_heads * self.head_dim)


class QwenMLP(nn.Module):
    """c_proj(w1(x) * silu(w2(x))): w2 is the gate. w2 and w1 are merged into one column-parallel
    gate_up layer ([w2_r; w1_r] per rank); c_proj is row parallel."""

    def __init__(self, b: Build):
        super().__init__()
        config, linears = b.config, b.linears()
        width = config.mlp_width
        self.gate_up = linears.column(config.hidden_size, [width, width], not config.no_bias, "mlp.w2/w1")
        self.act = SiluAndMul(b.fused)
        self.c_proj = linears.row(width, config.hidden_size, not config.no_bias, "mlp.c_proj")

    def load(self, weights: Weights, prefix: str) -> None:
        self.gate_up.load(weights, [f"{prefix}.w2", f"{prefix}.w1"])
        self.c_proj.load(weights, f"{prefix}.c_proj")

    def act_deferred(self, x: Deferred) -> torch.Tensor:
        """c_proj's input from ln_2's deferred output (DecodeKernels.norm_fold: FlashQwenModel.folds_norms): gate_up's
        launch scales its rows and gives the activation (gptq_act_out)."""
        act = unwrapped(self.gate_up).forward_silu_mul(x)  # type: ignore[operator]
        assert act is not None, "norm_fold needs gate_up's activation in its launch (folds_norms checks it)"
        return cast(torch.Tensor, act)

    def forward_norm(self, x: Deferred, norm: RMSNorm, residual: torch.Tensor) -> tuple[Deferred, torch.Tensor]:
        """norm(forward(x) + residual) deferred, and the sum (norm_fold): c_proj's launch adds the residual."""
        return unwrapped(self.c_proj).forward_norm(self.act_deferred(x), residual, norm)  # type: ignore[operator]

    def forward(self, x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        lora_act = getattr(self.gate_up, "silu_mul", None) if self.act.fused else None
        # adapters' expand fused with the activation (and with c_proj's shrink where both serve it)
        fused = lora_act(x, ctx, getattr(self.c_proj, "lora", None)) if lora_act is not None else None
        if fused is not None:
            act, parts = fused
            if parts is not None:
                return self.c_proj.forward_partials(act, ctx, parts)  # type: ignore[operator]
            return self.c_proj(act, ctx)
        act_out = getattr(self.gate_up, "forward_silu_mul", None) if self.act.fused else None
        act = act_out(x) if act_out is not None else None  # the activation in gate_up's GEMV (gptq_act_out)
        if act is not None:
            return self.c_proj(act, ctx)
        gate_up = self.gate_up(x, ctx)  # [T, 2 * width_per_rank] = [gate | up]
        if isinstance(self.c_proj, RowParallelLinear) and self.c_proj.fuses_act(gate_up):
            return self.c_proj.forward_act(gate_up)  # the activation inside c_proj's GEMV (DecodeKernels.act_gemv)
        return self.c_proj(self.act(gate_up), ctx)


class FlashQwenLayer(nn.Module):
    """One decoder block. Each residual add is fused into the next norm: the block's input is x + residual
    (residual None: x alone) and it returns (mlp output, h) for the next block to add."""

    def __init__(self, b: Build):
        super().__init__()
        self.ln_1 = b.norm()
        self.attn = FlashQwenAttention(b)
        self.ln_2 = b.norm()
        self.mlp = QwenMLP(b)

    def load(self, weights: Weights, prefix: str) -> None:
        for name in ("ln_1", "ln_2"):
            norm = getattr(self, name)
            norm.weight.data.copy_(weights.get(f"{prefix}.{name}.weight", tuple(norm.weight.shape)))
        self.attn.load(weights, f"{prefix}.attn")
        self.mlp.load(weights, f"{prefix}.mlp")

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None, ctx: ForwardContext, kv: KVLayer | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # x, residual: [T, H]
        pool = self.attn.shrink_pool(x.shape[0], ctx) if self.ln_1.fused else None
        parts = None
        if pool is None:
            normed, block_in = self.ln_1(x, residual)
        else:  # c_attn's adapter h from ln_1's kernel (DecodeKernels.lora_norm_shrink)
            assert ctx.adapter_data is not None and ctx.adapter_data.row_slots is not None
            normed, block_in, parts = self.ln_1.with_shrink(x, residual, pool, ctx.adapter_data.row_slots)
        normed, h = self.ln_2(self.attn(normed, ctx, kv, parts), block_in)  # h = block_in + attention
        return self.mlp(normed, ctx), h

    def forward_folded(
        self, x: torch.Tensor | Deferred, residual: torch.Tensor | None, ctx: ForwardContext, kv: KVLayer | None,
        next_norm: RMSNorm | None,
    ) -> tuple[torch.Tensor | Deferred, torch.Tensor]:  # fmt: skip
        """forward with the norms folded into the linears (DecodeKernels.norm_fold: FlashQwenModel.folds_norms):
        x is ln_1's deferred output (from the previous block) or, first, the embedding; returns next_norm's deferred
        output (the next block's ln_1) and the residual sum for the next block, or (next_norm None: the last block)
        forward's (mlp output, h)."""
        if isinstance(x, Deferred):  # ln_1 folded into the previous block: its residual sum comes with it
            assert residual is not None
            normed, block_in = x, residual
        else:
            normed, block_in = self.ln_1(x, residual)
        deferred, h = self.attn.forward_norm(normed, ctx, kv, self.ln_2, block_in)  # h = block_in + attention
        if next_norm is None:
            return self.mlp.c_proj(self.mlp.act_deferred(deferred), ctx), h
        return self.mlp.forward_norm(deferred, next_norm, h)


class FlashQwenModel(nn.Module):
    """`transformer`: wte (vocab parallel) → layers → ln_f."""

    def __init__(self, b: Build):
        super().__init__()
        config = b.config
        self.wte = VocabParallelEmbedding(config.padded_vocab_size, config.hidden_size, b.pctx, b.dtype)
        self.h = nn.ModuleList(FlashQwenLayer(b) for _ in range(config.num_hidden_layers))
        self.ln_f = b.norm()

    def layers(self) -> list[FlashQwenLayer]:
        """The decoder layers, typed (an nn.ModuleList indexes to plain Modules)."""
        return [cast(FlashQwenLayer, layer) for layer in self.h]

    def forward(self, input_ids: torch.Tensor, ctx: ForwardContext, kv_cache: Sequence[KVLayer] | None) -> torch.Tensor:
        x = self.wte(input_ids)  # [T, H]
        residual = None
        layers = self.layers()
        if self.folds_norms(ctx, x.shape[0]):  # the norms inside the linears (norm_fold); ln_f a launch of its own
            y: torch.Tensor | Deferred = x
            for i, layer in enumerate(layers):
                kv = kv_cache[i] if kv_cache is not None else None
                y, residual = layer.forward_folded(
                    y, residual, ctx, kv, layers[i + 1].ln_1 if i + 1 < len(layers) else None
                )
            assert isinstance(y, torch.Tensor)
            return self.ln_f(y, residual)[0]
        for i, layer in enumerate(layers):
            x, residual = layer(x, residual, ctx, kv_cache[i] if kv_cache is not None else None)
        return self.ln_f(x, residual)[0]

    def folds_norms(self, ctx: ForwardContext, rows: int) -> bool:
        """DecodeKernels.norm_fold at this step: a decode step without adapters whose four linears a block (the same in
        every block) take gptq_tc's folded norms at `rows` rows (`_GPTQ.folds_norm`), gate_up with its activation
        (gptq_act_out), with the fused kernels (the norms' weights are read by the linears)."""
        layers = self.layers()
        if ctx.is_prefill or ctx.adapter_data is not None or not self.ln_f.fused or len(layers) < 2:
            return False
        attn, mlp = layers[0].attn, layers[0].mlp
        linears: list[Any] = [unwrapped(m) for m in (attn.c_attn, attn.c_proj, mlp.gate_up, mlp.c_proj)]
        if not all(callable(getattr(m, "folds_norm", None)) and m.folds_norm(rows) for m in linears):
            return False
        return bool(linears[2].decode_kernels.gptq_act_out)


class FlashQwenForCausalLM(nn.Module):
    """`fused` (None: on exactly when the model is on CUDA with the `triton` attention backend) runs the
    norms, RoPE and SiLU-mul through worker/kernels/fused.py; the PyTorch path is the reference.
    `rotary` holds the constants the runner builds each step's ForwardContext from. `quant`: the five linears
    of each block as GPTQ Int4/Int8 or FP8 (worker/layers/quantized.py); wte, norms and lm_head stay float.
    `decode_kernels`: the decode kernel choices (worker/layers/decode_kernels.py; None: all off, today's
    kernels; the served shard passes the measured winners, --decode-kernels)."""

    def __init__(
        self,
        config: QwenConfig,
        pctx: ParallelContext | None = None,
        dtype: torch.dtype = torch.float32,
        backend: AttentionBackend | None = None,
        fused: bool | None = None,
        quant: QuantConfig | None = None,
        decode_kernels: DecodeKernels | None = None,
    ):
        super().__init__()
        self.config = config
        self.quant = quant
        self.pctx = pctx or ParallelContext()
        self.dtype = dtype
        self.backend = backend or TorchAttention()
        if fused is None:
            fused = self.backend.name == "triton" and self.pctx.device.type == "cuda"
        self.use_fused = fused
        self.rotary = RotarySettings(config.rotary_dim, config.rotary_emb_base, config.seq_length, config.use_logn_attn)
        self.transformer = FlashQwenModel(Build(config, self.pctx, dtype, self.backend, fused, quant))
        self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size, self.pctx, dtype)
        self.medusa = MedusaSet()
        if decode_kernels is not None:
            apply_decode_kernels(self.transformer, decode_kernels)

    @classmethod
    def from_pretrained(
        cls,
        model_dir: str,
        pctx: ParallelContext | None = None,
        dtype: torch.dtype | None = None,
        backend: AttentionBackend | None = None,
        progress: bool = True,
        fused: bool | None = None,
        quantize: str = "auto",
        decode_kernels: DecodeKernels | None = None,
    ) -> FlashQwenForCausalLM:
        """quantize: --quantize (auto: GPTQ when the checkpoint has a quantization_config, else float);
        decode_kernels: --decode-kernels (None: all off)."""
        config, dtype, quant = checkpoint_settings(model_dir, dtype, quantize)
        model = cls(config, pctx, dtype, backend, fused, quant, decode_kernels)
        model.load(Weights(model_dir, dtype, model.pctx.device), progress=progress)
        return model

    def load(self, weights: Weights, progress: bool = True) -> None:
        self.transformer.wte.load(weights, "transformer.wte")
        layers = self.transformer.layers()
        for i, layer in layer_progress(enumerate(layers), len(layers), progress and self.pctx.rank == 0):
            layer.load(weights, f"transformer.h.{i}")
        self.transformer.ln_f.weight.data.copy_(weights.get("transformer.ln_f.weight", (self.config.hidden_size,)))
        self.lm_head.load(weights, "lm_head")

    def attention_layers(self) -> list[FlashQwenAttention]:
        return [layer.attn for layer in self.transformer.layers()]

    def checkpoint_kv_scales(self) -> tuple[list[float], list[float]] | None:
        """Per-layer (k_scales, v_scales) from the checkpoint, or None unless every layer has both."""
        return every_layer([attn.checkpoint_kv_scales for attn in self.attention_layers()])

    def set_kv_scales(self, k_scales: torch.Tensor | None, v_scales: torch.Tensor | None) -> None:
        """Point each attention layer at its entry of the KV cache's per-layer scales ([layers] fp32, read
        by the kernels through pointers); None: an unscaled cache (the attention calls get no scales)."""
        for i, attn in enumerate(self.attention_layers()):
            attn.kv_scales = None if k_scales is None or v_scales is None else (k_scales[i], v_scales[i])

    def forward(
        self,
        input_ids: torch.Tensor,  # [T]
        position_ids: torch.Tensor,  # [T]
        cu_seqlen_prefill: torch.Tensor | None,  # [B+1] at prefill, None at decode
        kv_cache: Sequence[KVLayer] | None,
        block_tables: torch.Tensor | None,  # [B, max_blocks]
        slots: torch.Tensor | None,  # [T]
        seqlen: Seqlen,
        max_s: int,
        adapter_data: Any = None,
        prefill_cache_indices: torch.Tensor | None = None,  # sliding-window only: unused by Qwen v1
        lm_head_indices: torch.Tensor | None = None,  # [N]
        skip_lm_head: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The seed's contract: builds the step's ForwardContext and runs `forward_context`."""
        ctx = ForwardContext.build(
            self.rotary,
            is_prefill=cu_seqlen_prefill is not None,
            positions=position_ids,
            seqlen=seqlen,
            slots=slots,
            block_tables=block_tables,
            lm_head_indices=lm_head_indices,
            adapter_data=adapter_data,
        )
        if skip_lm_head:
            return self.forward_context(input_ids, ctx, kv_cache, skip_lm_head=True), None
        return self.forward_speculative(input_ids, ctx, kv_cache, None)

    def forward_context(
        self,
        input_ids: torch.Tensor,
        ctx: ForwardContext,
        kv_cache: Sequence[KVLayer] | None,
        skip_lm_head: bool = False,
    ) -> torch.Tensor:
        """input_ids [T] -> logits [N, vocab_size] of the tokens ctx.lm_head_indices picks (hidden states
        [N, H] with skip_lm_head). The padded vocab's extra ids are masked by the sampler."""
        hidden = self.transformer(input_ids, ctx, kv_cache)  # [T, H]
        if ctx.lm_head_indices is not None:
            hidden = hidden[ctx.lm_head_indices]
        if skip_lm_head:
            return hidden
        return self.lm_head(hidden)

    @property
    def medusa_heads(self) -> int:
        """K, the number of Medusa heads attached (0 when none)."""
        return self.medusa.num_heads

    def attach_medusa(self, ckpt: MedusaCheckpoint, slot: int | None = None) -> None:
        """Medusa heads (validated by worker.adapters.medusa): the base speculator (slot None) or the
        heads of adapter pool slot `slot` (v2, same K; `self.medusa.detach(slot)` forgets them)."""
        self.medusa.attach(MedusaHeads(ckpt, self.pctx, self.dtype), slot)

    def medusa_rows(self, adapter_slots: Sequence[int]) -> list[bool]:
        """Which rows (by adapter pool slot, 0: base) get usable speculative logits."""
        return self.medusa.rows(adapter_slots)

    def forward_speculative(
        self,
        input_ids: torch.Tensor,
        ctx: ForwardContext,
        kv_cache: Sequence[KVLayer] | None,
        adapter_slots: Sequence[int] | None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(logits [N, V], speculative logits [N, K, V] or None without heads) of the rows ctx.lm_head_indices
        picks; `adapter_slots`: each picked row's adapter pool slot (None: all base). A row uses its slot's
        heads, else the base speculator's; `medusa_rows` says which rows have either."""
        hidden = self.forward_context(input_ids, ctx, kv_cache, skip_lm_head=True)  # [N, H]
        return self.medusa(hidden, self.lm_head, adapter_slots)

    def lora_targets(self) -> list[LoraTarget]:
        """Every linear an adapter may wrap, layer by layer in LORA_TARGETS order."""
        return lora_targets(self.transformer.h)
