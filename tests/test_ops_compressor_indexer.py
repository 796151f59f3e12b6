"""KV compressor pooling (spec §8.1-§8.3, traps 7-8) and the lightning indexer (spec §9, §10; trap 11).

Expected values come from float64 re-statements written here, looping over batches, blocks, slots
and channels; nothing from fallbacks/ or op_adapters/ produces them.
"""

from __future__ import annotations

import math

import pytest
import torch

import op_adapters as oa

from op_helpers import assert_matches, rand

# Tolerances, judged as |out - ref| <= atol * max|ref| + rtol * |ref|.
#   compress_pool returns fp32 for fp32 and bf16 inputs alike (pooling is fp32; spec §13.1), and the
#   reference uses the bf16-rounded inputs, so both dtypes get the fp32 tolerance: a softmax over at
#   most 128 tokens and one weighted sum, a few fp32 ulps (1e-5 relative is tight but safe).
#   indexer_scores also returns fp32 (the reference keeps bf16; fp32 only removes rounding): fp32 dot
#   products of length c plus a sum over heads.  For bf16 inputs we allow 1.6e-2 (4 bf16 ulps),
#   because a backend that, like the official code, keeps the scores in bf16 is legitimate.
POOL_TOL = {
    torch.float32: dict(rtol=1e-5, atol=1e-6),
    torch.bfloat16: dict(rtol=1e-5, atol=1e-6),
}
SCORE_TOL = {
    torch.float32: dict(rtol=1e-5, atol=1e-6),
    torch.bfloat16: dict(rtol=1.6e-2, atol=4e-3),
}
DTYPES = [torch.float32, torch.bfloat16]


# -------------------------------------------------------------------------------- compress_pool
def _softmax_pool(slots: list[tuple[torch.Tensor, torch.Tensor]], D: int) -> torch.Tensor:
    """Per-channel softmax over the slots' scores, weights times the slots' kv (float64)."""
    out = torch.zeros(D, dtype=torch.float64)
    for c in range(D):
        zs = [float(z[c]) for _, z in slots]
        m = max(zs)
        ws = [math.exp(z - m) if z != -math.inf else 0.0 for z in zs]
        tot = sum(ws)
        out[c] = sum(w / tot * float(kv[c]) for w, (kv, _) in zip(ws, slots))
    return out


def ref_compress_pool(kv, score, ape, ratio, overlap):
    """Spec §8.2 (HCA) and §8.3 (CSA); tokens start at position 0, so ape row = p mod ratio."""
    kv = kv.to(torch.float64)
    score = score.to(torch.float64)
    ape = ape.to(torch.float64)
    B, S, W = kv.shape
    nb = S // ratio
    D = W // 2 if overlap else W
    out = torch.zeros(B, nb, D, dtype=torch.float64)
    for b in range(B):
        for i in range(nb):
            slots = []
            if not overlap:
                for j in range(ratio):
                    p = i * ratio + j
                    slots.append((kv[b, p], score[b, p] + ape[p % ratio]))
            else:
                # slots 0..3: block i-1 through channels [0:D]; block -1: kv 0, score -inf
                for j in range(ratio):
                    if i == 0:
                        slots.append((torch.zeros(D, dtype=torch.float64), torch.full((D,), -math.inf)))
                    else:
                        p = (i - 1) * ratio + j
                        slots.append((kv[b, p, :D], score[b, p, :D] + ape[p % ratio, :D]))
                # slots 4..7: block i through channels [D:2D]
                for j in range(ratio):
                    p = i * ratio + j
                    slots.append((kv[b, p, D:], score[b, p, D:] + ape[p % ratio, D:]))
            out[b, i] = _softmax_pool(slots, D)
    return out


