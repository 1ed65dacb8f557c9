"""The one-launch rotary tables (worker/kernels/rotary_tables.py) under the Triton interpreter against PyTorch's
(`ops.rotary_cos_sin`, `ops.logn_scale`). The interpreter has no libdevice: pow, cos and sin are numpy's, so cos and
sin agree to an angle error that grows with the position (pow's last bits times the position); logn is float64 both
ways and equal. On CUDA the tables are PyTorch's bit for bit (tests/gpu/test_gpu_fused.py)."""

from __future__ import annotations

import pytest
import torch

from worker.kernels.rotary_tables import rotary_tables, rotary_tables_reference

POSITIONS = torch.tensor([0, 1, 2, 5, 100, 1023, 2047, 2048, 2049, 3000, 8191, 8192, 20000], dtype=torch.long)
ALPHAS = torch.tensor([1.0, 1.0, 2.0, 1.0, 3.5, 1.0, 1.0, 7.25, 1.0, 2.0, 1.0, 16.0, 5.0])


def _close(got: torch.Tensor, want: torch.Tensor) -> None:
    """cos / sin within 4e-6 radians per position (pow through exp and log on numpy) plus float noise."""
    bound = 4e-6 * (POSITIONS.float() + 1)[:, None] + 1e-6
    assert got.shape == want.shape and got.dtype == torch.float32
    assert bool(((got - want).abs() <= bound).all()), (got - want).abs().max()


@pytest.mark.parametrize("rotary_dim", [128, 96, 64])
@pytest.mark.parametrize("with_alpha", [False, True])
@pytest.mark.parametrize("logn", [False, True])
def test_tables_match_pytorch(rotary_dim, with_alpha, logn):
    alpha = ALPHAS if with_alpha else None
    cos, sin, scale = rotary_tables(POSITIONS, alpha, rotary_dim, 10000.0, 2048, logn)
    ref_cos, ref_sin, ref_scale = rotary_tables_reference(POSITIONS, alpha, rotary_dim, 10000.0, 2048, logn)
    _close(cos, ref_cos)
    _close(sin, ref_sin)
    if logn:
        assert scale is not None and ref_scale is not None
        assert torch.equal(scale, ref_scale)
        assert scale[0].item() == 1.0 and scale[-1].item() > 1.29  # log(20001) / log(2048) = 1.2990
    else:
        assert scale is None


def test_alpha_changes_the_base():
    """Each token's alpha scales its own base (NTK): a token with alpha 1 keeps the plain tables."""
    plain, _, _ = rotary_tables(POSITIONS, None, 128, 10000.0, 2048, False)
    ntk, _, _ = rotary_tables(POSITIONS, ALPHAS, 128, 10000.0, 2048, False)
    same = ALPHAS == 1.0
    assert torch.equal(plain[same], ntk[same])
    assert bool((plain[~same] != ntk[~same]).any(dim=1).all())


def test_int32_positions_and_no_tokens():
    cos, sin, _ = rotary_tables(POSITIONS.int(), ALPHAS, 128, 1000000.0, 8192, False)
    ref_cos, ref_sin, _ = rotary_tables_reference(POSITIONS, ALPHAS, 128, 1000000.0, 8192, False)
    _close(cos, ref_cos)
    _close(sin, ref_sin)
    empty = rotary_tables(torch.zeros(0, dtype=torch.long), None, 128, 10000.0, 2048, True)
    assert empty[0].shape == (0, 64) and empty[2] is not None and empty[2].shape == (0,)
