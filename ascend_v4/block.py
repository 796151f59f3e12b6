"""One V4 transformer block with manifold-constrained hyper-connections (spec §5, §6).

    (x, post, comb) = HcPre(X; hc_attn_*)      X: [B, S, n_hc, d] residual streams
    X = HcPost(Attn(attn_norm(x)), X, post, comb)
    (x, post, comb) = HcPre(X; hc_ffn_*)
    X = HcPost(MoE(ffn_norm(x), ids), X, post, comb)

The streams stay in the model dtype between sub-layers (bf16 in production); mixing is fp32.
Attribute names mirror the official checkpoint (``hc_attn_fn``, ``attn_norm``, ``attn``, ``ffn``).
"""

from __future__ import annotations

import torch
from torch import nn

import op_adapters as ops

from .attention import Attention
from .cache import LayerCache
from .config import ModelConfig
from .context import StepContext
from .layers import RMSNorm, hp_dtype
from .moe import MoE


class HcHead(nn.Module):
    """Collapse of the streams before the final norm (§6.4); parameters ``hc_head_{fn,base,scale}``."""

    def __init__(self, config: ModelConfig, dtype: torch.dtype):
        super().__init__()
        n, d = config.hc_mult, config.hidden_size
        f = hp_dtype(dtype)
        self.hc_head_fn = nn.Parameter(torch.zeros(n, n * d, dtype=f), requires_grad=False)
        self.hc_head_base = nn.Parameter(torch.zeros(n, dtype=f), requires_grad=False)
        self.hc_head_scale = nn.Parameter(torch.zeros(1, dtype=f), requires_grad=False)
        self.norm_eps, self.hc_eps = config.rms_norm_eps, config.hc_eps

    def collapse(self, X: torch.Tensor) -> torch.Tensor:
        return ops.mhc_head(X, self.hc_head_fn, self.hc_head_scale, self.hc_head_base,
                            norm_eps=self.norm_eps, hc_eps=self.hc_eps)


class Block(nn.Module):
    def __init__(self, config: ModelConfig, layer_id: int, ratio: int, dtype: torch.dtype):
        super().__init__()
        n, d = config.hc_mult, config.hidden_size
        rows = (2 + n) * n
        f = hp_dtype(dtype)
        self.layer_id, self.ratio = layer_id, ratio
        self.attn_norm = RMSNorm(d, config.rms_norm_eps, dtype)
        self.ffn_norm = RMSNorm(d, config.rms_norm_eps, dtype)
        self.attn = Attention(config, ratio, dtype)
        self.ffn = MoE(config, config.is_hash_layer(layer_id), dtype)
        for part in ("attn", "ffn"):
            setattr(self, f"hc_{part}_fn", nn.Parameter(torch.zeros(rows, n * d, dtype=f), requires_grad=False))
            setattr(self, f"hc_{part}_base", nn.Parameter(torch.zeros(rows, dtype=f), requires_grad=False))
            setattr(self, f"hc_{part}_scale", nn.Parameter(torch.zeros(3, dtype=f), requires_grad=False))
        self.norm_eps, self.hc_eps, self.iters = config.rms_norm_eps, config.hc_eps, config.hc_sinkhorn_iters

    def _pre(self, X: torch.Tensor, part: str):
        return ops.mhc_pre(X, getattr(self, f"hc_{part}_fn"), getattr(self, f"hc_{part}_scale"),
                           getattr(self, f"hc_{part}_base"), norm_eps=self.norm_eps, hc_eps=self.hc_eps,
                           iters=self.iters)

    def forward(self, X: torch.Tensor, ctx: StepContext, cache: LayerCache, input_ids: torch.Tensor) -> torch.Tensor:
        ctx.record("streams_in", X)
        x, post, comb = self._pre(X, "attn")
        ctx.record("attn.x_in", x)
        h = self.attn(self.attn_norm(x), ctx, cache)
        ctx.record("attn.out", h)
        X = ops.mhc_post(X, h, post, comb)
        x, post, comb = self._pre(X, "ffn")
        ctx.record("ffn.x_in", x)
        h = self.ffn(self.ffn_norm(x), input_ids, ctx)
        ctx.record("ffn.out", h)
        X = ops.mhc_post(X, h, post, comb)
        ctx.record("streams_out", X)
        return X
