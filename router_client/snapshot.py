"""Read-only views of a running router for callers, tests and debugging: `RouterLoad` (queue, batch,
KV blocks, adapters now) and a plain-dict state dump. The caller holds the router's lock."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from router_client.loop import ServingLoop
from router_client.messages import AdapterInfo, RouterLoad, RouterStats
from router_client.scheduler import Scheduler


def router_load(sched: Scheduler, loop: ServingLoop | None, adapters: tuple[int, int], speculate: int) -> RouterLoad:
    """`adapters`: (loaded, offloaded) counts; `speculate`: drafts per step (0: off)."""
    running = loop.running if loop is not None else None
    st = sched.blocks.stats
    steps = loop.stats if loop is not None else RouterStats()
    return RouterLoad(
        len(sched.queue),
        len(sched.in_flight),
        running.size if running is not None else 0,
        running.max_tokens if running is not None else 0,
        sched.blocks.used_count,
        sched.blocks.free_count,
        adapters[0],
        adapters[1],
        sched.blocks.cached_count,
        st.lookups,
        st.hits,
        st.lookup_tokens,
        st.hit_tokens,
        speculate,
        steps.decode_rows,
        steps.decode_tokens,
    )


def debug_state(
    sched: Scheduler | None, loop: ServingLoop | None, adapters: dict[int, AdapterInfo], max_supported_total_tokens: int
) -> dict[str, Any]:
    """KV blocks, queue, batch, adapters and counters as plain values (zeros and empties before start)."""
    running = loop.running if loop is not None else None
    blocks = sched.blocks if sched is not None else None
    return {
        "free_blocks": blocks.free_count if blocks else 0,
        "usable_blocks": blocks.capacity if blocks else 0,
        "used_blocks": blocks.used_count if blocks else 0,
        "cached_blocks": blocks.cached_count if blocks else 0,
        "allocator_free_blocks": blocks.allocator.free_count if blocks else 0,
        "prefix_cache": asdict(blocks.stats) if blocks else {},
        "block_size": blocks.block_size if blocks else 0,
        "max_supported_total_tokens": max_supported_total_tokens,
        "queued": [p.id for p in sched.queue] if sched else [],
        "in_flight": sorted(sched.in_flight) if sched else [],
        "running_batch": None if running is None else {"id": running.id, "request_ids": list(running.request_ids)},
        "adapters": {i: {"ids": a.ids, "loaded": a.loaded} for i, a in adapters.items()},
        "stats": asdict(loop.stats if loop is not None else RouterStats()),
    }
