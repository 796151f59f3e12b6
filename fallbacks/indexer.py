"""Lightning indexer scores and causal top-k (spec §9, §10; trap 10-11).

``indexer_scores``: I[b, t, s] = Σ_h w[b, t, h] · ReLU(q[b, t, h] · k[b, s]), returned fp32
(the reference keeps it bf16; fp32 only removes rounding).  Computed in query chunks so memory is
O(chunk · heads · keys), never O(S² · heads).

``indexer_topk``: top-k over the compressed entries a query may see, s < ⌊(p+1)/ratio⌋;
returns int64 [B, S, min(k, N)] with −1 in every slot that has no valid entry.  Equal scores
are taken lowest index first (deterministic; the reference kernel leaves ties undefined).
"""

from __future__ import annotations

import torch

from ._checks import INDEX_DTYPES, check_tensor

_CHUNK_ELEMENTS = 1 << 24  # per-chunk [s, H, N] logits elements (64 MiB in fp32)


def indexer_scores(q: torch.Tensor, k: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    op = "indexer_scores"
    check_tensor(op, "q", q, dim=4)
    check_tensor(op, "k", k, dim=3)
    check_tensor(op, "weights", weights, dim=3)
    B, S, H, c = q.shape
    if k.shape[0] != B or k.shape[2] != c:
        raise ValueError(f"{op}: k must have shape [{B}, N, {c}] to match q {tuple(q.shape)}, got {tuple(k.shape)}")
    if weights.shape != (B, S, H):
        raise ValueError(f"{op}: weights must have shape [{B}, {S}, {H}], got {tuple(weights.shape)}")
    N = k.shape[1]
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    out = torch.empty(B, S, N, dtype=compute, device=q.device)
    if N == 0 or S == 0:
        return out
    kt = k.to(compute).transpose(1, 2)  # [B, c, N]
    chunk = max(1, _CHUNK_ELEMENTS // max(1, H * N * B))
    for s0 in range(0, S, chunk):  # query chunks bound memory; the chunk count does not grow per token
        s1 = min(S, s0 + chunk)
        qc = q[:, s0:s1].to(compute).reshape(B, (s1 - s0) * H, c)
        logits = torch.relu(torch.bmm(qc, kt)).view(B, s1 - s0, H, N)
        w = weights[:, s0:s1].to(compute).unsqueeze(-2)  # [B, s, 1, H]
        out[:, s0:s1] = (w @ logits).squeeze(-2)
    return out


def indexer_topk(scores: torch.Tensor, k: int, positions: torch.Tensor, ratio: int = 4) -> torch.Tensor:
    op = "indexer_topk"
    check_tensor(op, "scores", scores, dim=3)
    check_tensor(op, "positions", positions, min_dim=1, dtypes=INDEX_DTYPES)
    if not isinstance(k, int) or k < 1:
        raise ValueError(f"{op}: k must be an integer >= 1, got {k!r}")
    if not isinstance(ratio, int) or ratio < 1:
        raise ValueError(f"{op}: ratio must be an integer >= 1, got {ratio!r}")
    B, S, N = scores.shape
    if positions.shape not in ((S,), (B, S)):
        raise ValueError(f"{op}: positions must have shape [{S}] or [{B}, {S}], got {tuple(positions.shape)}")
    if (positions < 0).any():
        raise ValueError(f"{op}: positions must be >= 0")
    limit = torch.div(positions.to(torch.int64) + 1, ratio, rounding_mode="floor").expand(B, S)  # ⌊(p+1)/m⌋
    width = min(k, N)
    if width == 0:
        return torch.empty(B, S, 0, dtype=torch.int64, device=scores.device)
    cand = torch.arange(N, device=scores.device)
    masked = scores.masked_fill(cand >= limit.unsqueeze(-1), float("-inf"))
    # Ties (ReLU makes exact-zero scores common) go to the lower index, so prefill, chunked
    # prefill and decode select the same entries: take everything above the width-th largest
    # score, then the lowest-index entries equal to it.  O(N) per row, unlike a full sort.
    # a NaN score (only from NaN inputs) counts as the largest, as a descending sort would place it
    masked = torch.where(torch.isnan(masked), torch.full_like(masked, float("inf")), masked)
    thr = masked.topk(width, dim=-1).values[..., -1:]
    above = masked > thr
    need = width - above.sum(dim=-1, keepdim=True)
    at = masked == thr
    chosen = above | (at & (at.cumsum(dim=-1) <= need))
    idx = chosen.nonzero()[:, -1].view(B, S, width)        # exactly `width` per row, ascending
    return idx.masked_fill(idx >= limit.unsqueeze(-1), -1)


def lightning_indexer(q: torch.Tensor, k: torch.Tensor, weights: torch.Tensor, positions: torch.Tensor, *,
                      topk: int, ratio: int = 4) -> torch.Tensor:
    """Scores and causal top-k in one call (what ``npu_lightning_indexer`` fuses): the entry
    indices [B, S, min(topk, N)] each query attends to, −1 padded."""
    return indexer_topk(indexer_scores(q, k, weights), topk, positions, ratio)
