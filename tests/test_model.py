"""Model invariants (spec §10, §11): prefill ≡ decode ≡ chunked prefill, causality, batches of
different lengths, MTP drafting, and clear errors for bad input."""

from __future__ import annotations

import pytest
import torch

import ascend_v4
from ascend_v4.config import ModelConfig
from ascend_v4.model import V4Model

FP32_TOL = 1e-5  # issue 3: prefill vs decode vs chunked, fp32, absolute on logits of O(1)


@pytest.fixture(scope="module")
def seed() -> int:
    return int(torch.randint(0, 2**31 - 1, ()).item())


@pytest.fixture(scope="module")
def tiny(seed) -> V4Model:
    return V4Model(ModelConfig.preset("tiny")).init_random(seed).eval()


def _ids(seed: int, B: int, S: int, vocab: int) -> torch.Tensor:
    return torch.randint(0, vocab, (B, S), generator=torch.Generator().manual_seed(seed + 1))


@pytest.fixture(scope="module")
def reference_run(tiny, seed):
    ids = _ids(seed, 1, 300, tiny.config.vocab_size)
    return ids, tiny(ids)


@pytest.mark.parametrize("n", [1, 3, 4, 5, 127, 128, 129, 300])
def test_prefill_then_decode_equals_one_prefill(tiny, reference_run, n, seed):
    ids, full = reference_run
    ids, full = ids[:, :n], full[:, :n]
    k = min(n, 3)
    cache = tiny.new_cache(1, n)
    parts = [tiny(ids[:, : n - k], cache=cache)] if n > k else []
    for j in range(n - k, n):
        parts.append(tiny(ids[:, j : j + 1], cache=cache))
    got = torch.cat(parts, dim=1)
    err = (got - full).abs().max().item()
    assert err <= FP32_TOL, f"seed {seed}: prefill {n - k} + {k} decode steps differ from prefill {n} by {err}"
    assert int(cache.lengths[0]) == n


@pytest.mark.parametrize("chunk", [1, 4, 7, 128])
def test_chunked_prefill_equals_one_prefill(tiny, reference_run, chunk, seed):
    ids, full = reference_run
    model = V4Model(tiny.config).eval()
    model.load_state_dict(tiny.state_dict())
    model.prefill_chunk = chunk
    n = 140 if chunk == 1 else 300  # chunk 1 = pure decode; keep it short
    err = (model(ids[:, :n]) - full[:, :n]).abs().max().item()
    assert err <= FP32_TOL, f"seed {seed}: chunk {chunk} differs by {err}"


def test_extend_in_uneven_pieces(tiny, reference_run, seed):
    """Prefill, a decode step, an extend chunk crossing a 128-block, more decode: one cache."""
    ids, full = reference_run
    cache = tiny.new_cache(1, 300)
    cuts = [0, 6, 7, 131, 132, 133, 250, 300]
    got = torch.cat([tiny(ids[:, a:b], cache=cache) for a, b in zip(cuts, cuts[1:])], dim=1)
    assert (got - full).abs().max().item() <= FP32_TOL, f"seed {seed}"


@pytest.mark.parametrize("t", [0, 3, 4, 100, 130, 299])
def test_causality_changing_token_t_leaves_earlier_logits(tiny, reference_run, t, seed):
    ids, full = reference_run
    changed = ids.clone()
    changed[0, t] = (changed[0, t] + 1) % tiny.config.vocab_size
    out = tiny(changed)
    assert torch.equal(out[:, :t], full[:, :t]) or (out[:, :t] - full[:, :t]).abs().max() <= 1e-6, \
        f"seed {seed}: changing token {t} changed earlier logits"
    assert (out[:, t:] - full[:, t:]).abs().max() > 1e-4, "the change must be visible from position t on"


def test_batch_of_different_lengths_equals_one_by_one(tiny, seed):
    lens = [300, 5, 131, 1]
    prompts = [_ids(seed + i, 1, n, tiny.config.vocab_size) for i, n in enumerate(lens)]
    batch = torch.zeros(len(lens), max(lens), dtype=torch.int64)
    for i, p in enumerate(prompts):
        batch[i, : p.shape[1]] = p[0]
        batch[i, p.shape[1]:] = 7  # padding tokens must never matter
    cache = tiny.new_cache(len(lens), 310)
    out = tiny(batch, cache=cache, lengths=torch.tensor(lens))
    # then one decode step for every row at its own position
    nxt = torch.randint(0, tiny.config.vocab_size, (len(lens), 1), generator=torch.Generator().manual_seed(seed))
    step = tiny(nxt, cache=cache)
    for i, p in enumerate(prompts):
        c1 = tiny.new_cache(1, 310)
        alone = tiny(p, cache=c1)
        alone_step = tiny(nxt[i : i + 1], cache=c1)
        n = p.shape[1]
        assert (out[i, :n] - alone[0]).abs().max() <= FP32_TOL, f"seed {seed}: row {i} prefill differs"
        assert (step[i] - alone_step[0]).abs().max() <= FP32_TOL, f"seed {seed}: row {i} decode differs"


