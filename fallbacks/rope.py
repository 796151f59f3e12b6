"""Interleaved (GPT-J style) rotary embedding on the **last** rope dims (spec §7.3, traps 1-3).

Pair i of y = x[..., -r:] is (y[2i], y[2i+1]), rotated by angle p·θ_i:
    y'[2i]   = y[2i] cos − y[2i+1] sin
    y'[2i+1] = y[2i] sin + y[2i+1] cos
``inverse=True`` rotates by −p·θ_i (the output de-rotation before ``wo_a``).  Math in fp32, result
in x's dtype.  ``rope_frequencies`` gives θ_i with the YaRN blend of §7.3 when ``yarn`` is set.
"""

from __future__ import annotations

import math

import torch

from ._checks import check_tensor


def rope_frequencies(rope_dim: int, base: float, *, yarn_factor: float = 1.0, original_max_position: int = 0,
                     beta_fast: float = 32.0, beta_slow: float = 1.0) -> torch.Tensor:
    """θ_i (fp64, [rope_dim/2]) with the V4 YaRN blend; YaRN is off when factor <= 1 or original length is 0."""
    if rope_dim % 2:
        raise ValueError(f"rope_frequencies: rope_dim must be even, got {rope_dim}")
    half = rope_dim // 2
    theta = base ** (-torch.arange(0, rope_dim, 2, dtype=torch.float64) / rope_dim)
    if yarn_factor <= 1 or original_max_position <= 0:
        return theta

    def corr_dim(n_rot: float) -> float:
        return rope_dim * math.log(original_max_position / (n_rot * 2 * math.pi)) / (2 * math.log(base))

    lo = max(math.floor(corr_dim(beta_fast)), 0)
    hi = min(math.ceil(corr_dim(beta_slow)), rope_dim - 1)
    if lo == hi:
        hi += 0.001  # avoid a zero-width ramp, as the reference does
    ramp = ((torch.arange(half, dtype=torch.float64) - lo) / (hi - lo)).clamp(0, 1)
    smooth = 1 - ramp
    return theta / yarn_factor * (1 - smooth) + theta * smooth


def rope_cos_sin(theta: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables, fp64 [*positions.shape, r/2] (angles exact for large p); ``apply_rope`` rounds
    them once to its compute dtype (fp32, or fp64 for a float64 model)."""
    angles = positions.to(torch.float64).unsqueeze(-1) * theta.to(torch.float64)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *, inverse: bool = False) -> torch.Tensor:
    """Rotate the last ``2·cos.shape[-1]`` dims of x; cos/sin broadcast against x[..., :r/2].

    Typical shapes: x [B, S, H, D] with cos/sin [B, S, 1, r/2] or [S, 1, r/2]; x [B, N, D] with
    cos/sin [B, N, r/2] or [N, r/2].
    """
    check_tensor("apply_rope", "x", x, min_dim=1)
    check_tensor("apply_rope", "cos", cos, min_dim=1)
    check_tensor("apply_rope", "sin", sin, min_dim=1)
    if cos.shape != sin.shape:
        raise ValueError(f"apply_rope: cos {tuple(cos.shape)} and sin {tuple(sin.shape)} differ in shape")
    half = cos.shape[-1]
    r = 2 * half
    if r > x.shape[-1]:
        raise ValueError(f"apply_rope: {r} rope dims exceed the last dim of x ({x.shape[-1]})")
    try:
        torch.broadcast_shapes(x.shape[:-1] + (half,), cos.shape)
    except RuntimeError:
        raise ValueError(f"apply_rope: cos/sin shape {tuple(cos.shape)} does not broadcast against "
                         f"x {tuple(x.shape)} (expected [..., {half}])") from None
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    y = x[..., -r:].to(compute).unflatten(-1, (half, 2))
    c, s = cos.to(compute), sin.to(compute)
    if inverse:
        s = -s
    a, b = y[..., 0], y[..., 1]
    rotated = torch.stack((a * c - b * s, a * s + b * c), dim=-1).flatten(-2).to(x.dtype)
    if r == x.shape[-1]:
        return rotated
    return torch.cat((x[..., :-r], rotated), dim=-1)
