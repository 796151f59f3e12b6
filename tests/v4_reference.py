"""Naive float64 reference ("oracle") for the DeepSeek V4 forward pass.

Written from the specification (/work/shared/spec/deepseek_v4.md) only; it shares no code with the
``ascend_v4`` implementation.  Everything is plain per-token / per-head Python loops over float64
torch tensors, so it is slow but easy to check against the spec line by line.  Section numbers in the
comments refer to the spec.

Inputs
------
``sd``   a mapping of official parameter names (``layers.{i}.attn.wq_a.weight`` ...) to tensors; they are
         converted to float64 here.  Routed experts are stacked: ``layers.{i}.ffn.w1`` [E, I, d] etc.
``cfg``  a mapping with the Hugging-Face style config keys of ``ascend_v4/presets/*.yaml``
         (``hidden_size``, ``compress_ratios``, ``sliding_window`` ...).

Entry points
------------
``reference_logits(sd, cfg, ids, fake_quant=False)``      -> [B, S, V] logits for every position.
``reference_mtp_logits(sd, cfg, ids, fake_quant=False)``  -> [B, S-1, V] MTP logits (§15).

With ``fake_quant=True`` the QAT quantisation points of §13 are applied as fake quantisation on the
activations (FP8 e4m3 1x128 before the FP8 linears, FP8 KV on the nope dims in blocks of 64, FP4 on the
indexer q and keys after the Hadamard).  All arithmetic stays float64 otherwise: the bf16 casts of the
reference are not modelled (they are identities in a float64 model).

Diagnostic options (default float64 = the exact oracle): ``rope_table_dtype=torch.float32`` rounds the
RoPE cos/sin to fp32 before use, ``quant_input_dtype=torch.float32`` makes the fake quantisers read
their input rounded to fp32.  They emulate precision shortcuts of an implementation, so that such
deviations can be told apart from real bugs; they are not what the spec asks for in float64.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
from dataclasses import dataclass
from typing import Mapping

import torch
import torch.nn.functional as F

F64 = torch.float64

# Internally ``fake_quant`` is None (off) or the dtype the fake quantisers read their input in
# (float64: exact; float32: diagnostic emulation of a quantiser that rounds its input to fp32 first).
FQ = "torch.dtype | None"


# ---------------------------------------------------------------------------------------------
# configuration
# ---------------------------------------------------------------------------------------------

@dataclass
class RefCfg:
    vocab: int
    d: int
    n_layers: int
    n_h: int
    c: int                 # head dim
    r: int                 # rope dims (the LAST r dims of a head)
    d_c: int               # q latent rank
    g: int                 # output groups
    d_g: int               # per-group output rank
    n_win: int             # sliding window, current token included
    ratios: tuple          # compress_ratios, L + 1 entries (last: MTP block)
    n_I: int
    c_I: int
    k_I: int
    E: int
    k: int
    n_hash: int
    route_scale: float
    norm_topk: bool
    swiglu_limit: float
    n_hc: int
    sinkhorn_iters: int
    hc_eps: float
    norm_eps: float
    rope_theta: float
    compress_rope_theta: float
    rope_factor: float
    rope_orig: int
    beta_fast: float
    beta_slow: float
    # Oracle option, not a model hyper-parameter: the dtype the cos/sin tables are rounded to before use.
    # float64 (default) is the exact oracle; float32 mimics a model that rounds its RoPE tables to fp32.
    rope_table_dtype: torch.dtype = F64

    @classmethod
    def from_mapping(cls, m: Mapping) -> "RefCfg":
        return cls(
            vocab=int(m["vocab_size"]), d=int(m["hidden_size"]), n_layers=int(m["num_hidden_layers"]),
            n_h=int(m["num_attention_heads"]), c=int(m["head_dim"]), r=int(m["qk_rope_head_dim"]),
            d_c=int(m["q_lora_rank"]), g=int(m["o_groups"]), d_g=int(m["o_lora_rank"]),
            n_win=int(m["sliding_window"]), ratios=tuple(int(x) for x in m["compress_ratios"]),
            n_I=int(m["index_n_heads"]), c_I=int(m["index_head_dim"]), k_I=int(m["index_topk"]),
            E=int(m["n_routed_experts"]), k=int(m["num_experts_per_tok"]),
            n_hash=int(m["num_hash_layers"]), route_scale=float(m["routed_scaling_factor"]),
            norm_topk=bool(m.get("norm_topk_prob", True)), swiglu_limit=float(m["swiglu_limit"]),
            n_hc=int(m["hc_mult"]), sinkhorn_iters=int(m["hc_sinkhorn_iters"]),
            hc_eps=float(m["hc_eps"]), norm_eps=float(m["rms_norm_eps"]),
            rope_theta=float(m["rope_theta"]), compress_rope_theta=float(m["compress_rope_theta"]),
            rope_factor=float(m["rope_factor"]), rope_orig=int(m["rope_original_max_position"]),
            beta_fast=float(m["rope_beta_fast"]), beta_slow=float(m["rope_beta_slow"]),
        )


# ---------------------------------------------------------------------------------------------
# fake quantisation (§13.2 - §13.4), written out element-wise in float64
# ---------------------------------------------------------------------------------------------

def _ceil_log2(x: torch.Tensor) -> torch.Tensor:
    """Exact ceil(log2(x)) for x > 0 (from the binary exponent, +1 if any mantissa bit is set)."""
    m, e = torch.frexp(x)              # x = m * 2**e, m in [0.5, 1)
    return torch.where(m == 0.5, e - 1, e).to(F64)


def _round_to_minifloat(v: torch.Tensor, mant_bits: int, min_exp: int) -> torch.Tensor:
    """Round to nearest (ties to even) on a minifloat grid with `mant_bits` explicit mantissa bits and
    minimum normal exponent `min_exp` (subnormals below).  No overflow handling: callers clamp first."""
    a = v.abs()
    _, E = torch.frexp(a)              # floor(log2 a) = E - 1 for a > 0
    e = torch.clamp(E.to(F64) - 1, min=float(min_exp))
    spacing = torch.pow(torch.tensor(2.0, dtype=F64), e - mant_bits)
    return torch.sign(v) * torch.round(a / spacing) * spacing   # torch.round: half to even


def round_e4m3(v):
    return _round_to_minifloat(v, 3, -6)


def round_e2m1(v):
    return _round_to_minifloat(v, 1, 0)


def _fp32_const(v: float) -> float:
    """The fp32 constant nearest to v, as a float (spec §13.2: amax times the fp32 constant 1/448)."""
    return float(torch.tensor(v, dtype=torch.float32))


_INV = {448.0: _fp32_const(1.0 / 448.0), 6.0: _fp32_const(1.0 / 6.0)}


def fq_block(x: torch.Tensor, block: int, qmax: float, amin: float, rounder,
             in_dtype: torch.dtype = F64) -> torch.Tensor:
    """Fake-quantise a 1-D vector in consecutive blocks along its only dim (last block may be short).

    ``in_dtype`` float64 (default) quantises the float64 values exactly as §13.2 says.  float32 is a
    diagnostic option that first rounds the input to fp32 and forms the scale in fp32 arithmetic
    (i.e. rounds twice), mimicking an implementation that quantises ``x.float()``."""
    x = x.to(in_dtype)
    out = torch.empty_like(x)
    n = x.shape[0]
    inv = torch.tensor(_INV[qmax], dtype=in_dtype)
    for b0 in range(0, n, block):
        blk = x[b0:b0 + block]
        amax = torch.clamp(blk.abs().max(), min=amin)
        scale = torch.pow(torch.tensor(2.0, dtype=F64), _ceil_log2(amax * inv))   # power of two (ue8m0)
        v = torch.clamp(blk.to(F64) / scale, -qmax, qmax)                          # exact: power-of-2 divide
        out[b0:b0 + block] = (rounder(v) * scale).to(in_dtype)
    return out.to(F64)


def fp8_act(x: torch.Tensor, in_dtype: torch.dtype = F64) -> torch.Tensor:
    """§13.2 activation quantisation: blocks of 128 along K, ue8m0 scale, e4m3."""
    return fq_block(x, 128, 448.0, 1e-4, round_e4m3, in_dtype)


def fp8_kv(x: torch.Tensor, nope: int, in_dtype: torch.dtype = F64) -> torch.Tensor:
    """§13.3: FP8 on dims [0:nope] in blocks of 64, rope dims untouched."""
    y = x.clone()
    y[:nope] = fq_block(x[:nope], 64, 448.0, 1e-4, round_e4m3, in_dtype)
    return y


def fp4_fq(x: torch.Tensor, in_dtype: torch.dtype = F64) -> torch.Tensor:
    """§13.4: FP4 e2m1 in blocks of 32, amax >= 6 * 2**-126."""
    return fq_block(x, 32, 6.0, 6.0 * 2.0 ** -126, round_e2m1, in_dtype)


def hadamard(x: torch.Tensor) -> torch.Tensor:
    """Sylvester-ordered Walsh-Hadamard transform of a 1-D vector, scaled by n^-1/2."""
    n = x.shape[0]
    H = torch.ones(1, 1, dtype=F64)
    while H.shape[0] < n:
        H = torch.cat([torch.cat([H, H], 1), torch.cat([H, -H], 1)], 0)
    assert H.shape[0] == n, "Hadamard size must be a power of two"
    return (H @ x) * (n ** -0.5)


# ---------------------------------------------------------------------------------------------
# small building blocks
# ---------------------------------------------------------------------------------------------

def rmsnorm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    """Weighted RMSNorm over the last dim (§5)."""
    return w * (x * torch.rsqrt((x * x).mean(dim=-1, keepdim=True) + eps))


def rope_freqs(r: int, base: float, yarn: bool, cfg: RefCfg) -> torch.Tensor:
    """§7.3: θ_i = base^(-2i/r), i = 0..r/2-1, optionally blended with YaRN."""
    i = torch.arange(r // 2, dtype=F64)
    theta = base ** (-2.0 * i / r)
    if yarn and cfg.rope_orig > 0:
        def corr_dim(n):
            return r * math.log(cfg.rope_orig / (n * 2 * math.pi)) / (2 * math.log(base))
        lo = max(math.floor(corr_dim(cfg.beta_fast)), 0)
        hi = min(math.ceil(corr_dim(cfg.beta_slow)), r - 1)
        if lo == hi:
            hi += 0.001
        ramp = torch.clamp((i - lo) / (hi - lo), 0.0, 1.0)
        smooth = 1.0 - ramp
        theta = theta / cfg.rope_factor * (1.0 - smooth) + theta * smooth
    return theta


def apply_rope_last(v: torch.Tensor, r: int, pos: int, theta: torch.Tensor, inverse=False,
                    table_dtype: torch.dtype = F64) -> torch.Tensor:
    """Interleaved (GPT-J) rotation of the LAST r dims of v by position pos (or -pos).

    Pair i is (y[2i], y[2i+1]) with y = v[-r:]:  y'[2i] = y[2i] cos - y[2i+1] sin,
    y'[2i+1] = y[2i] sin + y[2i+1] cos, angle pos * theta_i (negated for the inverse)."""
    n = v.shape[0]
    ang = pos * theta                                          # [r/2], float64
    cs = torch.cos(ang).to(table_dtype).to(F64)
    sn = torch.sin(ang).to(table_dtype).to(F64)
    if inverse:
        sn = -sn
    a = v[n - r::2]                                            # y[2i]
    b = v[n - r + 1::2]                                        # y[2i+1]
    out = v.clone()
    out[n - r::2] = a * cs - b * sn
    out[n - r + 1::2] = a * sn + b * cs
    return out