def test_last_only_logits_pick_each_rows_last_token(tiny, seed):
    ids = _ids(seed, 2, 20, tiny.config.vocab_size)
    lens = torch.tensor([20, 9])
    full = tiny(ids, lengths=lens)
    last = tiny(ids, lengths=lens, last_only=True)
    assert (last[0] - full[0, 19]).abs().max() <= FP32_TOL and (last[1] - full[1, 8]).abs().max() <= FP32_TOL


def test_generate_with_mtp_equals_plain_greedy(tiny, seed):
    prompt = _ids(seed, 1, 9, tiny.config.vocab_size)[0].tolist()
    plain = ascend_v4.generate(tiny, [prompt], 12)
    spec = ascend_v4.generate(tiny, [prompt], 12, mtp=True)
    assert spec.tokens == plain.tokens
    assert spec.mtp_drafted > 0


def test_generate_mtp_accepts_a_draft_that_matches():
    """An MTP block that copies the main model's prediction must get its drafts accepted."""
    cfg = ModelConfig.preset("tiny")
    model = V4Model(cfg).init_random(3).eval()
    prompt = [1, 2, 3, 4]
    plain = ascend_v4.generate(model, [prompt], 6).tokens[0]
    # force the draft: make the MTP head always predict the token that greedy decoding produces next
    seq = prompt + plain
    calls = {"i": 0}
    real = model.mtp_forward

    def oracle(hidden, next_ids, cache=None, **kw):
        logits = real(hidden, next_ids, cache, **kw)
        out = torch.full_like(logits, -1e9)
        for j in range(next_ids.shape[1]):
            tok = int(next_ids[0, j])
            # position of this next token in seq; the draft is the token after it
            pos = [i for i in range(len(prompt), len(seq) - 1) if seq[i] == tok]
            if pos:
                out[0, j, seq[pos[0] + 1]] = 0
        calls["i"] += 1
        return out

    model.mtp_forward = oracle
    res = ascend_v4.generate(model, [prompt], 6, mtp=True)
    assert res.tokens[0] == plain
    assert res.mtp_accepted >= 1


def test_mtp_logits_shape_and_cache_equivalence(tiny, seed):
    ids = _ids(seed, 1, 40, tiny.config.vocab_size)
    full = tiny.mtp_logits(ids)
    assert full.shape == (1, 39, tiny.config.vocab_size)
    cache = tiny.new_cache(1, 40)
    _, hidden = tiny(ids, cache=cache, return_hidden=True)
    a = tiny.mtp_forward(hidden[:, :30], ids[:, 1:31], cache)
    b = tiny.mtp_forward(hidden[:, 30:39], ids[:, 31:40], cache)
    assert (torch.cat([a, b], 1) - full).abs().max() <= FP32_TOL


def test_cache_bytes_reports_each_layer_kind(tiny):
    info = tiny.cache_bytes()
    c = tiny.config
    el = 4  # fp32 model
    assert info["csa"]["per_token"] == pytest.approx(c.head_dim * el / 4 + c.index_head_dim * el / 4)
    assert info["hca"]["per_token"] == pytest.approx(c.head_dim * el / 128)
    assert info["swa"]["per_token"] == 0
    assert info["swa"]["fixed"] == c.sliding_window * c.head_dim * el


# ------------------------------------------------------------------ errors
def test_context_longer_than_cache_is_refused(tiny):
    cache = tiny.new_cache(1, 10)
    tiny(torch.zeros(1, 8, dtype=torch.int64), cache=cache)
    with pytest.raises(ValueError, match="context too long"):
        tiny(torch.zeros(1, 3, dtype=torch.int64), cache=cache)


def test_cache_longer_than_max_position_is_refused(tiny):
    with pytest.raises(ValueError, match="max_position_embeddings"):
        tiny.new_cache(1, tiny.config.max_position_embeddings + 1)


@pytest.mark.parametrize("bad, match", [
    (torch.zeros(5, dtype=torch.int64), r"\[batch, seq\]"),
    (torch.zeros(1, 5), "int32 or int64"),
    (torch.full((1, 5), 10_000), "vocab_size"),
    (torch.full((1, 5), -1), "vocab_size"),
    (torch.zeros(1, 0, dtype=torch.int64), "no tokens"),
])
def test_bad_input_ids(tiny, bad, match):
    with pytest.raises(ValueError, match=match):
        tiny(bad)


def test_batch_mismatch_with_cache(tiny):
    with pytest.raises(ValueError, match="batch_size"):
        tiny(torch.zeros(2, 3, dtype=torch.int64), cache=tiny.new_cache(1, 10))


def test_bad_lengths(tiny):
    with pytest.raises(ValueError, match="lengths"):
        tiny(torch.zeros(2, 3, dtype=torch.int64), lengths=[3, 4])


def test_random_weights_for_a_huge_preset_are_refused():
    with pytest.raises(ValueError, match="checkpoint"):
        ascend_v4.load_model("v4-flash")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_cuda_requested_without_a_gpu():
    with pytest.raises(ValueError, match="no CUDA device"):
        ascend_v4.load_model("tiny", device="cuda")


def test_unknown_model_path():
    with pytest.raises(ValueError, match="neither a preset"):
        ascend_v4.load_model("/nonexistent/model")
