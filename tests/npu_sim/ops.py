"""CPU simulations of torch-npu operators, written from Huawei's documentation.

Each function takes the same arguments as the registered torch-npu 2.13.0 schema (names, positional /
keyword-only split, defaults) and returns what the op's meta (shape/dtype) function says, computed on
CPU tensors from the op's documented formula.  The code deliberately uses nothing from ``fallbacks/`` or
``op_adapters/``: it is a second, independent reading of what each op does.

Sources, per op: the torch-npu 2.13.0 doc string and meta function (``/work/shared/tools/npu_op_doc``),
``/work/shared/spec/ascend_npu.md`` §5, and, where named in a comment, the CANN ops-transformer docs /
golden scripts.  Where the documentation is silent, the choice made is marked ``ASSUMPTION`` in a comment.

Conventions shared by all ops:

* Arithmetic is done in float32 (the documented or usual on-chip accumulation precision); results are
  cast once to the output dtype.  Tests compare against float64 formulas.
* Output regions the documentation calls undefined / invalid (e.g. ``out_flag=0`` intermediates, rows of
  ``expanded_x`` past the valid ones) are filled with NaN (floating outputs) or the dtype's minimum
  (integer outputs), so that code which reads them by mistake fails loudly instead of silently seeing
  zeros.  Where the documentation names a fill value (−1, (0, 0) terminator) that value is used.
* Unsupported modes raise ``NotImplementedError`` (not simulated) or ``ValueError`` / ``TypeError``
  (rejected by the documentation or the meta function).
"""

from __future__ import annotations

import contextvars
import dataclasses
import math
from typing import Optional

import torch
import torch.nn.functional as F

# ------------------------------------------------------------------------------------------------
# dtype ints (ascend_npu.md §2) and chip ids (§2, runtime SoC ids)
# ------------------------------------------------------------------------------------------------

INT4 = 285
HIFLOAT8 = 290
FLOAT8_E5M2 = 291
FLOAT8_E4M3FN = 292
FLOAT8_E8M0FNU = 293
FLOAT4_E2M1FN_X2 = 296
FLOAT4_E1M2FN_X2 = 297

DTYPE_INTS = {
    "int4": INT4,
    "hifloat8": HIFLOAT8,
    "float8_e5m2": FLOAT8_E5M2,
    "float8_e4m3fn": FLOAT8_E4M3FN,
    "float8_e8m0fnu": FLOAT8_E8M0FNU,
    "float4_e2m1fn_x2": FLOAT4_E2M1FN_X2,
    "float4_e1m2fn_x2": FLOAT4_E1M2FN_X2,
}

# torch ScalarType enum values, as used by int-typed ``output_dtype`` arguments (meta: TORCH_DTYPE_MAP)
_SCALAR_TYPE_INTS = {
    0: torch.uint8, 1: torch.int8, 2: torch.int16, 3: torch.int32, 4: torch.int64,
    5: torch.float16, 6: torch.float32, 7: torch.float64, 15: torch.bfloat16,
}

_I64_MAX = 9223372036854775807
_FLOATS = (torch.float16, torch.bfloat16, torch.float32)
_HALF = (torch.float16, torch.bfloat16)


@dataclasses.dataclass(frozen=True)
class SimConfig:
    """What the simulated machine is: runtime SoC id (ascend_npu.md §2) and CANN version string."""

    soc_version: int = 260
    cann_version: str = "9.1.0"

    @property
    def family(self) -> str:
        s = self.soc_version
        if 200 <= s <= 205:
            return "310P"
        if 220 <= s <= 225:
            return "A2"
        if 250 <= s <= 255:
            return "A3"
        if 260 <= s <= 269:
            return "A5"
        return "unknown"

    def cann_at_least(self, version: str) -> bool:
        def parts(v: str) -> tuple:
            out = []
            for p in v.replace("-", ".").split("."):
                digits = "".join(ch for ch in p if ch.isdigit())
                out.append(int(digits) if digits else 0)
            return tuple(out)

        return parts(self.cann_version) >= parts(version)


# The simulated module binds its config around every op call (see ``bind``).  Called directly, the ops
# see ``None`` and skip the chip / CANN gates.
_CONFIG: contextvars.ContextVar[Optional[SimConfig]] = contextvars.ContextVar("npu_sim_config", default=None)


def _config() -> Optional[SimConfig]:
    return _CONFIG.get()


# ------------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------------


def _check(cond: bool, msg: str, exc=ValueError) -> None:
    if not cond:
        raise exc(msg)


def _undefined(shape, dtype: torch.dtype, device=None) -> torch.Tensor:
    """A tensor whose contents the op leaves undefined: NaN for floats, the dtype's minimum for ints."""
    if dtype.is_floating_point:
        return torch.full(tuple(shape), float("nan"), dtype=dtype, device=device)
    if dtype == torch.bool:
        return torch.zeros(tuple(shape), dtype=dtype, device=device)
    return torch.full(tuple(shape), torch.iinfo(dtype).min, dtype=dtype, device=device)


def _resolve_dtype(dt) -> Optional[torch.dtype]:
    if dt is None or isinstance(dt, torch.dtype):
        return dt
    if isinstance(dt, int):
        if dt in _SCALAR_TYPE_INTS:
            return _SCALAR_TYPE_INTS[dt]
        raise NotImplementedError(f"output dtype int {dt} (an NPU-only format) is not simulated")
    raise TypeError(f"cannot interpret dtype {dt!r}")


def _stable_desc_order(scores: torch.Tensor) -> torch.Tensor:
    """Indices sorting the last dim in descending order; equal scores keep ascending index order."""
    return torch.sort(scores, dim=-1, descending=True, stable=True).indices


def _lengths(t: Optional[torch.Tensor], batch: int, default: int) -> list[int]:
    if t is None:
        return [default] * batch
    vals = [int(v) for v in t.reshape(-1).tolist()]
    _check(len(vals) == batch, f"expected {batch} sequence lengths, got {len(vals)}")
    return vals


def _cumulative_to_spans(t: Optional[torch.Tensor], what: str) -> list[tuple[int, int]]:
    _check(t is not None, f"{what} is required with the TND layout (prefix sums per batch)")
    vals = [int(v) for v in t.reshape(-1).tolist()]
    spans, prev = [], 0
    for v in vals:
        _check(v >= prev, f"{what} must be non-decreasing prefix sums, got {vals}")
        spans.append((prev, v - prev))
        prev = v
    return spans


# ------------------------------------------------------------------------------------------------
# norms, RoPE, SwiGLU
# ------------------------------------------------------------------------------------------------


def npu_rms_norm(input, gamma, epsilon=1e-06):
    """y = x · rstd · gamma over the trailing ``gamma.dim()`` dims; rstd = 1/sqrt(mean(x²) + eps).

    Returns (y in input dtype, rstd fp32 with the input's leading dims and 1 in the normalised dims).
    """
    _check(input.dtype in _FLOATS, f"npu_rms_norm: input dtype {input.dtype} not in fp16/bf16/fp32", TypeError)
    _check(gamma.dtype == input.dtype,
           f"npu_rms_norm: gamma dtype {gamma.dtype} must equal input dtype {input.dtype} (doc)", TypeError)
    _check(2 <= input.dim() <= 8, f"npu_rms_norm: input must have 2-8 dims, got {input.dim()}")
    gd = gamma.dim()
    _check(1 <= gd <= input.dim() and tuple(input.shape[input.dim() - gd:]) == tuple(gamma.shape),
           f"npu_rms_norm: gamma shape {tuple(gamma.shape)} must match input's trailing dims {tuple(input.shape)}")
    dims = tuple(range(input.dim() - gd, input.dim()))
    xf = input.float()
    rstd = torch.rsqrt(xf.pow(2).mean(dim=dims, keepdim=True) + epsilon)
    y = (xf * rstd * gamma.float()).to(input.dtype)
    return y, rstd