def linear(W: torch.Tensor, x: torch.Tensor, fq=None) -> torch.Tensor:
    """y = W x for W [out, in]; with fake quantisation on (fq = the quantiser input dtype, see
    `reference_both`) the FP8 activation fake quant is applied first (an FP8 linear)."""
    if fq:
        x = fp8_act(x, fq)
    return W @ x


# ---------------------------------------------------------------------------------------------
# mHC (§6.2 - §6.4)
# ---------------------------------------------------------------------------------------------

def hc_pre(X: torch.Tensor, fn, scale, base, cfg: RefCfg):
    """§6.2 per token.  X [..., n_hc, d] (any leading token dims, each token independent)
    -> (x_in [..., d], post [..., n_hc], comb [..., n_hc, n_hc])."""
    n = cfg.n_hc
    x = X.flatten(-2)                                              # [..., n_hc*d], streams concatenated
    rho = torch.rsqrt((x * x).mean(dim=-1, keepdim=True) + cfg.norm_eps)
    mix = (x @ fn.T) * rho                                         # [..., (2+n)n]
    eps = cfg.hc_eps
    pre = torch.sigmoid(mix[..., 0:n] * scale[0] + base[0:n]) + eps
    post = 2.0 * torch.sigmoid(mix[..., n:2 * n] * scale[1] + base[n:2 * n])
    R = (mix[..., 2 * n:] * scale[2] + base[2 * n:]).unflatten(-1, (n, n))   # row-major R[i, j]
    # Sinkhorn, exact order of §6.2 step 3 (dim -1: along a row, dim -2: along a column)
    ex = torch.exp(R - R.max(dim=-1, keepdim=True).values)        # row softmax (max-subtracted) ...
    comb = ex / ex.sum(dim=-1, keepdim=True) + eps                 # ... then +eps on every element
    comb = comb / (comb.sum(dim=-2, keepdim=True) + eps)           # column normalisation
    for _ in range(cfg.sinkhorn_iters - 1):
        comb = comb / (comb.sum(dim=-1, keepdim=True) + eps)       # row normalisation
        comb = comb / (comb.sum(dim=-2, keepdim=True) + eps)       # column normalisation
    x_in = torch.zeros(X.shape[:-2] + X.shape[-1:], dtype=F64)
    for i in range(n):                                             # x_in = Σ_i pre_i X_i
        x_in = x_in + pre[..., i, None] * X[..., i, :]
    return x_in, post, comb