POOL_CASES = [
    # B, S, D, ratio, overlap
    (1, 4, 3, 4, True),        # one CSA block (only the current-block half contributes)
    (2, 23, 4, 4, True),       # 5 CSA blocks + 3 tail tokens that must be ignored
    (1, 16, 6, 4, True),
    (2, 256, 3, 128, False),   # 2 HCA blocks
    (1, 300, 2, 128, False),   # 2 HCA blocks + 44 tail tokens
    (1, 100, 2, 128, False),   # no complete HCA block: empty output
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,S,D,ratio,overlap", POOL_CASES)
def test_compress_pool_matches_spec(torch_gen, dtype, B, S, D, ratio, overlap):
    W = 2 * D if overlap else D
    kv = rand(torch_gen, B, S, W, dtype=dtype)
    score = rand(torch_gen, B, S, W, dtype=dtype, scale=2.0)
    ape = rand(torch_gen, ratio, W)
    out = oa.compress_pool(kv, score, ape, ratio=ratio, overlap=overlap)
    assert out.dtype == torch.float32 and out.shape == (B, S // ratio, D)
    assert_matches(out, ref_compress_pool(kv, score, ape, ratio, overlap), POOL_TOL[dtype], "compress_pool")


@pytest.mark.parametrize("ratio,overlap", [(4, True), (128, False)])
def test_compress_pool_huge_scores_are_stable(torch_gen, ratio, overlap):
    # scores of ±300 overflow a softmax that does not subtract the max (exp(88) = inf in fp32).
    # Scores and ape lie on a 1/64 grid, so score + ape and the max-subtracted logits are exact in
    # fp32 and the fp32 tolerance stays meaningful (otherwise rounding score + ape at |z| ~ 1000,
    # an absolute error of ~3e-5, legitimately moves the softmax weights by ~3e-5 relative).
    B, S, D = 1, 2 * ratio, 4
    W = 2 * D if overlap else D
    kv = rand(torch_gen, B, S, W)
    score = torch.round(rand(torch_gen, B, S, W, scale=300.0) * 64) / 64
    ape = torch.round(rand(torch_gen, ratio, W, scale=10.0) * 64) / 64
    out = oa.compress_pool(kv, score, ape, ratio=ratio, overlap=overlap)
    assert torch.isfinite(out).all()
    assert_matches(out, ref_compress_pool(kv, score, ape, ratio, overlap), POOL_TOL[torch.float32], "huge scores")


def test_compress_pool_ape_is_per_position_and_channel(torch_gen):
    # Softmax is per channel over tokens: with equal scores, a big ape on row r of channel c must put
    # (almost) all of channel c's weight on the token at position r mod ratio of each block.
    ratio, D = 128, 3
    kv = rand(torch_gen, 1, 2 * ratio, D)
    score = torch.zeros(1, 2 * ratio, D)
    ape = torch.zeros(ratio, D)
    rows = [5, 77, 126]
    for c, r in enumerate(rows):
        ape[r, c] = 60.0
    out = oa.compress_pool(kv, score, ape, ratio=ratio, overlap=False)
    for i in range(2):
        for c, r in enumerate(rows):
            assert float(out[0, i, c]) == pytest.approx(float(kv[0, i * ratio + r, c]), rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("ratio,overlap", [(4, True), (128, False)])
def test_compress_pool_locality(torch_gen, ratio, overlap):
    """Perturbing one token's kv changes only the entries whose pooling windows contain it:
    HCA: its own block; CSA: its own block's entry and the next block's entry."""
    B, D = 2, 3
    nb = 5 if ratio == 4 else 3
    S = nb * ratio + (3 if ratio == 4 else 7)      # plus tail tokens
    W = 2 * D if overlap else D
    kv = rand(torch_gen, B, S, W)
    score = rand(torch_gen, B, S, W)
    ape = rand(torch_gen, ratio, W)
    base = oa.compress_pool(kv, score, ape, ratio=ratio, overlap=overlap)
    tokens = [0, ratio - 1, ratio + 1, (nb - 1) * ratio + 2, S - 1]   # the last one is a tail token
    for tok in tokens:
        kv2 = kv.clone()
        kv2[1, tok] += 1.0 + torch.rand(W, generator=torch_gen)       # every channel, batch 1 only
        out = oa.compress_pool(kv2, score, ape, ratio=ratio, overlap=overlap)
        blk = tok // ratio
        affected = set()
        if blk < nb:
            affected.add(blk)
            if overlap and blk + 1 < nb:
                affected.add(blk + 1)
        assert torch.equal(out[0], base[0]), "another batch row changed"
        for i in range(nb):
            changed = not torch.equal(out[1, i], base[1, i])
            assert changed == (i in affected), f"token {tok}: entry {i} changed={changed}, expected {i in affected}"
        if blk < nb:
            # the token's own entry changes in every output channel (CSA: through channels [D:2D])
            assert (out[1, blk] != base[1, blk]).all()
            if overlap and blk + 1 < nb:  # and the next entry in every channel (through [0:D])
                assert (out[1, blk + 1] != base[1, blk + 1]).all()


def test_compress_pool_bad_inputs(torch_gen):
    kv = rand(torch_gen, 1, 8, 6)
    ape = rand(torch_gen, 4, 6)
    with pytest.raises(ValueError, match="ratio"):
        oa.compress_pool(kv, kv, rand(torch_gen, 8, 6), ratio=8, overlap=True)
    with pytest.raises(ValueError, match="ratio"):
        oa.compress_pool(kv, kv, rand(torch_gen, 64, 6), ratio=64, overlap=False)
    with pytest.raises(ValueError, match="same shape"):
        oa.compress_pool(kv, kv[:, :7], ape, ratio=4, overlap=True)
    with pytest.raises(ValueError, match="dtype"):
        oa.compress_pool(kv, kv.to(torch.bfloat16), ape, ratio=4, overlap=True)
    with pytest.raises(ValueError, match="ape"):
        oa.compress_pool(kv, kv, ape[:3], ratio=4, overlap=True)
    with pytest.raises(ValueError, match="even"):
        oa.compress_pool(kv[..., :5], kv[..., :5], ape[:, :5], ratio=4, overlap=True)
    with pytest.raises(ValueError, match="dims"):
        oa.compress_pool(kv[0], kv[0], ape, ratio=4, overlap=True)


# ------------------------------------------------------------------------------ indexer_scores
def ref_indexer_scores(q, k, w):
    """I[b, t, s] = Σ_h w[b, t, h] · ReLU(q[b, t, h] · k[b, s]), float64, explicit loops."""
    q, k, w = q.to(torch.float64), k.to(torch.float64), w.to(torch.float64)
    B, S, H, _ = q.shape
    N = k.shape[1]
    out = torch.zeros(B, S, N, dtype=torch.float64)
    for b in range(B):
        for t in range(S):
            for s in range(N):
                acc = 0.0
                for h in range(H):
                    acc += float(w[b, t, h]) * max(float(q[b, t, h] @ k[b, s]), 0.0)
                out[b, t, s] = acc
    return out


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,S,H,c,N", [(1, 1, 1, 8, 1), (2, 5, 3, 16, 7), (1, 9, 4, 32, 12), (2, 3, 2, 8, 0)])
def test_indexer_scores_matches_spec(torch_gen, dtype, B, S, H, c, N):
    q = rand(torch_gen, B, S, H, c, dtype=dtype)
    k = rand(torch_gen, B, N, c, dtype=dtype)
    w = rand(torch_gen, B, S, H, dtype=dtype)          # signed weights, as weights_proj produces
    out = oa.indexer_scores(q, k, w)
    assert out.dtype == torch.float32 and out.shape == (B, S, N)
    ref = ref_indexer_scores(q, k, w)
    assert_matches(out, ref, SCORE_TOL[dtype], "indexer_scores")
    if N and B * S * H > 1:
        # the ReLU is active: some q·k are negative, so dropping the ReLU would change the result
        assert (torch.einsum("bthc,bsc->bths", q.double(), k.double()) < 0).any()


def test_indexer_scores_bad_inputs(torch_gen):
    q, k, w = rand(torch_gen, 2, 3, 4, 8), rand(torch_gen, 2, 5, 8), rand(torch_gen, 2, 3, 4)
    with pytest.raises(ValueError, match="k must have shape"):
        oa.indexer_scores(q, k[..., :7], w)
    with pytest.raises(ValueError, match="k must have shape"):
        oa.indexer_scores(q, k[:1], w)
    with pytest.raises(ValueError, match="weights"):
        oa.indexer_scores(q, k, w[..., :3])
    with pytest.raises(ValueError, match="dims"):
        oa.indexer_scores(q[0], k, w)


# -------------------------------------------------------------------------------- indexer_topk
def distinct_scores(gen, B, S, N, dtype):
    """Distinct scores (a random permutation of small integers, exact in bf16 too): no ties."""
    s = torch.stack([torch.stack([torch.randperm(N, generator=gen) for _ in range(S)]) for _ in range(B)])
    return (s.to(torch.float64) - N / 2).to(dtype)


def ref_topk_sets(scores, k, positions, ratio):
    """Per (b, t): the set of the min(k, #valid) best entries among s < floor((p+1)/ratio)."""
    B, S, N = scores.shape
    pos = positions.expand(B, S) if positions.dim() == 1 else positions
    out = {}
    for b in range(B):
        for t in range(S):
            limit = min((int(pos[b, t]) + 1) // ratio, N)
            cand = sorted(range(limit), key=lambda s: -float(scores[b, t, s]))
            out[b, t] = set(cand[: min(k, limit)])
    return out


TOPK_CASES = [
    # B, S, N, k, ratio, positions ("prefill" = 0..S-1, else random per batch)
    (1, 16, 4, 2, 4, "prefill"),
    (2, 24, 6, 3, 4, "prefill"),
    (2, 24, 6, 10, 4, "prefill"),     # k > N: width N
    (2, 5, 9, 4, 4, "decode"),        # [B, S] positions, arbitrary
    (1, 7, 3, 2, 128, "decode"),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,S,N,k,ratio,mode", TOPK_CASES)
def test_indexer_topk_matches_reference_sets(torch_gen, dtype, B, S, N, k, ratio, mode):
    scores = distinct_scores(torch_gen, B, S, N, dtype)
    if mode == "prefill":
        positions = torch.arange(S)
    else:
        positions = torch.randint(0, ratio * (N + 2), (B, S), generator=torch_gen)
        positions[0, 0] = 0                      # a row with no valid entry at all
        positions[-1, -1] = ratio * (N + 2)      # a row that sees every entry
    idx = oa.indexer_topk(scores, k, positions, ratio)
    width = min(k, N)
    assert idx.dtype == torch.int64 and idx.shape == (B, S, width)
    want = ref_topk_sets(scores, k, positions, ratio)
    pos = positions.expand(B, S) if positions.dim() == 1 else positions
    for b in range(B):
        for t in range(S):
            row = idx[b, t].tolist()
            limit = (int(pos[b, t]) + 1) // ratio
            valid = [s for s in row if s != -1]
            assert all(-1 <= s for s in row)
            assert all(s < limit for s in valid), f"entry >= floor((p+1)/ratio) = {limit} in {row}"
            assert len(set(valid)) == len(valid), f"duplicate index in {row}"
            assert set(valid) == want[b, t], f"(b={b}, t={t}, p={int(pos[b, t])}): {row} vs {want[b, t]}"
            assert row.count(-1) == width - len(want[b, t])


def test_indexer_topk_prefill_mask(torch_gen):
    # Spec §9 prefill: with scores favouring the LAST entries (future blocks), early rows must still
    # return only entries of completed blocks, padded with -1.
    S, N, k = 16, 4, 3
    scores = torch.arange(N, dtype=torch.float32).expand(1, S, N).contiguous()
    idx = oa.indexer_topk(scores, k, torch.arange(S), 4)
    for p in range(S):
        limit = (p + 1) // 4
        valid = sorted(s for s in idx[0, p].tolist() if s != -1)
        want = list(range(max(0, limit - k), limit))
        assert valid == want, (p, idx[0, p].tolist())


def test_indexer_topk_bad_inputs(torch_gen):
    scores = torch.randn(2, 5, 6, generator=torch_gen)
    with pytest.raises(ValueError, match="k must"):
        oa.indexer_topk(scores, 0, torch.arange(5), 4)
    with pytest.raises(ValueError, match="positions"):
        oa.indexer_topk(scores, 2, torch.arange(4), 4)
    with pytest.raises(ValueError, match="positions"):
        oa.indexer_topk(scores, 2, -torch.arange(5), 4)
    with pytest.raises(ValueError, match="dtype"):
        oa.indexer_topk(scores, 2, torch.arange(5).float(), 4)
    with pytest.raises(ValueError, match="ratio"):
        oa.indexer_topk(scores, 2, torch.arange(5), 0)
    with pytest.raises(ValueError, match="dims"):
        oa.indexer_topk(scores[0], 2, torch.arange(5), 4)


# --------------------------------------------------------------------------- lightning_indexer
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,S,H,c,N,topk,mode", [(1, 16, 2, 8, 4, 2, "prefill"), (2, 24, 3, 16, 6, 4, "prefill"),
                                                 (2, 5, 2, 8, 9, 3, "decode")])
def test_lightning_indexer_is_scores_then_causal_topk(torch_gen, dtype, B, S, H, c, N, topk, mode):
    """The fused op selects, per query, the top-k by Σ_h w_h·ReLU(q_h·k_s) among s < ⌊(p+1)/4⌋.
    ReLU makes exact ties (zeros) common, so the check is tie-tolerant: the selected entries' float64
    scores must equal the best min(k, #valid) scores as a multiset."""
    q = rand(torch_gen, B, S, H, c, dtype=dtype)
    k = rand(torch_gen, B, N, c, dtype=dtype)
    w = rand(torch_gen, B, S, H, dtype=dtype)
    positions = torch.arange(S) if mode == "prefill" else torch.randint(0, 4 * (N + 2), (B, S), generator=torch_gen)
    idx = oa.lightning_indexer(q, k, w, positions, topk=topk, ratio=4)
    width = min(topk, N)
    assert idx.dtype == torch.int64 and idx.shape == (B, S, width)
    ref = ref_indexer_scores(q, k, w)
    tol = SCORE_TOL[dtype]
    pos = positions.expand(B, S) if positions.dim() == 1 else positions
    for b in range(B):
        for t in range(S):
            limit = min((int(pos[b, t]) + 1) // 4, N)
            row = idx[b, t].tolist()
            valid = [s for s in row if s != -1]
            assert all(0 <= s < limit for s in valid) and len(set(valid)) == len(valid), row
            m = min(topk, limit)
            assert len(valid) == m and row.count(-1) == width - m, row
            got = sorted((float(ref[b, t, s]) for s in valid), reverse=True)
            best = sorted((float(v) for v in ref[b, t, :limit]), reverse=True)[:m]
            scale = float(ref[b, t].abs().max()) if N else 1.0
            for g, e in zip(got, best):
                assert abs(g - e) <= tol["atol"] * scale + tol["rtol"] * abs(e), (row, got, best)
