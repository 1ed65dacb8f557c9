"""router_client: a Python router that drives qwen-worker shards the way the LoRAX router does.

Exports resolve lazily, so `router_client.cli` imports without the generated protobuf stubs.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "ShardedClient": "router_client.client",
    "ShardError": "router_client.client",
    "ShardMismatchError": "router_client.client",
    "Router": "router_client.router",
    "RouterConfig": "router_client.messages",
    "RouterStats": "router_client.messages",
    "AdapterInfo": "router_client.messages",
    "RequestHandle": "router_client.requests",
    "GenerationResult": "router_client.requests",
    "TokenEvent": "router_client.requests",
    "RequestError": "router_client.requests",
    "ValidationError": "router_client.requests",
    "BlockAllocator": "router_client.blocks",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'router_client' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
