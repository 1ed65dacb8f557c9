"""Router configuration and state records, and every protobuf message the router builds itself:
sampling/stopping parameters from dicts, LoRAX's warmup batch, the health-probe batch, adapter
parameters."""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from router_client.requests import U64_MAX, ValidationError
from worker.pb import generate_pb2 as pb

HEALTH_ID = U64_MAX  # batch id and request id of the health probe; never used by real requests

SAMPLING_DEFAULTS: dict[str, Any] = {
    "temperature": 1.0,
    "top_k": 0,
    "top_p": 1.0,
    "typical_p": 1.0,
    "do_sample": False,
    "seed": None,
    "repetition_penalty": 1.0,
    "frequency_penalty": 0.0,
    "presence_penalty": 0.0,
    "watermark": False,
    "adapter_id": "",
    "schema": None,
    "return_k_alternatives": 0,
}
STOPPING_DEFAULTS: dict[str, Any] = {"max_new_tokens": 20, "stop_sequences": (), "ignore_eos_token": False}
# The shard's ranges (worker/engine/sampling.py, which imports torch): beyond them its fp32 sampler overflows.
MIN_TEMPERATURE, MAX_PENALTY_FACTOR, MAX_ADDITIVE_PENALTY = 1e-4, 1e4, 1e4


class Tokenizer(Protocol):
    """What the router needs of a tokenizer (`decode(ids) -> str` is used when present)."""

    def encode(self, text: str) -> list[int]: ...


@dataclass
class RouterConfig:
    max_input_length: int = 1024  # longest prompt (tokens) a request may have
    max_total_tokens: int = 2048  # prompt + max_new_tokens of one request
    max_batch_prefill_tokens: int = 4096  # tokens per forward (unchunked: a lone prompt may exceed it)
    max_batch_size: int = 256  # requests in flight (running + new)
    max_batch_total_tokens: int | None = None  # KV tokens, used only when Warmup answers none
    warmup: bool = True
    call_timeout_s: float | None = 120.0  # deadline of every step/bookkeeping RPC
    connect_timeout_s: float = 60.0
    warmup_timeout_s: float | None = 900.0
    chunked_prefill: bool = True  # split long prompts when the shards offer it (Info.chunked_prefill)
    prefix_caching: bool = True  # reuse cached prompt blocks; needs seq_length (NTK alpha keys)
    seq_length: int | None = None  # the model's training context S (config.json); None: ask the shards
    use_dynamic_ntk: bool = True  # the model's dynamic NTK (config.json): alpha depends on prompt length
    prefix_log_interval_s: float = 60.0  # how often the prefix-cache hit rate and speculative acceptance are logged

    def validate(self) -> None:
        if not 1 <= self.max_input_length < self.max_total_tokens:
            raise ValueError(
                f"need 1 <= max_input_length ({self.max_input_length}) < max_total_tokens ({self.max_total_tokens})"
            )
        if self.max_batch_size < 1 or self.max_batch_prefill_tokens < 1:
            raise ValueError(
                f"need max_batch_size ({self.max_batch_size}) >= 1 and max_batch_prefill_tokens "
                f"({self.max_batch_prefill_tokens}) >= 1"
            )
        if self.seq_length is not None and self.seq_length < 1:
            raise ValueError(f"seq_length must be >= 1, got {self.seq_length}")
        if not self.chunked_prefill:
            self.check_unchunked()

    def check_unchunked(self) -> None:
        """Without chunked prefill a whole prompt goes through one forward."""
        if self.max_batch_prefill_tokens < self.max_input_length:
            raise ValueError(
                f"need max_batch_prefill_tokens ({self.max_batch_prefill_tokens}) >= max_input_length "
                f"({self.max_input_length}) without chunked prefill"
            )


