"""RMSNorm (spec §5) and RoPE (spec §7.3, traps 1-3) against independent float64 re-statements.

Expected values are computed here, in float64, from the spec's formulas; nothing in fallbacks/ or
op_adapters/ is used to produce them.  Inputs are fresh random draws every run (``torch_gen``).
"""

from __future__ import annotations

import math

import pytest
import torch

import op_adapters as oa
from ascend_v4 import ModelConfig, rope_tables
from fallbacks.rope import rope_frequencies

from op_helpers import assert_matches, rand

# Tolerances, judged as |out - ref| <= atol * max|ref| + rtol * |ref|.
#   fp32: the ops compute in fp32, so a few fp32 ulps of rounding (2^-23 ≈ 1.2e-7) per step;
#         1e-5 relative leaves room for short reductions (mean over <= 64 values) and nothing more.
#   bf16: the result is rounded once to bf16 (half an ulp = 2^-9 ≈ 2e-3 relative); the reference is
#         computed from the same bf16-rounded inputs, so 1.6e-2 (4 bf16 ulps) is generous but still
#         far below any formula error (wrong eps, missing weight, wrong pair layout are O(1)).
TOL = {
    torch.float32: dict(rtol=1e-5, atol=1e-6),
    torch.bfloat16: dict(rtol=1.6e-2, atol=4e-3),
}
# inverse(rope(x)) == x: fp32 two rotations (~4 ulps); bf16 two bf16 roundings of the rotated part.
ROUNDTRIP_TOL = {
    torch.float32: dict(rtol=1e-5, atol=1e-6),
    torch.bfloat16: dict(rtol=2e-2, atol=8e-3),
}
DTYPES = [torch.float32, torch.bfloat16]


# ------------------------------------------------------------------------------------- RMSNorm
def ref_rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    """y = w · x / sqrt(mean(x²) + eps), float64, one row at a time."""
    x = x.to(torch.float64)
    rows = x.reshape(-1, x.shape[-1])
    out = torch.empty_like(rows)
    for r in range(rows.shape[0]):
        v = rows[r]
        ms = sum(float(t) ** 2 for t in v) / v.numel()
        out[r] = v / math.sqrt(ms + eps)
        if weight is not None:
            out[r] = out[r] * weight.to(torch.float64)
    return out.reshape(x.shape)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(7,), (3, 16), (2, 3, 64), (2, 1, 4, 33)])
@pytest.mark.parametrize("weighted", [True, False])
def test_rms_norm_matches_formula(torch_gen, dtype, shape, weighted):
    x = rand(torch_gen, *shape, dtype=dtype, scale=3.0)
    w = (torch.rand(shape[-1], generator=torch_gen) * 2 + 0.1) if weighted else None  # fp32 weight, as shipped
    y = oa.rms_norm(x, w, eps=1e-6)
    assert y.dtype == dtype and y.shape == x.shape
    assert_matches(y, ref_rms_norm(x, w, 1e-6), TOL[dtype], "rms_norm")


@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm_eps_is_inside_the_root(torch_gen, dtype):
    # With tiny inputs mean(x²) ~ 1e-8 << eps = 1e-6, so eps dominates: a norm that drops eps
    # (or adds it outside the sqrt) is off by a factor of ~10 here.
    x = rand(torch_gen, 4, 32, dtype=dtype, scale=1e-4)
    y = oa.rms_norm(x, None, eps=1e-6)
    assert_matches(y, ref_rms_norm(x, None, 1e-6), TOL[dtype], "rms_norm tiny input")
    y2 = oa.rms_norm(x, None, eps=1e-2)
    assert_matches(y2, ref_rms_norm(x, None, 1e-2), TOL[dtype], "rms_norm eps=1e-2")


def test_rms_norm_bad_inputs(torch_gen):
    x = rand(torch_gen, 2, 8)
    with pytest.raises(ValueError, match="weight"):
        oa.rms_norm(x, torch.ones(7))  # wrong length
    with pytest.raises(ValueError, match="weight"):
        oa.rms_norm(x, torch.ones(1, 8))  # wrong rank
    with pytest.raises(ValueError, match="eps"):
        oa.rms_norm(x, None, eps=0.0)
    with pytest.raises(ValueError, match="dtype"):
        oa.rms_norm(torch.ones(2, 8, dtype=torch.int64))
    with pytest.raises(ValueError, match="dims"):
        oa.rms_norm(torch.tensor(1.0))


