"""Shared-KV sparse attention with a per-head sink (spec §7.4, §10; traps 5-6) against float64.

The reference loops over batch, query, head and index slot and follows the spec formula literally:
M over the valid slots only, the sink only in the denominator, index -1 skipped, duplicates counted.
"""

from __future__ import annotations

import math

import pytest
import torch

import op_adapters as oa

from op_helpers import assert_matches, rand

# Tolerances, judged as |out - ref| <= atol * max|ref| + rtol * |ref|.
#   fp32: fp32 logits, softmax and accumulation: a few ulps; 1e-5 relative.
#   bf16: q/kv are bf16 (the reference uses the same bf16-rounded values); the kernel rounds the
#         un-normalised P to bf16 (2^-9 relative per weight) and the output once more to bf16, so
#         1.6e-2 (4 bf16 ulps); atol relative to the largest output because o_h is a weighted
#         average of signed vectors and may partly cancel.
TOL = {
    torch.float32: dict(rtol=1e-5, atol=2e-6),
    torch.bfloat16: dict(rtol=1.6e-2, atol=8e-3),
}
DTYPES = [torch.float32, torch.bfloat16]


def ref_sparse_attention(q, kv, indices, sink, scale):
    """o_h = Σ_s e^{l_s−M} kv_s / (Σ_s e^{l_s−M} + e^{sink_h−M}), l_s = q_h·kv_s·scale; −1 skipped."""
    q, kv, sink = q.to(torch.float64), kv.to(torch.float64), sink.to(torch.float64)
    B, S, H, D = q.shape
    out = torch.zeros(B, S, H, D, dtype=torch.float64)
    for b in range(B):
        for t in range(S):
            slots = [int(s) for s in indices[b, t] if int(s) != -1]   # duplicates kept on purpose
            if not slots:
                continue  # nothing to attend to: the output is 0
            for h in range(H):
                logits = [float(q[b, t, h] @ kv[b, s]) * scale for s in slots]
                M = max(logits)
                num = torch.zeros(D, dtype=torch.float64)
                den = math.exp(float(sink[h]) - M)
                for l, s in zip(logits, slots):
                    num += math.exp(l - M) * kv[b, s]
                    den += math.exp(l - M)
                out[b, t, h] = num / den
    return out


def random_indices(gen, B, S, K, N, p_invalid=0.25):
    idx = torch.randint(0, N, (B, S, K), generator=gen)
    drop = torch.rand(B, S, K, generator=gen) < p_invalid
    idx[drop] = -1
    idx[0, 0] = -1                 # one row with no valid slot at all
    if S > 1 and K > 2:
        idx[-1, -1, 1] = idx[-1, -1, 0] = 3 % N   # a duplicated entry (window + compressed overlap)
    return idx


