"""Hadamard (spec §8.4, §9) and the fake-quantisation points (spec §13.2-§13.4, trap 18).

The e4m3 and e2m1 value sets are decoded here from their bit patterns, rounding is done by hand in
float64 (nearest, ties to the even mantissa), and the ue8m0 scales follow the spec: amax clamped,
times the fp32 constant 1/448 (resp. 1/6) in fp32 arithmetic, then 2^ceil(log2).  Nothing from
fallbacks/ or op_adapters/ produces expected values.
"""

from __future__ import annotations

import bisect
import math

import pytest
import torch

import op_adapters as oa

from op_helpers import assert_matches, rand

# Tolerances.
#   Quantisation is exact arithmetic: scales are powers of two, x/scale is exact in fp32, the e4m3 /
#   e2m1 grids have <= 4 significant bits, so q·scale is exact in fp32 AND in bf16.  Every quant test
#   therefore demands bit-exact equality (tolerance 0) against the float64 reference.
#   hadamard: fp32 is a length-n fp32 dot product per output (1e-5 relative, atol relative to the
#   largest output); bf16 rounds the output once (1.6e-2 = 4 bf16 ulps).
QUANT_TOL = 0.0
HAD_TOL = {
    torch.float32: dict(rtol=1e-5, atol=1e-6),
    torch.bfloat16: dict(rtol=1.6e-2, atol=4e-3),
}
DTYPES = [torch.float32, torch.bfloat16]


# ------------------------------------------------------------------------------- value tables
def decode_e4m3(bits: int) -> float:
    """OCP FP8 e4m3fn: 1 sign, 4 exponent (bias 7), 3 mantissa; no inf; S.1111.111 is NaN."""
    sign = -1.0 if bits & 0x80 else 1.0
    e = (bits >> 3) & 0xF
    m = bits & 0x7
    if e == 0xF and m == 0x7:
        return math.nan
    if e == 0:
        return sign * (m / 8) * 2.0 ** (1 - 7)          # subnormal
    return sign * (1 + m / 8) * 2.0 ** (e - 7)


def decode_e2m1(bits: int) -> float:
    """FP4 e2m1: 1 sign, 2 exponent (bias 1), 1 mantissa; all 16 patterns finite."""
    sign = -1.0 if bits & 0x8 else 1.0
    e = (bits >> 1) & 0x3
    m = bits & 0x1
    if e == 0:
        return sign * (m / 2) * 2.0 ** (1 - 1)
    return sign * (1 + m / 2) * 2.0 ** (e - 1)


def positive_grid(decode, nbits: int) -> list[tuple[float, int]]:
    """Sorted (value, mantissa LSB) of the non-negative finite values of a format."""
    vals = {}
    for bits in range(1 << (nbits - 1)):          # sign bit clear
        v = decode(bits)
        if not math.isnan(v):
            vals[v] = bits & 1                       # mantissa LSB: 0 = even
    return sorted(vals.items())


E4M3 = positive_grid(decode_e4m3, 8)
E2M1 = positive_grid(decode_e2m1, 4)


def test_decoded_tables_match_spec():
    assert len(E4M3) == 127                           # 0 plus 126 positive finite values
    assert E4M3[-1][0] == 448.0                        # max finite
    assert E4M3[1][0] == 2.0 ** -9                     # smallest subnormal
    assert math.isnan(decode_e4m3(0x7F)) and math.isnan(decode_e4m3(0xFF))
    assert [v for v, _ in E2M1] == [0, 0.5, 1, 1.5, 2, 3, 4, 6]   # spec §13.4


def round_grid(a: float, grid: list[tuple[float, int]]) -> float:
    """Round to the nearest grid value (|a| <= max), ties to the even mantissa; float64, by search."""
    mag = abs(a)
    lo = bisect.bisect_right([v for v, _ in grid], mag) - 1   # largest grid value <= mag
    if grid[lo][0] == mag or lo == len(grid) - 1:
        r = grid[lo][0]
    else:
        (v0, lsb0), (v1, _) = grid[lo], grid[lo + 1]
        if mag - v0 < v1 - mag:
            r = v0
        elif mag - v0 > v1 - mag:
            r = v1
        else:
            r = v0 if lsb0 == 0 else v1             # exact midpoint: the even mantissa
    return math.copysign(r, a) if r else 0.0