def hc_post(Fout: torch.Tensor, X: torch.Tensor, post, comb, cfg: RefCfg) -> torch.Tensor:
    """§6.3 per token: Y_j = post_j F + Σ_i comb[i, j] X_i.  Fout [..., d], X [..., n_hc, d]."""
    n = cfg.n_hc
    Y = torch.empty_like(X)
    for j in range(n):
        acc = post[..., j, None] * Fout
        for i in range(n):
            acc = acc + comb[..., i, j, None] * X[..., i, :]
        Y[..., j, :] = acc
    return Y


def hc_head(X: torch.Tensor, fn, scale, base, cfg: RefCfg) -> torch.Tensor:
    """§6.4 per token: X [..., n_hc, d] -> y [..., d]."""
    n = cfg.n_hc
    x = X.flatten(-2)
    rho = torch.rsqrt((x * x).mean(dim=-1, keepdim=True) + cfg.norm_eps)
    mix = (x @ fn.T) * rho
    pre = torch.sigmoid(mix * scale[0] + base) + cfg.hc_eps
    y = torch.zeros(X.shape[:-2] + X.shape[-1:], dtype=F64)
    for i in range(n):
        y = y + pre[..., i, None] * X[..., i, :]
    return y


# ---------------------------------------------------------------------------------------------
# compressor (§8) and indexer (§9)
# ---------------------------------------------------------------------------------------------