def npu_rotary_mul(input, r1, r2, rotary_mode="half", rotate=None):
    """output = r1 · x + r2 · x_new (doc formulas), r1 = cos, r2 = sin, broadcast against the 4-D input.

    half:       x_new = cat(−x2, x1) with x1, x2 the halves of the last dim (NeoX);
    interleave: x_new[2i] = −x[2i+1], x_new[2i+1] = x[2i] (GPT-J);
    rotate:     x_new = x @ rotate (overrides the mode, as the doc's pseudo-code reads).
    ASSUMPTION: computed in fp32 and rounded once to the input dtype.
    """
    _check(input.dim() == 4, f"npu_rotary_mul: input must be 4-D (BNSD/BSND/SBND), got {input.dim()}-D")
    _check(rotary_mode in ("half", "interleave"), f"npu_rotary_mul: rotary_mode {rotary_mode!r} not half/interleave")
    d = input.shape[-1]
    _check(d % 2 == 0, f"npu_rotary_mul: last dim {d} must be even")
    xf = input.float()
    if rotate is not None:
        _check(tuple(rotate.shape) == (d, d), f"npu_rotary_mul: rotate must be [{d}, {d}]")
        x_new = xf @ rotate.float()
    elif rotary_mode == "half":
        x1, x2 = xf.chunk(2, dim=-1)
        x_new = torch.cat((-x2, x1), dim=-1)
    else:
        x1, x2 = xf[..., 0::2], xf[..., 1::2]
        x_new = torch.stack((-x2, x1), dim=-1).flatten(-2)
    out = r1.float() * xf + r2.float() * x_new
    _check(tuple(out.shape) == tuple(input.shape),
           f"npu_rotary_mul: r1/r2 shapes {tuple(r1.shape)}/{tuple(r2.shape)} do not broadcast to {tuple(input.shape)}")
    return out.to(input.dtype)


def npu_swiglu(input, dim=-1):
    """silu(A) · B where A | B are the two halves of ``dim``; A (the first half) is the gate (doc)."""
    _check(input.dtype in _FLOATS, f"npu_swiglu: dtype {input.dtype} not fp32/fp16/bf16", TypeError)
    size = input.shape[dim]
    _check(size % 2 == 0, f"npu_swiglu: dim {dim} has odd size {size}")
    a, b = input.float().chunk(2, dim=dim)
    return (F.silu(a) * b).to(input.dtype)


# ------------------------------------------------------------------------------------------------
# mHC
# ------------------------------------------------------------------------------------------------


def npu_mhc_pre(x, phi, alpha, bias, *, gamma=None, norm_eps=1e-6, hc_eps=1e-6, out_flag=0, inner_precise=0):
    """mHC pre-mapping (doc + mHC paper, arXiv 2512.24880).  Per token, with x_flat = vec(x) ∈ R^{nD}:

        inv_rms = 1 / sqrt(mean(x_flat²) + norm_eps)
        h_mix   = (x ⊙ gamma)_flat @ phiᵀ                       # [n² + 2n]  (gamma = 1 if None)
        h_pre   = σ(α_pre  · h_mix[0:n]   · inv_rms + b_pre) + hc_eps
        h_post  = 2σ(α_post · h_mix[n:2n]  · inv_rms + b_post)
        h_res   = α_res · h_mix[2n:] · inv_rms + b_res, as an n×n matrix, row-major, before Sinkhorn
        h_in    = Σ_i h_pre_i · x_i                              # fp32, cast to x.dtype

    ASSUMPTION (undocumented): h_post = 2σ(·) as in the mHC paper and DeepSeek V4 (not σ(·)).
    ASSUMPTION (undocumented): h_mix is the raw GEMM output *before* the 1/rms scaling (the doc calls it
        "x 与 phi 矩阵乘的结果" and returns inv_rms separately); with gamma it is (x ⊙ gamma) @ phiᵀ.
    ASSUMPTION: the h_pre output includes + hc_eps (the value that weights h_in).
    ASSUMPTION: with alpha of 2 elements only the pre/post rows (first 2n rows of phi/bias) are used and
        h_res is the [1] placeholder of the meta function (contents undefined → NaN).
    inner_precise (HF32 vs FP32 cube matmul) is not modelled: the GEMM is always fp32.
    With out_flag=0 the meta function still returns full-shaped inv_rms / h_mix / h_pre; their contents are
    undefined here (NaN).
    """
    _check(x.dim() in (3, 4), f"npu_mhc_pre: x must be 3-D or 4-D, got {x.dim()}-D")
    _check(x.dtype in _HALF, f"npu_mhc_pre: x dtype {x.dtype} must be bf16/fp16", TypeError)
    _check(phi.dtype == torch.float32 and alpha.dtype == torch.float32 and bias.dtype == torch.float32,
           "npu_mhc_pre: phi, alpha and bias must be fp32", TypeError)
    _check(alpha.numel() in (2, 3), f"npu_mhc_pre: alpha must have 2 or 3 elements, got {alpha.numel()}")
    _check(out_flag in (0, 1), f"npu_mhc_pre: out_flag must be 0 or 1, got {out_flag}")
    _check(inner_precise in (0, 1), f"npu_mhc_pre: inner_precise must be 0 or 1, got {inner_precise}")
    lead = tuple(x.shape[:-2])
    n, d = x.shape[-2], x.shape[-1]
    has_res = alpha.numel() == 3
    rows = phi.shape[0]
    _check(phi.dim() == 2 and phi.shape[1] == n * d, f"npu_mhc_pre: phi must be [rows, n·D={n * d}], got {tuple(phi.shape)}")
    _check(rows in ((n * n + 2 * n) if has_res else 2 * n, n * n + 2 * n),
           f"npu_mhc_pre: phi has {rows} rows, expected {n * n + 2 * n}" + ("" if has_res else f" or {2 * n}"))
    _check(bias.numel() == rows, f"npu_mhc_pre: bias has {bias.numel()} elements, phi has {rows} rows")
    if gamma is not None:
        _check(tuple(gamma.shape) == (n, d), f"npu_mhc_pre: gamma must be [{n}, {d}], got {tuple(gamma.shape)}")

    t = math.prod(lead)
    xf = x.float().reshape(t, n, d)
    inv_rms = torch.rsqrt(xf.pow(2).mean(dim=(-2, -1)) + norm_eps)                   # [T]
    xg = xf * gamma.float() if gamma is not None else xf
    h_mix = xg.reshape(t, n * d) @ phi.float().t()                                     # [T, rows]
    mix = h_mix * inv_rms[:, None]
    a = alpha.float()
    b = bias.float()
    h_pre = torch.sigmoid(a[0] * mix[:, :n] + b[:n]) + hc_eps
    h_post = 2.0 * torch.sigmoid(a[1] * mix[:, n:2 * n] + b[n:2 * n])
    h_in = (h_pre[:, :, None] * xf).sum(dim=1).to(x.dtype)
    if has_res:
        h_res = (a[2] * mix[:, 2 * n:2 * n + n * n] + b[2 * n:2 * n + n * n]).reshape(*lead, n, n)
    else:
        h_res = _undefined([1], torch.float32)

    h_in = h_in.reshape(*lead, d)
    h_post = h_post.reshape(*lead, n)
    if out_flag:
        inv_rms_o = inv_rms.reshape(lead)
        h_mix_o = h_mix.reshape(*lead, rows)
        h_pre_o = h_pre.reshape(*lead, n)
    else:
        inv_rms_o = _undefined(lead, torch.float32)
        h_mix_o = _undefined((*lead, rows), torch.float32)
        h_pre_o = _undefined((*lead, n), torch.float32)
    return h_in, h_post, h_res, inv_rms_o, h_mix_o, h_pre_o