def fp32(v: float) -> float:
    return float(torch.tensor(v, dtype=torch.float64).to(torch.float32))


def ue8m0_scale(amax: float, floor: float, inv_max: float) -> float:
    """2^ceil(log2(fp32(max(amax, floor) * fp32(inv_max)))), the product rounded to fp32 first."""
    arg = fp32(max(amax, floor) * fp32(inv_max))    # the product of two fp32 values is exact in fp64
    m, e = math.frexp(arg)                           # arg = m·2^e, m in [0.5, 1)
    return 2.0 ** (e - 1) if m == 0.5 else 2.0 ** e


def ref_block_quant(x: torch.Tensor, block: int, grid, qmax: float, floor: float, inv_max: float):
    """Returns (q values as float64 [..., K], scales [..., ceil(K/block)]) per spec §13.2-§13.4."""
    xs = x.to(torch.float64).reshape(-1, x.shape[-1])
    K = x.shape[-1]
    nblk = -(-K // block)
    q = torch.zeros_like(xs)
    scales = torch.zeros(xs.shape[0], nblk, dtype=torch.float64)
    for r in range(xs.shape[0]):
        for b in range(nblk):
            seg = xs[r, b * block:(b + 1) * block].tolist()
            sc = ue8m0_scale(max(abs(v) for v in seg), floor, inv_max)
            scales[r, b] = sc
            for j, v in enumerate(seg):
                q[r, b * block + j] = round_grid(min(max(v / sc, -qmax), qmax), grid)
    return q.reshape(x.shape), scales.reshape(*x.shape[:-1], nblk)


def ref_fp8(x, block):
    return ref_block_quant(x, block, E4M3, 448.0, 1e-4, 1 / 448)


def ref_fp4(x, block):
    return ref_block_quant(x, block, E2M1, 6.0, 6 * 2.0 ** -126, 1 / 6)


def expand_scales(scales: torch.Tensor, block: int, K: int) -> torch.Tensor:
    return scales.repeat_interleave(block, dim=-1)[..., :K]


def is_power_of_two(t: torch.Tensor) -> bool:
    m, _ = torch.frexp(t.to(torch.float64))
    return bool((m == 0.5).all())


def quant_input(gen, shape, dtype, block):
    """Random values spread over many binades, plus special blocks: all zeros, and
    amax exactly 448·2^k / 6·2^k (where the fp32 product with 1/448 or 1/6 decides the scale)."""
    x = rand(gen, *shape, scale=1.0)
    # per-element binades 2^-16..2^0 reach the e4m3 subnormals; per-row shifts 2^-12..2^11 vary the scale
    x = x * torch.exp2(torch.randint(-16, 1, shape, generator=gen).double())
    x = x * torch.exp2(torch.randint(-12, 12, (*shape[:-1], 1), generator=gen).double())
    flat = x.view(-1, shape[-1])
    if flat.shape[0] >= 3 and shape[-1] >= block:
        flat[0, :block] = 0.0
        for row, amax in ((1, 448.0 * 2.0 ** -3), (2, -6.0 * 2.0 ** 5)):
            flat[row, :block] *= 0.9 * abs(amax) / flat[row, :block].abs().max()
            flat[row, 0] = amax
    return x.to(dtype)


SHAPES = [(2, 64), (3, 2, 128), (4, 256), (3, 96)]   # (3, 96) with block 64: a shorter last block


# ---------------------------------------------------------------------------------------- fp8
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("block", [64, 128])
def test_act_quant_matches_spec(torch_gen, dtype, shape, block):
    x = quant_input(torch_gen, shape, dtype, block)
    q, scale = oa.act_quant(x, block=block)
    K = shape[-1]
    assert q.dtype == torch.float8_e4m3fn and q.shape == x.shape
    assert scale.dtype == torch.float32 and scale.shape == (*shape[:-1], -(-K // block))
    want_q, want_s = ref_fp8(x, block)
    assert is_power_of_two(scale)
    assert torch.equal(scale.double(), want_s), "ue8m0 scales differ"
    assert torch.equal(q.to(torch.float64), want_q), "e4m3 values differ"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("block", [64, 128])
def test_fp8_fake_quant_matches_spec(torch_gen, dtype, shape, block):
    x = quant_input(torch_gen, shape, dtype, block)
    y = oa.fp8_fake_quant(x, block=block)
    assert y.dtype == dtype and y.shape == x.shape
    want_q, want_s = ref_fp8(x, block)
    want = want_q * expand_scales(want_s, block, shape[-1])
    assert torch.equal(y.to(torch.float64), want)
    assert not torch.equal(y, x)        # it really rounds (trap 18: not a no-op)


def test_fp8_default_blocks():
    # act_quant defaults to blocks of 128 (§13.2), fp8_fake_quant to blocks of 64 (§13.3)
    x = torch.ones(1, 256)
    x[0, 64:] = 100.0
    x[0, 128:] = 1e-3
    _, s = oa.act_quant(x)
    assert s.shape == (1, 2)
    y = oa.fp8_fake_quant(x)
    want_q, want_s = ref_fp8(x, 64)
    assert want_s.shape == (1, 4)
    assert torch.equal(y.double(), want_q * expand_scales(want_s, 64, 256))


def test_fp8_midpoints_round_to_even():
    # block amax 400 → scale 2^ceil(log2(400/448)) = 1, so these values are quantised as they are.
    mids = [1.0625,        # between 1.0 (m=0) and 1.125 (m=1) → 1.0
            1.1875,        # between 1.125 (m=1) and 1.25 (m=2) → 1.25
            272.0,         # between 256 (m=0) and 288 (m=1) → 256
            304.0,         # between 288 (m=1) and 320 (m=2) → 320
            2.0 ** -10,    # between 0 and the smallest subnormal 2^-9 → 0
            3 * 2.0 ** -10,  # between 2^-9 (m=1) and 2^-8 (m=2) → 2^-8
            432.0,         # between 416 (m=5) and 448 (m=6) → 448
            -1.1875]
    want = [1.0, 1.25, 256.0, 320.0, 0.0, 2.0 ** -8, 448.0, -1.25]
    x = torch.tensor([[400.0] + mids + [0.0] * (63 - len(mids))])
    q, s = oa.act_quant(x, block=64)
    assert float(s[0, 0]) == 1.0
    assert float(q[0, 0].float()) == 384.0   # 400 is the midpoint of 384 (m=4) and 416 (m=5)
    assert q[0, 1:1 + len(mids)].double().tolist() == want
    y = oa.fp8_fake_quant(x, block=64)
    assert y[0, 1:1 + len(mids)].double().tolist() == want
    # and the hand-written reference agrees with the spec-derived expectations
    assert [round_grid(v, E4M3) if abs(v) <= 448 else 448.0 for v in mids] == want


# ---------------------------------------------------------------------------------------- fp4
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(2, 32), (3, 2, 128), (4, 96), (3, 40)])
@pytest.mark.parametrize("block", [32, 16])
def test_fp4_fake_quant_matches_spec(torch_gen, dtype, shape, block):
    x = quant_input(torch_gen, shape, dtype, block)
    y = oa.fp4_fake_quant(x, block=block)
    assert y.dtype == dtype and y.shape == x.shape
    want_q, want_s = ref_fp4(x, block)
    want = want_q * expand_scales(want_s, block, shape[-1])
    assert torch.equal(y.to(torch.float64), want)


def test_fp4_midpoints_round_to_even():
    # block amax 5.5 → scale 2^ceil(log2(5.5/6)) = 1; midpoints of the e2m1 grid go to the even code
    mids = [0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, -2.5, -0.25]
    want = [0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0, -2.0, 0.0]
    x = torch.zeros(1, 32)
    x[0, 0] = 5.5
    x[0, 1:1 + len(mids)] = torch.tensor(mids)
    y = oa.fp4_fake_quant(x, block=32)
    assert float(y[0, 0]) == 6.0
    assert y[0, 1:1 + len(mids)].double().tolist() == want
    assert [round_grid(v, E2M1) for v in mids] == want
    # the same values scaled by 2^-7 in a block whose amax is 5.5·2^-7: scale 2^-7, same rounding
    y2 = oa.fp4_fake_quant(x * 2.0 ** -7, block=32)
    assert torch.equal(y2, y * 2.0 ** -7)


def test_fp4_default_block_and_tiny_amax():
    x = torch.zeros(2, 64)
    x[0, :32] = 1e-38            # amax below the 6·2^-126 floor: the floor sets the scale
    x[1, 32:] = torch.linspace(-6, 6, 32)
    y = oa.fp4_fake_quant(x)     # default block 32 (§13.4)
    want_q, want_s = ref_fp4(x, 32)
    assert torch.equal(y.double(), want_q * expand_scales(want_s, 32, 64))


def test_quant_bad_inputs():
    with pytest.raises(ValueError, match="block"):
        oa.fp8_fake_quant(torch.ones(2, 64), block=0)
    with pytest.raises(ValueError, match="block"):
        oa.act_quant(torch.ones(2, 64), block=-128)
    with pytest.raises(ValueError, match="dtype"):
        oa.fp4_fake_quant(torch.ones(2, 64, dtype=torch.int32))
    with pytest.raises(ValueError, match="dims"):
        oa.act_quant(torch.tensor(1.0))


# ------------------------------------------------------------------------------------ Hadamard
def sylvester(n: int) -> torch.Tensor:
    """H_1 = [1], H_2m = [[H, H], [H, -H]], divided by sqrt(n); float64, built entry by entry."""
    H = [[1.0]]
    while len(H) < n:
        m = len(H)
        H = [[H[i % m][j % m] * (-1.0 if (i >= m and j >= m) else 1.0) for j in range(2 * m)] for i in range(2 * m)]
    return torch.tensor(H, dtype=torch.float64) / math.sqrt(n)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(3, 1), (2, 2), (5, 8), (2, 3, 32), (4, 128)])
