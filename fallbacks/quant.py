"""Hadamard transform and the V4 fake-quantisation points (spec §13.2-§13.4, trap 18).

* ``act_quant``: blocks along the last dim, amax ≥ 1e-4, scale = 2^⌈log2(amax · (1/448))⌉ (ue8m0,
  ⌈log2⌉ exact from the fp32 bits), q = clamp(x / scale, ±448) rounded to e4m3 (nearest even).
* ``fp8_fake_quant``: act_quant then multiply back, in x's dtype (KV: blocks of 64 on dims 0:448).
* ``fp4_fake_quant``: amax ≥ 6·2^−126, scale = 2^⌈log2(amax · (1/6))⌉, clamp ±6, round to the
  nearest e2m1 value {0, .5, 1, 1.5, 2, 3, 4, 6} (ties to even), multiply back.
* ``hadamard``: Sylvester-order Walsh-Hadamard over the last dim, scaled by n^−½.
A last block shorter than ``block`` gets its own scale (only small test configs have one).
"""

from __future__ import annotations

import functools

import torch

from ._checks import check_tensor

FP8_MAX = 448.0
FP4_MAX = 6.0
_INV_448 = torch.tensor(1.0 / 448.0, dtype=torch.float32).item()
_INV_6 = torch.tensor(1.0 / 6.0, dtype=torch.float32).item()


def pow2_ceil(v: torch.Tensor) -> torch.Tensor:
    """2^⌈log2 v⌉ for positive fp32 v, exact: frexp gives v = m·2^e with m ∈ [0.5, 1)."""
    m, e = torch.frexp(v)
    e = torch.where(m == 0.5, e - 1, e)
    return torch.ldexp(torch.ones_like(v), e)


def _blocks(x: torch.Tensor, block: int) -> tuple[torch.Tensor, int]:
    if not isinstance(block, int) or block < 1:
        raise ValueError(f"quantisation block must be an integer >= 1, got {block!r}")
    K = x.shape[-1]
    pad = (-K) % block
    xf = x.to(torch.float64 if x.dtype == torch.float64 else torch.float32)  # fp64 stays exact
    if pad:
        # pad with zeros: they never raise a block's amax, so the partial block keeps its own scale
        xf = torch.nn.functional.pad(xf, (0, pad))
    return xf.unflatten(-1, (-1, block)), K


def round_to_e4m3(a: torch.Tensor) -> torch.Tensor:
    """Round (already clamped to ±448) values to the nearest e4m3 value, ties to even, in a's dtype.

    Done arithmetically rather than by ``.to(float8_e4m3fn)`` because PyTorch casts fp64 to fp8
    through fp32, which rounds twice.  e4m3 has 3 mantissa bits and a minimum exponent of −6
    (subnormal spacing 2^−9), so the spacing at |a| is 2^(max(⌊log2|a|⌋, −6) − 3).
    """
    _, e = torch.frexp(a)                              # |a| = m·2^e, m ∈ [0.5, 1)
    step = torch.ldexp(torch.ones_like(a), torch.clamp(e - 1, min=-6) - 3)
    return torch.round(a / step) * step                # exact division by a power of two


def act_quant(x: torch.Tensor, block: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., K] → (q float8_e4m3fn [..., K], scale fp32 [..., ⌈K/block⌉]); x ≈ q · scale."""
    check_tensor("act_quant", "x", x, min_dim=1)
    xb, K = _blocks(x, block)
    amax = xb.abs().amax(dim=-1, keepdim=True).clamp(min=1e-4)
    scale = pow2_ceil(amax * _INV_448)
    q = round_to_e4m3((xb / scale).clamp(-FP8_MAX, FP8_MAX)).to(torch.float8_e4m3fn)  # exact cast
    return q.flatten(-2)[..., :K], scale.squeeze(-1).float()


def fp8_fake_quant(x: torch.Tensor, block: int = 64) -> torch.Tensor:
    """Round x to e4m3 with one power-of-two scale per ``block`` values; same shape and dtype as x."""
    check_tensor("fp8_fake_quant", "x", x, min_dim=1)
    xb, K = _blocks(x, block)
    amax = xb.abs().amax(dim=-1, keepdim=True).clamp(min=1e-4)
    scale = pow2_ceil(amax * _INV_448)
    q = round_to_e4m3((xb / scale).clamp(-FP8_MAX, FP8_MAX)) * scale
    return q.flatten(-2)[..., :K].to(x.dtype)


def round_to_e2m1(a: torch.Tensor) -> torch.Tensor:
    """Round (already clamped to ±6) values to the nearest FP4 e2m1 value, ties to even mantissa."""
    mag = a.abs()
    step = torch.where(mag < 2, 0.5, torch.where(mag < 4, 1.0, 2.0))
    return torch.sign(a) * torch.round(mag / step) * step  # torch.round rounds half to even


def fp4_fake_quant(x: torch.Tensor, block: int = 32) -> torch.Tensor:
    """Round x to FP4 e2m1 with one power-of-two scale per ``block`` values; same shape and dtype."""
    check_tensor("fp4_fake_quant", "x", x, min_dim=1)
    xb, K = _blocks(x, block)
    amax = xb.abs().amax(dim=-1, keepdim=True).clamp(min=FP4_MAX * 2.0 ** -126)
    scale = pow2_ceil(amax * _INV_6)
    q = round_to_e2m1((xb / scale).clamp(-FP4_MAX, FP4_MAX)) * scale
    return q.flatten(-2)[..., :K].to(x.dtype)


@functools.lru_cache(maxsize=16)
def hadamard_matrix(n: int, dtype: torch.dtype = torch.float32, device: str = "cpu") -> torch.Tensor:
    """Sylvester-order H_n / √n (H_{2m} = [[H, H], [H, −H]])."""
    if n < 1 or n & (n - 1):
        raise ValueError(f"hadamard: size must be a power of two, got {n}")
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat((torch.cat((h, h), 1), torch.cat((h, -h), 1)), 0)
    return (h / n ** 0.5).to(dtype=dtype, device=device)


def hadamard(x: torch.Tensor) -> torch.Tensor:
    """Orthonormal Sylvester Hadamard transform over the last dim; fp32 math, x's dtype out."""
    check_tensor("hadamard", "x", x, min_dim=1)
    n = x.shape[-1]
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    h = hadamard_matrix(n, compute, str(x.device))
    return (x.to(compute) @ h).to(x.dtype)  # H is symmetric: x Hᵀ = x H
