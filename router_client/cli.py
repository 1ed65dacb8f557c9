"""`qwen-router`: drive running qwen-worker shards from the command line.

    qwen-router generate --uds-path P --model-dir D "prompt" [--adapter ID ...] [--stream] [sampling flags]
    qwen-router load --uds-path P --model-dir D --requests N --concurrency C --max-new-tokens M [--prompt ...]
    qwen-router health --uds-path P
    qwen-router serve --uds-path P --model-dir D [--host 127.0.0.1] [--port 8080] [--api-key K]  (HTTP front)

`--uds-path P` is the worker's socket prefix: shard r listens on `P-r`; the router dials `P-0`.
Everything heavy (grpc stubs, the tokenizer) is imported only when a command runs.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from router_client.cli_args import build_parser, sampling_params


def _start_router(a: argparse.Namespace) -> Any:
    from router_client.model_facts import ModelFacts, read_model_facts
    from router_client.router import Router, RouterConfig

    if not a.model_dir:
        raise SystemExit("error: --model-dir is needed (the router tokenizes prompts to allocate KV blocks)")
    from worker.tokenizer import QwenTokenizer

    tokenizer = QwenTokenizer.from_dir(a.model_dir)
    try:
        facts: ModelFacts | None = read_model_facts(a.model_dir)
    except ValueError as err:  # the router still serves; its log says the prefix cache is off
        print(f"warning: {err}: the prefix cache needs the model's seq_length", file=sys.stderr)
        facts = None
    config = RouterConfig(
        max_input_length=a.max_input_length,
        max_total_tokens=a.max_total_tokens,
        max_batch_prefill_tokens=a.max_batch_prefill_tokens,
        max_batch_size=a.max_batch_size,
        max_batch_total_tokens=a.max_batch_total_tokens,
        warmup=not a.no_warmup,
        call_timeout_s=a.timeout,
        connect_timeout_s=a.connect_timeout,
        chunked_prefill=a.chunked_prefill,
        prefix_caching=a.prefix_caching,
        seq_length=facts.seq_length if facts is not None else None,
        use_dynamic_ntk=facts.use_dynamic_ntk if facts is not None else True,
    )
    return Router.connect(f"{a.uds_path}-0", tokenizer=tokenizer, config=config)


def _load_adapters(router: Any, a: argparse.Namespace) -> list[tuple[str, int]]:
    """(label, adapter_index) per generation target; the base model alone when no --adapter."""
    if not a.adapter:
        return [("base", 0)]
    if a.merge:
        return [("+".join(a.adapter), router.load_adapter(a.adapter, a.adapter_source))]
    return [(aid, router.load_adapter(aid, a.adapter_source)) for aid in a.adapter]


def _result_json(label: str, result: Any) -> dict[str, Any]:
    return {
        "adapter": label,
        "text": result.text,
        "token_ids": result.token_ids,
        "finish_reason": result.finish_reason,
        "generated_tokens": result.generated_tokens,
        "skipped_tokens": result.skipped_tokens,
        "prefill_tokens_length": result.prefill_tokens_length,
        "seed": result.seed,
        "prefill_tokens": [[t.id, t.logprob, t.text] for t in result.prefill_tokens],
        "ttft_s": round(result.ttft_s, 6),
        "latency_s": round(result.latency_s, 6),
    }


def cmd_generate(a: argparse.Namespace) -> int:
    parameters, stopping = sampling_params(a)
    with _start_router(a) as router:
        targets = _load_adapters(router, a)
        handles = [
            (
                label,
                router.submit(
                    a.prompt,
                    dict(parameters),
                    stopping,
                    adapter_index=index,
                    prefill_logprobs=a.prefill_logprobs,
                    truncate=a.truncate,
                ),
            )
            for label, index in targets
        ]
        for label, handle in handles:
            if a.stream and not a.json:
                if len(handles) > 1:
                    print(f"[{label}] ", end="", flush=True)
                for event in handle.stream():
                    print(event.text, end="", flush=True)
                print()
                continue
            result = handle.result()
            if a.json:
                print(json.dumps(_result_json(label, result)))
            else:
                print(f"[{label}] {result.text}" if len(handles) > 1 else result.text)
    return 0


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in [0, 100]) of a non-empty sequence."""
    ordered = sorted(values)
    rank = max(1, -(-len(ordered) * q // 100))
    return ordered[int(min(rank, len(ordered))) - 1]


def cmd_load(a: argparse.Namespace) -> int:
    if a.requests < 1 or a.concurrency < 1:
        raise SystemExit("error: --requests and --concurrency must be >= 1")
    prompts = a.prompt or ["Hello, my name is"]
    parameters, stopping = sampling_params(a)
    with _start_router(a) as router:
        targets = _load_adapters(router, a)

        def one(i: int) -> Any:
            index = targets[i % len(targets)][1]
            return router.generate(
                prompts[i % len(prompts)],
                parameters=dict(parameters),
                stopping=stopping,
                adapter_index=index,
                truncate=a.truncate,
            )

        start = time.perf_counter()
        results, errors = [], []
        with ThreadPoolExecutor(max_workers=a.concurrency) as pool:
            for fut in [pool.submit(one, i) for i in range(a.requests)]:
                try:
                    results.append(fut.result())
                except Exception as err:  # counted and reported, the run goes on
                    errors.append(str(err))
        wall = time.perf_counter() - start
        stats, load = router.stats, router.load()
    tokens = sum(r.generated_tokens for r in results)
    summary: dict[str, Any] = {
        "requests": a.requests,
        "ok": len(results),
        "failed": len(errors),
        "concurrency": a.concurrency,
        "wall_s": round(wall, 4),
        "generated_tokens": tokens,
        "tokens_per_s": round(tokens / wall, 2) if wall > 0 else 0.0,
        "steps": stats.steps,
        "accepted_tokens_per_decode_step": round(stats.accepted_per_step, 4),
        "prefix_cache_hit_rate": round(load.prefix_hit_tokens / max(load.prefix_lookup_tokens, 1), 4),
        "errors": errors[:5],
    }
    for name, values in (("latency_s", [r.latency_s for r in results]), ("ttft_s", [r.ttft_s for r in results])):
        if values:
            summary[name] = {f"p{q}": round(percentile(values, q), 4) for q in (50, 90, 99)}
    if a.json:
        print(json.dumps(summary))
    else:
        print(
            f"requests {summary['ok']}/{a.requests} ok (failed {len(errors)}), concurrency {a.concurrency}, "
            f"wall {wall:.2f}s, {stats.steps} steps"
        )
        print(f"generated tokens {tokens}: {summary['tokens_per_s']} tokens/s")
        print(f"prefix cache: {summary['prefix_cache_hit_rate']:.1%} of prompt tokens reused")
        if load.speculate:
            print(f"speculative decoding: {stats.accepted_per_step:.2f} accepted tokens per decode step")
        for name in ("latency_s", "ttft_s"):
            if name in summary:
                print(f"{name[:-2]:8s} " + "  ".join(f"{k} {v * 1000:.1f} ms" for k, v in summary[name].items()))
        for message in errors[:5]:
            print(f"error: {message}", file=sys.stderr)
    return 0 if not errors else 1


def cmd_health(a: argparse.Namespace) -> int:
    from router_client.client import ShardedClient

    with ShardedClient.connect(f"{a.uds_path}-0", timeout_s=a.timeout, connect_timeout_s=a.timeout) as client:
        for rank, metadata in enumerate(client.health()):
            print(f"shard {rank} ({client.urls[rank]}): ok {json.dumps(metadata)}")
    return 0


def cmd_serve(a: argparse.Namespace) -> int:
    import logging

    from router_client.front.server import serve

    logging.basicConfig(level=a.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return serve(a, _start_router(a))


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    command = {"generate": cmd_generate, "load": cmd_load, "health": cmd_health, "serve": cmd_serve}[args.command]
    try:
        return command(args)
    except KeyboardInterrupt:
        return 130
    except (ConnectionError, RuntimeError, ValueError) as err:  # ShardError, RequestError, ValidationError
        print(f"error: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
