"""torch-npu implementations of the V4 ops (ascend_npu.md §5; the mapping is in chips.CAPABILITIES).

Each op has ``supports_<op>(...)`` (None when the torch-npu op can express V4's semantics for these
arguments on the current chip, else the reason) and ``npu_<op>(...)`` with the reference op's
signature.  ``torch_npu`` is imported inside the calls only, after the backend was found usable.
Whatever the torch-npu op does not cover (layout changes, the small exact pieces V4 needs) is
plain PyTorch, which runs on the NPU too.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

import fallbacks

from .chips import CAPABILITIES, current_family

log = logging.getLogger("ascend_v4.dispatch")

HALF = (torch.float16, torch.bfloat16)
FLOATS = (torch.float16, torch.bfloat16, torch.float32)


def torch_npu():
    import torch_npu as tnpu  # imported lazily: never at module import time (ascend_npu.md §4.2)

    return tnpu


def _chip_reason(op: str) -> str | None:
    fam = current_family()
    cap = CAPABILITIES[op]
    if fam is None:
        return "unknown Ascend chip (SoC version not recognised)"
    if fam not in cap.chips:
        return f"{'/'.join(cap.torch_npu_ops)} is documented for {', '.join(sorted(cap.chips))}, not {fam}"
    return None


# ------------------------------------------------------------------ RMSNorm
def supports_rms_norm(x, weight=None, eps=1e-6):
    if (r := _chip_reason("rms_norm")):
        return r
    if x.dtype not in FLOATS:
        return f"npu_rms_norm takes fp16/bf16/fp32, got {x.dtype}"
    if not 2 <= x.dim() <= 8:
        return f"npu_rms_norm takes 2-8 dims, got {x.dim()}"
    return None


def npu_rms_norm(x, weight=None, eps=1e-6):
    gamma = torch.ones(x.shape[-1], dtype=x.dtype, device=x.device) if weight is None else weight.to(x.dtype)
    return torch_npu().npu_rms_norm(x, gamma, epsilon=eps)[0]


# ------------------------------------------------------------------ RoPE
def _rope_view(x, cos):
    """x's rope part as BSND [B, S, N, r] and cos as 1S1D, or None when the layout does not fit."""
    r = 2 * cos.shape[-1]
    if x.dim() == 4:
        c = cos if cos.dim() == 4 else None
    elif x.dim() == 3:
        c = cos.unsqueeze(-2) if cos.dim() == 3 else (cos.unsqueeze(0).unsqueeze(-2) if cos.dim() == 2 else None)
    elif x.dim() == 2:
        c = cos.unsqueeze(0).unsqueeze(-2) if cos.dim() == 2 else None
    else:
        c = None
    return r, c


def supports_apply_rope(x, cos, sin, *, inverse=False):
    if (r := _chip_reason("apply_rope")):
        return r
    if x.dtype not in FLOATS:
        return f"npu_rotary_mul takes fp16/bf16/fp32, got {x.dtype}"
    r, c = _rope_view(x, cos)
    if c is None or c.dim() != 4 or c.shape[2] != 1:
        return f"npu_rotary_mul interleave mode needs BSND input with 1S1D cos; got x {tuple(x.shape)}, cos {tuple(cos.shape)}"
    if c.shape[0] > 1 and c.device.type != "meta" and not torch.equal(c, c[:1].expand_as(c)):
        return "npu_rotary_mul interleave mode takes one cos/sin row for the whole batch (1S1D); positions differ per row"
    x4 = x if x.dim() == 4 else (x.unsqueeze(-2) if x.dim() == 3 else x.unsqueeze(0).unsqueeze(-2))
    if x4.shape[0] * x4.shape[2] >= 1000:
        return f"npu_rotary_mul needs B·N < 1000, got {x4.shape[0] * x4.shape[2]}"
    if r >= 896:
        return f"npu_rotary_mul needs D < 896, got {r}"
    return None


