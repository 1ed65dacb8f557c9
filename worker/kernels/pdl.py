"""Programmatic dependent launch (PDL, sm_90+) for our Triton kernels, an opt-in candidate for the batch-1
decode floor (issue 17, P1).

A kernel launched with `launch_pdl=True` may start while the kernel before it on the stream is still running
(inside a CUDA graph too: stream capture keeps the programmatic edge, CUDA 12.3+), so its launch and ramp
overlap the previous kernel's tail. It must therefore call `gdc_wait` (wait for the previous grid to finish
and its writes to be visible) before it reads anything another kernel writes, and before it writes anything:
only loads of data written before the step may come first (weights; see `level` for the rest). `gdc_go` then
lets the next PDL kernel launch; a kernel at level EARLY lets it launch before it waits itself.

Under the Triton interpreter (TRITON_INTERPRET=1) and on devices before sm_90 PDL is off: `active` is False,
the kernels are compiled without the instructions and launched plainly.
"""

from __future__ import annotations

from typing import Any

import torch
import triton
import triton.language as tl


@triton.jit
def gdc_wait(PDL: tl.constexpr):
    """Wait for the previous kernel on the stream (a no-op unless PDL); at PDL == EARLY, first let the next one
    launch."""
    if PDL:
        if PDL == 2:
            tl.extra.cuda.gdc_launch_dependents()
        tl.extra.cuda.gdc_wait()


@triton.jit
def gdc_go(PDL: tl.constexpr):
    """Let the next PDL kernel on the stream launch (a no-op unless PDL == 1: at EARLY, gdc_wait did)."""
    if PDL == 1:
        tl.extra.cuda.gdc_launch_dependents()


# kernels are bound to the Triton interpreter (TRITON_INTERPRET=1) or to the GPU when defined
INTERPRETED = not isinstance(gdc_wait, triton.runtime.JITFunction)


def active(requested: bool, device: torch.device) -> bool:
    """Whether a kernel on `device` launches with PDL: requested, compiled for the GPU, and sm_90 or later."""
    if not requested or INTERPRETED or device.type != "cuda":
        return False
    return torch.cuda.get_device_capability(device)[0] >= 9


def launch_options(pdl: bool) -> dict[str, Any]:
    """The launch keyword for a PDL launch (`pdl` from `active`), else none."""
    return {"launch_pdl": True} if pdl else {}


EARLY = 2  # the PDL level of a kernel that lets the next one launch before it waits itself (see `level`)
# Kernel families launched at EARLY, at decode steps of at most EARLY_MAX_ROWS rows. On the H200 (7B Int4, served
# decode kernels, 512-token contexts; BENCHMARKS.md, 2026-11-30, seventh), before RoPE moved into the CUDA decode
# attention: RoPE + store and RMSNorm at EARLY let that attention (attn_cuda) read its keys during c_attn, the batch-1
# step 1.979-1.986 ms against 2.077 with attn_cuda alone and 2.090-2.092 with neither; at 2 rows (Triton attention
# then) 2.192-2.196 against 2.156-2.161, at 8 rows 4.08-4.09 against 3.97-4.00 (the next kernel's early blocks take
# SMs from the running one). With RoPE inside the attention (served at 1-2 rows) RoPE + store no longer runs there;
# its EARLY stays for the steps where the attention cannot take RoPE (rope_serves). Not measured since: RMSNorm at
# EARLY alone with that attention.
EARLY_GO: set[str] = {"rope_store", "rms_norm"}
EARLY_MAX_ROWS = 1


def level(on: bool, family: str, rows: int) -> int:
    """The PDL constexpr of a launch of `family` over `rows` rows (`on` from `active`): 0 off, 1 on, EARLY where the
    family is in EARLY_GO and rows <= EARLY_MAX_ROWS. At EARLY the next kernel may start while this one's predecessor
    still runs: what that kernel reads before its wait must be written before both (every kernel here reads there
    only weights or data written before the step: adapter slots and pool rows, the CUDA decode attention's lengths,
    tables and all but the newest K/V row)."""
    return 0 if not on else EARLY if family in EARLY_GO and rows <= EARLY_MAX_ROWS else 1
