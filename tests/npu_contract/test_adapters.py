"""Every NPU adapter through Huawei's own meta functions, at tiny, V4-Flash and V4-Pro shapes.

For each torch-npu wheel (2.13.0, 2.14.0), chip family (A2, A3, 950), model (tiny, Flash, Pro),
mode (prefill of 256 tokens, one decode step at position 8191) and batch (1, 4), each adapter in
``op_adapters.npu.ops`` is called on ``device="meta"`` tensors with a ``torch_npu`` stand-in that
forwards to the wheel's meta functions.  An adapter whose ``supports_*`` accepts the arguments
must pass every Huawei check it triggers and return the shape and dtype the reference op returns;
one that refuses must give a reason.  ``summarise()`` prints the whole matrix (used for the
closing note: ``python -m tests.npu_contract.test_adapters``).
"""

from __future__ import annotations

import contextlib
import itertools

import pytest
import torch

from ascend_v4.config import ModelConfig
from op_adapters.npu import ops as npu_ops
from op_adapters.npu.chips import use_chip

from .harness import VERSIONS, make_torch_npu_standin, meta_for, standin_installed

pytestmark = pytest.mark.npu_contract

CHIPS = ("A2", "A3", "950")
PRESETS = ("tiny", "v4-flash", "v4-pro")
MODES = ("prefill", "decode")
BATCHES = (1, 4)
PREFILL, DECODE_POS = 256, 8191
BF16, F32, I64 = torch.bfloat16, torch.float32, torch.int64


def mt(*shape, dtype=BF16):
    return torch.empty(shape, dtype=dtype, device="meta")


def calls(cfg: ModelConfig, mode: str, B: int):
    """(adapter name, args, kwargs, expected [(shape, dtype), ...]) at one model's shapes."""
    d, H, c, r, n = cfg.hidden_size, cfg.num_attention_heads, cfg.head_dim, cfg.qk_rope_head_dim, cfg.hc_mult
    nI, cI, E, k, I = cfg.index_n_heads, cfg.index_head_dim, cfg.n_routed_experts, cfg.num_experts_per_tok, \
        cfg.moe_intermediate_size
    W = cfg.sliding_window
    S = PREFILL if mode == "prefill" else 1
    start = 0 if mode == "prefill" else DECODE_POS
    end = start + S
    n_csa, n_hca = end // 4, end // 128
    T = B * S
    pos = (start + torch.arange(S)).expand(B, S)                  # host tensor: index bookkeeping
    half = r // 2
    out = [
        ("rms_norm", (mt(B, S, d), mt(d, dtype=F32), 1e-6), {}, [((B, S, d), BF16)]),
        ("rms_norm", (mt(B, S, H, c), None, 1e-6), {}, [((B, S, H, c), BF16)]),
        ("apply_rope", (mt(B, S, H, c), mt(B, S, 1, half, dtype=torch.float64), mt(B, S, 1, half, dtype=torch.float64)),
         {}, [((B, S, H, c), BF16)]),
        ("apply_rope", (mt(B, S, c), mt(B, S, half, dtype=torch.float64), mt(B, S, half, dtype=torch.float64)),
         {"inverse": True}, [((B, S, c), BF16)]),
        ("apply_rope", (mt(n_csa, c), mt(n_csa, half, dtype=torch.float64), mt(n_csa, half, dtype=torch.float64)),
         {}, [((n_csa, c), BF16)]),
        ("sinkhorn", (mt(B, S, n, n, dtype=F32),), {"iters": cfg.hc_sinkhorn_iters, "eps": cfg.hc_eps},
         [((B, S, n, n), F32)]),
        ("mhc_pre", (mt(B, S, n, d), mt((2 + n) * n, n * d, dtype=F32), mt(3, dtype=F32), mt((2 + n) * n, dtype=F32)),
         {"norm_eps": 1e-6, "hc_eps": 1e-6, "iters": cfg.hc_sinkhorn_iters},
         [((B, S, d), BF16), ((B, S, n), F32), ((B, S, n, n), F32)]),
        ("mhc_post", (mt(B, S, n, d), mt(B, S, d), mt(B, S, n, dtype=F32), mt(B, S, n, n, dtype=F32)), {},
         [((B, S, n, d), BF16)]),
        ("lightning_indexer", (mt(B, S, nI, cI), mt(B, n_csa, cI), mt(B, S, nI), pos),
         {"topk": cfg.index_topk, "ratio": 4}, [((B, S, min(cfg.index_topk, n_csa)), I64)]),
        ("sparse_attention", (mt(B, S, H, c), mt(B, W + S + n_csa, c), mt(B, S, W + min(cfg.index_topk, n_csa), dtype=I64),
                              mt(H, dtype=F32), c ** -0.5), {}, [((B, S, H, c), BF16)]),
        ("sparse_attention", (mt(B, S, H, c), mt(B, W + S + n_hca, c), mt(B, S, W + n_hca, dtype=I64),
                              mt(H, dtype=F32), c ** -0.5), {}, [((B, S, H, c), BF16)]),
        ("moe_gate", (mt(T, E, dtype=F32),), {"bias": mt(E, dtype=F32), "k": k, "route_scale": cfg.routed_scaling_factor,
                                             "score_func": cfg.scoring_func}, [((T, k), F32), ((T, k), I64)]),
        ("moe_gate", (mt(T, E, dtype=F32),), {"k": k, "route_scale": cfg.routed_scaling_factor,
                                             "score_func": cfg.scoring_func, "input_ids": mt(T, dtype=I64),
                                             "tid2eid": mt(cfg.vocab_size, k, dtype=I64)},
         [((T, k), F32), ((T, k), I64)]),
        ("moe_experts", (mt(T, d), mt(T, k, dtype=F32), mt(T, k, dtype=I64), mt(E, I, d), mt(E, d, I), mt(E, I, d)),
         {"swiglu_limit": cfg.swiglu_limit, "out_dtype": F32}, [((T, d), F32)]),
    ]
    return out


