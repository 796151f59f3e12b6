"""RMSNorm (spec §5): y = (w · (x_f32 · rsqrt(mean(x_f32²) + eps))).to(x.dtype).

``weight=None`` gives the unweighted form used for the per-head q normalisation (§7.1 step 3).
The math is fp32 for every input dtype below fp64 (the reference computes the per-head q RMS in
bf16 in place; fp32 math differs from it by at most one bf16 rounding step).
"""

from __future__ import annotations

import torch

from ._checks import check_size, check_tensor


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None = None, eps: float = 1e-6) -> torch.Tensor:
    check_tensor("rms_norm", "x", x, min_dim=1)
    if weight is not None:
        check_tensor("rms_norm", "weight", weight, dim=1)
        check_size("rms_norm", "weight", weight.shape[0], x.shape[-1], "length")
    if eps <= 0:
        raise ValueError(f"rms_norm: eps must be > 0, got {eps}")
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    xf = x.to(compute)
    y = xf * torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + eps)
    if weight is not None:
        y = y * weight.to(compute)
    return y.to(x.dtype)
