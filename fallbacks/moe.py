"""MoE gate and routed experts (spec §12, traps 15-17).

``moe_gate``: scores s = sqrt(softplus(l)) (or sigmoid / softmax) in fp32; the indices are the
top-k of s + bias (bias for selection only) or, in hash layers, ``tid2eid[input_ids]``; the
weights are s at those indices, renormalised without eps (non-softmax scores) and times
``route_scale``.

``moe_experts``: clamped SwiGLU experts.  gate = (x W1ᵀ), up = (x W3ᵀ) in x's dtype, then fp32;
up ∈ [−limit, limit], gate ≤ limit; h = silu(gate) · up · w_route (weight before W2, fp32);
out = (h → x.dtype) W2ᵀ; the k outputs are summed in fp32.  Tokens are sorted by expert and run
as one padded batched matmul over the experts that received tokens (no Python loop over tokens
or experts); large batches are split into token chunks to bound the padded buffer.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._checks import INDEX_DTYPES, check_tensor
from .quant import fp8_fake_quant

SCORE_FUNCS = ("sqrtsoftplus", "sigmoid", "softmax")
_CHUNK_ROWS = 1 << 16  # (token, expert) assignments per chunk


def gate_scores(logits: torch.Tensor, score_func: str) -> torch.Tensor:
    compute = torch.float64 if logits.dtype == torch.float64 else torch.float32
    lf = logits.to(compute)
    if score_func == "sqrtsoftplus":
        return torch.sqrt(F.softplus(lf))
    if score_func == "sigmoid":
        return torch.sigmoid(lf)
    if score_func == "softmax":
        return torch.softmax(lf, dim=-1)
    raise ValueError(f"moe_gate: score_func must be one of {SCORE_FUNCS}, got {score_func!r}")


def moe_gate(logits: torch.Tensor, *, bias: torch.Tensor | None = None, k: int, route_scale: float = 1.0,
             score_func: str = "sqrtsoftplus", input_ids: torch.Tensor | None = None,
             tid2eid: torch.Tensor | None = None, renormalize: bool | None = None
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [T, E] → (weights [T, k] fp32, expert indices [T, k] int64)."""
    op = "moe_gate"
    check_tensor(op, "logits", logits, dim=2)
    T, E = logits.shape
    if not isinstance(k, int) or k < 1:
        raise ValueError(f"{op}: k must be an integer >= 1, got {k!r}")
    if k > E:
        raise ValueError(f"{op}: k = {k} is larger than the number of experts ({E})")
    scores = gate_scores(logits, score_func)
    if tid2eid is not None:
        check_tensor(op, "tid2eid", tid2eid, dim=2, dtypes=INDEX_DTYPES)
        if bias is not None:
            raise ValueError(f"{op}: hash routing (tid2eid) takes no bias; pass bias=None")
        if input_ids is None:
            raise ValueError(f"{op}: hash routing needs input_ids")
        check_tensor(op, "input_ids", input_ids, dim=1, dtypes=INDEX_DTYPES)
        if input_ids.shape[0] != T:
            raise ValueError(f"{op}: input_ids has {input_ids.shape[0]} tokens, logits has {T}")
        if tid2eid.shape[1] != k:
            raise ValueError(f"{op}: tid2eid must have k = {k} columns, got shape {tuple(tid2eid.shape)}")
        if T and (input_ids.min() < 0 or input_ids.max() >= tid2eid.shape[0]):
            raise ValueError(f"{op}: input_ids must lie in [0, {tid2eid.shape[0] - 1}] (tid2eid rows)")
        indices = tid2eid[input_ids.long()].long()
        if indices.numel() and (indices.min() < 0 or indices.max() >= E):
            raise ValueError(f"{op}: tid2eid holds expert ids outside [0, {E - 1}]")
    else:
        select = scores
        if bias is not None:
            check_tensor(op, "bias", bias, dim=1)
            if bias.shape[0] != E:
                raise ValueError(f"{op}: bias must have {E} entries (one per expert), got {bias.shape[0]}")
            select = scores + bias.to(scores.dtype)
        indices = select.topk(k, dim=-1).indices
    weights = scores.gather(-1, indices)
    if renormalize is None:
        renormalize = score_func != "softmax"
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights * route_scale, indices