def npu_mhc_sinkhorn(x, *, eps=1e-6, num_iters=20, out_flag=0):
    """Sinkhorn–Knopp projection of positive n×n matrices towards doubly-stochastic.

    ASSUMPTION (the doc gives no formula): the input is normalised directly (no exp / softmax first, as the
    doc's examples feed positive matrices), with ``num_iters`` iterations of
        y ← y / (Σ_j y[i, j] + eps)   (rows first)
        y ← y / (Σ_i y[i, j] + eps)   (then columns)
    so the last step is a column normalisation.
    With out_flag=1 the two backward buffers (``norm``, ``sum``; flat fp32 of the meta function's sizes)
    have an undocumented internal layout and are returned undefined (NaN); with out_flag=0 they are None.
    """
    _check(x.dim() in (3, 4), f"npu_mhc_sinkhorn: x must be 3-D or 4-D, got {x.dim()}-D")
    _check(x.shape[-1] in (4, 6, 8) and x.shape[-2] == x.shape[-1],
           f"npu_mhc_sinkhorn: x must end in [n, n] with n in 4/6/8, got {tuple(x.shape)}")
    _check(x.dtype == torch.float32, f"npu_mhc_sinkhorn: x must be fp32, got {x.dtype}", TypeError)
    _check(0 < int(num_iters) <= 100, f"npu_mhc_sinkhorn: num_iters must be in [1, 100], got {num_iters}")
    y = x.float()
    for _ in range(int(num_iters)):
        y = y / (y.sum(dim=-1, keepdim=True) + eps)
        y = y / (y.sum(dim=-2, keepdim=True) + eps)
    y = y.to(x.dtype)
    if not out_flag:
        return y, None, None
    n = x.shape[-1]
    t = math.prod(x.shape[:-2])
    norm = _undefined([2 * int(num_iters) * t * n * 8], x.dtype)
    ssum = _undefined([2 * int(num_iters) * t * 8], x.dtype)
    return y, norm, ssum


def npu_mhc_post(x, h_res, h_out, h_post):
    """x_{l+1} = h_resᵀ · x_l + h_out ⊗ h_post  (doc), i.e. per token y_j = Σ_i h_res[i, j] x_i + h_post_j · h_out.

    h_res None: y = x + h_out ⊗ h_post (doc: accepted only on Ascend 950; other chips raise — simulated when
    the module's SoC is known).  fp32 math, output in x's dtype and shape.
    """
    _check(x.dim() in (3, 4), f"npu_mhc_post: x must be 3-D or 4-D, got {x.dim()}-D")
    _check(x.dtype in _HALF and h_out.dtype in _HALF, "npu_mhc_post: x and h_out must be bf16/fp16", TypeError)
    _check(h_post.dtype == torch.float32, "npu_mhc_post: h_post must be fp32", TypeError)
    lead, n, d = tuple(x.shape[:-2]), x.shape[-2], x.shape[-1]
    _check(tuple(h_out.shape) == (*lead, d), f"npu_mhc_post: h_out must be {(*lead, d)}, got {tuple(h_out.shape)}")
    _check(tuple(h_post.shape) == (*lead, n), f"npu_mhc_post: h_post must be {(*lead, n)}, got {tuple(h_post.shape)}")
    xf = x.float()
    add = h_post.float()[..., :, None] * h_out.float()[..., None, :]
    if h_res is None:
        cfg = _config()
        if cfg is not None and cfg.family != "A5":
            raise RuntimeError(f"npu_mhc_post: h_res=None is supported only on Ascend 950 (simulated SoC "
                               f"{cfg.soc_version}, family {cfg.family})")
        y = xf + add
    else:
        _check(h_res.dtype == torch.float32, "npu_mhc_post: h_res must be fp32", TypeError)
        _check(tuple(h_res.shape) == (*lead, n, n), f"npu_mhc_post: h_res must be {(*lead, n, n)}, got {tuple(h_res.shape)}")
        y = torch.einsum("...ij,...id->...jd", h_res.float(), xf) + add
    return y.to(x.dtype)


# ------------------------------------------------------------------------------------------------
# MoE
# ------------------------------------------------------------------------------------------------