def test_hadamard_matches_sylvester_matrix(torch_gen, dtype, shape):
    x = rand(torch_gen, *shape, dtype=dtype)
    y = oa.hadamard(x)
    assert y.dtype == dtype and y.shape == x.shape
    H = sylvester(shape[-1])
    want = torch.einsum("ij,...j->...i", H, x.double())
    assert_matches(y, want, HAD_TOL[dtype], "hadamard")


@pytest.mark.parametrize("dtype", DTYPES)
def test_hadamard_is_orthonormal_involution(torch_gen, dtype):
    x = rand(torch_gen, 6, 128, dtype=dtype)
    back = oa.hadamard(oa.hadamard(x))
    tol = {torch.float32: dict(rtol=1e-5, atol=1e-6), torch.bfloat16: dict(rtol=3e-2, atol=1e-2)}[dtype]
    assert_matches(back, x.double(), tol, "hadamard(hadamard(x))")
    y = oa.hadamard(x.float())
    torch.testing.assert_close(y.double().norm(dim=-1), x.double().norm(dim=-1), rtol=1e-5, atol=0)


def test_hadamard_sylvester_order():
    # natural (Sylvester) order, not sequency order: H e_0 = all ones, H e_1 = (+, -, +, -, ...),
    # H e_2 = (+, +, -, -, ...), each divided by sqrt(n)
    n = 16
    eye = torch.eye(n)
    y = oa.hadamard(eye[:3]).double() * math.sqrt(n)
    idx = torch.arange(n)
    torch.testing.assert_close(y[0], torch.ones(n, dtype=torch.float64), rtol=0, atol=1e-6)
    torch.testing.assert_close(y[1], torch.where(idx % 2 == 0, 1.0, -1.0).double(), rtol=0, atol=1e-6)
    torch.testing.assert_close(y[2], torch.where(idx % 4 < 2, 1.0, -1.0).double(), rtol=0, atol=1e-6)


def test_hadamard_bad_size():
    with pytest.raises(ValueError, match="power of two"):
        oa.hadamard(torch.ones(2, 12))
    with pytest.raises(ValueError, match="dims"):
        oa.hadamard(torch.tensor(1.0))
