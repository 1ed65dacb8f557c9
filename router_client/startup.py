"""The router's startup sequence, as LoRAX runs it: ClearCache(None) → Info → Warmup → a KV block pool
of `max_supported_total_tokens // block_size` blocks (block 0 reserved for the health probe)."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from router_client.blocks import BlockAllocator
from router_client.client import ShardedClient
from router_client.kv import KVBlocks, choose_prefix_cache
from router_client.messages import RouterConfig, warmup_batch
from worker.pb import generate_pb2 as pb

log = logging.getLogger(__name__)


@dataclass
class Shards:
    """What the started shards offer: their Info, the KV tokens Warmup found room for, the block pool
    over them, and whether prompts are split into chunks."""

    info: pb.InfoResponse
    max_supported_total_tokens: int
    blocks: KVBlocks
    chunking: bool


def start_shards(client: ShardedClient, c: RouterConfig) -> Shards:
    """ClearCache(None) → Info → Warmup → block pool; logs what the router will serve with."""
    client.clear_cache(None, timeout_s=c.connect_timeout_s, wait_for_ready=True)
    info = client.info()
    if not info.supports_generation:
        raise RuntimeError("the shards do not support generation (Info.supports_generation is false)")
    total = None
    if c.warmup:
        total = client.warmup(
            warmup_batch(c),
            c.max_input_length,
            c.max_batch_prefill_tokens,
            c.max_total_tokens - c.max_input_length,
            timeout_s=c.warmup_timeout_s,
        )
    total = total if total is not None else c.max_batch_total_tokens
    if total is None:
        raise RuntimeError("Warmup reported no max_supported_total_tokens: set RouterConfig.max_batch_total_tokens")
    chunking = c.chunked_prefill and info.chunked_prefill
    if not chunking:
        c.check_unchunked()
    prefix, why = choose_prefix_cache(c, info, client.health)
    blocks = KVBlocks(BlockAllocator(total // info.block_size, info.block_size), prefix)
    log.info(
        "router ready: %d shard(s), block_size %d, %d KV tokens -> %d usable blocks, block allocator %s, "
        "chunked prefill %s, prefix caching %s, speculative decoding %s",
        client.world_size,
        info.block_size,
        total,
        blocks.capacity,
        "on" if info.requires_block_allocator else "off (shards allocate)",
        f"on ({c.max_batch_prefill_tokens} tokens per forward)"
        if chunking
        else "off (" + ("not offered by the shards" if c.chunked_prefill else "disabled") + ")",
        why,
        f"on ({info.speculate} drafts per step)" if info.speculate else "off",
    )
    return Shards(info, total, blocks, chunking)