def npu_moe_gating_top_k(x, k, *, bias=None, input_ids=None, tid2eid=None, k_group=1, group_count=1,
                         group_select_mode=0, renorm=0, norm_type=0, out_flag=False, routed_scaling_factor=1.0,
                         eps=1e-20):
    """MoE gate: normalise, select top-k (bias for selection only), weight.

    norm: 0 softmax, 1 sigmoid, 2 sqrt(softplus) = sqrt(ln(1 + eˣ)) literally in fp32 (no large-x shortcut,
    as the vllm-ascend kernel; overflows to inf above ≈ 88).  Selection uses s + bias (bias ∈ R^E, same dtype
    as x); hash routing (input_ids + tid2eid) takes the experts from tid2eid[input_ids] instead.
    Group-limited routing: groups of E/group_count experts scored by their max (mode 0) or top-2 sum (mode 1)
    of the selection scores; the best k_group groups stay eligible.
    y = un-biased normalised scores of the selected experts; for sigmoid / sqrt-softplus y ← y/(Σy + eps),
    then y ← y · routed_scaling_factor; softmax weights are scaled but not renormalised (ascend_npu.md §5.2).
    ASSUMPTION: the k outputs are ordered by descending selection score, ties to the lower expert index;
        hash routing keeps tid2eid's order; bias is ignored under hash routing.
    ASSUMPTION: norm_out (fp32 [T, E]) is undefined (NaN) unless out_flag=True.
    """
    _check(x.dim() == 2, f"npu_moe_gating_top_k: x must be 2-D, got {x.dim()}-D")
    _check(x.dtype in _FLOATS, f"npu_moe_gating_top_k: x dtype {x.dtype} not fp16/bf16/fp32", TypeError)
    t, e = x.shape
    _check(e <= 2048, f"npu_moe_gating_top_k: E = {e} > 2048")
    _check(renorm == 0, f"npu_moe_gating_top_k: only renorm=0 is supported, got {renorm}")
    _check(norm_type in (0, 1, 2), f"npu_moe_gating_top_k: norm_type {norm_type} not in 0/1/2")
    _check((input_ids is None) == (tid2eid is None), "npu_moe_gating_top_k: pass input_ids and tid2eid together or neither")
    _check(group_count >= 1 and e % group_count == 0 and e // group_count > 2,
           f"npu_moe_gating_top_k: E={e} must split into group_count={group_count} groups of size > 2")
    _check(1 <= k_group <= group_count, f"npu_moe_gating_top_k: k_group {k_group} not in [1, group_count]")
    _check(1 <= k <= e // group_count * k_group, f"npu_moe_gating_top_k: k={k} out of range")
    _check(group_select_mode in (0, 1), f"npu_moe_gating_top_k: group_select_mode {group_select_mode} not 0/1")
    if bias is not None:
        _check(bias.dim() == 1 and bias.shape[0] == e, f"npu_moe_gating_top_k: bias must be [{e}]")
        _check(bias.dtype == x.dtype, f"npu_moe_gating_top_k: bias dtype {bias.dtype} must equal x dtype {x.dtype}", TypeError)

    xf = x.float()
    if norm_type == 0:
        s = torch.softmax(xf, dim=-1)
    elif norm_type == 1:
        s = torch.sigmoid(xf)
    else:
        s = torch.sqrt(torch.log(1.0 + torch.exp(xf)))

    if input_ids is not None:
        _check(input_ids.dim() == 1 and input_ids.shape[0] == t, "npu_moe_gating_top_k: input_ids must be [T]")
        _check(tid2eid.dim() == 2 and tid2eid.shape[1] == k, "npu_moe_gating_top_k: tid2eid must be [vocab, k]")
        idx = tid2eid[input_ids.long()].long()
    else:
        sel = s + bias.float() if bias is not None else s.clone()
        if group_count > 1:
            gsize = e // group_count
            grouped = sel.reshape(t, group_count, gsize)
            if group_select_mode == 0:
                gscore = grouped.max(dim=-1).values
            else:
                gscore = torch.sort(grouped, dim=-1, descending=True).values[..., :2].sum(dim=-1)
            keep_groups = _stable_desc_order(gscore)[:, :k_group]
            keep = torch.zeros(t, group_count, dtype=torch.bool)
            keep.scatter_(1, keep_groups, True)
            sel = sel.masked_fill(~keep.repeat_interleave(gsize, dim=1), float("-inf"))
        idx = _stable_desc_order(sel)[:, :k]
    w = s.gather(1, idx)
    if norm_type in (1, 2):
        w = w / (w.sum(dim=-1, keepdim=True) + eps)
    w = w * routed_scaling_factor
    norm_out = s if out_flag else _undefined((t, e), torch.float32)
    return w.to(x.dtype), idx.to(torch.int32), norm_out


def npu_moe_init_routing_v2(x, expert_idx, *, scale=None, offset=None, active_num=-1, expert_capacity=-1,
                            expert_num=-1, drop_pad_mode=0, expert_tokens_num_type=0, expert_tokens_num_flag=False,
                            quant_mode=-1, active_expert_range=[], row_idx_type=0, x_dtype=None):
    """MoE dispatch: sort the (token, k) pairs by expert and gather the token rows (dropless only).

    From the doc and CANN's aclnnMoeInitRoutingV2/V3 formulas: flatten expert_idx row-major (source index
    f = row·K + k), keep the pairs whose expert lies in active_expert_range = [start, end), stable-sort them by
    expert (sortedRowIdx), then
        expanded_x[i] = x[sortedRowIdx[i] // K]                        (first available_idx_num rows valid)
        row_idx_type 0 (gather): expanded_row_idx[sortedRowIdx[i]] = i, −1 for pairs out of range
        row_idx_type 1 (scatter): expanded_row_idx[i] = sortedRowIdx[i] (rest undefined)
        counts over [start, end): type 0 cumsum, 1 per-expert count, 2 (expert, count) pairs of the
        non-empty experts in order, then a (0, 0) terminator when fewer than expert_num pairs.
    quant_mode 1 (dynamic int8, aclnnMoeInitRoutingV3 formula): xs = x_row · smooth_scale[expert − start]
    (scale [range, H] or [1, H], optional), dyn = max|xs| / 127, q = round(xs / dyn) → int8, expanded_scale = dyn.
    quant_mode −1: expanded_scale[i] = scale[sortedRowIdx[i] // K] when scale [NUM_ROWS] is given.
    ASSUMPTION: rows / entries the doc calls invalid or undefined are NaN / int-min (see module doc); the
        key-value output after the (0, 0) terminator is zero-filled.
    ASSUMPTION: round() is round-half-to-even, |q| ≤ 127; the smoothed row x·scale is what gets quantised
        (the V3 doc writes round(x / dyn), but dyn is computed from x·scale, as in SmoothQuant).
    Not simulated: drop_pad_mode 1, quant modes other than −1 / 1, 0 < active_num < available_idx_num
    (truncation semantics undocumented), x_dtype (hifloat8 / fp4 inputs).
    """
    _check(x.dim() == 2 and expert_idx.dim() == 2 and x.shape[0] == expert_idx.shape[0],
           "npu_moe_init_routing_v2: x [NUM_ROWS, H] and expert_idx [NUM_ROWS, K] must be 2-D with equal rows")
    _check(expert_idx.dtype == torch.int32, f"npu_moe_init_routing_v2: expert_idx must be int32, got {expert_idx.dtype}", TypeError)
    _check(row_idx_type in (0, 1), f"npu_moe_init_routing_v2: row_idx_type {row_idx_type} not 0/1")
    _check(expert_tokens_num_type in (0, 1, 2), f"npu_moe_init_routing_v2: expert_tokens_num_type {expert_tokens_num_type} not 0/1/2")
    if drop_pad_mode != 0:
        raise NotImplementedError("npu_moe_init_routing_v2: only drop_pad_mode=0 (dropless) is simulated")
    if quant_mode not in (-1, 1):
        raise NotImplementedError(f"npu_moe_init_routing_v2: quant_mode {quant_mode} is not simulated (only -1 and 1)")
    if x_dtype is not None:
        raise NotImplementedError("npu_moe_init_routing_v2: x_dtype (NPU-only input formats) is not simulated")
    _check(offset is None, "npu_moe_init_routing_v2: offset must be None (non-quantised and dynamic quant)")
    n, kk = expert_idx.shape
    h = x.shape[1]
    if active_expert_range:
        _check(len(active_expert_range) == 2 and 0 <= active_expert_range[0] < active_expert_range[1] <= 10240,
               f"npu_moe_init_routing_v2: invalid active_expert_range {active_expert_range}")
        start, end = int(active_expert_range[0]), int(active_expert_range[1])
        if expert_num > 0:
            _check(end <= expert_num, "npu_moe_init_routing_v2: active_expert_range end exceeds expert_num")
    else:
        _check(expert_num > 0, "npu_moe_init_routing_v2: give expert_num (> 0) or active_expert_range")
        start, end = 0, int(expert_num)
    rng = end - start

    flat = expert_idx.reshape(-1).long()
    in_range = (flat >= start) & (flat < end)
    keys = torch.where(in_range, flat, torch.full_like(flat, _I64_MAX))
    order = torch.sort(keys, stable=True).indices
    avail = int(in_range.sum())
    sorted_src = order[:avail]
    src_rows = torch.div(sorted_src, kk, rounding_mode="floor")
    sorted_expert = flat[sorted_src]

    rows_out = n * kk if active_num <= 0 else min(int(active_num), n * kk)
    if 0 < active_num < avail:
        raise NotImplementedError("npu_moe_init_routing_v2: active_num smaller than the routed pairs is not simulated")

    if quant_mode == -1:
        expanded_x = _undefined((rows_out, h), x.dtype)
        expanded_x[:avail] = x[src_rows]
        expanded_scale = _undefined((rows_out,), torch.float32)
        if scale is not None:
            _check(scale.dim() == 1 and scale.shape[0] == n, "npu_moe_init_routing_v2: scale must be [NUM_ROWS] without quantisation")
            expanded_scale[:avail] = scale.float()[src_rows]
    else:
        _check(x.dtype in _FLOATS, "npu_moe_init_routing_v2: dynamic quant needs a floating x", TypeError)
        xs = x[src_rows].float()
        if scale is not None:
            _check(scale.dim() == 2 and scale.shape[1] == h and scale.shape[0] in (rng, 1),
                   f"npu_moe_init_routing_v2: dynamic-quant scale must be [{rng} or 1, {h}]")
            sm = scale.float()[sorted_expert - start] if scale.shape[0] == rng else scale.float()[0].expand(avail, h)
            xs = xs * sm
        dyn = xs.abs().amax(dim=-1) / 127.0
        q = torch.round(xs / torch.where(dyn > 0, dyn, torch.ones_like(dyn))[:, None]).clamp(-127, 127)
        expanded_x = _undefined((rows_out, h), torch.int8)
        expanded_x[:avail] = q.to(torch.int8)
        expanded_scale = _undefined((rows_out,), torch.float32)
        expanded_scale[:avail] = dyn

    if row_idx_type == 0:
        row_idx = torch.full((n * kk,), -1, dtype=torch.int32)
        row_idx[sorted_src] = torch.arange(avail, dtype=torch.int32)
    else:
        row_idx = _undefined((n * kk,), torch.int32)
        row_idx[:avail] = sorted_src.to(torch.int32)

    counts = torch.bincount(sorted_expert - start, minlength=rng)[:rng].to(torch.int64) if avail else torch.zeros(rng, dtype=torch.int64)
    if not expert_tokens_num_flag:
        tokens = _undefined((), torch.int64)
    elif expert_tokens_num_type == 0:
        tokens = torch.cumsum(counts, 0)
    elif expert_tokens_num_type == 1:
        tokens = counts
    else:
        _check(expert_num > 0, "npu_moe_init_routing_v2: key_value mode needs expert_num > 0")
        tokens = torch.zeros((int(expert_num), 2), dtype=torch.int64)
        nz = torch.nonzero(counts, as_tuple=False).reshape(-1)
        tokens[:nz.numel(), 0] = nz + start
        tokens[:nz.numel(), 1] = counts[nz]
        # the (0, 0) terminator after the valid pairs is the zero fill
    return expanded_x, row_idx, tokens, expanded_scale


def _act(y: torch.Tensor, act_type: int) -> torch.Tensor:
    if act_type == 0:
        return y
    if act_type == 1:
        return F.relu(y)
    if act_type == 2:
        return F.gelu(y, approximate="tanh")
    if act_type == 4:
        return y * torch.sigmoid(1.702 * y)  # ASSUMPTION: FAST_GELU = x·σ(1.702x)
    if act_type == 5:
        return F.silu(y)
    raise ValueError(f"npu_grouped_matmul: act_type {act_type} is not supported")


def npu_grouped_matmul(x, weight, *, bias=None, scale=None, offset=None, antiquant_scale=None, antiquant_offset=None,
                       per_token_scale=None, group_list=None, activation_input=None, activation_quant_scale=None,
                       activation_quant_offset=None, split_item=0, group_type=None, group_list_type=0, act_type=0,
                       tuning_config=None, output_dtype=None, x_dtype=None, weight_dtype=None, scale_dtype=None,
                       per_token_scale_dtype=None):
    """Grouped GEMM: y_g = x_g · w_g (+ bias_g), fp32 accumulation, output in x's dtype unless output_dtype.

    Forms (doc "场景"):
    * group_type 0 (or None with a list group_list): split x along M.  Single x [M, K] with group_list
      (Tensor: type 0 cumsum, type 1 counts; List[int]: cumsum) and weight = [W [E, K, N]] or [W_0 … W_{E−1}];
      several x tensors are one group each.  split_item 2/3 → one output [M, N]; 0/1 → one output per group.
    * group_type −1: independent pairs y_i = x_i · w_i (+ b_i), x_i of 2–6 dims; split_item 0/1 → list.
    Quantised forms (doc formulas): int8 x and w: y = (x·w + bias) · scale [· per_token_scale] then act_type;
    antiquant (int8 w, float x): y = x · ((w + antiquant_offset) · antiquant_scale) + bias.
    Weights may be transposed views (logical shape [K, N] per group).
    ASSUMPTION: rows of a single x past the last group (Σ group_list < M) are undefined in the output (NaN).
    ASSUMPTION: act_type is applied only in the per-token-quantised form (doc: "仅per-token量化场景支持激活函数
        计算"); elsewhere a non-zero act_type raises NotImplementedError rather than being silently ignored.
    Not simulated: group_type 2 (K split), int4 / MX / HiF8 / FP8 formats, int64 (packed) scales.
    """
    _check(isinstance(x, (list, tuple)) and isinstance(weight, (list, tuple)) and len(x) > 0 and len(weight) > 0,
           "npu_grouped_matmul: x and weight must be non-empty lists of tensors", TypeError)
    list_form = isinstance(group_list, (list, tuple))
    _check(group_type in (-1, 0, 2) or (list_form and group_type is None),
           f"npu_grouped_matmul: group_type only supports -1, 0 and 2, got {group_type}")
    if group_type == 2:
        raise NotImplementedError("npu_grouped_matmul: group_type 2 (K-axis grouping) is not simulated")
    for name, val in (("x_dtype", x_dtype), ("weight_dtype", weight_dtype), ("scale_dtype", scale_dtype),
                      ("per_token_scale_dtype", per_token_scale_dtype)):
        if val is not None:
            raise NotImplementedError(f"npu_grouped_matmul: {name} (NPU-only formats) is not simulated")
    _check(offset is None and activation_input is None and activation_quant_scale is None
           and activation_quant_offset is None,
           "npu_grouped_matmul: offset / activation_* accept only None (doc)")
    _check(split_item in (0, 1, 2, 3), f"npu_grouped_matmul: split_item {split_item} not in 0..3")
    out_dtype = _resolve_dtype(output_dtype)
    if out_dtype is None:
        out_dtype = x[0].dtype
    if any(w.dtype == torch.int32 for w in weight):
        raise NotImplementedError("npu_grouped_matmul: int4-packed (int32) weights are not simulated")
    if scale is not None and any(s.dtype == torch.int64 for s in scale):
        raise NotImplementedError("npu_grouped_matmul: int64 (packed) scales are not simulated")

    single_w = len(weight) == 1 and weight[0].dim() == 3

    def w_of(g):
        return weight[0][g] if single_w else weight[g]

    def n_groups_w():
        return weight[0].shape[0] if single_w else len(weight)

    def pick(lst, g):
        # a single 3-D weight takes its per-group tensors stacked in one list entry ([E, N] bias/scales);
        # a weight list takes one entry per group
        if lst is None:
            return None
        if single_w and len(lst) == 1 and lst[0].dim() >= 2:
            return lst[0][g]
        return lst[g]

    def one(xg, g, pts_rows):
        wg = w_of(g)
        _check(wg.dim() == 2, f"npu_grouped_matmul: group {g}: weight must be 2-D [K, N] per group")
        _check(xg.shape[-1] == wg.shape[0], f"npu_grouped_matmul: group {g}: x K={xg.shape[-1]} vs weight K={wg.shape[0]}")
        bg = pick(bias, g)
        if xg.dtype == torch.int8 and wg.dtype == torch.int8:
            if act_type and pts_rows is None:
                raise NotImplementedError("npu_grouped_matmul: act_type only applies to the per-token-quantised form")
            acc = xg.double() @ wg.double()  # exact integer accumulation (|acc| << 2**53 at these sizes)
            if bg is not None:
                acc = acc + bg.double()
            sg = pick(scale, g)
            y = acc if sg is None else acc * sg.double()
            if pts_rows is not None:
                y = _act(y * pts_rows.double()[:, None], act_type)
            return y.float()
        if act_type:
            raise NotImplementedError("npu_grouped_matmul: act_type only applies to the per-token-quantised form")
        if wg.dtype == torch.int8:
            _check(antiquant_scale is not None, "npu_grouped_matmul: int8 weights with float x need antiquant_scale")
            wf = wg.float()
            ao = pick(antiquant_offset, g)
            if ao is not None:
                wf = wf + ao.float()
            wf = wf * pick(antiquant_scale, g).float()
        else:
            wf = wg.float()
        y = xg.float() @ wf
        if bg is not None:
            y = y + bg.float()
        return y

    outputs: list[torch.Tensor] = []
    if group_type == -1:
        _check(group_list is None, "npu_grouped_matmul: group_type -1 requires group_list=None")
        _check(len(x) == len(weight), "npu_grouped_matmul: group_type -1 needs as many x as weight tensors")
        ys = []
        for g, xg in enumerate(x):
            pts = per_token_scale[g] if per_token_scale is not None else None
            ys.append(one(xg, g, pts).to(out_dtype))
        if split_item in (0, 1):
            return ys
        return [torch.cat([y.reshape(-1, y.shape[-1]) for y in ys], dim=0)]

    # group_type 0: M-axis grouping
    if len(x) == 1:
        xm = x[0]
        _check(xm.dim() == 2, "npu_grouped_matmul: grouped x must be 2-D [M, K]")
        _check(group_list is not None, "npu_grouped_matmul: group_list is required for a single grouped x")
        gl = [int(v) for v in (group_list.reshape(-1).tolist() if isinstance(group_list, torch.Tensor) else group_list)]
        if isinstance(group_list, torch.Tensor) and group_list_type == 1:
            _check(all(v >= 0 for v in gl), "npu_grouped_matmul: counts must be non-negative")
            ends = list(torch.cumsum(torch.tensor(gl, dtype=torch.int64), 0).tolist()) if gl else []
        else:
            _check(list_form or group_list_type == 0, f"npu_grouped_matmul: group_list_type {group_list_type} not 0/1")
            _check(all(b >= a for a, b in zip([0] + gl[:-1], gl)) and (not gl or gl[0] >= 0),
                   "npu_grouped_matmul: cumulative group_list must be non-negative and non-decreasing")
            ends = gl
        _check(len(ends) == n_groups_w(), f"npu_grouped_matmul: group_list has {len(ends)} groups, weight has {n_groups_w()}")
        m = xm.shape[0]
        _check(not ends or ends[-1] <= m, f"npu_grouped_matmul: groups cover {ends[-1] if ends else 0} rows > M={m}")
        n_out = w_of(0).shape[-1]
        pts_all = per_token_scale[0] if per_token_scale is not None else None
        starts = [0] + ends[:-1]
        ys = [one(xm[a:b], g, pts_all[a:b] if pts_all is not None else None).to(out_dtype)
              for g, (a, b) in enumerate(zip(starts, ends))]
        if split_item in (2, 3):
            y = _undefined((m, n_out), out_dtype)
            for (a, b), yg in zip(zip(starts, ends), ys):
                y[a:b] = yg
            return [y]
        return ys

    # several x tensors, one group each ("多多单" / "多多多" with group_list)
    _check(len(x) == n_groups_w(), "npu_grouped_matmul: need one weight per x tensor")
    ys = []
    for g, xg in enumerate(x):
        pts = per_token_scale[g] if per_token_scale is not None else None
        ys.append(one(xg, g, pts).to(out_dtype))
    if split_item in (2, 3):
        return [torch.cat(ys, dim=0)]
    return ys


def npu_moe_finalize_routing(expanded_permuted_rows, skip1, skip2, bias, scales, expanded_src_to_dst_row,
                             export_for_source_row, drop_pad_mode=0, k=1):
    """MoE combine (doc formula):

        out[i] = skip1[i] + skip2[i] + Σ_k scales[i, k] · (rows[src_to_dst[pos(i, k)]] + bias[expert[i, k]])

    pos(i, k) = i + k·NUM_ROWS for drop_pad_mode 0 (the doc's formula; k-major, as the v1
    npu_moe_init_routing produces) and i·K + k for drop_pad_mode 2 (token-major, as
    npu_moe_init_routing_v2 with row_idx_type=0 produces; from the CANN MoeFinalizeRoutingV2 kernel).
    A −1 index contributes a zero row (bias still added), as CANN's golden script does.  scales None → 1.
    ASSUMPTION: fp32 accumulation, one rounding to the rows' dtype at the end.
    Not simulated: drop_pad_mode 1 / 3 (drop-pad, rows [E, C, H]).
    """
    if drop_pad_mode not in (0, 2):
        raise NotImplementedError(f"npu_moe_finalize_routing: drop_pad_mode {drop_pad_mode} is not simulated (0 and 2 are)")
    rows = expanded_permuted_rows
    _check(rows.dim() == 2, "npu_moe_finalize_routing: expanded_permuted_rows must be [NUM_ROWS·K, H]")
    _check(rows.dtype in _FLOATS, f"npu_moe_finalize_routing: rows dtype {rows.dtype} not fp16/bf16/fp32", TypeError)
    _check(skip2 is None or skip1 is not None, "npu_moe_finalize_routing: skip2 requires skip1 (doc)")
    for name, t in (("skip1", skip1), ("skip2", skip2), ("bias", bias)):
        _check(t is None or t.dtype == rows.dtype,
               f"npu_moe_finalize_routing: {name} must have the rows' dtype {rows.dtype} (doc)", TypeError)
    src = expanded_src_to_dst_row.reshape(-1).long()
    if scales is not None:
        _check(scales.dtype == rows.dtype, "npu_moe_finalize_routing: scales must have the rows' dtype (doc)", TypeError)
        n, kk = scales.shape
    else:
        _check(k is not None and k > 0, "npu_moe_finalize_routing: give k when scales is None")
        kk = int(k)
        n = src.numel() // kk
    _check(src.numel() == n * kk, f"npu_moe_finalize_routing: expanded_src_to_dst_row has {src.numel()} entries, expected {n * kk}")
    h = rows.shape[1]
    idx = src.reshape(kk, n).t() if drop_pad_mode == 0 else src.reshape(n, kk)       # [N, K]
    _check(bool((idx < rows.shape[0]).all()), "npu_moe_finalize_routing: index past expanded_permuted_rows")
    valid = idx >= 0
    gathered = rows.float()[idx.clamp(min=0)]                                          # [N, K, H]
    g = torch.where(valid[..., None], gathered, torch.zeros_like(gathered))
    if bias is not None:
        _check(export_for_source_row is not None, "npu_moe_finalize_routing: bias needs export_for_source_row")
        g = g + bias.float()[export_for_source_row.long()]
    w = scales.float() if scales is not None else torch.ones(n, kk)
    out = (w[..., None] * g).sum(dim=1)
    if skip1 is not None:
        out = skip1.float() + out
    if skip2 is not None:
        out = out + skip2.float()
    return out.to(rows.dtype).reshape(n, h)


# ------------------------------------------------------------------------------------------------
# attention family (DeepSeek V3.2-style lightning indexer and sparse flash attention)
# ------------------------------------------------------------------------------------------------


def _query_batches(q: torch.Tensor, layout: str, act_q: Optional[torch.Tensor], what: str):
    """Flatten q to [rows, N, D]; return it, the per-batch (row start, valid rows, padded rows) list."""
    if layout == "BSND":
        _check(q.dim() == 4, f"{what}: BSND query must be 4-D, got {q.dim()}-D")
        b, s1 = q.shape[:2]
        lens = _lengths(act_q, b, s1)
        _check(all(0 <= v <= s1 for v in lens), f"{what}: actual_seq_lengths_query must lie in [0, S1={s1}]")
        return [(i * s1, lens[i], s1) for i in range(b)]
    if layout == "TND":
        _check(q.dim() == 3, f"{what}: TND query must be 3-D, got {q.dim()}-D")
        spans = _cumulative_to_spans(act_q, "actual_seq_lengths_query")
        _check(spans[-1][0] + spans[-1][1] <= q.shape[0], f"{what}: actual_seq_lengths_query exceeds T")
        return [(a, ln, ln) for a, ln in spans]
    raise ValueError(f"{what}: layout_query {layout!r} not BSND/TND")


def _kv_batch(t: Optional[torch.Tensor], layout: str, lengths: list, spans, block_table, b: int):
    """Keys (or values / key_rope) of batch b as [L_b, N, D] in logical token order."""
    if t is None:
        return None
    if layout == "BSND":
        return t[b, :lengths[b]]
    if layout == "TND":
        a, ln = spans[b]
        return t[a:a + ln]
    # PA_BSND: [blocks, block_size, N, D] through block_table[b]
    bs = t.shape[1]
    nblk = -(-lengths[b] // bs)
    blocks = block_table[b, :nblk].long()
    return t[blocks].reshape(nblk * bs, *t.shape[2:])[:lengths[b]]


def _kv_layout(key: torch.Tensor, layout: str, act_kv: Optional[torch.Tensor], block_table, nb: int, what: str):
    if layout == "BSND":
        _check(key.dim() == 4 and key.shape[0] == nb, f"{what}: BSND key must be [B={nb}, S2, N2, D]")
        lens = _lengths(act_kv, nb, key.shape[1])
        _check(all(0 <= v <= key.shape[1] for v in lens), f"{what}: actual kv lengths must lie in [0, S2]")
        return lens, None
    if layout == "TND":
        _check(key.dim() == 3, f"{what}: TND key must be 3-D")
        # ASSUMPTION (SFA): TND kv lengths are prefix sums, as the indexer doc states for TND keys.
        spans = _cumulative_to_spans(act_kv, "actual_seq_lengths_kv/key")
        _check(len(spans) == nb, f"{what}: {len(spans)} kv batches vs {nb} query batches")
        _check(spans[-1][0] + spans[-1][1] <= key.shape[0], f"{what}: kv prefix sums exceed T2")
        return [ln for _, ln in spans], spans
    if layout == "PA_BSND":
        _check(key.dim() == 4, f"{what}: PA_BSND key must be [blocks, block_size, N2, D]")
        _check(block_table is not None and block_table.dim() == 2 and block_table.shape[0] == nb,
               f"{what}: PA_BSND needs block_table [B, max_blocks]")
        _check(act_kv is not None, f"{what}: PA_BSND needs the actual kv lengths")
        lens = _lengths(act_kv, nb, 0)
        bs = key.shape[1]
        _check(all(-(-v // bs) <= block_table.shape[1] for v in lens), f"{what}: block_table too short for the kv lengths")
        return lens, None
    raise ValueError(f"{what}: key layout {layout!r} not BSND/TND/PA_BSND")


_CHUNK = 64  # query rows per chunk, to bound memory at real shapes


def npu_lightning_indexer(query, key, weights, *, actual_seq_lengths_query=None, actual_seq_lengths_key=None,
                          block_table=None, layout_query="BSND", layout_key="BSND", sparse_count=2048, sparse_mode=3,
                          pre_tokens=9223372036854775807, next_tokens=9223372036854775807, return_value=False):
    """Top-``sparse_count`` keys per query token and KV head under score_s = Σ_g w_g · ReLU(q_g · k_s).

    (Doc formula: Top-k{[1]_{1×g} @ [(W @ [1]_{1×S_k}) ⊙ ReLU(Q_index @ K_indexᵀ)]}; the g query heads sharing
    a KV head are summed.)  Keys at positions ≥ the batch's actual_seq_lengths_key are excluded;
    sparse_mode 3 (right-down causal) additionally excludes s > (S2_b − S1_b) + i for query i of batch b,
    with S1_b / S2_b the batch's actual query / key lengths; sparse_mode 0 applies no mask.
    Output indices are key positions within the batch's own sequence (0 … S2_b − 1; for paged keys, the
    logical position, not the block slot).
    ASSUMPTION: results are in descending score order, ties to the lower key index; rows with fewer valid
        keys than sparse_count are padded with −1 (values −inf); query rows past actual_seq_lengths_query
        (BSND padding) are all −1.
    ASSUMPTION: scores are computed in fp32 from the bf16/fp16 inputs; sparse_values is the score rounded to
        the query dtype.
    """
    what = "npu_lightning_indexer"
    _check(sparse_mode in (0, 3), f"{what}: sparse_mode {sparse_mode} not 0/3")
    _check(sparse_count > 0, f"{what}: sparse_count must be > 0")
    if pre_tokens != _I64_MAX or next_tokens != _I64_MAX:
        raise NotImplementedError(f"{what}: only the default pre_tokens/next_tokens are supported")
    _check(query.dtype in _HALF and key.dtype == query.dtype, f"{what}: query/key must be bf16/fp16 of one dtype", TypeError)
    _check(weights.dtype in (query.dtype, torch.float32),
           f"{what}: weights must be fp32 or the query dtype, got {weights.dtype}", TypeError)
    if layout_key != "PA_BSND":
        _check(layout_key == layout_query, f"{what}: layout_key must equal layout_query outside paged attention")
    batches = _query_batches(query, layout_query, actual_seq_lengths_query, what)
    nb = len(batches)
    kv_lens, kv_spans = _kv_layout(key, layout_key, actual_seq_lengths_key, block_table, nb, what)
    n1, d = query.shape[-2], query.shape[-1]
    n2 = key.shape[-2]
    _check(key.shape[-1] == d and n1 % n2 == 0, f"{what}: head dims / head counts do not match")
    g = n1 // n2
    q_flat = query.reshape(-1, n1, d)
    w_flat = weights.reshape(-1, n1)
    _check(w_flat.shape[0] == q_flat.shape[0], f"{what}: weights must be [B, S1, N1] or [T, N1]")
    rows_total = q_flat.shape[0]
    idx_out = torch.full((rows_total, n2, sparse_count), -1, dtype=torch.int32)
    val_out = torch.full((rows_total, n2, sparse_count), float("-inf"), dtype=torch.float32)

    for b, (r0, s1b, _padded) in enumerate(batches):
        kb = _kv_batch(key, layout_key, kv_lens, kv_spans, block_table, b)
        lk = kv_lens[b]
        if s1b == 0 or lk == 0:
            continue
        kf = kb.float()                                                            # [L, N2, D]
        pos = torch.arange(lk)
        for c0 in range(0, s1b, _CHUNK):
            c1 = min(s1b, c0 + _CHUNK)
            qf = q_flat[r0 + c0:r0 + c1].float().reshape(c1 - c0, n2, g, d)
            wf = w_flat[r0 + c0:r0 + c1].float().reshape(c1 - c0, n2, g)
            dots = torch.einsum("qngd,knd->qngk", qf, kf)
            score = (F.relu(dots) * wf[..., None]).sum(dim=2)                       # [q, N2, L]
            if sparse_mode == 3:
                qi = torch.arange(c0, c1)
                limit = (lk - s1b) + qi                                             # [q]
                mask = pos[None, :] <= limit[:, None]                               # [q, L]
                score = score.masked_fill(~mask[:, None, :], float("-inf"))
            order = _stable_desc_order(score)[..., :sparse_count]                   # [q, N2, ≤K]
            top = score.gather(-1, order)
            valid = torch.isfinite(top)
            kk = order.shape[-1]
            idx_out[r0 + c0:r0 + c1, :, :kk] = torch.where(valid, order, torch.full_like(order, -1)).to(torch.int32)
            val_out[r0 + c0:r0 + c1, :, :kk] = torch.where(valid, top, torch.full_like(top, float("-inf")))

    if layout_query == "BSND":
        shape = (query.shape[0], query.shape[1], n2, sparse_count)
    else:
        shape = (query.shape[0], n2, sparse_count)
    sparse_indices = idx_out.reshape(shape)
    if return_value:
        sparse_values = val_out.reshape(shape).to(query.dtype)
    else:
        sparse_values = torch.empty([0], dtype=query.dtype)
    return sparse_indices, sparse_values


def npu_sparse_flash_attention(query, key, value, sparse_indices, scale_value, *, block_table=None,
                               actual_seq_lengths_query=None, actual_seq_lengths_kv=None, query_rope=None,
                               key_rope=None, sparse_block_size=1, layout_query="BSND", layout_kv="BSND",
                               sparse_mode=3, pre_tokens=9223372036854775807, next_tokens=9223372036854775807,
                               attention_mode=0, return_softmax_lse=False, sinks=None):
    """out = softmax(Q · K_selᵀ · scale_value) · V_sel over the keys gathered by ``sparse_indices``.

    logits l_s = (q · k_s + q_rope · k_rope_s) · scale_value; V = value, or key when value is None (the meta
    function requires CANN ≥ 9.2.0 for that: simulated against the module's CANN version).  Query head h
    reads KV head h // (N1 / KV_N) and that head's index list.  An entry is skipped when it is −1 or comes
    after the first −1 (the doc: valid entries first, padding after), or is ≥ the batch's actual kv length;
    sparse_mode 3 (right-down causal) also skips s > (S2_b − S1_b) + i for query i of batch b; mode 0 adds
    no mask.  With sparse_block_size > 1 an index j names tokens [j·bs, (j+1)·bs) (ASSUMPTION), masked
    token-wise.
    ASSUMPTION (sinks, undocumented): sinks is a per-query-head fp32 logit [N1] that enters only the softmax
        denominator: out = Σ e^{l−m} v / (Σ e^{l−m} + e^{sink−m}), m = max of the valid logits (DeepSeek V4).
    ASSUMPTION (return_softmax_lse): softmax_max = m and softmax_sum = that denominator (sink included),
        laid out [B, KV_N, S1, N1/KV_N] (BSND) or [KV_N, T, N1/KV_N] (TND); rows with no valid key give
        out = 0, max = −inf, sum = 0.  Query rows past actual_seq_lengths_query (BSND padding) likewise.
    ASSUMPTION: duplicate indices count twice; TND indices are positions within the batch's own kv sequence;
        attention_mode 2 (MLA absorb) uses the same formula; fp32 softmax and PV, output rounded once.
    """
    what = "npu_sparse_flash_attention"
    _check(sparse_mode in (0, 3), f"{what}: sparse_mode {sparse_mode} not 0/3")
    _check(attention_mode in (0, 2), f"{what}: attention_mode {attention_mode} not 0/2")
    _check(int(sparse_block_size) >= 1, f"{what}: sparse_block_size must be >= 1")
    if pre_tokens != _I64_MAX or next_tokens != _I64_MAX:
        raise NotImplementedError(f"{what}: only the default pre_tokens/next_tokens are supported")
    _check(query.dtype in _HALF and key.dtype == query.dtype, f"{what}: query/key must be bf16/fp16 of one dtype", TypeError)
    _check(sparse_indices.dtype == torch.int32, f"{what}: sparse_indices must be int32", TypeError)
    if value is None:
        cfg = _config()
        if cfg is not None and not cfg.cann_at_least("9.2.0"):
            raise RuntimeError(f"{what}: value=None is only supported with CANN >= 9.2.0 "
                               f"(simulated CANN {cfg.cann_version})")
        value = key
    _check((query_rope is None) == (key_rope is None), f"{what}: pass query_rope and key_rope together")
    batches = _query_batches(query, layout_query, actual_seq_lengths_query, what)
    nb = len(batches)
    kv_lens, kv_spans = _kv_layout(key, layout_kv, actual_seq_lengths_kv, block_table, nb, what)
    n1, d = query.shape[-2], query.shape[-1]
    kvn = key.shape[-2]
    _check(key.shape[-1] == d and n1 % kvn == 0, f"{what}: query/key head dims or head counts do not match")
    _check(value.shape[-1] == d, f"{what}: value head dim {value.shape[-1]} must equal the query's {d} "
                                 f"(the output has the query's shape)")
    g = n1 // kvn
    q_flat = query.reshape(-1, n1, d)
    qr_flat = query_rope.reshape(-1, n1, query_rope.shape[-1]) if query_rope is not None else None
    ksel_n = sparse_indices.shape[-1]
    idx_flat = sparse_indices.reshape(-1, kvn, ksel_n)
    _check(idx_flat.shape[0] == q_flat.shape[0], f"{what}: sparse_indices must be [B, S1, KV_N, K] or [T, KV_N, K]")
    if sinks is not None:
        _check(sinks.numel() == n1, f"{what}: sinks must hold one logit per query head ({n1})")
        sink_f = sinks.float().reshape(n1)
    rows_total = q_flat.shape[0]
    out = torch.zeros(rows_total, n1, d, dtype=torch.float32)
    smax = torch.full((rows_total, n1), float("-inf"), dtype=torch.float32)
    ssum = torch.zeros(rows_total, n1, dtype=torch.float32)
    bs = int(sparse_block_size)
    chunk = max(1, min(_CHUNK, (1 << 24) // max(1, ksel_n * bs * max(d, value.shape[-1]))))

    for b, (r0, s1b, _padded) in enumerate(batches):
        lk = kv_lens[b]
        if s1b == 0 or lk == 0:
            continue
        kb = _kv_batch(key, layout_kv, kv_lens, kv_spans, block_table, b).float()
        vb = _kv_batch(value, layout_kv, kv_lens, kv_spans, block_table, b).float()
        krb = _kv_batch(key_rope, layout_kv, kv_lens, kv_spans, block_table, b)
        krb = krb.float() if krb is not None else None
        for c0 in range(0, s1b, chunk):
            c1 = min(s1b, c0 + chunk)
            ids = idx_flat[r0 + c0:r0 + c1].long()                                   # [q, KV_N, K]
            before_pad = torch.cumprod((ids >= 0).to(torch.int64), dim=-1).bool()     # entries before the first −1
            if bs > 1:
                tok = ids[..., None] * bs + torch.arange(bs)                          # [q, KV_N, K, bs]
                ok = before_pad[..., None].expand_as(tok)
                tok, ok = tok.flatten(-2), ok.flatten(-2)
            else:
                tok, ok = ids, before_pad
            ok = ok & (tok >= 0) & (tok < lk)
            if sparse_mode == 3:
                limit = (lk - s1b) + torch.arange(c0, c1)
                ok = ok & (tok <= limit[:, None, None])
            tok_c = tok.clamp(0, lk - 1)
            for n in range(kvn):
                heads = slice(n * g, (n + 1) * g)
                t_n, ok_n = tok_c[:, n], ok[:, n]                                       # [q, Kt]
                kg = kb[:, n][t_n]                                                      # [q, Kt, D]
                vg = vb[:, n][t_n]
                qf = q_flat[r0 + c0:r0 + c1, heads].float()                             # [q, G, D]
                logits = torch.einsum("qgd,qkd->qgk", qf, kg)
                if krb is not None:
                    qrf = qr_flat[r0 + c0:r0 + c1, heads].float()
                    logits = logits + torch.einsum("qgd,qkd->qgk", qrf, krb[:, n][t_n])
                logits = logits * float(scale_value)
                logits = logits.masked_fill(~ok_n[:, None, :], float("-inf"))
                m = logits.amax(dim=-1)                                                 # [q, G]
                has = torch.isfinite(m)
                m_safe = torch.where(has, m, torch.zeros_like(m))
                p = torch.exp(logits - m_safe[..., None])                              # masked → 0
                denom = p.sum(dim=-1)
                if sinks is not None:
                    denom = denom + torch.exp(sink_f[heads][None, :] - m_safe)
                o = torch.einsum("qgk,qkd->qgd", p, vg) / torch.where(has, denom, torch.ones_like(denom))[..., None]
                o = torch.where(has[..., None], o, torch.zeros_like(o))
                out[r0 + c0:r0 + c1, heads] = o
                smax[r0 + c0:r0 + c1, heads] = m
                ssum[r0 + c0:r0 + c1, heads] = torch.where(has, denom, torch.zeros_like(denom))

    attention_out = out.to(query.dtype).reshape(query.shape)
    if return_softmax_lse:
        if layout_query == "BSND":
            bq, s1 = query.shape[:2]
            softmax_max = smax.reshape(bq, s1, kvn, g).permute(0, 2, 1, 3).contiguous()
            softmax_sum = ssum.reshape(bq, s1, kvn, g).permute(0, 2, 1, 3).contiguous()
        else:
            softmax_max = smax.reshape(-1, kvn, g).permute(1, 0, 2).contiguous()
            softmax_sum = ssum.reshape(-1, kvn, g).permute(1, 0, 2).contiguous()
    else:
        softmax_max = torch.empty([0], dtype=torch.float32)
        softmax_sum = torch.empty([0], dtype=torch.float32)
    return attention_out, softmax_max, softmax_sum


# ------------------------------------------------------------------------------------------------

SIMULATED_OPS = (
    "npu_rms_norm",
    "npu_rotary_mul",
    "npu_swiglu",
    "npu_mhc_pre",
    "npu_mhc_sinkhorn",
    "npu_mhc_post",
    "npu_moe_gating_top_k",
    "npu_moe_init_routing_v2",
    "npu_grouped_matmul",
    "npu_moe_finalize_routing",
    "npu_lightning_indexer",
    "npu_sparse_flash_attention",
)