def compressor_entries(P: Mapping, pre: str, xs: torch.Tensor, ratio: int, D: int, rotate: bool,
                       theta: torch.Tensor, cfg: RefCfg, fake_quant: FQ) -> list:
    """All completed entries of one compressor for tokens xs [S, d] (attn_norm outputs) from position 0.

    Returns a list of ⌊S/ratio⌋ post-processed entries (§8.4), each [D]."""
    S = xs.shape[0]
    Wkv, Wg, ape = P[pre + "wkv.weight"], P[pre + "wgate.weight"], P[pre + "ape"]
    nw = P[pre + "norm.weight"]
    C = [Wkv @ xs[j] for j in range(S)]
    Z = [Wg @ xs[j] + ape[j % ratio] for j in range(S)]
    entries = []
    for i in range(S // ratio):
        if ratio == 4:   # CSA, overlap (§8.3)
            slot_kv, slot_z = [], []
            if i > 0:
                for j in range(4 * i - 4, 4 * i):           # previous block, channels [0:D]
                    slot_kv.append(C[j][0:D]); slot_z.append(Z[j][0:D])
            for j in range(4 * i, 4 * i + 4):               # own block, channels [D:2D]
                slot_kv.append(C[j][D:2 * D]); slot_z.append(Z[j][D:2 * D])
        else:            # HCA (§8.2)
            slot_kv = [C[j] for j in range(ratio * i, ratio * i + ratio)]
            slot_z = [Z[j] for j in range(ratio * i, ratio * i + ratio)]
        Kv = torch.stack(slot_kv)       # [slots, D]
        Zs = torch.stack(slot_z)
        # softmax over the slots (dim 0), separately for every channel
        w = torch.exp(Zs - Zs.max(dim=0, keepdim=True).values)
        w = w / w.sum(dim=0, keepdim=True)
        pooled = (w * Kv).sum(dim=0)
        e = rmsnorm(pooled, nw, cfg.norm_eps)
        e = apply_rope_last(e, cfg.r, i * ratio, theta, table_dtype=cfg.rope_table_dtype)
        if rotate:
            e = hadamard(e)
            if fake_quant:
                e = fp4_fq(e, fake_quant)
        else:
            if fake_quant:
                e = fp8_kv(e, D - cfg.r, fake_quant)
        entries.append(e)
    return entries


def indexer_topk(P: Mapping, pre: str, xs, qlats, theta, cfg: RefCfg, fake_quant: FQ) -> list:
    """For every position p: the list of selected compressed entry ids (lower index wins ties)."""
    S = xs.shape[0]
    keys = compressor_entries(P, pre + "compressor.", xs, 4, cfg.c_I, True, theta, cfg, fake_quant)
    Wq, Ww = P[pre + "wq_b.weight"], P[pre + "weights_proj.weight"]
    out = []
    for p in range(S):
        n_valid = (p + 1) // 4
        if n_valid == 0:
            out.append([])
            continue
        qI = linear(Wq, qlats[p], fake_quant).reshape(cfg.n_I, cfg.c_I)
        qs = []
        for h in range(cfg.n_I):
            qh = apply_rope_last(qI[h], cfg.r, p, theta, table_dtype=cfg.rope_table_dtype)
            qh = hadamard(qh)
            if fake_quant:
                qh = fp4_fq(qh, fake_quant)
            qs.append(qh)
        w = (Ww @ xs[p]) * (cfg.c_I ** -0.5) * (cfg.n_I ** -0.5)
        Q = torch.stack(qs)                                   # [n_I, c_I]
        scores = []
        for s in range(n_valid):                              # I_{t,s} = Σ_h w_h ReLU(q_h · K_s)
            tot = (w * torch.relu(Q @ keys[s])).sum()
            scores.append((float(tot), s))
        scores.sort(key=lambda t: (-t[0], t[1]))        # descending score, ties -> lower index
        out.append([s for _, s in scores[:min(cfg.k_I, n_valid)]])
    return out


# ---------------------------------------------------------------------------------------------
# attention (§7, §10)
# ---------------------------------------------------------------------------------------------

def attention_layer(P: Mapping, pre: str, xs: torch.Tensor, ratio: int, cfg: RefCfg,
                    fake_quant: FQ) -> torch.Tensor:
    """xs [S, d] attn_norm outputs of one sequence (prefill from 0) -> [S, d] attention outputs."""
    S = xs.shape[0]
    c, r, n_h = cfg.c, cfg.r, cfg.n_h
    nope = c - r
    if ratio == 0:
        theta = rope_freqs(r, cfg.rope_theta, False, cfg)
    else:
        theta = rope_freqs(r, cfg.compress_rope_theta, True, cfg)

    qs, kvs, qlats = [], [], []
    for p in range(S):
        x = xs[p]
        # §7.1 query path
        q_lat = rmsnorm(linear(P[pre + "wq_a.weight"], x, fake_quant), P[pre + "q_norm.weight"], cfg.norm_eps)
        qlats.append(q_lat)
        q = linear(P[pre + "wq_b.weight"], q_lat, fake_quant).reshape(n_h, c)
        heads = []
        for h in range(n_h):
            qh = q[h] * torch.rsqrt((q[h] * q[h]).mean() + cfg.norm_eps)
            heads.append(apply_rope_last(qh, r, p, theta, table_dtype=cfg.rope_table_dtype))
        qs.append(heads)
        # §7.2 kv path
        kv = rmsnorm(linear(P[pre + "wkv.weight"], x, fake_quant), P[pre + "kv_norm.weight"], cfg.norm_eps)
        kv = apply_rope_last(kv, r, p, theta, table_dtype=cfg.rope_table_dtype)
        if fake_quant:
            kv = fp8_kv(kv, nope, fake_quant)
        kvs.append(kv)

    comp = []
    sel = None
    if ratio != 0:
        comp = compressor_entries(P, pre + "compressor.", xs, ratio, c, False, theta, cfg, fake_quant)
        if ratio == 4:
            sel = indexer_topk(P, pre + "indexer.", xs, qlats, theta, cfg, fake_quant)

    sink = P[pre + "attn_sink"]
    Woa = P[pre + "wo_a.weight"].reshape(cfg.g, cfg.d_g, n_h * c // cfg.g)
    Wob = P[pre + "wo_b.weight"]
    hpg = n_h // cfg.g
    out = torch.empty(S, cfg.d, dtype=F64)
    for p in range(S):
        # §10.1 index set: window ∪ compressed (not de-duplicated)
        keys = [kvs[j] for j in range(max(0, p - cfg.n_win + 1), p + 1)]
        if ratio == 128:
            keys += [comp[i] for i in range((p + 1) // 128)]
        elif ratio == 4:
            keys += [comp[i] for i in sel[p]]
        K = torch.stack(keys)                                  # [n, c], K = V
        o = []
        for h in range(n_h):
            logits = (K @ qs[p][h]) * (c ** -0.5)
            M = logits.max()                                   # the sink does not enter the max
            ex = torch.exp(logits - M)
            den = ex.sum() + torch.exp(sink[h] - M)
            oh = (ex[:, None] * K).sum(0) / den
            o.append(apply_rope_last(oh, r, p, theta, inverse=True,
                                     table_dtype=cfg.rope_table_dtype))   # de-rotate by -p
        zs = []
        for j in range(cfg.g):                                 # §7.5 grouped output projection
            u = torch.cat(o[j * hpg:(j + 1) * hpg])
            zs.append(Woa[j] @ u)
        out[p] = linear(Wob, torch.cat(zs), fake_quant)
    return out


# ---------------------------------------------------------------------------------------------
# MoE (§12)
# ---------------------------------------------------------------------------------------------

def moe_token(P: Mapping, pre: str, x: torch.Tensor, token_id: int, layer_id: int, cfg: RefCfg,
              fake_quant: FQ) -> torch.Tensor:
    L = cfg.swiglu_limit
    logits = P[pre + "gate.weight"] @ x
    s = torch.sqrt(F.softplus(logits))                        # sqrtsoftplus, beta 1, threshold 20
    if layer_id < cfg.n_hash:
        idx = [int(e) for e in P[pre + "gate.tid2eid"][token_id].tolist()]
    else:
        biased = s + P[pre + "gate.bias"]
        order = sorted(range(cfg.E), key=lambda e: (-float(biased[e]), e))
        idx = order[:cfg.k]
    w = torch.stack([s[e] for e in idx])                      # bias is for selection only
    if cfg.norm_topk:
        w = w / w.sum()
    w = w * cfg.route_scale
    xq = fp8_act(x, fake_quant) if fake_quant else x
    y = torch.zeros(cfg.d, dtype=F64)
    for kk, e in enumerate(idx):
        gate = P[pre + "w1"][e] @ xq
        up = P[pre + "w3"][e] @ xq
        up = torch.clamp(up, -L, L)
        gate = torch.clamp(gate, max=L)
        h = F.silu(gate) * up
        h = h * w[kk]                                         # routing weight before w2
        if fake_quant:
            h = fp8_act(h, fake_quant)
        y = y + P[pre + "w2"][e] @ h
    # shared expert(s), clamped as well (current revision)
    gate = P[pre + "shared_experts.w1.weight"] @ xq
    up = P[pre + "shared_experts.w3.weight"] @ xq
    up = torch.clamp(up, -L, L)
    gate = torch.clamp(gate, max=L)
    h = F.silu(gate) * up
    if fake_quant:
        h = fp8_act(h, fake_quant)
    y = y + P[pre + "shared_experts.w2.weight"] @ h
    return y


# ---------------------------------------------------------------------------------------------
# blocks and the full model (§5, §15)
# ---------------------------------------------------------------------------------------------

def block(P: Mapping, pre: str, X: torch.Tensor, ids: list, layer_id: int, ratio: int, cfg: RefCfg,
          fake_quant: FQ) -> torch.Tensor:
    """X [S, n_hc, d] of one sequence -> [S, n_hc, d]."""
    S = X.shape[0]
    # mHC mixing is per token; hc_pre / hc_post / rmsnorm take all S tokens at once (no cross-token terms)
    x_in, post, comb = hc_pre(X, P[pre + "hc_attn_fn"], P[pre + "hc_attn_scale"], P[pre + "hc_attn_base"], cfg)
    xs = rmsnorm(x_in, P[pre + "attn_norm.weight"], cfg.norm_eps)
    A = attention_layer(P, pre + "attn.", xs, ratio, cfg, fake_quant)
    X1 = hc_post(A, X, post, comb, cfg)
    x_in, post, comb = hc_pre(X1, P[pre + "hc_ffn_fn"], P[pre + "hc_ffn_scale"], P[pre + "hc_ffn_base"], cfg)
    xn = rmsnorm(x_in, P[pre + "ffn_norm.weight"], cfg.norm_eps)
    y = torch.stack([moe_token(P, pre + "ffn.", xn[p], ids[p], layer_id, cfg, fake_quant) for p in range(S)])
    return hc_post(y, X1, post, comb, cfg)


@contextlib.contextmanager
def _single_thread():
    """The oracle runs thousands of tiny ops; intra-op threading only adds overhead (a lot of it on a
    loaded machine), so run single-threaded and restore the caller's setting afterwards."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def _prep(sd: Mapping, cfg, rope_table_dtype: torch.dtype) -> tuple:
    P = {k: (v.detach().to(F64) if v.is_floating_point() else v.detach()) for k, v in sd.items()}
    cfg = RefCfg.from_mapping(cfg) if not isinstance(cfg, RefCfg) else dataclasses.replace(cfg)
    cfg.rope_table_dtype = rope_table_dtype
    return P, cfg


def main_streams(P, cfg: RefCfg, ids: list, fake_quant: FQ) -> torch.Tensor:
    """Embedding + all main layers for one sequence -> X [S, n_hc, d] (before HcHead)."""
    h0 = torch.stack([P["embed.weight"][t] for t in ids])
    X = h0[:, None, :].repeat(1, cfg.n_hc, 1)           # n_hc identical streams
    for l in range(cfg.n_layers):
        X = block(P, f"layers.{l}.", X, ids, l, cfg.ratios[l], cfg, fake_quant)
    return X


def head_logits(P, cfg: RefCfg, X: torch.Tensor, hc_pre_: str, norm_name: str) -> torch.Tensor:
    """HcHead -> RMSNorm -> head for every position: X [S, n_hc, d] -> [S, V]."""
    y = hc_head(X, P[hc_pre_ + "hc_head_fn"], P[hc_pre_ + "hc_head_scale"], P[hc_pre_ + "hc_head_base"], cfg)
    y = rmsnorm(y, P[norm_name], cfg.norm_eps)
    return y @ P["head.weight"].T


def mtp_from_streams(P, cfg: RefCfg, H: torch.Tensor, ids: list, fake_quant: FQ) -> torch.Tensor:
    """§15: H [S, n_hc, d] main streams (before HcHead), ids [S] -> [S-1, V] MTP logits."""
    L = cfg.n_layers
    nxt = ids[1:]
    if not nxt:
        return torch.empty(0, cfg.vocab, dtype=F64)
    Xp = torch.empty(len(nxt), cfg.n_hc, cfg.d, dtype=F64)
    for p in range(len(nxt)):
        e = rmsnorm(P["embed.weight"][nxt[p]], P["mtp.0.enorm.weight"], cfg.norm_eps)
        ee = linear(P["mtp.0.e_proj.weight"], e, fake_quant)        # broadcast over the streams
        for i in range(cfg.n_hc):
            xh = rmsnorm(H[p, i], P["mtp.0.hnorm.weight"], cfg.norm_eps)
            Xp[p, i] = ee + linear(P["mtp.0.h_proj.weight"], xh, fake_quant)
    # full block with layer id L (not a hash layer) and ratio compress_ratios[L] (0: SWA only)
    Xp = block(P, "mtp.0.", Xp, nxt, L, cfg.ratios[L], cfg, fake_quant)
    return head_logits(P, cfg, Xp, "mtp.0.head_hc.", "mtp.0.norm.weight")


def reference_both(sd: Mapping, cfg, ids: torch.Tensor, fake_quant: bool = False,
                   rope_table_dtype: torch.dtype = F64, quant_input_dtype: torch.dtype = F64):
    """(logits [B,S,V], mtp logits [B,S-1,V]) sharing one pass through the main layers.

    rope_table_dtype / quant_input_dtype: float64 (default) is the exact oracle.  float32 turns on a
    diagnostic emulation of an implementation that rounds its RoPE cos/sin tables, or the inputs of its
    fake quantisers, to fp32 (used to tell such precision deviations apart from real bugs)."""
    P, cfg = _prep(sd, cfg, rope_table_dtype)
    fake_quant = quant_input_dtype if fake_quant else None
    lg, mt = [], []
    with torch.no_grad(), _single_thread():
        for b in range(ids.shape[0]):
            seq = [int(t) for t in ids[b].tolist()]
            H = main_streams(P, cfg, seq, fake_quant)
            lg.append(head_logits(P, cfg, H, "hc.", "norm.weight"))
            mt.append(mtp_from_streams(P, cfg, H, seq, fake_quant))
    return torch.stack(lg), torch.stack(mt)


def reference_logits(sd: Mapping, cfg, ids: torch.Tensor, fake_quant: bool = False,
                     rope_table_dtype: torch.dtype = F64, quant_input_dtype: torch.dtype = F64) -> torch.Tensor:
    """[B, S] token ids -> [B, S, V] float64 logits (prefill from position 0)."""
    P, cfg = _prep(sd, cfg, rope_table_dtype)
    fake_quant = quant_input_dtype if fake_quant else None
    with torch.no_grad(), _single_thread():
        return torch.stack([head_logits(P, cfg, main_streams(P, cfg, [int(t) for t in row.tolist()], fake_quant),
                                        "hc.", "norm.weight") for row in ids])


def reference_mtp_logits(sd: Mapping, cfg, ids: torch.Tensor, fake_quant: bool = False,
                         rope_table_dtype: torch.dtype = F64, quant_input_dtype: torch.dtype = F64) -> torch.Tensor:
    """[B, S] ids -> [B, S-1, V]: MTP logits at p from main streams H[p] and the embedding of ids[p+1]."""
    return reference_both(sd, cfg, ids, fake_quant, rope_table_dtype, quant_input_dtype)[1]