@dataclass
class RouterStats:
    tokens_generated: int = 0
    steps: int = 0  # Prefill + Decode calls that succeeded
    prefills: int = 0
    decodes: int = 0
    requests_finished: int = 0
    requests_failed: int = 0
    decode_rows: int = 0  # one request in one step after its first token (a Decode row)
    decode_tokens: int = 0  # tokens those rows accepted (1 each without speculation; up to 1 + speculate)

    @property
    def accepted_per_step(self) -> float:
        """Mean tokens a request gains per Decode step: 1.0 without speculation."""
        return self.decode_tokens / self.decode_rows if self.decode_rows else 0.0


@dataclass(frozen=True)
class StepRecord:
    """One Prefill or Decode the router made, for its `step_observer`."""

    method: str  # "prefill" | "decode"
    duration_s: float
    batch_size: int  # requests in the step


@dataclass(frozen=True)
class RouterLoad:
    """A snapshot of the router's load (gauges)."""

    queued: int
    in_flight: int
    batch_size: int  # requests in the running batch
    batch_max_tokens: int  # KV token slots the running batch holds
    blocks_used: int
    blocks_free: int
    adapters_loaded: int
    adapters_offloaded: int
    prefix_cached_blocks: int = 0  # blocks the prefix cache holds (referenced or not)
    prefix_lookups: int = 0  # counters since start: admitted requests that looked the cache up,
    prefix_hits: int = 0  # those that reused at least one block,
    prefix_lookup_tokens: int = 0  # their prompt tokens,
    prefix_hit_tokens: int = 0  # and the tokens not computed again
    speculate: int = 0  # draft tokens the shards verify per step (Info.speculate)
    decode_rows: int = 0  # counters since start: RouterStats.decode_rows
    decode_tokens: int = 0  # and RouterStats.decode_tokens


@dataclass
class AdapterInfo:
    index: int
    params: pb.AdapterParameters
    source: int
    loaded: bool = True
    memory_fraction: float = 0.0

    @property
    def ids(self) -> list[str]:
        return list(self.params.adapter_ids)


def sampling_parameters(params: dict[str, Any] | None) -> pb.NextTokenChooserParameters:
    """Keys of NextTokenChooserParameters with LoRAX's defaults; `do_sample` without a seed draws one."""
    merged = _merge(SAMPLING_DEFAULTS, params or {}, "sampling parameter")
    _check_ranges(merged)
    if merged["seed"] is None:
        merged["seed"] = random.getrandbits(63) if merged["do_sample"] else 0
    schema = merged.pop("schema")
    out = pb.NextTokenChooserParameters(**merged)
    if schema is not None:
        out.schema = schema
    return out


def _check_ranges(p: dict[str, Any]) -> None:
    """Refuse non-finite values and those that would overflow the shard's fp32 sampler (ValidationError naming the
    field and the range); the shard checks the rest (top_k, top_p, typical_p) itself."""
    for name in ("temperature", "top_p", "typical_p", "repetition_penalty", "frequency_penalty", "presence_penalty"):
        if not math.isfinite(p[name]):
            raise ValidationError(f"{name} must be a finite number, got {p[name]}")
    t, rep, additive = p["temperature"], p["repetition_penalty"], MAX_ADDITIVE_PENALTY
    checks = [
        ("temperature", t == 0 or t >= MIN_TEMPERATURE, f"0 (greedy) or >= {MIN_TEMPERATURE:g}"),
        (
            "repetition_penalty",
            1 / MAX_PENALTY_FACTOR <= rep <= MAX_PENALTY_FACTOR,
            f"in [{1 / MAX_PENALTY_FACTOR:g}, {MAX_PENALTY_FACTOR:g}]",
        ),
        ("frequency_penalty", abs(p["frequency_penalty"]) <= additive, f"in [-{additive:g}, {additive:g}]"),
        ("presence_penalty", abs(p["presence_penalty"]) <= additive, f"in [-{additive:g}, {additive:g}]"),
    ]
    for name, ok, rule in checks:
        if not ok:
            raise ValidationError(f"{name} must be {rule}, got {p[name]}")


