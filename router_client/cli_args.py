"""The argument parser of `qwen-router` (router_client/cli.py): the flags every command shares (the shards,
the router's limits, adapters), the sampling flags, and each command's own.
"""

from __future__ import annotations

import argparse
from typing import Any

DESCRIPTION = "`qwen-router`: drive running qwen-worker shards from the command line."


def _router_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--uds-path", required=True, help="socket prefix of the shards (shard 0 is at P-0)")
    p.add_argument("--model-dir", help="model directory, for the tokenizer (qwen.tiktoken / tokenizer.json)")
    p.add_argument("--max-input-length", type=int, default=1024)
    p.add_argument("--max-total-tokens", type=int, default=2048)
    p.add_argument("--max-batch-prefill-tokens", type=int, default=4096)
    p.add_argument("--max-batch-size", type=int, default=256)
    p.add_argument(
        "--max-batch-total-tokens",
        type=int,
        default=None,
        help="KV tokens to assume when Warmup is skipped or answers none",
    )
    p.add_argument("--no-warmup", action="store_true", help="skip Warmup (needs --max-batch-total-tokens)")
    p.add_argument(
        "--prefix-caching",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="reuse the KV blocks of prompt prefixes computed before (keyed by adapter and NTK alpha)",
    )
    p.add_argument(
        "--chunked-prefill",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="split long prompts into chunks of --max-batch-prefill-tokens when the shards offer it",
    )
    p.add_argument("--timeout", type=float, default=120.0, help="deadline of each RPC, seconds")
    p.add_argument("--connect-timeout", type=float, default=60.0)
    p.add_argument(
        "--adapter",
        action="append",
        default=[],
        metavar="ID",
        help="adapter id to load (repeatable; generate runs the prompt once per adapter)",
    )
    p.add_argument("--adapter-source", default="local", choices=["local", "hub", "s3", "pbase"])
    p.add_argument("--merge", action="store_true", help="merge the --adapter ids into one adapter (LINEAR)")


def _sampling_args(p: argparse.ArgumentParser, max_new_tokens: int) -> None:
    p.add_argument("--max-new-tokens", type=int, default=max_new_tokens)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--typical-p", type=float, default=1.0)
    p.add_argument("--do-sample", action="store_true")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--frequency-penalty", type=float, default=0.0)
    p.add_argument("--presence-penalty", type=float, default=0.0)
    p.add_argument("--return-k-alternatives", type=int, default=0)
    p.add_argument("--stop", action="append", default=[], metavar="TEXT", help="stop sequence (repeatable)")
    p.add_argument("--ignore-eos", action="store_true", help="generate past EOS (benchmarking)")
    p.add_argument("--truncate", type=int, default=0, help="keep only the last N prompt tokens")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qwen-router", description=DESCRIPTION)
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="generate text for one prompt")
    _router_args(gen)
    _sampling_args(gen, max_new_tokens=32)
    gen.add_argument("prompt")
    gen.add_argument("--stream", action="store_true", help="print tokens as they arrive")
    gen.add_argument("--prefill-logprobs", action="store_true")
    gen.add_argument("--json", action="store_true", help="one JSON object per result on stdout")
    load = sub.add_parser("load", help="a load test: N requests, C in flight; tokens/s and latencies")
    _router_args(load)
    _sampling_args(load, max_new_tokens=64)
    load.add_argument("--requests", type=int, default=64)
    load.add_argument("--concurrency", type=int, default=8)
    load.add_argument("--prompt", action="append", default=[], help="prompt(s), used round-robin")
    load.add_argument("--json", action="store_true", help="print the summary as JSON")
    serve = sub.add_parser("serve", help="serve LoRAX's REST API and OpenAI's API over HTTP")
    _router_args(serve)
    from router_client.front.server import add_serve_args

    add_serve_args(serve)
    health = sub.add_parser("health", help="Health on every shard (no warmup)")
    health.add_argument("--uds-path", required=True)
    health.add_argument("--timeout", type=float, default=10.0)
    return parser


def sampling_params(a: argparse.Namespace) -> tuple[dict[str, Any], dict[str, Any]]:
    """(parameters, stopping) of a request, as the router takes them, from the sampling flags."""
    parameters = {
        "temperature": a.temperature,
        "top_k": a.top_k,
        "top_p": a.top_p,
        "typical_p": a.typical_p,
        "do_sample": a.do_sample,
        "seed": a.seed,
        "repetition_penalty": a.repetition_penalty,
        "frequency_penalty": a.frequency_penalty,
        "presence_penalty": a.presence_penalty,
        "return_k_alternatives": a.return_k_alternatives,
    }
    stopping = {"max_new_tokens": a.max_new_tokens, "stop_sequences": a.stop, "ignore_eos_token": a.ignore_eos}
    return parameters, stopping
