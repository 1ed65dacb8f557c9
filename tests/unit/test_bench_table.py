"""scripts/bench_table.py: the P1 / P1L decode rows (long contexts, rows skipped when their KV does not fit),
P4L, and TP speed-ups against the base-context row of the same batch."""

from __future__ import annotations

import os
import sys

sys.path.insert(
    0, os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "scripts")
)

from bench_table import print_table  # noqa: E402


def row(batch: int, ctx: int, ms: float) -> dict:
    return dict(batch=batch, ctx=ctx, eager_ms=ms, graph_ms=ms, floor_ms=ms / 2, ratio=2.0, tok_s=batch / ms)


def test_long_context_rows_and_tp_base(capsys):
    res = dict(
        card="card",
        shape="7b",
        backend="triton",
        copy_TBps=4.0,
        matmul_TFLOPs=700.0,
        weight_GB=15.0,
        decode=[row(1, 512, 4.0), row(16, 512, 5.0), row(1, 8192, 8.0), dict(batch=16, ctx=32768, skipped=True)],
        prefill_long=dict(tokens=32768, ms=900.0, tflops=500.0, mfu=0.7),
        tp={2: [dict(batch=1, graph_ms=2.0, eager_ms=3.0, floor_ms=1.0)]},
    )
    print_table(res)
    out = capsys.readouterr().out
    assert "| P1 | decode b=1 ctx 512" in out and "<= 1.2 |" in out
    assert "|    | decode b=16 ctx 512" in out  # batch 16 at the base context is not a spec row
    assert "| P1L | decode b=1 ctx 8192" in out and "<= 1.25 |" in out
    assert "decode b=16 ctx 32768: skipped" in out
    assert "| P4L | prefill 1x32768" in out
    assert "speed-up over TP=1 2.00x" in out  # 4.0 ms at ctx 512, not the 8192 row's 8.0 ms
