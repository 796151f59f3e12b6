"""KV compressor (spec §8, §11.3): pools complete blocks of ``ratio`` tokens into one entry.

CSA (ratio 4) pools with the 8-slot overlap, HCA (ratio 128) plain blocks; the indexer owns a
second CSA compressor with D = index_head_dim whose entries are Hadamard-rotated and FP4
fake-quantised instead of FP8 (§8.4).

One method serves prefill, extend and decode: the cached projections of the tokens before
``start`` that still matter (the incomplete block, and for CSA the previous block) are put in
front of the new tokens so the sequence starts on a block boundary, every complete block is
pooled by ``op_adapters.compress_pool``, and only blocks that are complete *now* and were not
complete before are kept.  Padding after a row's last token can only complete blocks past the
row's end, which are never kept (the pooling happens before that mask, but the mask is by block).
"""

from __future__ import annotations

import torch
from torch import nn

import op_adapters as ops

from .cache import CompressorState
from .context import StepContext
from .layers import Linear, RMSNorm, hp_dtype
from .rope import rope_tables


class Compressor(nn.Module):
    def __init__(self, dim: int, out_dim: int, ratio: int, *, rope_dim: int, eps: float, rotate: bool,
                 dtype: torch.dtype):
        super().__init__()
        self.ratio, self.out_dim, self.rope_dim, self.rotate = ratio, out_dim, rope_dim, rotate
        self.overlap = ratio == 4
        coff = 2 if self.overlap else 1
        self.wkv = Linear(dim, coff * out_dim, kind="fp32", dtype=dtype)
        self.wgate = Linear(dim, coff * out_dim, kind="fp32", dtype=dtype)
        self.ape = nn.Parameter(torch.zeros(ratio, coff * out_dim, dtype=hp_dtype(dtype)), requires_grad=False)
        self.norm = RMSNorm(out_dim, eps, dtype)
        self.dtype = dtype

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """C and Z (without ape) in fp32 from the attn_norm output (trap 9: fp32 linear, fp32 input)."""
        return self.wkv(x), self.wgate(x)

    def postprocess(self, pooled: torch.Tensor, block_ids: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        """§8.4: cast to the model dtype, norm, RoPE at position i·ratio, then the quantisation point."""
        y = self.norm(pooled.to(self.dtype))
        cos, sin = rope_tables(ctx.config, self.ratio, block_ids * self.ratio)
        y = ops.apply_rope(y, cos, sin)
        if self.rotate:
            y = ops.hadamard(y)
            if ctx.fake_quant:
                y = ops.fp4_fake_quant(y, 32)
        elif ctx.fake_quant:
            nope = self.out_dim - self.rope_dim
            y = torch.cat((ops.fp8_fake_quant(y[..., :nope], 64), y[..., nope:]), dim=-1)
        return y

    def forward(self, x: torch.Tensor, ctx: StepContext, state: CompressorState) -> torch.Tensor:
        """Absorb the new tokens, write newly complete entries into ``state.entries``.

        Returns the number of entries each sequence has afterwards ([B] int64).
        """
        B, S, _ = x.shape
        C, Z = self.project(x)
        R = state.kv.shape[1]
        ratio = self.ratio
        start, end = ctx.start, ctx.end
        first = torch.div(start, ratio, rounding_mode="floor") * ratio - (ratio if self.overlap else 0)
        first = first.clamp(min=0)                                     # block-aligned first position
        span = int((end - first).max())
        if span >= ratio:  # at least one row may complete a block: pool
            j = torch.arange(span, device=x.device)
            pos = first.unsqueeze(1) + j                                # [B, span]
            from_state = pos < start.unsqueeze(1)
            new_idx = (pos - start.unsqueeze(1)).clamp(0, S - 1)
            slot = pos % R
            bidx = torch.arange(B, device=x.device).unsqueeze(1)
            seq_kv = torch.where(from_state.unsqueeze(-1), state.kv[bidx, slot], C[bidx, new_idx])
            seq_sc = torch.where(from_state.unsqueeze(-1), state.score[bidx, slot], Z[bidx, new_idx])
            pooled = ops.compress_pool(seq_kv, seq_sc, self.ape, ratio=ratio, overlap=self.overlap)
            nb = pooled.shape[1]
            blocks = torch.div(first, ratio, rounding_mode="floor").unsqueeze(1) + torch.arange(nb, device=x.device)
            keep = (blocks >= torch.div(start, ratio, rounding_mode="floor").unsqueeze(1)) & \
                   (blocks < torch.div(end, ratio, rounding_mode="floor").unsqueeze(1))
            if keep.any():
                b_k, e_k = keep.nonzero(as_tuple=True)
                blk = blocks[b_k, e_k]
                if int(blk.max()) >= state.entries.shape[1]:
                    raise ValueError("compressor: context longer than the cache's max_len")
                state.entries[b_k, blk] = self.postprocess(pooled[b_k, e_k], blk, ctx)
        # keep the projections of the last R tokens of each row for the next call
        pos_new = ctx.positions
        keep_new = ctx.valid & (pos_new >= (end - R).unsqueeze(1))
        b_n, s_n = keep_new.nonzero(as_tuple=True)
        slots = pos_new[b_n, s_n] % R
        state.kv[b_n, slots] = C[b_n, s_n].to(state.kv.dtype)
        state.score[b_n, slots] = Z[b_n, s_n].to(state.score.dtype)
        return torch.div(end, ratio, rounding_mode="floor")
