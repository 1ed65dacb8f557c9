"""Pieces of the OpenAI answers: finish reasons, message text, logprobs in both shapes, and the
adapter ids found under the adapter root (for /v1/models)."""

from __future__ import annotations

import os
from typing import Any

from router_client.front.flow import finite
from router_client.front.openai_schemas import ChatMessage
from router_client.front.service import Outcome
from router_client.requests import TokenEvent

FINISH = {"eos_token": "stop", "stop_sequence": "stop", "length": "length"}


def message_text(m: ChatMessage) -> str:
    if m.content is None or isinstance(m.content, str):
        return m.content or ""
    return "".join(part.text for part in m.content)


def mean_logprob(o: Outcome) -> float:
    return sum(finite(e.logprob, -1e9) or 0.0 for e in o.events) / max(1, len(o.events))


def chat_logprob(e: TokenEvent) -> dict[str, Any]:
    return {
        "token": e.text,
        "logprob": finite(e.logprob, -9999.0),
        "bytes": list(e.text.encode()),
        "top_logprobs": [
            {"token": a.text, "logprob": finite(a.logprob, -9999.0), "bytes": list(a.text.encode())}
            for a in e.alternatives
        ],
    }


def completion_logprobs(events: list[TokenEvent]) -> dict[str, Any]:
    events = [e for e in events if not e.special]
    offsets, at = [], 0
    for e in events:
        offsets.append(at)
        at += len(e.text)
    return {
        "tokens": [e.text for e in events],
        "token_logprobs": [finite(e.logprob, -9999.0) for e in events],
        "top_logprobs": [{a.text: finite(a.logprob, -9999.0) for a in e.alternatives} for e in events],
        "text_offset": offsets,
    }


def adapter_dirs(root: str) -> list[str]:
    """Adapter ids under the adapter root: directories holding adapter_config.json (name or org/name)."""
    found = []
    for name in sorted(os.listdir(root)) if os.path.isdir(root) else []:
        path = os.path.join(root, name)
        if os.path.isfile(os.path.join(path, "adapter_config.json")):
            found.append(name)
        elif os.path.isdir(path):
            found += [
                f"{name}/{sub}"
                for sub in sorted(os.listdir(path))
                if os.path.isfile(os.path.join(path, sub, "adapter_config.json"))
            ]
    return found
