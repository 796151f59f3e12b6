"""MoE gate (spec §12.1-§12.3, trap 15) and clamped SwiGLU experts (spec §12.4, trap 17) vs float64.

References loop over tokens and slots in float64; selection sets are compared as sets (top-k order is
implementation-defined), weights by the expert they belong to.
"""

from __future__ import annotations

import math

import pytest
import torch

import op_adapters as oa

from op_helpers import assert_matches, rand

# Tolerances, judged as |out - ref| <= atol * max|ref| + rtol * |ref|.
#   gate weights are fp32 for every logits dtype (scores and renormalisation in fp32; the reference
#   uses the same, possibly bf16-rounded, logits), so 1e-5 relative for both.
#   experts, fp32: two length-d and one length-I fp32 dot products per slot: 1e-5 relative.
#   experts, bf16: the two linear outputs, h and each expert output are rounded to bf16 (spec §12.4),
#   i.e. four bf16 roundings in a row (~4 · 2^-9 relative), summed over slots: 3e-2 (8 bf16 ulps),
#   with atol relative to the largest output because slot contributions can cancel.
GATE_TOL = dict(rtol=1e-5, atol=1e-6)
EXPERT_TOL = {
    torch.float32: dict(rtol=1e-5, atol=2e-6),
    torch.bfloat16: dict(rtol=3e-2, atol=1.2e-2),
}
DTYPES = [torch.float32, torch.bfloat16]


# ------------------------------------------------------------------------------------- gate
def ref_scores(logits: torch.Tensor, score_func: str) -> torch.Tensor:
    l = logits.to(torch.float64)
    if score_func == "sqrtsoftplus":
        return torch.tensor([[math.sqrt(math.log1p(math.exp(v)) if v < 30 else v) for v in row] for row in l.tolist()],
                            dtype=torch.float64)
    if score_func == "sigmoid":
        return torch.tensor([[1 / (1 + math.exp(-v)) for v in row] for row in l.tolist()], dtype=torch.float64)
    if score_func == "softmax":
        out = []
        for row in l.tolist():
            m = max(row)
            e = [math.exp(v - m) for v in row]
            out.append([v / sum(e) for v in e])
        return torch.tensor(out, dtype=torch.float64)
    raise AssertionError(score_func)


def ref_gate(logits, k, route_scale, score_func, bias=None, input_ids=None, tid2eid=None):
    """Returns per token a list of (expert, weight) pairs (float64)."""
    s = ref_scores(logits, score_func)
    T, E = s.shape
    rows = []
    for t in range(T):
        if tid2eid is not None:
            idx = [int(e) for e in tid2eid[int(input_ids[t])]]
        else:
            sel = [float(s[t, e]) + (float(bias[e]) if bias is not None else 0.0) for e in range(E)]
            idx = sorted(range(E), key=lambda e: -sel[e])[:k]
        w = [float(s[t, e]) for e in idx]
        if score_func != "softmax":     # renormalise, no eps
            tot = sum(w)
            w = [v / tot for v in w]
        rows.append([(e, v * route_scale) for e, v in zip(idx, w)])
    return rows


def selection_margin(logits, k, score_func, bias=None) -> torch.Tensor:
    """Gap between the k-th and (k+1)-th selection value per row (float64)."""
    sel = ref_scores(logits, score_func)
    if bias is not None:
        sel = sel + bias.to(torch.float64)
    top = sel.topk(min(k + 1, sel.shape[1]), dim=-1).values
    if k >= sel.shape[1]:
        return torch.full((sel.shape[0],), math.inf, dtype=torch.float64)
    return top[:, k - 1] - top[:, k]


def well_separated_logits(gen, T, E, k, dtype, score_func, bias=None, scale=2.0):
    """Random logits (rounded to dtype) whose top-k selection is unambiguous (margin > 1e-3),
    so an fp32 op and the float64 reference cannot disagree through rounding of near-ties."""
    logits = rand(gen, T, E, dtype=dtype, scale=scale)
    for _ in range(100):
        bad = selection_margin(logits, k, score_func, bias) <= 1e-3
        if not bad.any():
            return logits
        logits[bad] = rand(gen, int(bad.sum()), E, dtype=dtype, scale=scale)
    raise AssertionError("could not draw well-separated logits")


