"""The SUMMARY block of scripts/gpu_check_lora.py: what a person reads to decide the P2 default."""

from __future__ import annotations

from typing import Any


def summary(
    passed: dict[str, bool],
    res: dict[str, Any],
    modes: dict[str, tuple[str, int | None, int]],
    p2_base: float,
    p2_lora: float,
) -> None:
    """What a person acts on: correctness (`passed`), the best kernels alone and the best LoraTerm mode of
    `modes` in the step proxy (`res`), with P2 projected from its last in-model measurement
    (p2_base / p2_lora ms) minus the mode's saving over today's "side"."""
    print("\nSUMMARY")
    fails = [n for n, ok in passed.items() if not ok]
    print(f"  correctness (bf16 vs reference): {len(passed) - len(fails)} PASS, FAIL: {fails or 'none'}")
    if "alone" in res:
        now, mixed, best = res["alone"]
        print(f"  (1) term alone, 32 layers: two (now) {now:.3f} ms; best per module {mixed:.3f} ms {best}")
        print("      target: <= 0.78 ms in the step (the adapters' bytes at 4.2 TB/s: ~0.55 ms)")
    rows, base = res.get("modes", {}), res.get("base")
    if base is None or "now: side" not in rows:
        print("  (2) step proxy not measured")
        return
    now_ms = rows["now: side"][0]
    for label, (ms, diff) in rows.items():  # the floor is no mode: its diff is not a finding
        saving = now_ms - ms
        p2 = p2_base / (p2_lora - saving)
        print(f"  (2) {label:24s} extra {ms - base:6.3f} ms  ratio {base / ms:.3f}  proj. P2 {p2:.3f}  diff {diff:.4f}")
    if "floor: base + add" in rows:  # what fusing the add into its consumer (act, rotary, residual norm) could save
        print(f"  the add per module alone costs {rows['floor: base + add'][0] - base:.3f} ms per step (fusion bound)")
    if "composed" in res:
        per, ms = res["composed"]
        p2 = p2_base / (p2_lora - now_ms + ms)
        print(f"  (2) composed best mode per module: extra {ms - base:.3f} ms  proj. P2 {p2:.3f}")
        print(f"      {per}")
        best_ms = min(ms_ for label, (ms_, _) in rows.items() if label in modes)
        if ms < 0.98 * best_ms:
            print("      (beats every single mode by > 2 %: pick the mode per target key in SlotPool.wrap_targets)")
    best = res.get("best_mode")
    if best and best != "now: side" and not fails and rows[best][0] < 0.98 * now_ms and rows[best][1] < 0.02:
        decode, priority, per_sm = modes[best]
        print(
            f"  ACTION: {best} is faster: SlotPool.wrap_targets decode={decode!r}, per_sm={per_sm}; side stream "
            f"priority {priority} (worker/adapters/pool.py makes it); then confirm with scripts/bench_lora.py"
        )
    else:
        print(f"  ACTION: keep 'side' (best mode {best}: not 2 % faster, or not exact)")