def stopping_parameters(stopping: dict[str, Any] | None) -> pb.StoppingCriteriaParameters:
    """Keys of StoppingCriteriaParameters (`stop` is an alias of `stop_sequences`)."""
    stopping = dict(stopping or {})
    if "stop" in stopping:
        stopping["stop_sequences"] = stopping.pop("stop")
    merged = _merge(STOPPING_DEFAULTS, stopping, "stopping parameter")
    if merged["max_new_tokens"] < 1:
        raise ValidationError(f"max_new_tokens must be >= 1, got {merged['max_new_tokens']}")
    merged["stop_sequences"] = list(merged["stop_sequences"])
    return pb.StoppingCriteriaParameters(**merged)


def _merge(defaults: dict[str, Any], given: dict[str, Any], what: str) -> dict[str, Any]:
    unknown = sorted(set(given) - set(defaults))
    if unknown:
        raise ValidationError(f"unknown {what}(s) {unknown}; known: {sorted(defaults)}")
    return {**defaults, **given}


def warmup_batch(config: RouterConfig) -> pb.Batch:
    """LoRAX's warmup batch: text-only requests of max_input_length tokens worth (the shard tokenizes
    and truncates) filling max_batch_prefill_tokens, with costly sampling options; no blocks."""
    c = config
    requests: list[pb.Request] = []
    n_tokens = 0
    while n_tokens < c.max_batch_prefill_tokens and len(requests) < c.max_batch_size:
        truncate = min(c.max_input_length, c.max_batch_prefill_tokens - n_tokens)
        requests.append(
            pb.Request(
                id=len(requests),
                inputs="_test " * c.max_input_length,
                truncate=truncate,
                prefill_logprobs=True,
                parameters=pb.NextTokenChooserParameters(
                    temperature=0.9, top_k=10, top_p=0.9, typical_p=0.9, repetition_penalty=1.2
                ),
                stopping_parameters=pb.StoppingCriteriaParameters(max_new_tokens=c.max_total_tokens - truncate),
            )
        )
        n_tokens += c.max_input_length
    return pb.Batch(id=0, requests=requests, size=len(requests), max_tokens=len(requests) * c.max_total_tokens)


def health_batch(token_ids: list[int], use_blocks: bool) -> pb.Batch:
    """LoRAX's liveness batch: batch and request id 2^64-1, one prompt token, max_new_tokens 1,
    block 0 (reserved by the router's allocator) and slot 0."""
    request = pb.Request(
        id=HEALTH_ID,
        inputs="liveness",
        tokenized_inputs=pb.TokenizedInputs(ids=token_ids[:1]),
        truncate=1,
        parameters=pb.NextTokenChooserParameters(temperature=1.0, top_p=1.0, typical_p=1.0, repetition_penalty=1.0),
        stopping_parameters=pb.StoppingCriteriaParameters(max_new_tokens=1),
    )
    if use_blocks:
        request.blocks[:] = [0]
        request.slots[:] = [0]
    return pb.Batch(id=HEALTH_ID, requests=[request], size=1, max_tokens=2, max_blocks=1)


def adapter_parameters(adapter: str | Sequence[str] | pb.AdapterParameters) -> pb.AdapterParameters:
    """One adapter id, several ids (a LINEAR merge with equal weights), or full AdapterParameters."""
    if isinstance(adapter, pb.AdapterParameters):
        return adapter
    ids = [adapter] if isinstance(adapter, str) else list(adapter)
    if not ids or not all(ids):
        raise ValidationError(f"invalid adapter id(s) {ids!r}")
    weights = [1.0 / len(ids)] * len(ids) if len(ids) > 1 else []
    return pb.AdapterParameters(adapter_ids=ids, weights=weights, density=1.0 if len(ids) > 1 else 0.0)


def adapter_source(source: str | int) -> int:
    """`"local"` / `"LOCAL"` / `pb.LOCAL` → the AdapterSource enum value."""
    if isinstance(source, int):
        return source
    try:
        return pb.AdapterSource.Value(source.upper())
    except ValueError:
        raise ValidationError(f"unknown adapter source {source!r}; known: {list(pb.AdapterSource.keys())}") from None
