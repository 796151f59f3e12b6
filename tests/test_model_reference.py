"""The float64 model against an independent float64 oracle (tests/v4_reference.py).

The oracle is written from the spec (/work/shared/spec/deepseek_v4.md) with plain per-token /
per-head loops; it takes only the parameter names and shapes from the implementation.  Both run in
float64 on the `tiny` preset (SWA, CSA with hash routing, HCA, CSA, MTP) with fresh random weights, so
with ``fake_quant=False`` they must agree to ~1e-15; the tests allow 1e-9 relative.

Every run draws a fresh seed (printed in every assertion message); set ASCEND_V4_REF_SEED to replay
one.  The oracle and the model both run single-threaded: on a 2-core machine intra-op threads only add
overhead to thousands of tiny ops (and a lot of it when the machine is loaded).
"""

from __future__ import annotations

import dataclasses
import functools
import os
import secrets
import sys

import pytest
import torch

from ascend_v4.config import ModelConfig
from ascend_v4.model import V4Model

if os.path.dirname(os.path.abspath(__file__)) not in sys.path:   # any pytest import mode
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import v4_reference as ref  # noqa: E402

TOL = 1e-9  # relative max error of the float64 logits (max |got - want| / max |want|)

SEED = int(os.environ.get("ASCEND_V4_REF_SEED") or secrets.randbits(31))


@functools.lru_cache(maxsize=None)
def _model() -> V4Model:
    return V4Model(ModelConfig.preset("tiny"), dtype=torch.float64).init_random(SEED).eval()


def _cfg() -> dict:
    return dataclasses.asdict(_model().config)


def _sd() -> dict:
    m = _model()
    return {**dict(m.named_parameters()), **dict(m.named_buffers())}


def _ids(B: int, S: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(SEED * 1000 + 7 * B + S)
    return torch.randint(0, _model().config.vocab_size, (B, S), generator=g)


@functools.lru_cache(maxsize=None)
def _oracle(B: int, S: int, fake_quant: bool = False, table: str = "float64", qin: str = "float64"):
    """(logits, mtp logits) of the oracle, cached across tests.  table / qin: the oracle's diagnostic
    options rope_table_dtype / quant_input_dtype ("float64" = the exact oracle)."""
    return ref.reference_both(_sd(), _cfg(), _ids(B, S), fake_quant=fake_quant,
                              rope_table_dtype=getattr(torch, table), quant_input_dtype=getattr(torch, qin))


@functools.lru_cache(maxsize=None)
def _run_model(B: int, S: int, fake_quant: bool = False):
    m = _model()
    old = m.fake_quant
    m.fake_quant = fake_quant
    try:
        with torch.no_grad(), ref._single_thread():
            ids = _ids(B, S)
            logits = m(ids)
            mtp = m.mtp_logits(ids) if S > 1 else None
    finally:
        m.fake_quant = old
    return logits, mtp


def _rel(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.double() - want).abs().max() / want.abs().max()).item()


def _where(got: torch.Tensor, want: torch.Tensor) -> str:
    """First (batch, position) whose row error exceeds TOL, for the assertion message."""
    row = (got.double() - want).abs().amax(-1) / want.abs().amax(-1).clamp_min(1e-300)
    bad = (row > TOL).nonzero()
    return f"first bad (b, p) = {bad[0].tolist()}, {len(bad)} bad rows of {row.numel()}" if len(bad) else "-"


def _msg(what: str, got, want) -> str:
    return (f"seed {SEED} (ASCEND_V4_REF_SEED={SEED} to replay): {what}: relative max error "
            f"{_rel(got, want):.3e} > {TOL:g}; {_where(got, want)}")


def _check(what: str, got: torch.Tensor, want: torch.Tensor) -> None:
    __tracebackhide__ = True
    err = _rel(got, want)
    assert err <= TOL, _msg(what, got, want)


# ---------------------------------------------------------------------------------------------
# the oracle's own building blocks against the spec (cheap sanity checks of the oracle itself)
# ---------------------------------------------------------------------------------------------