def npu_apply_rope(x, cos, sin, *, inverse=False):
    r, c = _rope_view(x, cos)
    _, s = _rope_view(x, sin)
    x4 = x if x.dim() == 4 else (x.unsqueeze(-2) if x.dim() == 3 else x.unsqueeze(0).unsqueeze(-2))
    r1 = c[:1].repeat_interleave(2, dim=-1).to(x.dtype)
    r2 = s[:1].repeat_interleave(2, dim=-1).to(x.dtype)
    if inverse:
        r2 = -r2
    rot = torch_npu().npu_rotary_mul(x4[..., -r:].contiguous(), r1, r2, rotary_mode="interleave")
    out = rot if r == x4.shape[-1] else torch.cat((x4[..., :-r], rot), dim=-1)
    return out.reshape(x.shape)


# ------------------------------------------------------------------ mHC
def _mhc_shape_reason(name, x):
    if x.dtype not in HALF:
        return f"{name} takes bf16/fp16 streams, got {x.dtype}"
    if x.dim() not in (3, 4):
        return f"{name} takes [T, n, D] or [B, S, n, D] streams, got {x.dim()} dims"
    if x.shape[-2] not in (4, 6, 8):
        return f"{name} supports n in (4, 6, 8) streams, got {x.shape[-2]}"
    return None


def supports_sinkhorn(logits, *, iters=20, eps=1e-6):
    if (r := _chip_reason("sinkhorn")):
        return r
    if logits.dim() < 3:
        return "npu_mhc_sinkhorn takes [T, n, n] or [B, S, n, n]"
    if logits.shape[-1] not in (4, 6, 8) or logits.shape[-1] != logits.shape[-2]:
        return f"npu_mhc_sinkhorn supports n in (4, 6, 8), got {tuple(logits.shape[-2:])}"
    if not isinstance(iters, int) or not 1 <= iters <= 100:
        return f"npu_mhc_sinkhorn supports num_iters in [1, 100], got {iters}"
    return None


def npu_sinkhorn(logits, *, iters=20, eps=1e-6):
    if not isinstance(iters, int) or iters < 1:
        raise ValueError(f"sinkhorn: iters must be an integer >= 1, got {iters!r}")
    n = logits.shape[-1]
    p = torch.softmax(logits.float(), dim=-1) + eps
    flat = p.reshape(-1, n, n) if p.dim() != 3 else p
    out = torch_npu().npu_mhc_sinkhorn(flat, eps=eps, num_iters=iters)[0]
    return out.reshape(p.shape)


def supports_mhc_pre(x, hc_fn, hc_scale, hc_base, *, norm_eps=1e-6, hc_eps=1e-6, iters=20):
    return _chip_reason("mhc_pre") or _mhc_shape_reason("npu_mhc_pre", x)


def npu_mhc_pre(x, hc_fn, hc_scale, hc_base, *, norm_eps=1e-6, hc_eps=1e-6, iters=20):
    import op_adapters

    n = x.shape[-2]
    h_in, _post, _res, inv_rms, h_mix, _pre = torch_npu().npu_mhc_pre(
        x, hc_fn.float(), hc_scale.float(), hc_base.float(), norm_eps=norm_eps, hc_eps=hc_eps, out_flag=1)
    lead = x.shape[:-2]
    mix = h_mix.reshape(*lead, -1) * inv_rms.reshape(*lead, 1)
    scale, base = hc_scale.float(), hc_base.float()
    post = 2 * torch.sigmoid(mix[..., n:2 * n] * scale[1] + base[n:2 * n])
    res = (mix[..., 2 * n:] * scale[2] + base[2 * n:]).unflatten(-1, (n, n))
    comb = op_adapters.sinkhorn(res, iters=iters, eps=hc_eps)
    return h_in.reshape(*lead, x.shape[-1]), post, comb


def supports_mhc_post(x, h_out, post, comb):
    return _chip_reason("mhc_post") or _mhc_shape_reason("npu_mhc_post", x)


def npu_mhc_post(x, h_out, post, comb):
    if h_out.dtype != x.dtype:
        h_out = h_out.to(x.dtype)
    return torch_npu().npu_mhc_post(x, comb.float(), h_out, post.float())


# ------------------------------------------------------------------ lightning indexer
SPARSE_COUNTS = set(range(1, 2049)) | {3072, 4096, 5120, 6144, 7168, 8192}
_PAGE = 128  # key page size: a multiple of 16, at most 1024


