"""Where a Decode RPC's time goes beyond the forward (P7): one process, the Qwen-7B shape with random bf16
weights, CUDA graphs, a batch of greedy requests with router-allocated KV blocks.

    python scripts/profile_rpc.py --batch 64 --ctx 512
    python scripts/profile_rpc.py --p7       # P7 itself: the shard in its own process, client here
    python scripts/profile_rpc.py --host --ctx 64   # no GPU: the shard's host work per Decode (see host)

--fed off|on|both (default both) picks the look-ahead variant of --p7 and --host: after the stop checks (off),
or fed on the device right after the sampler (on, the served default: EngineConfig.look_ahead_fed,
`serve --look-ahead-fed on`).

Prints, per decode step (medians): the graph replay alone; the Decode call in-process (no gRPC, look-ahead
off) with its input preparation + replay issue (CPU) and sampling (GPU time by events); then the same
Decode through gRPC on a unix socket, client in this process, with the handler's own time and the replay
at that round's context, for look-ahead off, on and fed, one server thread, and a 0.1 ms GIL switch interval;
then the torch profiler's top CPU operations over a few in-process steps.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "scripts"))

import torch  # noqa: E402


def p7(shape: str, batch: int, ctx: int, feds: list[bool]) -> None:
    """P7: a shard process (`worker.cli serve`, its defaults: look-ahead on at TP=1 with CUDA graphs) and a
    gRPC client here, `bench.py`'s P7 row (bench_serving.bench_rpc_overhead: Prefill of `batch` x `ctx`, then
    50 Decodes, median of the last 45). Its Decode walls run at contexts ctx+6 .. ctx+50, so the forward is
    replayed here from a CUDA graph both at ctx (bench.py's figure) and at the median Decode's context. One
    shard process per look-ahead variant in `feds` (fed on the device or not)."""
    from bench import bench_decode
    from bench_common import build_model, with_decode_kernels
    from bench_serving import bench_rpc_overhead
    from worker.distributed import ParallelContext
    from worker.layers.decode_kernels import SERVED

    dev = torch.device("cuda", 0)
    model = build_model(shape, ParallelContext(0, 1, dev), "auto")
    print(f"forward with the shard's decode kernels: {with_decode_kernels(model, ','.join(SERVED))}")
    fwd = {c: bench_decode(model, [batch], c, 16, 1.0, True)[0]["graph_ms"] for c in (ctx, ctx + 28)}
    for fed in feds:
        with tempfile.TemporaryDirectory() as tmp:
            res = bench_rpc_overhead(model, tmp, batch, ctx, fwd[ctx], ["--look-ahead-fed", "on" if fed else "off"])
        wall = res["rpc_ms"]
        variant = "fed on the device" if fed else "after the stop checks"
        print(f"P7, batch {batch}, shard in its own process, look-ahead {variant}: Decode RPC wall {wall:.2f} ms")
        for c, ms in fwd.items():
            print(
                f"  forward (graph replay) at context {c}: {ms:.2f} ms -> overhead (wall - forward) / wall "
                f"{(wall - ms) / wall:.1%} (BENCHMARKS.md's P7, target 10 %), / forward {(wall - ms) / ms:.1%}"
            )


def serve_batch(model: Any, pctx: Any, B: int, ctx: int, new: int, look_ahead: bool | None) -> tuple[Any, Any, Any]:
    """An engine and servicer on `model` (a byte-level tokenizer), warmed up, with a batch of B greedy requests of
    `ctx` prompt tokens and router-allocated blocks for `new` more prefilled: (engine, servicer, its CachedBatch)."""
    from bench_serving import same_prompt_requests
    from demo_tokenizer import train_bpe_ranks, write_tiktoken_file
    from worker.engine.engine import Engine, EngineConfig
    from worker.pb import generate_pb2 as pb
    from worker.server import LoraxServicer
    from worker.tokenizer import QwenTokenizer

    tmp = tempfile.mkdtemp()
    write_tiktoken_file(os.path.join(tmp, "qwen.tiktoken"), train_bpe_ranks("benchmark text", 0))
    tok = QwenTokenizer.from_dir(tmp)
    cfg = EngineConfig(block_size=16, max_total_tokens=2 * B * (ctx + new), look_ahead=look_ahead)
    engine = Engine(model, tok, pctx, cfg)
    servicer = LoraxServicer(engine, os.path.join(tmp, "s"), pctx.device.type)
    ids = [(7 * i) % 400 + 1 for i in range(ctx)]
    warm = pb.Batch(id=0, requests=same_prompt_requests(ids, 1, new))
    servicer.Warmup(
        pb.WarmupRequest(batch=warm, max_input_length=ctx, max_prefill_tokens=8192, max_new_tokens=new), None
    )
    reqs = same_prompt_requests(ids, B, new, (engine.cfg.block_size, ctx + new))
    cached = servicer.Prefill(pb.PrefillRequest(batch=pb.Batch(id=1, requests=reqs, size=B)), None).batch
    return engine, servicer, cached


def host(batch: int, ctx: int, steps: int, fed: bool) -> None:
    """The shard's host work per Decode on the CPU (the `tiny` shape, torch attention, look-ahead on, fed on the
    device or not): the handler, the reply's protobufs and their serialization, less the forwards (timed apart);
    and of it the window the device would idle in, from the sampler's return to the look-ahead's launch. The CPU
    forward is cheap at this shape, so these figures are the Python/protobuf costs that P7 pays on a GPU host
    too."""
    from bench_common import build_model
    from worker.distributed import ParallelContext
    from worker.engine.sampling import BatchSampler
    from worker.pb import generate_pb2 as pb

    torch.set_num_threads(1)
    pctx = ParallelContext()
    model = build_model("tiny", pctx, "torch")
    engine, servicer, cached = serve_batch(model, pctx, batch, ctx, steps + 10, look_ahead=True)
    engine.cfg.look_ahead_fed = fed
    runner, sample = engine.runner, BatchSampler.__call__
    marks: dict[str, float] = {}
    forwards: list[float] = []
    runner_forward = runner.forward

    def forward(*a, **kw):
        t = time.perf_counter()
        marks.setdefault("launch", t)
        out = runner_forward(*a, **kw)
        forwards.append(time.perf_counter() - t)
        return out

    def sampled(*a, **kw):
        out = sample(*a, **kw)
        marks["sampled"] = time.perf_counter()
        return out

    runner.forward = forward  # timing instrumentation
    BatchSampler.__call__ = sampled  # type: ignore[method-assign] # idem
    totals, windows = [], []
    try:
        for _ in range(steps):
            forwards.clear()
            marks.clear()
            request = pb.DecodeRequest(batches=[cached]).SerializeToString()
            t = time.perf_counter()
            resp = servicer.Decode(pb.DecodeRequest.FromString(request), None)
            resp.SerializeToString()
            totals.append(time.perf_counter() - t - sum(forwards))
            windows.append(marks["launch"] - marks["sampled"])  # the look-ahead's forward is the Decode's only one
            cached = resp.batch
    finally:
        BatchSampler.__call__ = sample  # type: ignore[method-assign]
    med = statistics.median
    variant = "fed on the device" if fed else "after the stop checks"
    print(f"CPU host work per Decode, tiny shape, batch {batch}, context {ctx}+, greedy, look-ahead {variant}:")
    print(f"  handler + reply protobufs + serialization, forwards excluded: {med(totals[5:]) * 1e3:.3f} ms")
    print(f"  of it, sampler's return -> look-ahead launch (device idle on a GPU): {med(windows[5:]) * 1e3:.3f} ms")
    if fed:  # no CUDA graph here: the eager launch copies the requests with their token after the ids are read
        print("  (fed: a GPU graph's launch is the ids' copy and the replay; other inputs are filled before sampling)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="7b")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--p7", action="store_true", help="P7 as specified: the shard in its own process (see p7)")
    ap.add_argument("--host", action="store_true", help="the shard's host work per Decode on the CPU (see host)")
    ap.add_argument("--fed", choices=["off", "on", "both"], default="both", help="look-ahead variants (see above)")
    args = ap.parse_args()
    feds = {"off": [False], "on": [True], "both": [False, True]}[args.fed]
    if args.host:
        for fed in feds:
            host(args.batch, args.ctx, args.steps, fed)
        return
    if not torch.cuda.is_available():
        sys.exit("profile_rpc.py needs a CUDA GPU")
    if args.p7:
        p7(args.shape, args.batch, args.ctx, feds)
        return

    import grpc

    from bench_common import build_model
    from worker.distributed import ParallelContext
    from worker.pb import generate_pb2 as pb
    from worker.pb import generate_pb2_grpc as pb_grpc
    from worker.server import make_server

    dev = torch.device("cuda", 0)
    torch.cuda.set_device(dev)
    pctx = ParallelContext(0, 1, dev)
    model = build_model(args.shape, pctx, "triton")
    B, ctx, new = args.batch, args.ctx, 7 * args.steps + 40  # every Decode round below adds a token
    engine, servicer, cached = serve_batch(model, pctx, B, ctx, new, look_ahead=False)  # gRPC rounds compare both
    tmp = tempfile.mkdtemp()  # the gRPC rounds' sockets

    # phases of the in-process Decode
    phases: dict[str, list[float]] = {"prep+issue": [], "sampler_gpu": [], "after_issue": []}
    runner = engine.runner
    assert runner is not None
    runner_forward = runner.forward

    def forward(*a, **kw):
        t = time.perf_counter()
        out = runner_forward(*a, **kw)
        phases["prep+issue"].append(time.perf_counter() - t)
        return out

    runner.forward = forward  # timing instrumentation

    def decode_in_process(n: int) -> list[float]:
        nonlocal cached
        walls = []
        for _ in range(n):
            batch = engine.batches[cached.id]
            sampler = batch.sampler
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)

            def timed_sampler(*a, _s=sampler, _start=start, _end=end, **kw):
                _start.record()
                out = type(_s).__call__(_s, *a, **kw)
                _end.record()
                return out

            batch.sampler = timed_sampler  # timing instrumentation
            t = time.perf_counter()
            resp = servicer.Decode(pb.DecodeRequest(batches=[cached]), None)
            resp.SerializeToString()
            walls.append(time.perf_counter() - t)
            end.synchronize()
            phases["sampler_gpu"].append(start.elapsed_time(end) / 1e3)
            engine.batches[resp.batch.id].sampler = sampler
            cached = resp.batch
        return walls

    decode_in_process(5)
    for v in phases.values():
        v.clear()
    walls = decode_in_process(args.steps)

    def replay_now() -> float:
        """The graph replay alone, back to back, at the batch's current context (rewrites the same KV)."""
        batch = engine.batches[cached.id]
        graphs = runner.graphs
        assert graphs is not None
        for r in batch.requests:
            r.n_cached -= 1
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(20):
            graphs.run(batch, None)
        torch.cuda.synchronize()
        return (time.perf_counter() - t) / 20

    replay = replay_now()

    # through gRPC on a unix socket (client and server in this process): server threads x GIL switch interval
    # the handler's own time, measured inside the gRPC worker thread
    handler_walls: list[float] = []
    decode_handler = servicer.Decode

    def timed_decode(request, context):
        t = time.perf_counter()
        out = decode_handler(request, context)
        handler_walls.append(time.perf_counter() - t)
        return out

    servicer.Decode = timed_decode  # registered by make_server below
    grpc_rows = []
    rounds = ((4, 0.005, False, False), (4, 0.005, None, False), (4, 0.005, None, True), (1, 0.005, False, False))
    for workers, interval, ahead, fed in (*rounds, (4, 1e-4, False, False)):
        sys.setswitchinterval(interval)
        engine.cfg.look_ahead, engine.cfg.look_ahead_fed = ahead, fed
        path = os.path.join(tmp, f"s{workers}{interval}-0")
        server = make_server(servicer, path, workers=workers)
        stub = pb_grpc.LoraxServiceStub(grpc.insecure_channel(f"unix://{path}"))
        grpc_walls = []
        handler_walls.clear()
        for _ in range(args.steps):
            t = time.perf_counter()
            cached = stub.Decode(pb.DecodeRequest(batches=[cached])).batch
            grpc_walls.append(time.perf_counter() - t)
        here = replay_now()  # the forward at this round's final context (it grows a token per step)
        t = time.perf_counter()
        for _ in range(50):
            stub.Info(pb.InfoRequest())
        grpc_rows.append(
            (
                workers,
                interval,
                "off" if ahead is False else "fed" if fed else "on",
                statistics.median(grpc_walls[3:]),
                statistics.median(handler_walls[3:]),
                here,
                (time.perf_counter() - t) / 50,
            )
        )
        server.stop(None)
    sys.setswitchinterval(0.005)

    med = statistics.median
    wall = med(walls)
    print(f"{torch.cuda.get_device_name(dev)}: {args.shape}, batch {B}, context {ctx}, greedy")
    print(f"  graph replay alone              {replay * 1e3:7.2f} ms")
    print(
        f"  Decode in process (no gRPC)     {wall * 1e3:7.2f} ms  (+{(wall - replay) / replay * 100:.1f} % over replay)"
    )
    print(f"    input prep + replay issue     {med(phases['prep+issue']) * 1e3:7.2f} ms (CPU)")
    print(f"    sampler                       {med(phases['sampler_gpu']) * 1e3:7.2f} ms (GPU)")
    for workers, interval, variant, decode, handler, here, info in grpc_rows:
        print(
            f"  through gRPC, look-ahead {variant}, {workers} server threads, GIL switch "
            f"{interval * 1e3:g} ms: Decode {decode * 1e3:.2f} ms, "
            f"its handler {handler * 1e3:.2f} ms, replay at that context {here * 1e3:.2f} ms: "
            f"+{(decode - here) / here * 100:.1f} % (handler +{(handler - here) / here * 100:.1f} %); "
            f"empty RPC round trip {info * 1e3:.2f} ms"
        )

    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        decode_in_process(5)
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))


if __name__ == "__main__":
    main()