CASES = [
    # B, S, H, D, N, K
    (1, 2, 1, 8, 3, 4),
    (2, 3, 4, 16, 10, 6),
    (1, 4, 2, 64, 20, 12),
    (2, 2, 3, 32, 5, 1),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,S,H,D,N,K", CASES)
@pytest.mark.parametrize("idx_dtype", [torch.int64, torch.int32])
def test_sparse_attention_matches_spec(torch_gen, dtype, B, S, H, D, N, K, idx_dtype):
    q = rand(torch_gen, B, S, H, D, dtype=dtype, scale=2.0)
    kv = rand(torch_gen, B, N, D, dtype=dtype)
    indices = random_indices(torch_gen, B, S, K, N).to(idx_dtype)
    sink = rand(torch_gen, H, scale=2.0)          # fp32, some heads with a strong sink
    scale = D ** -0.5
    out = oa.sparse_attention(q, kv, indices, sink, scale)
    assert out.dtype == dtype and out.shape == (B, S, H, D)
    assert_matches(out, ref_sparse_attention(q, kv, indices, sink, scale), TOL[dtype], "sparse_attention")


@pytest.mark.parametrize("dtype", DTYPES)
def test_sparse_attention_all_invalid_row_is_exactly_zero(torch_gen, dtype):
    q = rand(torch_gen, 2, 3, 2, 16, dtype=dtype)
    kv = rand(torch_gen, 2, 5, 16, dtype=dtype)
    indices = torch.randint(0, 5, (2, 3, 4), generator=torch_gen)
    indices[1, 2] = -1
    indices[0, 0] = -1
    out = oa.sparse_attention(q, kv, indices, torch.randn(2, generator=torch_gen), 0.25)
    assert torch.equal(out[1, 2], torch.zeros_like(out[1, 2]))
    assert torch.equal(out[0, 0], torch.zeros_like(out[0, 0]))
    assert (out[0, 1] != 0).any()


def test_sparse_attention_no_kv_entries_all_invalid_is_zero(torch_gen):
    # Degenerate form of the rule above: with N = 0 kv entries every index must be -1, and the
    # output is exactly 0 (not an error).
    q = rand(torch_gen, 1, 2, 2, 8)
    out = oa.sparse_attention(q, torch.zeros(1, 0, 8), torch.full((1, 2, 3), -1), torch.zeros(2), 0.5)
    assert out.shape == q.shape and torch.equal(out, torch.zeros_like(q))


def test_sparse_attention_duplicates_count_twice(torch_gen):
    B, S, H, D, N = 1, 1, 2, 16, 4
    q = rand(torch_gen, B, S, H, D, scale=2.0)
    kv = rand(torch_gen, B, N, D)
    sink = torch.zeros(H)
    dup = torch.tensor([[[0, 0, 2]]])
    once = torch.tensor([[[0, 2, -1]]])
    out_dup = oa.sparse_attention(q, kv, dup, sink, D ** -0.5)
    out_once = oa.sparse_attention(q, kv, once, sink, D ** -0.5)
    assert_matches(out_dup, ref_sparse_attention(q, kv, dup, sink, D ** -0.5), TOL[torch.float32], "dup")
    assert_matches(out_once, ref_sparse_attention(q, kv, once, sink, D ** -0.5), TOL[torch.float32], "once")
    assert not torch.allclose(out_dup, out_once, atol=1e-4)   # de-duplicating would be wrong (trap 6)


def test_sparse_attention_sink_only_in_denominator(torch_gen):
    # With a single valid slot the output is kv_s · e^{l}/(e^{l} + e^{sink}): a pure shrink of kv_s.
    D = 8
    q = rand(torch_gen, 1, 1, 3, D)
    kv = rand(torch_gen, 1, 2, D)
    sink = torch.tensor([-1e4, 0.0, 5.0])
    out = oa.sparse_attention(q, kv, torch.tensor([[[1, -1]]]), sink, 0.5)
    for h in range(3):
        l = float(q[0, 0, h].double() @ kv[0, 1].double()) * 0.5
        frac = 1.0 / (1.0 + math.exp(float(sink[h]) - l))
        torch.testing.assert_close(out[0, 0, h].double(), frac * kv[0, 1].double(), rtol=1e-5, atol=1e-6)
    assert torch.allclose(out[0, 0, 0], kv[0, 1], rtol=1e-5, atol=1e-6)   # sink -1e4: plain softmax


@pytest.mark.parametrize("dtype", DTYPES)
def test_sparse_attention_huge_logits_and_sink(torch_gen, dtype):
    # Logits of several hundred overflow exp() unless the max is subtracted; the sink is also large.
    # q and kv are small integers (exact in bf16) and the scale 1/4 is a power of two, so the logits
    # are exact in fp32 and the usual tolerance applies (fp32 rounding of logits ~ 500 would
    # otherwise move the softmax weights by ~1e-5 relative on its own).
    B, S, H, D, N, K = 1, 3, 3, 16, 6, 5
    q = torch.randint(-40, 41, (B, S, H, D), generator=torch_gen).to(dtype)
    kv = torch.randint(-3, 4, (B, N, D), generator=torch_gen).to(dtype)
    indices = random_indices(torch_gen, B, S, K, N, p_invalid=0.0)
    sink = torch.tensor([300.0, -300.0, 0.0])
    out = oa.sparse_attention(q, kv, indices, sink, 0.25)
    assert torch.isfinite(out.float()).all()
    ref = ref_sparse_attention(q, kv, indices, sink, 0.25)
    assert ref[..., 1:, :].abs().max() > 0.1        # the -300 / 0 sink heads carry real output
    assert_matches(out, ref, TOL[dtype], "huge logits")


def test_sparse_attention_bad_inputs(torch_gen):
    q = rand(torch_gen, 1, 2, 2, 8)
    kv = rand(torch_gen, 1, 4, 8)
    idx = torch.zeros(1, 2, 3, dtype=torch.int64)
    sink = torch.zeros(2)
    with pytest.raises(ValueError, match="dtype"):
        oa.sparse_attention(q, kv.to(torch.bfloat16), idx, sink, 1.0)
    with pytest.raises(ValueError, match="indices must lie"):
        oa.sparse_attention(q, kv, idx + 4, sink, 1.0)      # == N
    with pytest.raises(ValueError, match="indices must lie"):
        oa.sparse_attention(q, kv, idx - 2, sink, 1.0)      # < -1
    with pytest.raises(ValueError, match="dtype"):
        oa.sparse_attention(q, kv, idx.float(), sink, 1.0)
    with pytest.raises(ValueError, match="kv must have shape"):
        oa.sparse_attention(q, kv[..., :7], idx, sink, 1.0)
    with pytest.raises(ValueError, match="indices must have shape"):
        oa.sparse_attention(q, kv, idx[:, :1], sink, 1.0)
    with pytest.raises(ValueError, match="sink"):
        oa.sparse_attention(q, kv, idx, torch.zeros(3), 1.0)
    with pytest.raises(ValueError, match="dims"):
        oa.sparse_attention(q[0], kv, idx, sink, 1.0)