def run_case(version: str, chip: str, preset: str, mode: str, B: int):
    """Run every adapter call of one case; returns rows (op, status, detail)."""
    meta = meta_for(version)
    cfg = ModelConfig.preset(preset)
    rows = []
    with meta.chip(chip), use_chip(chip), standin_installed(make_torch_npu_standin(meta, npu_available=True)):
        for name, args, kwargs, expected in calls(cfg, mode, B):
            fn, supports = npu_ops.IMPLEMENTATIONS[name]
            reason = supports(*args, **kwargs)
            if reason is not None:
                rows.append((name, "reference", reason))
                continue
            try:
                result = fn(*args, **kwargs)
            except Exception as e:  # Huawei's check refused the call the adapter made
                rows.append((name, "REFUSED", f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"))
                continue
            got = result if isinstance(result, tuple) else (result,)
            shapes = [(tuple(t.shape), t.dtype) for t in got]
            want = [(tuple(s), dt) for s, dt in expected]
            rows.append((name, "npu" if shapes == want else "BAD-SHAPE", "" if shapes == want else f"{shapes} != {want}"))
    return rows


CASES = list(itertools.product(VERSIONS, CHIPS, PRESETS, MODES, BATCHES))


@pytest.mark.parametrize("version, chip, preset, mode, B", CASES,
                         ids=[f"{v}-{c}-{p}-{m}-b{b}" for v, c, p, m, b in CASES])
def test_adapters_pass_huaweis_checks(version, chip, preset, mode, B):
    rows = run_case(version, chip, preset, mode, B)
    bad = [r for r in rows if r[1] in ("REFUSED", "BAD-SHAPE")]
    assert not bad, "\n".join(f"{op}: {status}: {detail}" for op, status, detail in bad)
    if preset != "tiny":
        # at real V4 shapes the ops documented for the chip must really be used, not silently skipped
        used = {op for op, status, _ in rows if status == "npu"}
        expected = {"rms_norm"}
        if chip == "950":
            expected |= {"sinkhorn", "mhc_pre", "mhc_post"}
        if chip in ("A2", "A3"):
            expected |= {"moe_experts"}
        expected |= {"moe_gate", "lightning_indexer", "sparse_attention"}
        assert expected <= used, f"not used at {preset} shapes on {chip}: {expected - used}; rows: {rows}"


def test_a_refused_reason_names_the_limit():
    """tiny's head dims are outside the attention kernels' limits: the reason must say which."""
    rows = dict((op, (status, why)) for op, status, why in run_case(VERSIONS[0], "A3", "tiny", "decode", 1))
    status, why = rows["sparse_attention"]
    assert status == "reference" and "512" in why
    status, why = rows["lightning_indexer"]
    assert status == "reference" and "128" in why


def summarise() -> str:
    """The adapter × chip × shape matrix as text (for notes and the README)."""
    lines = []
    for version, chip, preset, mode, B in CASES:
        with contextlib.suppress(Exception):
            for op, status, detail in run_case(version, chip, preset, mode, B):
                lines.append(f"{version}\t{chip}\t{preset}\t{mode}\tB={B}\t{op}\t{status}\t{detail}")
    return "\n".join(lines)


if __name__ == "__main__":
    print(summarise())
