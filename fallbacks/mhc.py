"""Manifold-constrained hyper-connections (spec §6.2 HcPre, §6.3 HcPost, §6.4 HcHead, trap 13).

Shapes: the n residual streams are ``x [..., n, d]``; ``hc_fn [(2+n)·n, n·d]`` has rows pre (n),
post (n), res (n², row-major); ``hc_scale [3]`` = (α_pre, α_post, α_res); ``hc_base [(2+n)·n]``.
All mixing is fp32; stream outputs are cast back to x's dtype.
"""

from __future__ import annotations

import torch

from ._checks import check_size, check_tensor


def sinkhorn(logits: torch.Tensor, *, iters: int = 20, eps: float = 1e-6) -> torch.Tensor:
    """V4's Sinkhorn-Knopp: row softmax + eps, column norm, then (row, column) × (iters − 1).

    logits [..., n, n] → fp32 (fp64 for fp64 input) with every column summing to 1 (± eps).
    """
    check_tensor("sinkhorn", "logits", logits, min_dim=2)
    if logits.shape[-1] != logits.shape[-2]:
        raise ValueError(f"sinkhorn: logits must be square in the last two dims, got {tuple(logits.shape)}")
    if not isinstance(iters, int) or iters < 1:
        raise ValueError(f"sinkhorn: iters must be an integer >= 1, got {iters!r}")
    compute = torch.float64 if logits.dtype == torch.float64 else torch.float32
    comb = torch.softmax(logits.to(compute), dim=-1) + eps
    comb = comb / (comb.sum(dim=-2, keepdim=True) + eps)
    for _ in range(iters - 1):  # a fixed count of tiny [n, n] normalisations, not a loop over data
        comb = comb / (comb.sum(dim=-1, keepdim=True) + eps)
        comb = comb / (comb.sum(dim=-2, keepdim=True) + eps)
    return comb


def _check_streams(op: str, x: torch.Tensor, fn: torch.Tensor, base: torch.Tensor, rows: int) -> tuple[int, int]:
    check_tensor(op, "x", x, min_dim=2)
    n, d = x.shape[-2], x.shape[-1]
    check_tensor(op, "fn", fn, dim=2)
    check_tensor(op, "base", base, dim=1)
    if fn.shape != (rows, n * d):
        raise ValueError(f"{op}: fn must have shape [{rows}, {n * d}] for {n} streams of width {d}, "
                         f"got {tuple(fn.shape)}")
    check_size(op, "base", base.shape[0], rows, "length")
    return n, d


def _mix(x: torch.Tensor, fn: torch.Tensor, norm_eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """mix = (x_flat @ fnᵀ) · rsqrt(mean(x_flat²) + eps) in fp32, plus the fp32 streams."""
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    xf = x.to(compute)
    flat = xf.flatten(-2)
    rho = torch.rsqrt(flat.pow(2).mean(dim=-1, keepdim=True) + norm_eps)
    return (flat @ fn.to(compute).T) * rho, xf


def mhc_pre(x: torch.Tensor, hc_fn: torch.Tensor, hc_scale: torch.Tensor, hc_base: torch.Tensor, *,
            norm_eps: float = 1e-6, hc_eps: float = 1e-6, iters: int = 20
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Streams [..., n, d] → (x_in [..., d] in x.dtype, post [..., n] fp32, comb [..., n, n] fp32)."""
    n = x.shape[-2] if x.dim() >= 2 else 0
    n, d = _check_streams("mhc_pre", x, hc_fn, hc_base, (2 + n) * n)
    check_tensor("mhc_pre", "hc_scale", hc_scale, dim=1)
    check_size("mhc_pre", "hc_scale", hc_scale.shape[0], 3, "length")
    mix, xf = _mix(x, hc_fn, norm_eps)
    scale, base = hc_scale.to(mix.dtype), hc_base.to(mix.dtype)
    pre = torch.sigmoid(mix[..., :n] * scale[0] + base[:n]) + hc_eps
    post = 2 * torch.sigmoid(mix[..., n:2 * n] * scale[1] + base[n:2 * n])
    res = (mix[..., 2 * n:] * scale[2] + base[2 * n:]).unflatten(-1, (n, n))
    comb = sinkhorn(res, iters=iters, eps=hc_eps)
    x_in = (pre.unsqueeze(-1) * xf).sum(dim=-2).to(x.dtype)
    return x_in, post, comb


def mhc_post(x: torch.Tensor, h_out: torch.Tensor, post: torch.Tensor, comb: torch.Tensor) -> torch.Tensor:
    """y[..., j, :] = post_j · h_out + Σ_i comb[i, j] · x[..., i, :]  (comb transposed), in x.dtype."""
    check_tensor("mhc_post", "x", x, min_dim=2)
    n, d = x.shape[-2], x.shape[-1]
    check_tensor("mhc_post", "h_out", h_out, min_dim=1)
    check_tensor("mhc_post", "post", post, min_dim=1)
    check_tensor("mhc_post", "comb", comb, min_dim=2)
    if h_out.shape != x.shape[:-2] + (d,):
        raise ValueError(f"mhc_post: h_out must have shape {tuple(x.shape[:-2] + (d,))}, got {tuple(h_out.shape)}")
    if post.shape != x.shape[:-2] + (n,):
        raise ValueError(f"mhc_post: post must have shape {tuple(x.shape[:-2] + (n,))}, got {tuple(post.shape)}")
    if comb.shape != x.shape[:-2] + (n, n):
        raise ValueError(f"mhc_post: comb must have shape {tuple(x.shape[:-2] + (n, n))}, got {tuple(comb.shape)}")
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    y = post.to(compute).unsqueeze(-1) * h_out.to(compute).unsqueeze(-2)
    y = y + comb.to(compute).transpose(-1, -2) @ x.to(compute)
    return y.to(x.dtype)


def mhc_head(x: torch.Tensor, fn: torch.Tensor, scale: torch.Tensor, base: torch.Tensor, *,
             norm_eps: float = 1e-6, hc_eps: float = 1e-6) -> torch.Tensor:
    """Collapse the streams: y = Σ_i (σ(mix_i · scale + base_i) + hc_eps) · x_i → [..., d] in x.dtype."""
    n = x.shape[-2] if x.dim() >= 2 else 0
    _check_streams("mhc_head", x, fn, base, n)
    check_tensor("mhc_head", "scale", scale, dim=1)
    check_size("mhc_head", "scale", scale.shape[0], 1, "length")
    mix, xf = _mix(x, fn, norm_eps)
    pre = torch.sigmoid(mix * scale.to(mix.dtype)[0] + base.to(mix.dtype)) + hc_eps
    return (pre.unsqueeze(-1) * xf).sum(dim=-2).to(x.dtype)