# ----------------------------------------------------------------------------- RoPE frequencies
def ref_theta(rope_dim: int, base: float, factor: float = 1.0, orig: int = 0, beta_fast: float = 32.0,
              beta_slow: float = 1.0) -> tuple[list[float], float | None, float | None]:
    """θ'_i of spec §7.3 (float64), plus the YaRN (lo, hi) or (None, None) when YaRN is off."""
    theta = [base ** (-2.0 * i / rope_dim) for i in range(rope_dim // 2)]
    if factor <= 1 or orig <= 0:
        return theta, None, None

    def corr_dim(n: float) -> float:
        return rope_dim * math.log(orig / (n * 2 * math.pi)) / (2 * math.log(base))

    lo = max(math.floor(corr_dim(beta_fast)), 0)
    hi = min(math.ceil(corr_dim(beta_slow)), rope_dim - 1)
    out = []
    for i, t in enumerate(theta):
        ramp = min(max((i - lo) / (hi - lo), 0.0), 1.0)
        smooth = 1.0 - ramp
        out.append(t / factor * (1 - smooth) + t * smooth)
    return out, lo, hi


def test_yarn_constants_from_spec():
    """Spec §7.3: base 160000, r = 64, s = 16, 65536, β 32/1 → lo = 15, hi = 25."""
    theta_yarn, lo, hi = ref_theta(64, 160000.0, 16.0, 65536, 32.0, 1.0)
    assert (lo, hi) == (15, 25)
    got = rope_frequencies(64, 160000.0, yarn_factor=16.0, original_max_position=65536, beta_fast=32.0,
                           beta_slow=1.0)
    assert got.shape == (32,)
    base_theta = [160000.0 ** (-2.0 * i / 64) for i in range(32)]
    for i in range(32):
        g = float(got[i])
        if i <= 15:  # pairs 0..15 keep their frequency
            assert g == pytest.approx(base_theta[i], rel=1e-12), i
        elif i >= 25:  # pairs >= 25 are divided by 16
            assert g == pytest.approx(base_theta[i] / 16, rel=1e-12), i
        else:  # ramped: strictly between θ/16 and θ, and equal to the spec blend
            assert base_theta[i] / 16 < g < base_theta[i], i
            assert g == pytest.approx(theta_yarn[i], rel=1e-12), i
    # the ramp is linear in i: pair 20 is exactly halfway between lo = 15 and hi = 25
    assert float(got[20]) == pytest.approx(base_theta[20] * (0.5 / 16 + 0.5), rel=1e-12)


@pytest.mark.parametrize("rope_dim,base,factor,orig", [
    (64, 10000.0, 1.0, 0),           # SWA layers: no YaRN
    (64, 160000.0, 16.0, 65536),     # CSA/HCA layers of the released models
    (16, 160000.0, 16.0, 65536),     # the tiny preset's rope dims
    (32, 10000.0, 40.0, 4096),       # another blend, to exercise lo/hi computation
])
def test_rope_frequencies_match_spec(rope_dim, base, factor, orig):
    want, _, _ = ref_theta(rope_dim, base, factor, orig)
    got = rope_frequencies(rope_dim, base, yarn_factor=factor, original_max_position=orig, beta_fast=32.0,
                           beta_slow=1.0)
    torch.testing.assert_close(got.to(torch.float64), torch.tensor(want, dtype=torch.float64), rtol=1e-12, atol=0)


def test_rope_frequencies_rejects_odd_dim():
    with pytest.raises(ValueError, match="even"):
        rope_frequencies(15, 10000.0)


# --------------------------------------------------------------------------------- rope_tables
def _ref_tables(theta: list[float], positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    p = positions.to(torch.float64).unsqueeze(-1)
    ang = p * torch.tensor(theta, dtype=torch.float64)
    return ang.cos(), ang.sin()


@pytest.mark.parametrize("preset", ["v4-flash", "tiny"])
@pytest.mark.parametrize("kind", ["swa", "csa", "hca", 0, 4, 128])
def test_rope_tables_per_layer_kind(torch_gen, preset, kind):
    cfg = ModelConfig.preset(preset)
    r = cfg.qk_rope_head_dim
    if kind in ("swa", 0):  # trap 2: SWA-only layers use base 10000 without YaRN
        theta, _, _ = ref_theta(r, 10000.0)
    else:                   # CSA/HCA: base 160000 with the YaRN blend
        theta, _, _ = ref_theta(r, 160000.0, 16.0, 65536, 32.0, 1.0)
    positions = torch.randint(0, 1 << 20, (2, 5), generator=torch_gen)
    positions[0, 0] = 0
    cos, sin = rope_tables(cfg, kind, positions)
    # fp64 tables: apply_rope rounds them once to its compute dtype (fp32, or fp64 in a float64 model)
    assert cos.dtype == torch.float64 and sin.dtype == torch.float64
    assert cos.shape == (2, 5, r // 2) and sin.shape == (2, 5, r // 2)
    rc, rs = _ref_tables(theta, positions)
    torch.testing.assert_close(cos, rc, rtol=0, atol=1e-12)
    torch.testing.assert_close(sin, rs, rtol=0, atol=1e-12)


def test_rope_tables_swa_and_compressed_differ_and_int_positions():
    cfg = ModelConfig.preset("v4-flash")
    c_swa, _ = rope_tables(cfg, "swa", 7)  # an int means positions 0..6
    c_csa, _ = rope_tables(cfg, "csa", torch.arange(7))
    assert c_swa.shape == (7, 32)
    theta_swa, _, _ = ref_theta(64, 10000.0)
    torch.testing.assert_close(c_swa.double(), _ref_tables(theta_swa, torch.arange(7))[0], rtol=0, atol=2e-7)
    assert not torch.allclose(c_swa, c_csa)
    c_hca, _ = rope_tables(cfg, 128, torch.arange(7))
    torch.testing.assert_close(c_hca, c_csa, rtol=0, atol=0)  # CSA and HCA share the compressed table


def test_rope_tables_yarn_off_when_no_original_length():
    cfg = ModelConfig.preset("v4-flash").replace(rope_original_max_position=0)
    cos, _ = rope_tables(cfg, "csa", torch.arange(0, 5000, 97))
    theta, _, _ = ref_theta(64, 160000.0)
    torch.testing.assert_close(cos.double(), _ref_tables(theta, torch.arange(0, 5000, 97))[0], rtol=0, atol=2e-7)


def test_rope_tables_bad_kind():
    cfg = ModelConfig.preset("tiny")
    with pytest.raises(ValueError, match="kind"):
        rope_tables(cfg, "mla", torch.arange(3))
    with pytest.raises(ValueError, match="ratio"):
        rope_tables(cfg, 8, torch.arange(3))


# ---------------------------------------------------------------------------------- apply_rope
def ref_apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, inverse: bool = False) -> torch.Tensor:
    """Interleaved pairs (y_2i, y_2i+1) of the LAST r dims, rotated by ±angle; float64, loop over pairs."""
    half = cos.shape[-1]
    r = 2 * half
    D = x.shape[-1]
    out = x.to(torch.float64).clone()
    c = cos.to(torch.float64)
    s = sin.to(torch.float64)
    if inverse:
        s = -s
    for i in range(half):
        a = x[..., D - r + 2 * i].to(torch.float64)
        b = x[..., D - r + 2 * i + 1].to(torch.float64)
        ci, si = c[..., i], s[..., i]
        out[..., D - r + 2 * i] = a * ci - b * si
        out[..., D - r + 2 * i + 1] = a * si + b * ci
    return out


ROPE_CASES = [
    # x shape, cos/sin shape (broadcast against x[..., :r/2])
    ((2, 5, 3, 32), (5, 1, 8)),       # [B, S, H, D] with [S, 1, r/2]; nope 16 + rope 16
    ((2, 5, 3, 32), (2, 5, 1, 8)),    # with [B, S, 1, r/2]
    ((2, 6, 24), (6, 8)),             # [B, N, D] with [N, r/2]
    ((2, 6, 24), (2, 6, 8)),          # with [B, N, r/2]
    ((4, 16), (4, 8)),                # r == D: the whole vector rotates
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("xshape,cshape", ROPE_CASES)
@pytest.mark.parametrize("inverse", [False, True])
def test_apply_rope_matches_formula(torch_gen, dtype, xshape, cshape, inverse):
    x = rand(torch_gen, *xshape, dtype=dtype, scale=2.0)
    ang = torch.rand(*cshape, generator=torch_gen, dtype=torch.float64) * 2 * math.pi * 50
    cos, sin = ang.cos().float(), ang.sin().float()
    y = oa.apply_rope(x, cos, sin, inverse=inverse)
    assert y.dtype == dtype and y.shape == x.shape
    assert_matches(y, ref_apply_rope(x, cos, sin, inverse), TOL[dtype], "apply_rope")
    r = 2 * cshape[-1]
    # the nope dims pass through bit-exactly
    assert torch.equal(y[..., : xshape[-1] - r], x[..., : xshape[-1] - r])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ["swa", "csa"])
def test_apply_rope_inverse_roundtrip(torch_gen, dtype, kind):
    cfg = ModelConfig.preset("tiny")
    positions = torch.randint(0, 200_000, (6,), generator=torch_gen)
    cos, sin = rope_tables(cfg, kind, positions)
    x = rand(torch_gen, 2, 6, 3, cfg.head_dim, dtype=dtype)
    y = oa.apply_rope(x, cos[:, None, :], sin[:, None, :])
    assert not torch.allclose(y.float(), x.float())  # it did rotate something
    back = oa.apply_rope(y, cos[:, None, :], sin[:, None, :], inverse=True)
    assert back.dtype == dtype
    assert_matches(back, x.double(), ROUNDTRIP_TOL[dtype], "inverse(rope(x))")


@pytest.mark.parametrize("kind", ["swa", "hca"])
def test_apply_rope_relative_property(torch_gen, kind):
    """q(p)·k(p') depends only on p − p' (and equals Re Σ q_i conj(k_i) e^{j(p−p')θ_i} + nope part)."""
    cfg = ModelConfig.preset("tiny")
    r, D = cfg.qk_rope_head_dim, cfg.head_dim
    theta, _, _ = (ref_theta(r, 10000.0) if kind == "swa" else ref_theta(r, 160000.0, 16.0, 65536, 32.0, 1.0))
    q = rand(torch_gen, 5, D)
    k = rand(torch_gen, 5, D)
    p = torch.randint(0, 50_000, (5,), generator=torch_gen)
    p2 = torch.randint(0, 50_000, (5,), generator=torch_gen)
    shift = torch.randint(1, 50_000, (5,), generator=torch_gen)

    def dot_at(pq, pk):
        cq, sq = rope_tables(cfg, kind, pq)
        ck, sk = rope_tables(cfg, kind, pk)
        return (oa.apply_rope(q, cq, sq).double() * oa.apply_rope(k, ck, sk).double()).sum(-1)

    d0 = dot_at(p, p2)
    d1 = dot_at(p + shift, p2 + shift)
    # reference: complex form over interleaved pairs of the last r dims
    q64, k64 = q.double(), k.double()
    qc = torch.complex(q64[:, D - r::2], q64[:, D - r + 1::2])
    kc = torch.complex(k64[:, D - r::2], k64[:, D - r + 1::2])
    phase = (p - p2).double().unsqueeze(-1) * torch.tensor(theta, dtype=torch.float64)
    want = (q64[:, : D - r] * k64[:, : D - r]).sum(-1) + (qc * kc.conj() * torch.polar(torch.ones_like(phase), phase)).real.sum(-1)
    scale = float((q64.norm(dim=-1) * k64.norm(dim=-1)).max())
    torch.testing.assert_close(d0, want, rtol=0, atol=1e-5 * scale)
    torch.testing.assert_close(d1, want, rtol=0, atol=1e-5 * scale)


def test_apply_rope_bad_inputs(torch_gen):
    x = rand(torch_gen, 2, 4, 16)
    c = torch.ones(4, 4)
    with pytest.raises(ValueError, match="shape"):
        oa.apply_rope(x, c, torch.ones(4, 3))                 # cos/sin differ
    with pytest.raises(ValueError, match="exceed"):
        oa.apply_rope(x, torch.ones(4, 9), torch.ones(4, 9))  # 18 rope dims > 16
    with pytest.raises(ValueError, match="broadcast"):
        oa.apply_rope(x, torch.ones(5, 4), torch.ones(5, 4))  # 5 positions vs 4
    with pytest.raises(ValueError, match="dtype"):
        oa.apply_rope(x.to(torch.int32), c, c)