def check_gate(weights, indices, want, T, k):
    assert weights.dtype == torch.float32 and indices.dtype == torch.int64
    assert weights.shape == (T, k) and indices.shape == (T, k)
    for t in range(T):
        got = {int(e): float(w) for e, w in zip(indices[t], weights[t])}
        exp = dict(want[t])
        assert set(got) == set(exp), f"token {t}: experts {sorted(got)} vs {sorted(exp)}"
        for e in exp:
            assert got[e] == pytest.approx(exp[e], rel=GATE_TOL["rtol"], abs=GATE_TOL["atol"]), (t, e)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("score_func", ["sqrtsoftplus", "sigmoid", "softmax"])
@pytest.mark.parametrize("T,E,k,route_scale", [(1, 4, 1, 1.0), (9, 16, 6, 1.5), (12, 32, 4, 2.5), (5, 6, 6, 1.5)])
def test_moe_gate_topk_matches_spec(torch_gen, dtype, score_func, T, E, k, route_scale):
    logits = well_separated_logits(torch_gen, T, E, k, dtype, score_func)
    w, idx = oa.moe_gate(logits, k=k, route_scale=route_scale, score_func=score_func)
    check_gate(w, idx, ref_gate(logits, k, route_scale, score_func), T, k)
    if score_func != "softmax":  # renormalised: weights sum to route_scale exactly up to rounding
        torch.testing.assert_close(w.double().sum(-1), torch.full((T,), route_scale, dtype=torch.float64),
                                   rtol=1e-6, atol=0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T,E,k", [(10, 16, 6), (7, 8, 2)])
def test_moe_gate_bias_selects_but_does_not_weight(torch_gen, dtype, T, E, k):
    for _ in range(50):
        bias = rand(torch_gen, E, scale=1.0)
        logits = well_separated_logits(torch_gen, T, E, k, dtype, "sqrtsoftplus", bias=bias)
        want = ref_gate(logits, k, 1.5, "sqrtsoftplus", bias=bias)
        unbiased = ref_gate(logits, k, 1.5, "sqrtsoftplus")
        # non-trivial draw: the bias changes the selection of at least one token, otherwise this test
        # could not tell a biased gate from an unbiased one
        if any({e for e, _ in a} != {e for e, _ in b} for a, b in zip(want, unbiased)):
            break
    else:
        raise AssertionError("the bias never changed the selection")
    w, idx = oa.moe_gate(logits, bias=bias, k=k, route_scale=1.5, score_func="sqrtsoftplus")
    check_gate(w, idx, want, T, k)


def test_moe_gate_sqrtsoftplus_large_logits(torch_gen):
    # logits beyond softplus' threshold (20): s = sqrt(l); make sure such experts are picked and weighted
    logits = torch.tensor([[25.0, -3.0, 0.5, 40.0, 1.0, -20.0]])
    w, idx = oa.moe_gate(logits, k=3, route_scale=2.5, score_func="sqrtsoftplus")
    check_gate(w, idx, ref_gate(logits, 3, 2.5, "sqrtsoftplus"), 1, 3)
    assert set(idx[0].tolist()) == {0, 3, 4}


@pytest.mark.parametrize("dtype", DTYPES)
def test_moe_gate_hash_routing(torch_gen, dtype):
    T, E, k, V = 11, 16, 6, 40
    logits = rand(torch_gen, T, E, dtype=dtype, scale=2.0)
    tid2eid = torch.stack([torch.randperm(E, generator=torch_gen)[:k] for _ in range(V)])
    tid2eid[3] = torch.tensor([1, 1, 2, 5, 5, 5])[:k]   # rows may repeat an expert (Unknown in the spec)
    ids = torch.randint(0, V, (T,), generator=torch_gen)
    ids[0] = 3
    w, idx = oa.moe_gate(logits, k=k, route_scale=1.5, score_func="sqrtsoftplus", input_ids=ids, tid2eid=tid2eid)
    assert torch.equal(idx, tid2eid[ids].long())           # exactly the table rows, in order
    want = ref_gate(logits, k, 1.5, "sqrtsoftplus", input_ids=ids, tid2eid=tid2eid)
    assert w.dtype == torch.float32 and w.shape == (T, k)
    ref_w = torch.tensor([[v for _, v in row] for row in want], dtype=torch.float64)
    assert_matches(w, ref_w, GATE_TOL, "hash weights")


def test_moe_gate_bad_inputs(torch_gen):
    logits = rand(torch_gen, 4, 8)
    with pytest.raises(ValueError, match="larger than the number of experts"):
        oa.moe_gate(logits, k=9)
    with pytest.raises(ValueError, match="k must"):
        oa.moe_gate(logits, k=0)
    with pytest.raises(ValueError, match="score_func"):
        oa.moe_gate(logits, k=2, score_func="relu")
    with pytest.raises(ValueError, match="bias"):
        oa.moe_gate(logits, k=2, bias=torch.zeros(7))
    tid2eid = torch.randint(0, 8, (16, 2))
    ids = torch.randint(0, 16, (4,), generator=torch_gen)
    with pytest.raises(ValueError, match="tid2eid"):
        oa.moe_gate(logits, k=3, input_ids=ids, tid2eid=tid2eid)              # second dim != k
    with pytest.raises(ValueError, match="bias"):
        oa.moe_gate(logits, k=2, bias=torch.zeros(8), input_ids=ids, tid2eid=tid2eid)
    with pytest.raises(ValueError, match="input_ids"):
        oa.moe_gate(logits, k=2, tid2eid=tid2eid)
    with pytest.raises(ValueError, match="dims"):
        oa.moe_gate(logits[None], k=2)


# ---------------------------------------------------------------------------------- experts
def ref_experts(x, weights, indices, w1, w2, w3, limit):
    """Spec §12.4 per (token, slot), float64: clamp up to ±L, gate to ≤ L; weight before W2."""
    x, w1, w2, w3 = (t.to(torch.float64) for t in (x, w1, w2, w3))
    T, d = x.shape
    out = torch.zeros(T, d, dtype=torch.float64)
    stats = {"up_hi": 0, "up_lo": 0, "gate_hi": 0}
    for t in range(T):
        for j in range(indices.shape[1]):
            e = int(indices[t, j])
            gate = w1[e] @ x[t]
            up = w3[e] @ x[t]
            if limit:
                stats["up_hi"] += int((up > limit).sum())
                stats["up_lo"] += int((up < -limit).sum())
                stats["gate_hi"] += int((gate > limit).sum())
                up = up.clamp(-limit, limit)
                gate = gate.clamp(max=limit)
            h = gate / (1 + torch.exp(-gate)) * up * float(weights[t, j])
            out[t] += w2[e] @ h
    return out, stats


def make_experts(gen, T, d, I, E, k, dtype, wscale):
    x = rand(gen, T, d, dtype=dtype)
    w1 = rand(gen, E, I, d, dtype=dtype, scale=wscale)
    w3 = rand(gen, E, I, d, dtype=dtype, scale=wscale)
    w2 = rand(gen, E, d, I, dtype=dtype, scale=0.3)
    weights = torch.rand(T, k, generator=gen) + 0.1
    indices = torch.randint(0, E - 2, (T, k), generator=gen)   # experts E-2, E-1 receive no token
    indices[0] = 1                                                # all slots of token 0 hit expert 1
    return x, weights, indices, w1, w2, w3


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T,d,I,E,k", [(1, 8, 4, 3, 1), (7, 16, 8, 6, 3), (12, 32, 16, 8, 6)])
def test_moe_experts_clamped_swiglu(torch_gen, dtype, T, d, I, E, k):
    # Weights scaled so |x W3ᵀ| and x W1ᵀ often exceed the limit 10: the clamp must be active.
    x, weights, indices, w1, w2, w3 = make_experts(torch_gen, T, d, I, E, k, dtype, wscale=12.0 / math.sqrt(d))
    out = oa.moe_experts(x, weights, indices, w1, w2, w3, swiglu_limit=10.0)
    assert out.dtype == dtype and out.shape == (T, d)
    ref, stats = ref_experts(x, weights, indices, w1, w2, w3, 10.0)
    assert_matches(out, ref, EXPERT_TOL[dtype], "moe_experts")
    if T * k * I >= 32:  # (the single-slot case is too small to be sure every clamp side triggers)
        assert stats["up_hi"] > 0 and stats["up_lo"] > 0 and stats["gate_hi"] > 0, stats
        # and the clamp matters: the unclamped result is far from the clamped one
        unclamped, _ = ref_experts(x, weights, indices, w1, w2, w3, 0.0)
        assert not torch.allclose(unclamped, ref, rtol=0.05, atol=0.05 * float(ref.abs().max()))


@pytest.mark.parametrize("dtype", DTYPES)
def test_moe_experts_no_clamp_and_out_dtype(torch_gen, dtype):
    T, d, I, E, k = 6, 16, 8, 5, 2
    x, weights, indices, w1, w2, w3 = make_experts(torch_gen, T, d, I, E, k, dtype, wscale=0.3)
    out = oa.moe_experts(x, weights, indices, w1, w2, w3, swiglu_limit=0.0, out_dtype=torch.float32)
    assert out.dtype == torch.float32
    ref, _ = ref_experts(x, weights, indices, w1, w2, w3, 0.0)
    assert_matches(out, ref, EXPERT_TOL[dtype], "moe_experts without clamp")


def test_moe_experts_gate_clamped_only_from_above(torch_gen):
    # A very negative gate must not be clamped to -L: silu(-50) ≈ 0, silu(-10) ≈ -4.5e-4.
    d, I = 4, 2
    x = torch.tensor([[1.0, 0.0, 0.0, 0.0]])
    w1 = torch.zeros(1, I, d)
    w3 = torch.zeros(1, I, d)
    w1[0, :, 0] = torch.tensor([-50.0, 30.0])   # gate: -50 (unclamped), 30 → 10
    w3[0, :, 0] = torch.tensor([1000.0, -25.0])  # up: 1000 → 10, -25 → -10
    w2 = torch.eye(d, I).unsqueeze(0)
    out = oa.moe_experts(x, torch.ones(1, 1), torch.zeros(1, 1, dtype=torch.int64), w1, w2, w3, swiglu_limit=10.0)
    silu = lambda v: v / (1 + math.exp(-v))  # noqa: E731
    assert float(out[0, 0]) == pytest.approx(silu(-50.0) * 10.0, abs=1e-12)
    assert float(out[0, 1]) == pytest.approx(silu(10.0) * -10.0, rel=1e-6)


def test_moe_experts_bad_inputs(torch_gen):
    T, d, I, E, k = 3, 8, 4, 4, 2
    x, weights, indices, w1, w2, w3 = make_experts(torch_gen, T, d, I, E, k, torch.float32, wscale=1.0)
    with pytest.raises(ValueError, match="dtype"):
        oa.moe_experts(x, weights, indices, w1.to(torch.bfloat16), w2, w3)
    with pytest.raises(ValueError, match="w2"):
        oa.moe_experts(x, weights, indices, w1, w2[:, :, :3], w3)
    with pytest.raises(ValueError, match="w1 and w3"):
        oa.moe_experts(x, weights, indices, w1, w2, w3[:, :3])
    with pytest.raises(ValueError, match="expert indices"):
        oa.moe_experts(x, weights, indices + E, w1, w2, w3)
    with pytest.raises(ValueError, match="weights"):
        oa.moe_experts(x, weights[:, :1], indices, w1, w2, w3)
    with pytest.raises(ValueError, match="dtype"):
        oa.moe_experts(x, weights, indices.float(), w1, w2, w3)
    with pytest.raises(ValueError, match="dims"):
        oa.moe_experts(x[None], weights, indices, w1, w2, w3)