def test_oracle_minifloat_rounding_matches_torch_float8_and_the_e2m1_table():
    g = torch.Generator().manual_seed(SEED)
    x = (torch.randn(20000, generator=g, dtype=torch.float64) * 2.0 ** torch.randint(-12, 9, (20000,), generator=g))
    x = x.float().double().clamp(-448, 448)          # exactly representable in fp32: no double rounding
    want = x.float().to(torch.float8_e4m3fn).double()
    assert torch.equal(ref.round_e4m3(x), want), f"seed {SEED}: e4m3 rounding"
    grid = torch.tensor([0, 0.5, 1, 1.5, 2, 3, 4, 6], dtype=torch.float64)
    y = torch.linspace(-6, 6, 4801, dtype=torch.float64)
    q = ref.round_e2m1(y)
    assert torch.isin(q.abs(), grid).all()
    d = (y[:, None].abs() - grid).abs()
    best = d.min(1).values
    assert torch.equal((q.abs() - y.abs()).abs(), best)                       # nearest
    assert ref.round_e2m1(torch.tensor([0.25, 0.75, 2.5, 3.5, 5.0], dtype=torch.float64)).tolist() == \
        [0.0, 1.0, 2.0, 4.0, 4.0]                                            # ties to even


def test_oracle_sinkhorn_and_yarn_follow_the_spec():
    c = ref.RefCfg.from_mapping(_cfg())
    g = torch.Generator().manual_seed(SEED)
    X = torch.randn(c.n_hc, c.d, generator=g, dtype=torch.float64)
    # unit-scale mix logits: with raw randn weights |mix| reaches ~40, where 2σ rounds to exactly 2.0
    fn = torch.randn(24, 4 * c.d, generator=g, dtype=torch.float64) / (4 * c.d) ** 0.5
    _, post, comb = ref.hc_pre(X, fn, torch.ones(3, dtype=torch.float64), torch.zeros(24, dtype=torch.float64), c)
    assert torch.allclose(comb.sum(0), torch.ones(4, dtype=torch.float64), atol=1e-5)   # last step: columns
    assert ((post > 0) & (post < 2)).all()
    # §7.3 (r = 64, base 160000): pairs 0..15 keep θ, pairs >= 25 are divided by the factor
    big = dataclasses.replace(c, r=64)
    th = ref.rope_freqs(64, 160000.0, True, big)
    base = 160000.0 ** (-torch.arange(32, dtype=torch.float64) / 32)
    assert torch.allclose(th[:16], base[:16], rtol=0, atol=0)
    assert torch.allclose(th[25:], base[25:] / big.rope_factor, rtol=1e-15)


# ---------------------------------------------------------------------------------------------
# model vs oracle, fake_quant = False, float64, tight
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("S", [1, 5, 37])
def test_logits_match_oracle(S):
    got, _ = _run_model(1, S)
    want, _ = _oracle(1, S)
    assert got.shape == want.shape
    _check(f"logits, S={S}", got, want)


def test_logits_match_oracle_300_tokens():
    """Crosses an HCA block (ratio 128) twice, wraps the 32-token window, CSA top-8 of up to 75."""
    got, _ = _run_model(1, 300)
    want, _ = _oracle(1, 300)
    _check("logits, S=300", got, want)


def test_batch_of_two_matches_oracle():
    got, _ = _run_model(2, 41)
    want, _ = _oracle(2, 41)
    assert got.shape == want.shape == (2, 41, _model().config.vocab_size)
    _check("logits, B=2, S=41", got, want)


@pytest.mark.parametrize("S", [5, 300])
def test_mtp_logits_match_oracle(S):
    _, got = _run_model(1, S)
    _, want = _oracle(1, S)
    assert got.shape == want.shape == (1, S - 1, _model().config.vocab_size)
    _check(f"mtp logits, S={S}", got, want)


def test_matches_oracle_up_to_rope_table_precision():
    """Diagnostic companion of the strict tests above, NOT a replacement for them.  The float64 model
    builds its RoPE cos/sin tables in fp32 (fallbacks/rope.py `rope_cos_sin`), which the strict tests
    flag (about 1e-8 relative).  This test says whether anything ELSE differs, over 300 tokens and the
    MTP block: the model must match, to 1e-9, the oracle with float64 tables or the oracle variant whose
    cos/sin are rounded to fp32 (everything else float64)."""
    got, got_mtp = _run_model(1, 300)
    errs = {}
    for table in ("float64", "float32"):
        want, want_mtp = _oracle(1, 300, table=table)
        errs[table] = (f"{_rel(got, want):.2e}", f"{_rel(got_mtp, want_mtp):.2e}")
        if _rel(got, want) <= TOL and _rel(got_mtp, want_mtp) <= TOL:
            return
    pytest.fail(f"seed {SEED}: S=300 (logits, mtp logits) relative errors vs the oracle with float64 / fp32 "
                f"rope tables: {errs}; tolerance {TOL:g}")


# ---------------------------------------------------------------------------------------------
# fake_quant = True
# ---------------------------------------------------------------------------------------------

