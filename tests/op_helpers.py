"""Helpers shared by the op tests (tests/test_ops_*.py)."""

from __future__ import annotations

import torch


def assert_matches(out: torch.Tensor, ref: torch.Tensor, tol: dict, what: str = "") -> None:
    """out (any dtype) vs a float64 reference; atol is relative to the reference's largest entry."""
    ref = ref.to(torch.float64)
    scale = float(ref.abs().max()) if ref.numel() else 1.0
    torch.testing.assert_close(out.to(torch.float64), ref, rtol=tol["rtol"], atol=tol["atol"] * max(scale, 1e-30),
                               msg=lambda m: f"{what}: {m}")


def rand(gen, *shape, dtype=torch.float32, scale=1.0):
    """Fresh standard-normal values (drawn in float64, then rounded to ``dtype``)."""
    return (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale).to(dtype)
