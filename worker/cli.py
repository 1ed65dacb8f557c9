"""`qwen-worker serve MODEL_DIR --uds-path PATH [...]`: one shard of the model, serving LoRAX's gRPC
contract on `unix://PATH-{RANK}`. Rank and world size come from the torchrun environment."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from worker.layers.decode_kernels import DecodeKernels
    from worker.models.qwen import FlashQwenForCausalLM
    from worker.tokenizer import QwenTokenizer

# LoRAX launcher flags accepted for drop-in use but without effect here (each is logged once).
IGNORED_FLAGS = {
    "--sharded": "sharding follows WORLD_SIZE from the launcher",
    "--trust-remote-code": "no remote code is ever run; Qwen v1 is implemented natively",
    "--revision": "models are read from a local directory only",
    "--compile": "use CUDA graphs (default on GPU) instead",
    "--otlp-endpoint": "no OpenTelemetry exporter",
    "--source": "models are read from a local directory only",
    "--merge-lora": "adapters are applied at run time",
}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return json.dumps(
            {
                "ts": round(record.created, 3),
                "level": record.levelname,
                "logger": record.name,
                "msg": record.getMessage(),
            }
        )


def setup_logging(level: str, json_logs: bool, rank: int) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        JsonFormatter()
        if json_logs
        else logging.Formatter(f"%(asctime)s %(levelname)s [shard {rank}] %(name)s: %(message)s")
    )
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)


def build_parser() -> argparse.ArgumentParser:
    from worker.layers.decode_kernels import CANDIDATES, SERVED
    from worker.layers.lora import LORA_DECODE

    ap = argparse.ArgumentParser(prog="qwen-worker", description=__doc__)
    sub = ap.add_subparsers(dest="command", required=True)
    s = sub.add_parser("serve", help="serve one shard")
    s.add_argument("model_dir", help="directory with config.json, safetensors and qwen.tiktoken")
    s.add_argument("--uds-path", default="/tmp/qwen-worker", help="socket path prefix: shard r binds PATH-r")
    s.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "bfloat16", "float16", "float32"],
        help="weights/activations dtype (auto: bf16 on GPU, fp32 on CPU)",
    )
    s.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    s.add_argument(
        "--quantize",
        default="auto",
        choices=["auto", "none", "gptq", "fp8"],
        help="auto: GPTQ Int4/Int8 when the checkpoint has a quantization_config (config.json or "
        "quantize_config.json), else unquantized; gptq: require one; fp8: quantize a float checkpoint's five "
        "linears per block to e4m3 at load (per-output-channel scales, per-token activation scales)",
    )
    s.add_argument("--block-size", type=int, default=16, help="KV cache block size in tokens")
    s.add_argument(
        "--max-total-tokens",
        type=int,
        default=0,
        help="KV token slots per shard (0: from free GPU memory after Warmup; 16384 on CPU)",
    )
    s.add_argument("--memory-fraction", type=float, default=0.9, help="share of free GPU memory for the KV cache")
    s.add_argument(
        "--kv-cache-dtype",
        default="auto",
        choices=["auto", "bfloat16", "float16", "float32", "fp8_e4m3", "fp8"],
        help="KV cache dtype (auto: the model dtype). fp8_e4m3 (alias fp8) halves the KV bytes of "
        "bf16: per-layer K/V scales come from the checkpoint (transformer.h.N.attn.k_scale / "
        "v_scale) when present, else from Warmup's prefill (max |k|, |v| per layer)",
    )
    s.add_argument(
        "--kv-scale-margin",
        type=float,
        default=2.0,
        help="fp8 KV calibrated at Warmup: scale = margin x max|x| / 448, so values up to margin "
        "times Warmup's largest fit before they clamp",
    )
    s.add_argument("--eager", action="store_true", help="no CUDA graphs for decode")
    s.add_argument(
        "--look-ahead",
        choices=["auto", "on", "off"],
        default="auto",
        help="start each batch's next decode forward before replying, so the reply, the router and the "
        "next Decode overlap the GPU (auto: where CUDA graphs serve the batch, TP=1 only)",
    )
    s.add_argument(
        "--look-ahead-fed",
        choices=["on", "off"],
        default="on",
        help="on: launch the look-ahead right after the sampler, its ids fed on the GPU, before the host reads "
        "them (plain decode steps); off: the look-ahead starts after the stop checks",
    )
    s.add_argument(
        "--no-chunked-prefill",
        action="store_true",
        help="refuse Request.chunk_len and report Info.chunked_prefill=false (the router then prefills new "
        "batches whole and alone)",
    )
    s.add_argument(
        "--max-seq-len",
        type=int,
        default=16384,
        help="longest context served from CUDA graphs (longer ones decode eagerly)",
    )
    s.add_argument(
        "--decode-kernels",
        type=decode_kernels,
        default=",".join(SERVED),
        help="decode kernel choices (worker/layers/decode_kernels.py): 'none' (today's kernels) or a comma list of "
        f"{', '.join(CANDIDATES)}; default: the set measured faster and exact on an H200. CUDA only "
        "(pdl on sm_90+); the chosen set is logged",
    )
    s.add_argument("--attention-backend", default="auto", choices=["auto", "torch", "triton"])
    s.add_argument("--adapter-root", default=None, help="directory LOCAL adapters are resolved under")
    s.add_argument("--max-lora-rank", type=int, default=64, help="largest adapter rank a slot holds")
    s.add_argument(
        "--lora-pool-rank",
        type=int,
        default=None,
        help="the adapter pools' lanes a slot at start-up (default 16, at most --max-lora-rank). Every decode step "
        "reads every slot's lanes, so the pools start small and grow (to the next power of two, up to "
        "--max-lora-rank) when a larger adapter loads; that LoadAdapter also re-captures the decode graphs with "
        "adapters (logged). Set it to the largest rank you serve to have no re-capture while serving",
    )
    s.add_argument(
        "--lora-backend",
        default="auto",
        choices=["auto", "torch", "triton"],
        help="mixed-adapter matmuls: triton (segmented shrink/expand kernels that skip unused rank, "
        "captured in the decode CUDA graphs), torch (batched bmm over gathered slots), or auto: "
        "triton on CUDA when it imports, else torch",
    )
    s.add_argument("--max-adapter-slots", type=int, default=8, help="adapters resident at once (the pool size)")
    s.add_argument(
        "--lora-decode",
        default="auto",
        choices=LORA_DECODE,
        help="Triton LoRA at decode (batches over 8 rows): gemm (the shrink inside the base matmul, whose weight "
        "shares one allocation with its A pool; one expand), side (shrink and expand on a side stream beside "
        "the base matmul, then an add), auto: gemm on float linears whose A rows add at most 55%% to the matmul "
        "(25%% past 32 lanes a slot in the pools, --lora-pool-rank), and up to 64 lanes a slot",
    )
    s.add_argument(
        "--allow-bin-adapters",
        action="store_true",
        help="also read adapter_model.bin (weights-only torch.load); default: safetensors only",
    )
    s.add_argument(
        "--preloaded-adapter-ids",
        default="",
        help="comma-separated adapter ids loaded at start-up as indices 1..n (reported in Info)",
    )
    s.add_argument(
        "--speculative-adapter",
        default=None,
        help="Medusa heads (v1 or v2) used as every request's speculator: a directory relative to "
        "--adapter-root or absolute under it",
    )
    s.add_argument(
        "--speculative-tokens",
        type=speculative_tokens,
        default=0,
        help="drafts verified per step (Info.speculate), 0..16: prompt lookup (n-gram) drafts for requests without "
        "Medusa heads; with a Medusa speculator, caps its K heads' drafts",
    )
    s.add_argument("--max-batch-size", type=int, default=0, help="reject larger batches (0: no limit)")
    s.add_argument("--dist-timeout", type=float, default=600.0, help="seconds before a collective gives up")
    s.add_argument("--log-level", default="info")
    s.add_argument("--json-logs", action="store_true")
    return ap


def speculative_tokens(value: str) -> int:
    """--speculative-tokens: an integer in [0, MAX_SPECULATIVE_TOKENS], else argparse's error naming it."""
    from worker.engine.speculative import check_tokens

    try:
        n = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not an integer") from None
    try:
        return check_tokens(n)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def decode_kernels(value: str) -> DecodeKernels:
    """--decode-kernels: 'none' or a comma list of DecodeKernels fields, else argparse's error naming it."""
    from worker.layers.decode_kernels import parse_decode_kernels

    try:
        return parse_decode_kernels(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def split_ignored(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """Drop LoRAX flags we accept but ignore (with their value, if any)."""
    kept, ignored, i = [], [], 0
    argv = list(argv)
    while i < len(argv):
        flag = argv[i].split("=", 1)[0]
        if flag in IGNORED_FLAGS:
            ignored.append(flag)
            if "=" not in argv[i] and i + 1 < len(argv) and not argv[i + 1].startswith("--"):
                i += 1
        else:
            kept.append(argv[i])
        i += 1
    return kept, ignored


def serve(args: argparse.Namespace, env: dict[str, str]) -> int:
    import torch

    from worker.distributed import init_from_env, shutdown
    from worker.engine.engine import Engine, EngineConfig
    from worker.engine.kv_cache import parse_kv_dtype
    from worker.layers.attention import make_backend
    from worker.layers.decode_kernels import where_applies
    from worker.models.qwen import FlashQwenForCausalLM
    from worker.server import LoraxServicer, make_server, serve_forever
    from worker.weights import torch_dtype

    log = logging.getLogger("worker")
    if not args.kv_scale_margin > 0:
        raise SystemExit(f"--kv-scale-margin must be positive, got {args.kv_scale_margin}")
    pctx = init_from_env(env, args.device, args.dist_timeout)
    dtype = (
        (torch.bfloat16 if pctx.device.type == "cuda" else torch.float32)
        if args.dtype == "auto"
        else torch_dtype(args.dtype)
    )
    backend = make_backend(args.attention_backend, pctx.device)
    log.info(
        "rank %d/%d on %s, dtype %s, attention backend %s", pctx.rank, pctx.world_size, pctx.device, dtype, backend.name
    )
    t0 = time.time()
    tokenizer = checked_tokenizer(args.model_dir)  # before the weights: a clear refusal, fast
    kernels = where_applies(args.decode_kernels, pctx.device, fused=backend.name == "triton")
    log.info("decode kernels: %s (asked: %s)", kernels.describe(), args.decode_kernels.describe())
    model = FlashQwenForCausalLM.from_pretrained(
        args.model_dir, pctx, dtype, backend, quantize=args.quantize, decode_kernels=kernels
    )
    log.info(
        "model loaded in %.1fs: %d layers, hidden %d, vocab %d",
        time.time() - t0,
        model.config.num_hidden_layers,
        model.config.hidden_size,
        model.config.vocab_size,
    )
    if args.speculative_adapter:
        attach_speculator(args, model)
    adapters = None
    if args.adapter_root:
        from worker.adapters.pool import AdapterManager

        adapters = AdapterManager.from_args(
            args, model, pctx, triton_interpreter=os.environ.get("TRITON_INTERPRET") == "1"
        )
    kv_dtype = parse_kv_dtype(args.kv_cache_dtype)
    engine = Engine(
        model,
        tokenizer,
        pctx,
        EngineConfig(
            block_size=args.block_size,
            kv_cache_dtype=kv_dtype,
            max_total_tokens=args.max_total_tokens,
            memory_fraction=args.memory_fraction,
            max_batch_size=args.max_batch_size,
            cuda_graphs=not args.eager,
            look_ahead={"auto": None, "on": True, "off": False}[args.look_ahead],
            look_ahead_fed=args.look_ahead_fed == "on",
            max_seq_len=args.max_seq_len,
            chunked_prefill=not args.no_chunked_prefill,
            kv_scale_margin=args.kv_scale_margin,
            speculative_tokens=args.speculative_tokens,
        ),
        adapters,
    )
    if adapters is not None:
        adapters.attach(engine)
        adapters.preload([a for a in args.preloaded_adapter_ids.split(",") if a])
    socket_path = f"{args.uds_path}-{pctx.rank}"
    servicer = LoraxServicer(engine, args.uds_path, pctx.device.type, adapters)
    server = make_server(servicer, socket_path)
    log.info("serving on unix://%s", socket_path)
    try:
        serve_forever(server, socket_path, health=servicer.health)
    finally:
        engine.close()  # its CUDA graphs go before the process group (distributed.shutdown)
        shutdown(pctx)
    return 0


def attach_speculator(args: argparse.Namespace, model: FlashQwenForCausalLM) -> None:
    """The base Medusa speculator (--speculative-adapter); a bad one stops the start with ConfigError."""
    from worker.adapters.medusa import load_speculator
    from worker.config import ConfigError
    from worker.errors import WorkerError

    try:
        model.attach_medusa(load_speculator(args.adapter_root, args.speculative_adapter, model.config))
    except WorkerError as exc:
        raise ConfigError(f"--speculative-adapter {args.speculative_adapter}: {exc}") from exc


def checked_tokenizer(model_dir: str) -> QwenTokenizer:
    """The checkpoint's tokenizer, once config.json is valid and has a row for every one of its tokens
    (else ConfigError naming the files)."""
    from worker.config import ConfigError, QwenConfig
    from worker.tokenizer import QwenTokenizer

    config = QwenConfig.from_pretrained(model_dir)
    tokenizer = QwenTokenizer.from_dir(model_dir)
    tiktoken_file = os.path.join(model_dir, "qwen.tiktoken")
    tokenizer_file = tiktoken_file if os.path.isfile(tiktoken_file) else os.path.join(model_dir, "tokenizer.json")
    try:
        config.check_tokenizer(tokenizer.n_real_vocab, tokenizer_file)
    except ConfigError as exc:
        raise ConfigError(f"{os.path.join(model_dir, 'config.json')}: {exc}") from exc
    return tokenizer


def main(argv: Sequence[str] | None = None) -> int:
    from worker.distributed import env_snapshot

    argv = list(sys.argv[1:] if argv is None else argv)
    argv, ignored = split_ignored(argv)
    args = build_parser().parse_args(argv)
    env = env_snapshot()
    setup_logging(args.log_level, args.json_logs, int(env.get("RANK", "0")))
    for flag in ignored:
        logging.getLogger("worker").warning("ignoring %s: %s", flag, IGNORED_FLAGS[flag])
    if args.command == "serve":
        from worker.config import ConfigError
        from worker.weights import WeightError

        try:
            return serve(args, env)
        except (ConfigError, WeightError, FileNotFoundError) as exc:  # a checkpoint that cannot be served
            logging.getLogger("worker").error("cannot serve %s: %s", args.model_dir, exc)
            return 1
    return 2


if __name__ == "__main__":
    sys.exit(main())