def supports_lightning_indexer(q, k, weights, positions, *, topk, ratio=4):
    if (r := _chip_reason("lightning_indexer")):
        return r
    if q.dim() != 4 or k.dim() != 3:
        return "npu_lightning_indexer adapter takes q [B, S, H, D] and k [B, N, D]"
    if q.dtype not in HALF or k.dtype != q.dtype:
        return f"npu_lightning_indexer takes bf16/fp16 q and k of one dtype, got {q.dtype}/{k.dtype}"
    if q.shape[-1] != 128:
        return f"npu_lightning_indexer needs head dim 128, got {q.shape[-1]}"
    heads = q.shape[2]
    if current_family() == "950" and heads not in (8, 16, 24, 32, 64):
        return f"npu_lightning_indexer on 950 takes 8/16/24/32/64 heads, got {heads}"
    if heads > 64:
        return f"npu_lightning_indexer takes at most 64 heads, got {heads}"
    if min(topk, k.shape[1]) not in SPARSE_COUNTS:
        return f"npu_lightning_indexer sparse_count must be 1..2048 or 3072..8192 step 1024, got {min(topk, k.shape[1])}"
    return None


def npu_lightning_indexer(q, k, weights, positions, *, topk, ratio=4):
    B, S, H, D = q.shape
    N = k.shape[1]
    width = min(topk, N)
    dev = q.device
    if width == 0 or S == 0:
        return torch.full((B, S, width), -1, dtype=torch.int64, device=dev)
    # Group the queries whose limit ⌊(p+1)/m⌋ is equal: each group is one "batch" of the op, and all
    # groups of a row read that row's keys through the same block_table row, each with its own key
    # length.  The bookkeeping uses only the positions, on their own device (host in the contract
    # tests; one small transfer per call on an NPU).
    pos = positions.to(torch.int64).expand(B, S)
    limit = torch.div(pos + 1, ratio, rounding_mode="floor")                 # [B, S]
    group = limit - limit[:, :1]                                              # 0-based per row
    G = int(group.max()) + 1
    s_ar = torch.arange(S, device=pos.device).expand(B, S)
    first = torch.full((B, G), S, dtype=torch.int64, device=pos.device).scatter_reduce(1, group, s_ar, "amin")
    slot = (s_ar - first.gather(1, group)).reshape(-1)                       # place in its group
    gid = (torch.arange(B, device=pos.device).unsqueeze(1) * G + group).reshape(-1)
    glimit = torch.zeros(B * G, dtype=torch.int64, device=pos.device).index_put_(
        (gid,), limit.reshape(-1).clamp(max=N))
    gcount = torch.zeros(B * G, dtype=torch.int64, device=pos.device).index_add_(0, gid, torch.ones_like(gid))
    pages = -(-N // _PAGE)
    table = (torch.arange(B, device=pos.device).repeat_interleave(G).unsqueeze(1) * pages
             + torch.arange(pages, device=pos.device))
    gid_d, slot_d = gid.to(dev), slot.to(dev)
    qg = q.new_zeros(B * G, ratio, H, D)
    wg = q.new_zeros(B * G, ratio, H)
    qg[gid_d, slot_d] = q.reshape(B * S, H, D)
    wg[gid_d, slot_d] = weights.to(q.dtype).reshape(B * S, H)
    keys = k.new_zeros(B, pages * _PAGE, D)
    keys[:, :N] = k
    idx, _ = torch_npu().npu_lightning_indexer(
        qg, keys.view(B * pages, _PAGE, 1, D), wg, actual_seq_lengths_query=gcount.to(dev, torch.int32),
        actual_seq_lengths_key=glimit.to(dev, torch.int32), block_table=table.to(dev, torch.int32),
        layout_query="BSND", layout_key="PA_BSND", sparse_count=width, sparse_mode=0)
    idx = idx.reshape(B * G, ratio, width)[gid_d, slot_d].reshape(B, S, width).to(torch.int64)
    return idx.masked_fill((idx < 0) | (idx >= limit.to(dev).unsqueeze(-1)), -1)


# ------------------------------------------------------------------ sparse attention
ROPE = 64


def supports_sparse_attention(q, kv, indices, sink, scale):
    if (r := _chip_reason("sparse_attention")):
        return r
    if q.dtype not in HALF or kv.dtype != q.dtype:
        return f"npu_sparse_flash_attention takes bf16/fp16 q and kv of one dtype, got {q.dtype}/{kv.dtype}"
    if q.dim() != 4 or kv.dim() != 3:
        return "npu_sparse_flash_attention adapter takes q [B, S, H, D] and kv [B, N, D]"
    if q.shape[-1] != 512:
        return f"npu_sparse_flash_attention (MLA-absorb layout) needs head dim 512, got {q.shape[-1]}"
    return None


def npu_sparse_attention(q, kv, indices, sink, scale):
    B, S, H, D = q.shape
    nope = D - ROPE
    valid = indices >= 0
    order = torch.argsort((~valid).to(torch.int8), dim=-1, stable=True)      # valid entries first
    idx = torch.gather(indices, -1, order).masked_fill(~torch.gather(valid, -1, order), -1)
    query = torch.cat((q[..., :nope], torch.zeros_like(q[..., nope:])), dim=-1)
    key = kv.unsqueeze(2)                                                       # [B, N, 1, D]
    out, smax, ssum = torch_npu().npu_sparse_flash_attention(
        query, key, key, idx.to(torch.int32).unsqueeze(2), scale, query_rope=q[..., nope:].contiguous(),
        key_rope=key[..., nope:].contiguous(), layout_query="BSND", layout_kv="BSND", sparse_mode=0,
        attention_mode=2, return_softmax_lse=True)
    # sink (V4 §7.4): o · Σ / (Σ + exp(sink − max)), with the op's softmax max/sum [B, 1, S, H]
    m = smax.reshape(B, S, H).float()
    total = ssum.reshape(B, S, H).float()
    factor = total / (total + torch.exp(sink.float().view(1, 1, H) - m))
    factor = torch.where(valid.any(-1, keepdim=True), factor, torch.zeros_like(factor))
    return (out.float() * factor.unsqueeze(-1)).to(q.dtype)


# ------------------------------------------------------------------ MoE gate
NORM_TYPES = {"softmax": 0, "sigmoid": 1, "sqrtsoftplus": 2}
_refused: dict[str, str] = {}   # norm types the installed CANN refused at run time


def supports_moe_gate(logits, *, bias=None, k, route_scale=1.0, score_func="sqrtsoftplus", input_ids=None,
                      tid2eid=None, renormalize=None):
    if (r := _chip_reason("moe_gate")):
        return r
    if score_func in _refused:
        return _refused[score_func]
    if score_func not in NORM_TYPES:
        return f"npu_moe_gating_top_k has no norm_type for {score_func!r}"
    if logits.dim() != 2 or logits.dtype not in FLOATS:
        return "npu_moe_gating_top_k takes 2-D fp16/bf16/fp32 logits"
    if logits.shape[1] > 2048:
        return f"npu_moe_gating_top_k takes at most 2048 experts, got {logits.shape[1]}"
    default = score_func != "softmax"
    if renormalize is not None and renormalize != default:
        return f"npu_moe_gating_top_k renormalises exactly when the score is not softmax; renormalize={renormalize}"
    return None


def npu_moe_gate(logits, *, bias=None, k, route_scale=1.0, score_func="sqrtsoftplus", input_ids=None,
                 tid2eid=None, renormalize=None):
    if k > logits.shape[1] or (tid2eid is not None and bias is not None) or (tid2eid is not None and input_ids is None):
        # let the reference produce its error message
        return fallbacks.moe_gate(logits, bias=bias, k=k, route_scale=route_scale, score_func=score_func,
                                  input_ids=input_ids, tid2eid=tid2eid, renormalize=renormalize)
    try:
        y, idx, _ = torch_npu().npu_moe_gating_top_k(
            logits, k, bias=None if bias is None else bias.to(logits.dtype), input_ids=input_ids,
            tid2eid=tid2eid, k_group=1, group_count=1, group_select_mode=0, renorm=0,
            norm_type=NORM_TYPES[score_func], out_flag=False, routed_scaling_factor=float(route_scale), eps=1e-20)
    except RuntimeError as e:  # an older CANN refuses the undocumented norm_type=2: stop asking
        _refused[score_func] = f"npu_moe_gating_top_k refused norm_type {NORM_TYPES[score_func]}: {str(e)[:120]}"
        log.warning("op moe_gate: %s; using the reference from now on", _refused[score_func])
        return fallbacks.moe_gate(logits, bias=bias, k=k, route_scale=route_scale, score_func=score_func,
                                  input_ids=input_ids, tid2eid=tid2eid, renormalize=renormalize)
    return y.float(), idx.to(torch.int64)


# ------------------------------------------------------------------ MoE experts
def supports_moe_experts(x, weights, indices, w1, w2, w3, *, swiglu_limit=0.0, out_dtype=None, act_quant_block=None):
    if (r := _chip_reason("moe_experts")):
        return r
    if x.dim() != 2 or w1.dim() != 3:
        return "moe_experts adapter takes x [T, d] and stacked expert weights [E, I, d]"
    if x.dtype not in FLOATS or any(w.dtype != x.dtype for w in (w1, w2, w3)):
        return "npu_grouped_matmul needs x and expert weights of one fp16/bf16/fp32 dtype"
    E = w1.shape[0]
    if E > 1024:
        return f"npu_grouped_matmul (MoE form) takes at most 1024 groups, got {E}"
    if max(w1.shape[1], w1.shape[2]) >= 65536:
        return "npu_grouped_matmul needs every inner dim < 65536"
    return None


def npu_moe_experts(x, weights, indices, w1, w2, w3, *, swiglu_limit=0.0, out_dtype=None, act_quant_block=None):
    import op_adapters

    tnpu = torch_npu()
    T, d = x.shape
    k = indices.shape[1]
    E = w1.shape[0]
    if T == 0:
        return torch.zeros(0, d, dtype=out_dtype or x.dtype, device=x.device)
    expert_idx = indices.to(torch.int32)
    rows, row_idx, counts, _ = tnpu.npu_moe_init_routing_v2(
        x, expert_idx, active_num=T * k, expert_num=E, expert_tokens_num_type=1, expert_tokens_num_flag=True,
        active_expert_range=[0, E], quant_mode=-1, row_idx_type=0)
    gmm = dict(group_list=counts, group_list_type=1, group_type=0, split_item=2)
    gate = tnpu.npu_grouped_matmul([rows], [w1.transpose(1, 2)], **gmm)[0].float()
    up = tnpu.npu_grouped_matmul([rows], [w3.transpose(1, 2)], **gmm)[0].float()
    if swiglu_limit and swiglu_limit > 0:
        up = up.clamp(-swiglu_limit, swiglu_limit)
        gate = gate.clamp(max=swiglu_limit)
    # routing weight before W2 (V4 §12.4).  init_routing_v2 numbers the (token, slot) pairs
    # token-major (t·k + slot) and row_idx (row_idx_type 0) maps each pair to its sorted row.
    w_rows = torch.empty(T * k, dtype=torch.float32, device=x.device)
    w_rows[row_idx.to(torch.int64)] = weights.float().reshape(-1)
    h = (F.silu(gate) * up * w_rows.unsqueeze(-1)).to(x.dtype)
    if act_quant_block:
        h = op_adapters.fp8_fake_quant(h, act_quant_block)
    down = tnpu.npu_grouped_matmul([h], [w2.transpose(1, 2)], **gmm)[0]
    # drop_pad_mode 2 reads row_idx token-major, the v2 layout (mode 0 is the v1 slot-major one)
    out = tnpu.npu_moe_finalize_routing(down.float(), None, None, None, None, row_idx, expert_idx, 2, k)
    return out.to(out_dtype or x.dtype)


IMPLEMENTATIONS = {
    "rms_norm": (npu_rms_norm, supports_rms_norm),
    "apply_rope": (npu_apply_rope, supports_apply_rope),
    "sinkhorn": (npu_sinkhorn, supports_sinkhorn),
    "mhc_pre": (npu_mhc_pre, supports_mhc_pre),
    "mhc_post": (npu_mhc_post, supports_mhc_post),
    "lightning_indexer": (npu_lightning_indexer, supports_lightning_indexer),
    "sparse_attention": (npu_sparse_attention, supports_sparse_attention),
    "moe_gate": (npu_moe_gate, supports_moe_gate),
    "moe_experts": (npu_moe_experts, supports_moe_experts),
}
