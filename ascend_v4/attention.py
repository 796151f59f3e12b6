"""V4 attention for SWA, CSA and HCA layers with one code path (spec §7, §10).

q:  q_lat = q_norm(wq_a(x)); q = wq_b(q_lat) per head; unweighted per-head RMS; RoPE (last r dims).
kv: kv = kv_norm(wkv(x)), one shared K=V head; RoPE; FP8 fake quant of the nope dims (when on).
The attended set of a query at position p is its window (positions p−W+1 … p, itself included)
plus the compressed entries: HCA all i < ⌊(p+1)/128⌋, CSA the indexer's top-k.  One softmax with
the per-head sink runs over the union (``op_adapters.sparse_attention``).  The output is
de-rotated at p (inverse RoPE) and projected by the grouped ``wo_a`` then ``wo_b``.

The attended kv tensor is [window ring (W) | this call's kv (S) | compressed entries]: older
window positions are read from the ring, new ones from this call, so a decode step, an extend
chunk and a prefill are the same computation.
"""

from __future__ import annotations

import torch
from torch import nn

import op_adapters as ops

from .cache import LayerCache
from .compressor import Compressor
from .config import CSA, HCA, ModelConfig
from .context import StepContext
from .indexer import Indexer
from .layers import Linear, RMSNorm, hp_dtype


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, ratio: int, dtype: torch.dtype):
        super().__init__()
        c = config
        self.ratio = ratio
        self.n_heads, self.head_dim, self.rope_dim = c.num_attention_heads, c.head_dim, c.qk_rope_head_dim
        self.nope_dim = c.head_dim - c.qk_rope_head_dim
        self.window = c.sliding_window
        self.groups, self.o_rank = c.o_groups, c.o_lora_rank
        self.eps = c.rms_norm_eps
        self.softmax_scale = c.head_dim ** -0.5  # no mscale anywhere (trap 2)
        self.wq_a = Linear(c.hidden_size, c.q_lora_rank, kind="fp8", dtype=dtype)
        self.q_norm = RMSNorm(c.q_lora_rank, c.rms_norm_eps, dtype)
        self.wq_b = Linear(c.q_lora_rank, c.num_attention_heads * c.head_dim, kind="fp8", dtype=dtype)
        self.wkv = Linear(c.hidden_size, c.head_dim, kind="fp8", dtype=dtype)
        self.kv_norm = RMSNorm(c.head_dim, c.rms_norm_eps, dtype)
        # wo_a is used as a dequantised bf16 weight, not an FP8 linear (trap 19)
        self.wo_a = Linear(c.num_attention_heads * c.head_dim // c.o_groups, c.o_groups * c.o_lora_rank,
                           kind="bf16", dtype=dtype)
        self.wo_b = Linear(c.o_groups * c.o_lora_rank, c.hidden_size, kind="fp8", dtype=dtype)
        self.attn_sink = nn.Parameter(torch.zeros(c.num_attention_heads, dtype=hp_dtype(dtype)), requires_grad=False)
        self.compressor = (Compressor(c.hidden_size, c.head_dim, ratio, rope_dim=c.qk_rope_head_dim,
                                      eps=c.rms_norm_eps, rotate=False, dtype=dtype) if ratio else None)
        self.indexer = Indexer(c, dtype) if ratio == CSA else None

    def window_indices(self, ctx: StepContext, S: int) -> torch.Tensor:
        """[B, S, W] indices into [ring | new kv]: ring slot for cached positions, W + offset for new ones."""
        W = self.window
        pos = ctx.positions.unsqueeze(-1) - (W - 1) + torch.arange(W, device=ctx.positions.device)
        start = ctx.start.view(-1, 1, 1)
        idx = torch.where(pos >= start, W + pos - start, pos % W)
        return torch.where(pos >= 0, idx, torch.full_like(idx, -1))

    def forward(self, x: torch.Tensor, ctx: StepContext, cache: LayerCache) -> torch.Tensor:
        B, S, _ = x.shape
        cos, sin = ctx.rope_for(self.ratio)
        cos_h, sin_h = cos.unsqueeze(2), sin.unsqueeze(2)
        # query path (§7.1)
        q_lat = self.q_norm(self.wq_a(x))
        q = self.wq_b(q_lat).view(B, S, self.n_heads, self.head_dim)
        q = ops.rms_norm(q, None, self.eps)
        q = ops.apply_rope(q, cos_h, sin_h)
        # shared K=V path (§7.2)
        kv = self.kv_norm(self.wkv(x))
        kv = ops.apply_rope(kv, cos, sin)
        if ctx.fake_quant:
            kv = torch.cat((ops.fp8_fake_quant(kv[..., :self.nope_dim], 64), kv[..., self.nope_dim:]), dim=-1)
        ctx.record("attn.kv", kv)
        # index sets (§10): window first, then compressed entries emitted before this attention
        W = self.window
        parts_idx = [self.window_indices(ctx, S)]
        parts_kv = [cache.window, kv]
        if self.ratio:
            topk = self.indexer(x, q_lat, ctx, cache.indexer) if self.indexer is not None else None
            counts = self.compressor(x, ctx, cache.compressor)
            n = int(counts.max())
            ctx.record("attn.compressed", cache.compressor.entries[:, :n])
            if topk is not None:
                ctx.record("attn.indexer_topk", topk)
            parts_kv.append(cache.compressor.entries[:, :n])
            if self.ratio == HCA:
                i = torch.arange(n, device=x.device)
                limit = torch.div(ctx.positions + 1, HCA, rounding_mode="floor").unsqueeze(-1)
                comp_idx = torch.where(i < limit, W + S + i, torch.full_like(limit, -1)) if n else \
                    torch.empty(B, S, 0, dtype=torch.int64, device=x.device)
            else:
                comp_idx = torch.where(topk >= 0, W + S + topk, topk)
            parts_idx.append(comp_idx)
        kv_all = torch.cat(parts_kv, dim=1)
        indices = torch.cat(parts_idx, dim=-1)
        o = ops.sparse_attention(q, kv_all, indices, self.attn_sink, self.softmax_scale)
        self._write_window(cache, kv, ctx)
        # output (§7.5): de-rotate at the query position, grouped wo_a, then wo_b
        o = ops.apply_rope(o, cos_h, sin_h, inverse=True)
        o = o.reshape(B, S, self.groups, -1)
        wo_a = self.wo_a.weight.view(self.groups, self.o_rank, -1)
        z = torch.einsum("bsgk,gok->bsgo", o, wo_a)
        return self.wo_b(z.flatten(2))

    def _write_window(self, cache: LayerCache, kv: torch.Tensor, ctx: StepContext) -> None:
        """Write the last W valid new entries of each row into ring slot position mod W."""
        W = self.window
        keep = ctx.valid & (ctx.positions >= (ctx.end - W).unsqueeze(1))
        b, s = keep.nonzero(as_tuple=True)
        cache.window[b, ctx.positions[b, s] % W] = kv[b, s]
