"""The table scripts/bench.py prints last: one row per measured figure (ids of spec/performance.md), with
its target."""

from __future__ import annotations

from typing import Any


def print_table(res: dict[str, Any]) -> None:
    print(
        f"\n{res['card']} | {res['shape']} bf16 | backend {res['backend']} | copy {res['copy_TBps']:.2f} TB/s | "
        f"bf16 matmul {res['matmul_TFLOPs']:.0f} TFLOP/s | weights {res['weight_GB']:.2f} GB"
    )
    print("| id | figure | measured | target |\n|---|---|---|---|")
    base_ctx = min((row.get("ctx", 0) for row in res.get("decode", [])), default=0)
    for row in res.get("decode", []):
        ctx = row.get("ctx", base_ctx)
        if row.get("skipped"):
            print(f"|    | decode b={row['batch']} ctx {ctx}: skipped (its KV does not fit) | - | |")
            continue
        graph = f"{row['graph_ms']:.2f}" if row["graph_ms"] is not None else "-"
        long = ctx > base_ctx
        tag = ("P1L" if row["batch"] in (1, 16) else "  ") if long else ("P1" if row["batch"] == 1 else "  ")
        target = "<= 1.2" if tag == "P1" else ("<= 1.25" if row["batch"] == 1 else "<= 1.3") if tag == "P1L" else ""
        print(
            f"| {tag} | decode b={row['batch']} ctx {ctx}: eager {row['eager_ms']:.2f} ms, graph {graph} ms, floor "
            f"{row['floor_ms']:.2f} ms | step/floor {row['ratio']:.2f} ({row['tok_s']:.0f} tok/s) | {target} |"
        )
    if "prefill" in res:
        p = res["prefill"]
        print(f"| P4 | prefill 8x1024: {p['ms']:.1f} ms, {p['tflops']:.0f} TFLOP/s | MFU {p['mfu']:.2f} | >= 0.6 |")
    if "prefill_long" in res:
        p = res["prefill_long"]
        print(
            f"| P4L | prefill 1x{p['tokens']} (NTK): {p['ms']:.1f} ms, {p['tflops']:.0f} TFLOP/s | MFU {p['mfu']:.2f} "
            "| >= 0.7 |"
        )
    if "rpc" in res:
        r = res["rpc"]
        print(
            f"| P7 | Decode RPC at b={r['batch']}: {r['rpc_ms']:.2f} ms wall vs {r['forward_ms']:.2f} ms forward "
            f"| overhead {r['overhead']:.1%} | <= 10% |"
        )
    for w, rows in res.get("tp", {}).items():
        base = {
            r["batch"]: r for r in res.get("decode", []) if r.get("ctx", base_ctx) == base_ctx and not r.get("skipped")
        }
        for row in rows:
            b1 = base.get(row["batch"])
            t_tp = row["graph_ms"] or row["eager_ms"]
            speed = f"{(b1['graph_ms'] or b1['eager_ms']) / t_tp:.2f}x" if b1 else "-"
            print(
                f"| {'P5' if row['batch'] == 1 and w == 2 else '  '} | TP={w} decode b={row['batch']}: "
                f"{t_tp:.2f} ms (floor/rank {row['floor_ms']:.2f} ms) | speed-up over TP=1 {speed} | "
                f"{'>= 1.6x' if row['batch'] == 1 and w == 2 else ''} |"
            )
    if "lora" in res:
        lo = res["lora"]
        for row in lo.get("decode", []):
            p2 = row["batch"] == 32 and row is max(
                (r for r in lo["decode"] if r["batch"] == 32), key=lambda r: r["ratio"]
            )
            mode = row.get("backend", "triton") + (", shrink || base matmul" if row["overlap"] else "")
            print(
                f"| {'P2' if p2 else '  '} | LoRA decode b={row['batch']}, {row['adapters']} distinct "
                f"rank-{lo['rank']} adapters (r_max {lo['max_rank']}, {mode}): {row['lora_ms']:.2f} ms vs base "
                f"{row['base_ms']:.2f} ms (+{row['extra_ms']:.2f} ms; adapter bytes floor "
                f"{row['lora_floor_ms']:.2f} ms) | {row['ratio']:.3f} | {'>= 0.90' if p2 else ''} |"
            )
        g = lo.get("generate")
        if g:
            print(
                f"| P3 | ours, {g['batch']} x {g['prompt']} prompts + {g['new_tokens']} tokens, {g['adapters']} "
                f"adapters: prefill {g['prefill_ms']:.0f} ms, step {g['step_ms']:.2f} ms | {g['tok_s']:.0f} tok/s "
                f"(decode {g['decode_tok_s']:.0f}) | bench_peer.py |"
            )
        for row in lo.get("load", []):
            print(
                f"| P6 | LoadAdapter rank {row['rank']}, 5 modules, {row['file_dtype']} file {row['file_MB']:.0f} "
                f"MB: cold{'' if row['page_cache_dropped'] else ' (page cache kept)'} / after DownloadAdapter / "
                f"host cache | {row['cold_ms']:.1f} (read {row['cold_read_stage_ms']:.1f}) / "
                f"{row['after_download_ms']:.1f} / {row['cached_ms']:.1f} ms | "
                "<= 100 ms |"
            )
    for key in ("kv", "kv_fp8"):
        if key in res:
            k = res[key]
            twice = (
                f"; {k['cache_tokens'] / res['kv']['cache_tokens']:.2f}x the bf16 cache's tokens"
                if key == "kv_fp8" and "kv" in res
                else ""
            )
            print(
                f"| P8 | KV capacity ({k.get('kv_dtype', 'bfloat16')}) {k['cache_tokens']} tokens of "
                f"{k['ideal_tokens']} ideal ({k['free_gib']:.1f} GiB free); the router is offered "
                f"{k['max_supported_total_tokens']} ({k['max_supported_total_tokens'] / k['ideal_tokens']:.2f})"
                f"{twice} | {k['ratio']:.2f} | >= 0.9 |"
            )
