"""Request admission: a prompt and its parameters checked against the router's limits before anything
is queued (ValidationError at once, naming what is wrong), and the prefix-cache key a request gets."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from router_client.blocks import blocks_needed, tokens_needed
from router_client.kv import KVBlocks
from router_client.messages import RouterConfig, Tokenizer, sampling_parameters, stopping_parameters
from router_client.prefix_cache import CacheKey, ntk_alpha
from router_client.requests import Pending, ValidationError
from worker.pb import generate_pb2 as pb


@dataclass
class Checked:
    """A request that fits: its text and token ids (truncated), parameters, and the KV it will need."""

    text: str
    ids: list[int]
    sampling: pb.NextTokenChooserParameters
    stop: pb.StoppingCriteriaParameters
    n_blocks: int
    n_tokens: int  # KV token slots: prompt + max_new_tokens - 1 + speculate


@dataclass
class Admission:
    """The limits a request is checked against: the router's config, its tokenizer, and the KV block pool
    the shards offered (`speculate` drafts per step, each needing KV room)."""

    config: RouterConfig
    tokenizer: Tokenizer | None
    blocks: KVBlocks
    speculate: int

    def check(
        self,
        prompt: str | Sequence[int],
        parameters: dict[str, Any] | None,
        stopping: dict[str, Any] | None,
        truncate: int,
    ) -> Checked:
        """Tokenize and truncate the prompt, then check it against max_input_length, max_total_tokens
        and the block pool."""
        c = self.config
        text, ids = tokenize(self.tokenizer, prompt)
        if truncate and truncate < len(ids):
            ids = ids[-truncate:]
        if not ids:
            raise ValidationError("the prompt is empty")
        if len(ids) > c.max_input_length:
            raise ValidationError(
                f"the prompt has {len(ids)} tokens, more than max_input_length {c.max_input_length} "
                "(pass truncate= to keep the last tokens)"
            )
        sampling, stop = sampling_parameters(parameters), stopping_parameters(stopping)
        if len(ids) + stop.max_new_tokens > c.max_total_tokens:
            raise ValidationError(
                f"prompt ({len(ids)}) + max_new_tokens ({stop.max_new_tokens}) exceeds "
                f"max_total_tokens {c.max_total_tokens}"
            )
        block_size, capacity = self.blocks.block_size, self.blocks.capacity
        n_blocks = blocks_needed(len(ids), stop.max_new_tokens, block_size, self.speculate)
        n_tokens = tokens_needed(len(ids), stop.max_new_tokens, self.speculate)
        if n_blocks > capacity:
            raise ValidationError(
                f"the request needs {n_blocks} KV blocks ({n_tokens} tokens) but the pool has "
                f"only {capacity} usable blocks of {block_size}: it can never run"
            )
        return Checked(text, ids, sampling, stop, n_blocks, n_tokens)

    def cache_key(self, p: Pending) -> CacheKey | None:
        """(adapter index, NTK alpha of the whole prompt); None for requests asking for prefill logprobs."""
        c = self.config
        if p.request.prefill_logprobs or c.seq_length is None:
            return None
        return (p.request.adapter_index, ntk_alpha(p.prompt_tokens, c.seq_length, c.use_dynamic_ntk))


def tokenize(tokenizer: Tokenizer | None, prompt: str | Sequence[int]) -> tuple[str, list[int]]:
    """(text, ids) of a text prompt (needs a tokenizer) or of token ids (text decoded when it can be)."""
    if isinstance(prompt, str):
        if tokenizer is None:
            raise ValidationError("a text prompt needs a tokenizer: pass tokenizer= to the Router, or token ids")
        return prompt, list(tokenizer.encode(prompt))
    ids = [int(i) for i in prompt]
    decode = getattr(tokenizer, "decode", None)
    return (decode(ids) if decode is not None else ""), ids