def moe_experts(x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor, w1: torch.Tensor,
                w2: torch.Tensor, w3: torch.Tensor, *, swiglu_limit: float = 0.0,
                out_dtype: torch.dtype | None = None, act_quant_block: int | None = None) -> torch.Tensor:
    """x [T, d], weights/indices [T, k], w1/w3 [E, I, d], w2 [E, d, I] → [T, d] (x.dtype unless out_dtype).

    ``act_quant_block``: when set, the hidden activation h is rounded to e4m3 in blocks of that
    size before W2, as the FP8-activation × FP4/FP8-weight GEMM of the reference does (§13.2);
    the caller quantises x itself (it is shared by every expert).
    """
    op = "moe_experts"
    check_tensor(op, "x", x, dim=2)
    check_tensor(op, "weights", weights, dim=2)
    check_tensor(op, "indices", indices, dim=2, dtypes=INDEX_DTYPES)
    for name, w in (("w1", w1), ("w2", w2), ("w3", w3)):
        check_tensor(op, name, w, dim=3)
    T, d = x.shape
    E, I = w1.shape[0], w1.shape[1]
    if w1.shape != (E, I, d) or w3.shape != (E, I, d):
        raise ValueError(f"{op}: w1 and w3 must have shape [E, I, {d}] alike, got {tuple(w1.shape)} and {tuple(w3.shape)}")
    if w2.shape != (E, d, I):
        raise ValueError(f"{op}: w2 must have shape [{E}, {d}, {I}], got {tuple(w2.shape)}")
    if weights.shape != indices.shape or weights.shape[0] != T:
        raise ValueError(f"{op}: weights {tuple(weights.shape)} and indices {tuple(indices.shape)} must both be [{T}, k]")
    for name, w in (("w1", w1), ("w2", w2), ("w3", w3)):
        if w.dtype != x.dtype:
            raise ValueError(f"{op}: {name} has dtype {w.dtype} but x has {x.dtype}; cast or dequantise first")
    if indices.numel() and (indices.min() < 0 or indices.max() >= E):
        raise ValueError(f"{op}: expert indices must lie in [0, {E - 1}]")
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    y = torch.zeros(T, d, dtype=compute, device=x.device)
    k = indices.shape[1]
    flat_e = indices.reshape(-1).long()
    flat_w = weights.reshape(-1).to(compute)
    flat_t = torch.arange(T, device=x.device).repeat_interleave(k)
    for r0 in range(0, flat_e.numel(), _CHUNK_ROWS):  # bounded buffers for very large batches
        r1 = min(flat_e.numel(), r0 + _CHUNK_ROWS)
        _experts_chunk(x, flat_t[r0:r1], flat_e[r0:r1], flat_w[r0:r1], w1, w2, w3, swiglu_limit, y,
                       act_quant_block)
    return y.to(out_dtype or x.dtype)


def _experts_chunk(x, tok, exp, wr, w1, w2, w3, limit, y, act_quant_block) -> None:
    order = torch.argsort(exp, stable=True)
    tok, exp, wr = tok[order], exp[order], wr[order]
    active, group, counts = torch.unique_consecutive(exp, return_inverse=True, return_counts=True)
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.arange(exp.numel(), device=x.device) - starts[group]
    cap = int(counts.max())
    buf = x.new_zeros(active.numel(), cap, x.shape[1])
    buf[group, rank] = x[tok]
    if active.numel() < w1.shape[0]:  # gather only the experts that got tokens (a copy); all: use as is
        w1, w2, w3 = w1[active], w2[active], w3[active]
    gate = torch.bmm(buf, w1.transpose(1, 2)).to(y.dtype)  # [A, cap, I], linear output in x.dtype
    up = torch.bmm(buf, w3.transpose(1, 2)).to(y.dtype)
    if limit and limit > 0:
        up = up.clamp(-limit, limit)
        gate = gate.clamp(max=limit)
    wbuf = y.new_zeros(active.numel(), cap)
    wbuf[group, rank] = wr
    h = (F.silu(gate) * up * wbuf.unsqueeze(-1)).to(x.dtype)
    if act_quant_block:
        h = fp8_fake_quant(h, act_quant_block)
    out = torch.bmm(h, w2.transpose(1, 2))                          # [A, cap, d] in x.dtype
    y.index_add_(0, tok, out[group, rank].to(y.dtype))
