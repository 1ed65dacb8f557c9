"""pb.Request builders for tests that drive a shard or an engine directly (protobuf only, no torch)."""

from __future__ import annotations

from typing import Any

from worker.pb import generate_pb2 as pb

NEUTRAL = {"temperature": 1.0, "top_p": 1.0, "typical_p": 1.0, "repetition_penalty": 1.0}  # no processor on


def greedy_request(rid: int, ids: list[int], max_new: int, **params: Any) -> Any:
    """A pb.Request with the given chooser parameters (greedy by default) that ignores eos unless told."""
    stop = params.pop("stop", [])
    ignore_eos = params.pop("ignore_eos", True)
    request_fields = ("blocks", "slots", "adapter_index", "chunk_len", "prefill_logprobs")
    fields = {k: params.pop(k) for k in list(params) if k in request_fields}
    return pb.Request(
        id=rid,
        inputs="",
        tokenized_inputs=pb.TokenizedInputs(ids=ids),
        parameters=pb.NextTokenChooserParameters(**{**NEUTRAL, **params}),
        stopping_parameters=pb.StoppingCriteriaParameters(
            max_new_tokens=max_new, stop_sequences=stop, ignore_eos_token=ignore_eos
        ),
        **fields,
    )


def paged_request(rid: int, ids: list[int], max_new: int, blocks: list[int], block_size: int, **params: Any) -> Any:
    """`greedy_request` that also carries its KV blocks, one slot per token it can write
    (prompt + max_new - 1), filling the blocks in order."""
    n = len(ids) + max_new - 1
    slots = [b * block_size + j for b in blocks for j in range(block_size)][:n]
    return greedy_request(rid, ids, max_new, blocks=blocks, slots=slots, **params)
