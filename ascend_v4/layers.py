"""Small building blocks shared by the V4 modules: linears with the reference's precision rules
(spec §13.1) and a weighted RMSNorm (§5).

``Linear`` covers the three precision classes of the reference:
* ``kind="fp8"``: weight stored FP8/FP4 in the checkpoint and held here dequantised; with fake
  quantisation on, the activation is rounded to e4m3 in 1×128 blocks first (§13.2), which makes
  x_q @ w_dqᵀ equal the block-scaled FP8 GEMM up to fp32 summation order.
* ``kind="bf16"``: a plain linear in the model dtype (``wo_a``, indexer ``weights_proj``).
* ``kind="fp32"``: fp32 weight on an fp32 input (compressor ``wkv``/``wgate``, gate, head).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import op_adapters as ops


class Linear(nn.Module):
    def __init__(self, in_features: int, out_features: int, *, kind: str = "fp8", dtype: torch.dtype = torch.float32):
        super().__init__()
        if kind not in ("fp8", "bf16", "fp32"):
            raise ValueError(f"Linear kind must be fp8, bf16 or fp32, got {kind!r}")
        self.in_features, self.out_features, self.kind = in_features, out_features, kind
        wdtype = torch.float32 if kind == "fp32" and dtype != torch.float64 else dtype
        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=wdtype), requires_grad=False)
        self.fake_quant = False  # set by the model: round the activation to e4m3 (1×128 blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "fp32":
            return F.linear(x.to(self.weight.dtype), self.weight)
        if self.fake_quant and self.kind == "fp8":
            x = ops.fp8_fake_quant(x, 128)
        return F.linear(x, self.weight)

    def extra_repr(self) -> str:
        return f"{self.in_features} -> {self.out_features}, kind={self.kind}"


class RMSNorm(nn.Module):
    """Weighted RMSNorm; the weight is held in fp32 (fp64 in a float64 model), output in x's dtype."""

    def __init__(self, dim: int, eps: float, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.eps = eps
        wdtype = torch.float64 if dtype == torch.float64 else torch.float32
        self.weight = nn.Parameter(torch.ones(dim, dtype=wdtype), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.rms_norm(x, self.weight, self.eps)


def hp_dtype(dtype: torch.dtype) -> torch.dtype:
    """The 'fp32' precision of the reference for a model running in ``dtype`` (fp64 stays fp64)."""
    return torch.float64 if dtype == torch.float64 else torch.float32
