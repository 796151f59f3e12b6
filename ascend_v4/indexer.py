"""Lightning indexer of CSA layers (spec §9): picks the compressed entries each query attends to.

qI = wq_b(q_lat) → [n_I, c_I]; RoPE on the last r dims; Hadamard; FP4 fake quant (when on).
w  = weights_proj(x) · c_I^−½ · n_I^−½.
Keys come from the indexer's own CSA compressor (D = c_I, Hadamard + FP4 on its entries).
Scores Σ_h w_h·ReLU(qI_h·K_s) over the entries s < ⌊(p+1)/4⌋, top-k (k_I) padded with −1.
"""

from __future__ import annotations

import torch
from torch import nn

import op_adapters as ops

from .cache import CompressorState
from .compressor import Compressor
from .config import ModelConfig
from .context import StepContext
from .layers import Linear


class Indexer(nn.Module):
    def __init__(self, config: ModelConfig, dtype: torch.dtype):
        super().__init__()
        self.n_heads, self.head_dim, self.topk = config.index_n_heads, config.index_head_dim, config.index_topk
        self.rope_dim = config.qk_rope_head_dim
        self.wq_b = Linear(config.q_lora_rank, self.n_heads * self.head_dim, kind="fp8", dtype=dtype)
        self.weights_proj = Linear(config.hidden_size, self.n_heads, kind="bf16", dtype=dtype)
        self.compressor = Compressor(config.hidden_size, self.head_dim, 4, rope_dim=self.rope_dim,
                                     eps=config.rms_norm_eps, rotate=True, dtype=dtype)
        self.weight_scale = self.head_dim ** -0.5 * self.n_heads ** -0.5

    def forward(self, x: torch.Tensor, q_lat: torch.Tensor, ctx: StepContext, state: CompressorState) -> torch.Tensor:
        """Top-k entry indices [B, S, min(k_I, N)] (−1 = none) into ``state.entries``."""
        B, S, _ = x.shape
        counts = self.compressor(x, ctx, state)          # emits keys completed by these tokens first
        q = self.wq_b(q_lat).view(B, S, self.n_heads, self.head_dim)
        cos, sin = ctx.rope_for(4)
        q = ops.apply_rope(q, cos.unsqueeze(2), sin.unsqueeze(2))
        q = ops.hadamard(q)
        if ctx.fake_quant:
            q = ops.fp4_fake_quant(q, 32)
        w = self.weights_proj(x) * self.weight_scale
        n = int(counts.max())
        keys = state.entries[:, :n]
        return ops.lightning_indexer(q, keys, w, ctx.positions, topk=self.topk, ratio=4)