def test_fake_quant_matches_oracle():
    """All QAT fake-quant points (§13): FP8 activations of the FP8 linears (routed experts also on h
    before w2), FP8 KV (nope dims, blocks of 64) for window and compressed entries, FP4 indexer q/keys
    after the Hadamard, MTP e_proj/h_proj.  Still float64 and still 1e-9: both sides quantise the same
    float64 values, so they agree to rounding noise unless a value sits on a rounding boundary.

    Two known float64-mode precision deviations of the model (fp32 RoPE cos/sin tables; fake quantisers
    that round their input to fp32 first) turn into full e4m3/e2m1 steps when a value lies within ~1e-8
    of a rounding boundary (a few percent of 300-token runs).  They have their own deterministic tests
    (the strict tests above and `test_fp8_fake_quant_rounds_the_float64_value`); to keep this test about
    the quantisation POINTS and not flaky, the model may match any of the four oracle variants."""
    S = 37
    got, got_mtp = _run_model(1, S, fake_quant=True)
    plain, _ = _run_model(1, S, fake_quant=False)
    assert _rel(got, plain) > 1e-4, f"seed {SEED}: fake_quant=True had no effect on the logits"
    errs = {}
    for table in ("float64", "float32"):
        for qin in ("float64", "float32"):
            want, want_mtp = _oracle(1, S, fake_quant=True, table=table, qin=qin)
            errs[(table, qin)] = (f"{_rel(got, want):.2e}", f"{_rel(got_mtp, want_mtp):.2e}")
            if _rel(got, want) <= TOL and _rel(got_mtp, want_mtp) <= TOL:
                return
    pytest.fail(f"seed {SEED}: fake_quant (logits, mtp logits) relative errors vs the oracle, keyed by "
                f"(rope table dtype, quantiser input dtype): {errs}; tolerance {TOL:g}")


def _crafted_model(target: float) -> tuple[V4Model, torch.Tensor]:
    """A copy of the tiny model in which token 2's layer-0 attn_norm output is x = [50, 9.5*target/76,
    1, 1, ...] (up to float64 ulps), so the FP8 activation quant before wq_a / wkv has scale 2^-3 and sees
    x[1]/scale = target."""
    m = V4Model(ModelConfig.preset("tiny"), dtype=torch.float64).init_random(SEED).eval()
    c = ref.RefCfg.from_mapping(_cfg())
    prm = dict(m.named_parameters())
    t0 = 2
    X = torch.ones(c.n_hc, c.d, dtype=torch.float64)                 # embedding row of ones, 4 streams
    x_in, _, _ = ref.hc_pre(X, prm["layers.0.hc_attn_fn"].detach(), prm["layers.0.hc_attn_scale"].detach(),
                            prm["layers.0.hc_attn_base"].detach(), c)
    cn = ref.rmsnorm(x_in, torch.ones(c.d, dtype=torch.float64), c.norm_eps)[0].item()
    w = torch.full((c.d,), 1.0 / cn, dtype=torch.float64)
    w[0] = 50.0 / cn                                                   # amax 50 -> scale 2^ceil(log2(50/448)) = 2^-3
    w[1] = target / 8.0 / cn
    with torch.no_grad():
        prm["embed.weight"][t0] = 1.0
        prm["layers.0.attn_norm.weight"].copy_(w)
    return m, torch.tensor([[t0]])


def test_fp8_fake_quant_rounds_the_float64_value():
    """§13.2: q = clamp(x/scale, ±448) -> e4m3, round to nearest even.  x/scale = 76·(1 − 1e-9) lies
    just below the midpoint 76 of the e4m3 neighbours 72 and 80, so it must round to 72.  A quantiser
    that first rounds x to fp32 sees exactly 76 and rounds the tie to 80.  Control: 76·(1 − 1e-3)."""
    for target, label in ((76.0 * (1 - 1e-3), "control 76(1-1e-3)"), (76.0 * (1 - 1e-9), "76(1-1e-9)")):
        m, ids = _crafted_model(target)
        sd = {**dict(m.named_parameters()), **dict(m.named_buffers())}
        m.fake_quant = True
        with torch.no_grad(), ref._single_thread():
            got = m(ids)
        want = ref.reference_logits(sd, _cfg(), ids, fake_quant=True)
        err = _rel(got, want)
        if err > TOL:
            emul = ref.reference_logits(sd, _cfg(), ids, fake_quant=True, quant_input_dtype=torch.float32)
            pytest.fail(f"seed {SEED}: {label}: S=1 fake-quant logits differ from the oracle by {err:.3e} "
                        f"(relative); the oracle variant that rounds the quantiser input to fp32 first "
                        f"differs by {_rel(got, emul):.3e}")
