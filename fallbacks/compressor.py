"""Compressor pooling (spec §8.1-§8.3, traps 7-8): per-channel softmax over the tokens of a block.

Inputs are the fp32 compressor projections of consecutive tokens that **start at a block
boundary**: ``kv = x Wkvᵀ`` and ``score = x Wgateᵀ`` (without ``ape``), each ``[B, S, coff·D]``.
``ape [ratio, coff·D]`` is added to the scores by position in block (p mod ratio).

* HCA (``overlap=False``, coff = 1): entry i = Σ_{j ∈ block i} softmax_j(Z_j[c]) · C_j[c].
* CSA (``overlap=True``, coff = 2): entry i pools 8 slots: the 4 tokens of block i−1 through
  channels [0:D] and the 4 tokens of block i through channels [D:2D]; block −1 has weight 0.

Only complete blocks are pooled: the output is ``[B, S // ratio, D]`` fp32.  Post-processing
(bf16 cast, norm, RoPE, quantisation; §8.4) is the caller's.
"""

from __future__ import annotations

import torch

from ._checks import check_tensor

ALLOWED_RATIOS = (4, 128)


def compress_pool(kv: torch.Tensor, score: torch.Tensor, ape: torch.Tensor, *, ratio: int,
                  overlap: bool) -> torch.Tensor:
    op = "compress_pool"
    check_tensor(op, "kv", kv, dim=3)
    check_tensor(op, "score", score, dim=3)
    check_tensor(op, "ape", ape, dim=2)
    if ratio not in ALLOWED_RATIOS:
        raise ValueError(f"{op}: ratio must be one of {ALLOWED_RATIOS} (CSA 4, HCA 128), got {ratio!r}")
    if kv.shape != score.shape:
        raise ValueError(f"{op}: kv {tuple(kv.shape)} and score {tuple(score.shape)} must have the same shape")
    if kv.dtype != score.dtype:
        raise ValueError(f"{op}: kv ({kv.dtype}) and score ({score.dtype}) must have the same dtype")
    width = kv.shape[-1]
    if ape.shape != (ratio, width):
        raise ValueError(f"{op}: ape must have shape [{ratio}, {width}] (ratio, channels), got {tuple(ape.shape)}")
    if overlap and width % 2:
        raise ValueError(f"{op}: overlapping (CSA) pooling needs an even channel count (2·D), got {width}")
    B, S, _ = kv.shape
    nb = S // ratio
    compute = torch.float64 if kv.dtype == torch.float64 else torch.float32
    kvb = kv[:, : nb * ratio].to(compute).view(B, nb, ratio, width)
    sb = (score[:, : nb * ratio].to(compute).view(B, nb, ratio, width) + ape.to(compute))
    if not overlap:
        return (torch.softmax(sb, dim=2) * kvb).sum(dim=2)
    D = width // 2
    prev_kv = torch.zeros_like(kvb[..., :D])
    prev_s = torch.full_like(sb[..., :D], float("-inf"))
    prev_kv[:, 1:] = kvb[:, :-1, :, :D]
    prev_s[:, 1:] = sb[:, :-1, :, :D]
    slots_kv = torch.cat((prev_kv, kvb[..., D:]), dim=2)
    slots_s = torch.cat((prev_s, sb[..., D:]), dim=2)
    return (torch.softmax(slots_s, dim=2) * slots_kv).sum(dim=2)
