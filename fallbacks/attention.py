"""Shared-KV sparse attention with a per-head sink (spec §7.4, traps 5-6).

For query (b, t) and head h over the index set I = indices[b, t] (−1 = empty slot):
    l_s = (q_h · kv_s) · scale
    o_h = Σ_s exp(l_s − M) kv_s / (Σ_s exp(l_s − M) + exp(sink_h − M))
K = V = kv (one 512-vector per entry).  The sink only enlarges the denominator.  Here M is
max(max_s l_s, sink_h), which is algebraically the same and makes an all-empty row return 0.
Numerics follow the reference kernel: fp32 logits and softmax, the un-normalised P rounded to
q's dtype before the PV product, fp32 accumulation, result in q's dtype.  Queries are processed
in chunks so the gathered [chunk, K, D] block bounds memory.
"""

from __future__ import annotations

import torch

from ._checks import INDEX_DTYPES, check_tensor

_CHUNK_ELEMENTS = 1 << 25  # gathered kv elements per query chunk (128 MiB in fp32)


def sparse_attention(q: torch.Tensor, kv: torch.Tensor, indices: torch.Tensor, sink: torch.Tensor,
                     scale: float) -> torch.Tensor:
    op = "sparse_attention"
    check_tensor(op, "q", q, dim=4)
    check_tensor(op, "kv", kv, dim=3)
    check_tensor(op, "indices", indices, dim=3, dtypes=INDEX_DTYPES)
    check_tensor(op, "sink", sink, dim=1)
    B, S, H, D = q.shape
    if kv.shape[0] != B or kv.shape[2] != D:
        raise ValueError(f"{op}: kv must have shape [{B}, N, {D}] to match q {tuple(q.shape)}, got {tuple(kv.shape)}")
    if kv.dtype != q.dtype:
        raise ValueError(f"{op}: q ({q.dtype}) and kv ({kv.dtype}) must have the same dtype")
    if indices.shape[:2] != (B, S):
        raise ValueError(f"{op}: indices must have shape [{B}, {S}, K], got {tuple(indices.shape)}")
    if sink.shape[0] != H:
        raise ValueError(f"{op}: sink must have one logit per head ({H}), got {tuple(sink.shape)}")
    N, K = kv.shape[1], indices.shape[2]
    if K and (indices.max() >= N or indices.min() < -1):
        raise ValueError(f"{op}: indices must lie in [-1, {N - 1}] (N = {N} kv entries), "
                         f"got range [{int(indices.min())}, {int(indices.max())}]")
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    out = torch.zeros(B, S, H, D, dtype=q.dtype, device=q.device)
    if K == 0 or S == 0 or N == 0:  # nothing to attend to (the range check forced every index to −1)
        return out
    sink_c = sink.to(compute).view(1, 1, H, 1)
    batch = torch.arange(B, device=q.device).view(B, 1, 1)
    chunk = max(1, _CHUNK_ELEMENTS // max(1, B * K * D))
    for s0 in range(0, S, chunk):  # query chunks bound memory; not a per-token loop
        s1 = min(S, s0 + chunk)
        idx = indices[:, s0:s1].long()
        valid = idx >= 0
        gathered = kv[batch, idx.clamp(min=0)].to(compute)                      # [B, s, K, D]
        logits = torch.einsum("bshd,bskd->bshk", q[:, s0:s1].to(compute), gathered) * scale
        logits = logits.masked_fill(~valid.unsqueeze(2), float("-inf"))
        m = torch.maximum(logits.amax(dim=-1, keepdim=True), sink_c)
        p = torch.exp(logits - m)                                               # 0 on empty slots
        denom = p.sum(dim=-1, keepdim=True) + torch.exp(sink_c - m)
        p = p.to(q.dtype).to(compute)                                           # P rounded like the kernel
        o = torch.einsum("bshk,bskd->bshd", p, gathered) / denom
        out[:, s0:s1] = o.to(q.dtype)
    return out
