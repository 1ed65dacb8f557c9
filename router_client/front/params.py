"""From HTTP request fields to what the router takes: sampling and stopping dicts, the adapter to
use, and the JSON schema of structured output (sent to the shard in
`NextTokenChooserParameters.schema`)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from router_client.front.errors import validation
from router_client.front.schemas import MAX_STOP_CHARS, Grammar, MergedAdapters, ResponseFormat
from worker.pb import generate_pb2 as pb

MAX_SCHEMA_BYTES = 64 * 1024
MAX_SCHEMA_DEPTH = 32


@dataclass(frozen=True)
class AdapterRef:
    """One adapter, or a merge of several, as a request names it."""

    ids: tuple[str, ...]
    source: str  # hub | local | s3 | pbase
    weights: tuple[float, ...] = ()
    merge_strategy: str = "linear"
    density: float = 1.0
    majority_sign_method: str = "total"
    api_token: str | None = field(default=None, compare=False, repr=False)

    @property
    def label(self) -> str:
        return "+".join(self.ids)

    def to_pb(self) -> pb.AdapterParameters:
        if len(self.ids) == 1:
            return pb.AdapterParameters(adapter_ids=list(self.ids))
        weights = list(self.weights) or [1.0 / len(self.ids)] * len(self.ids)
        return pb.AdapterParameters(
            adapter_ids=list(self.ids),
            weights=weights,
            merge_strategy=pb.MergeStrategy.Value(self.merge_strategy.upper()),
            density=self.density,
            majority_sign_method=pb.MajoritySignMethod.Value(self.majority_sign_method.upper()),
        )


def adapter_ref(
    adapter_id: str | None,
    merged: MergedAdapters | None,
    source: str | None,
    default_source: str,
    api_token: str | None,
    base_ids: Sequence[str] = ("",),
) -> AdapterRef | None:
    """The adapter a request asks for; None for the base model (no id, or one of `base_ids`)."""
    source = source or default_source
    if merged is not None:
        if adapter_id not in (None, *base_ids):
            raise validation("set at most one of adapter_id and merged_adapters")
        if merged.weights is not None and len(merged.weights) != len(merged.ids):
            raise validation(f"merged_adapters: {len(merged.ids)} ids but {len(merged.weights)} weights")
        if len(merged.ids) == 1:
            return AdapterRef((merged.ids[0],), source, api_token=api_token)
        return AdapterRef(
            tuple(merged.ids),
            source,
            tuple(merged.weights or ()),
            merged.merge_strategy or "linear",
            1.0 if merged.density is None else merged.density,
            merged.majority_sign_method or "total",
            api_token=api_token,
        )
    if adapter_id is None or adapter_id in base_ids:
        return None
    return AdapterRef((adapter_id,), source, api_token=api_token)


def stop_list(stop: str | list[str] | None, limit: int) -> list[str]:
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    if len(stops) > limit:
        raise validation(f"stop: {len(stops)} sequences, at most {limit} allowed")
    if any(len(s) > MAX_STOP_CHARS for s in stops):
        raise validation(f"stop: a stop sequence is longer than {MAX_STOP_CHARS} characters")
    return stops


def structured_schema(response_format: ResponseFormat | None, grammar: Grammar | None) -> str | None:
    """The JSON schema (compact JSON text) that constrains the output, or None."""
    if response_format is not None and grammar is not None:
        raise validation("set at most one of response_format and grammar")
    schema: Any = None
    if grammar is not None:
        if grammar.type == "regex":
            raise validation("grammar type 'regex' is not supported: use a JSON schema (type 'json')")
        schema = (
            json.loads(grammar.value) if isinstance(grammar.value, str) and _is_json(grammar.value) else grammar.value
        )
        if not isinstance(schema, dict):
            raise validation("grammar.value must be a JSON schema object")
    elif response_format is not None and response_format.type != "text":
        spec = response_format.json_schema
        schema = spec.schema_ if spec is not None and spec.schema_ is not None else response_format.schema_
        if schema is None:
            if response_format.type == "json_schema":
                raise validation("response_format json_schema needs a schema")
            schema = {"type": "object"}  # json_object: any JSON object
    if schema is None:
        return None
    if _depth(schema) > MAX_SCHEMA_DEPTH:
        raise validation(f"the JSON schema is nested deeper than {MAX_SCHEMA_DEPTH} levels")
    text = json.dumps(schema, separators=(",", ":"), ensure_ascii=False)
    if len(text.encode()) > MAX_SCHEMA_BYTES:
        raise validation(f"the JSON schema is larger than {MAX_SCHEMA_BYTES} bytes")
    return text


def _is_json(text: str) -> bool:
    try:
        json.loads(text)
        return True
    except ValueError:
        return False


def _depth(value: Any) -> int:
    if isinstance(value, dict):
        return 1 + max((_depth(v) for v in value.values()), default=0)
    if isinstance(value, list):
        return 1 + max((_depth(v) for v in value), default=0)
    return 0


def sampling(
    *,
    temperature: float | None,
    do_sample: bool,
    top_k: int | None = None,
    top_p: float | None = None,
    typical_p: float | None = None,
    seed: int | None = None,
    repetition_penalty: float | None = None,
    frequency_penalty: float | None = None,
    presence_penalty: float | None = None,
    return_k_alternatives: int = 0,
    watermark: bool = False,
    schema: str | None = None,
) -> dict[str, Any]:
    """The router's sampling dict; None leaves LoRAX's default. Temperature 0 is greedy."""
    out: dict[str, Any] = {
        "do_sample": do_sample and temperature != 0.0,
        "watermark": watermark,
        "return_k_alternatives": return_k_alternatives,
        "schema": schema,
    }
    given = {
        "temperature": temperature,
        "top_k": top_k,
        "top_p": top_p,
        "typical_p": typical_p,
        "seed": seed,
        "repetition_penalty": repetition_penalty,
        "frequency_penalty": frequency_penalty,
        "presence_penalty": presence_penalty,
    }
    out.update({k: v for k, v in given.items() if v is not None})
    return out


def stopping(max_new_tokens: int, stops: list[str], ignore_eos_token: bool) -> dict[str, Any]:
    return {"max_new_tokens": max_new_tokens, "stop_sequences": stops, "ignore_eos_token": ignore_eos_token}


def is_sampling(p: dict[str, Any]) -> bool:
    """TGI's rule: a request samples when do_sample is set or any warper is active; temperature 0 is greedy."""
    if p.get("temperature") == 0.0:
        return False
    return (
        bool(p.get("do_sample"))
        or p.get("temperature", 1.0) not in (0.0, 1.0)
        or bool(p.get("top_k"))
        or p.get("top_p", 1.0) < 1.0
        or p.get("typical_p", 1.0) < 1.0
    )
