"""Official-format checkpoints (spec §4, §13.1): the name map, FP8/FP4 (de)quantisation checked
against independent float64 decodings of the bit layouts, save → load round trips, and every error
case naming the file and the tensor."""

from __future__ import annotations

import json
import logging
import re
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from ascend_v4.checkpoint import (INDEX_FILE, SINGLE_FILE, CheckpointError, dequant_fp8, load_weights, pack_fp4,
                                  quant_fp8, save_model, unpack_fp4)
from ascend_v4.checkpoint_names import module_name, official_name, official_tensors, storage_kind
from ascend_v4.config import ModelConfig
from ascend_v4.model import V4Model

FMT_BF16 = dict(weight_format="bf16", expert_format="bf16")
FMT_FP4 = dict(weight_format="fp8", expert_format="fp4", scale_format="ue8m0")
FMT_BASE = dict(weight_format="fp8", expert_format="fp8", scale_format="fp32")


# ---------------------------------------------------------------------------- independent decoders
def ref_e4m3(t: torch.Tensor) -> torch.Tensor:
    """float8_e4m3fn bytes → float64 from the bit layout: s eeee mmm, bias 7, no inf, 0x7f/0xff NaN."""
    b = t.view(torch.uint8).to(torch.int64)
    sign = 1.0 - 2.0 * (b >> 7).double()
    exp, man = (b >> 3) & 15, (b & 7).double()
    normal = (1.0 + man / 8.0) * torch.pow(2.0, (exp - 7).double())
    sub = man / 8.0 * 2.0 ** -6
    v = sign * torch.where(exp == 0, sub, normal)
    return torch.where((exp == 15) & (man == 7), torch.nan, v)


def ref_e8m0(t: torch.Tensor) -> torch.Tensor:
    """float8_e8m0fnu bytes → 2^(b − 127) in float64."""
    return torch.pow(2.0, t.view(torch.uint8).to(torch.int64).double() - 127.0)


def ref_e2m1(nibble: torch.Tensor) -> torch.Tensor:
    """e2m1 nibble → float64 from the bit layout: s ee m, bias 1, exponent 0 = subnormal (m · 0.5)."""
    n = nibble.to(torch.int64)
    sign = 1.0 - 2.0 * (n >> 3).double()
    exp, man = (n >> 1) & 3, (n & 1).double()
    mag = torch.where(exp == 0, man * 0.5, (1.0 + man / 2.0) * torch.pow(2.0, (exp - 1).double()))
    return sign * mag


def ref_scale(s: torch.Tensor) -> torch.Tensor:
    return ref_e8m0(s) if s.dtype == torch.float8_e8m0fnu else s.double()


def ref_fp8(w: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    out, inn = w.shape
    rows, cols = torch.arange(out) // 128, torch.arange(inn) // 128
    return ref_e4m3(w) * ref_scale(s)[rows][:, cols]


def ref_fp4(packed: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    b = packed.view(torch.uint8).to(torch.int64)
    out, half = b.shape
    vals = torch.empty(out, 2 * half, dtype=torch.float64)
    vals[:, 0::2] = ref_e2m1(b & 15)   # low nibble: even element
    vals[:, 1::2] = ref_e2m1(b >> 4)   # high nibble: odd element
    cols = torch.arange(2 * half) // 32
    return vals * ref_e8m0(s)[:, cols]


def spread(shape, seed: int) -> torch.Tensor:
    """Random fp32 values whose magnitudes span several decades (per row), with one zero row."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g) * torch.exp(2 * torch.randn(shape[0], 1, generator=g))
    w[1] = 0.0
    return w


# ---------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def cfg() -> ModelConfig:
    return ModelConfig.preset("tiny")


@pytest.fixture(scope="module")
def model(cfg) -> V4Model:
    return V4Model(cfg).init_random(0)


@pytest.fixture(scope="module")
def saved(model, tmp_path_factory):
    """Checkpoints of ``model`` in each format, written once (tests copy before mutating)."""
    root = tmp_path_factory.mktemp("ckpts")
    out = {}
    for key, fmt in (("bf16", FMT_BF16), ("fp4", FMT_FP4), ("base", FMT_BASE)):
        save_model(model, root / key, **fmt)
        out[key] = root / key
    save_model(model, root / "sharded", **FMT_FP4, max_shard_bytes=150_000)
    out["sharded"] = root / "sharded"
    return out


def fresh(cfg, dtype=torch.float32) -> V4Model:
    return V4Model(cfg, dtype=dtype).init_random(1)


def mutated(src, dst, fn):
    """Copy checkpoint dir ``src`` to ``dst`` and rewrite its single file through ``fn(dict)``."""
    shutil.copytree(src, dst)
    d = load_file(str(dst / SINGLE_FILE))
    fn(d)
    save_file(d, str(dst / SINGLE_FILE), metadata={"format": "pt"})
    return dst


def state_f64(m) -> dict[str, torch.Tensor]:
    return {k: v.detach().double() for k, v in m.state_dict().items()}


# ---------------------------------------------------------------------------- name map
def test_official_names(cfg, model):
    ts = official_tensors(model)
    names = [t.name for t in ts]
    assert len(names) == len(set(names))
    by = {t.name: t for t in ts}
    for n in ("embed.weight", "head.weight", "norm.weight", "hc_head_fn", "hc_head_base", "hc_head_scale",
              "layers.0.attn.wq_a.weight", "layers.0.attn.wo_a.weight", "layers.0.attn.attn_sink",
              "layers.0.hc_attn_fn", "layers.0.hc_ffn_scale", "layers.0.attn_norm.weight",
              "layers.1.attn.indexer.compressor.ape", "layers.1.attn.indexer.wq_b.weight",
              "layers.1.attn.indexer.weights_proj.weight", "layers.1.attn.compressor.wkv.weight",
              "layers.2.attn.compressor.ape", "layers.2.ffn.gate.bias", "layers.3.ffn.gate.bias",
              "layers.0.ffn.gate.tid2eid", "layers.1.ffn.gate.tid2eid", "layers.0.ffn.gate.weight",
              "layers.0.ffn.experts.3.w1.weight", "layers.3.ffn.experts.7.w2.weight",
              "layers.0.ffn.shared_experts.w3.weight",
              "mtp.0.e_proj.weight", "mtp.0.h_proj.weight", "mtp.0.enorm.weight", "mtp.0.hnorm.weight",
              "mtp.0.norm.weight", "mtp.0.hc_head_fn", "mtp.0.hc_head_base", "mtp.0.hc_head_scale",
              "mtp.0.hc_attn_fn", "mtp.0.ffn.gate.bias", "mtp.0.ffn.experts.0.w3.weight", "mtp.0.attn.wkv.weight"):
        assert n in by, n
    for n in ("layers.2.ffn.gate.tid2eid", "layers.0.ffn.gate.bias", "mtp.0.ffn.gate.tid2eid",
              "layers.0.attn.compressor.ape", "layers.2.attn.indexer.wq_b.weight", "mtp.0.attn.compressor.ape"):
        assert n not in by, n
    for n in names:  # shared MTP embedding/head and module-only names never appear
        assert not (n.startswith("mtp.") and ("emb" in n or n.endswith("head.weight"))), n
        assert not re.match(r"^(hc\.|.*head_hc\.|.*\.ffn\.w[123]$)", n), n
    E, I, d = cfg.n_routed_experts, cfg.moe_intermediate_size, cfg.hidden_size
    assert by["layers.0.ffn.experts.3.w1.weight"].shape == (I, d)
    assert by["layers.0.ffn.experts.3.w2.weight"].shape == (d, I)
    assert by["layers.1.attn.compressor.ape"].shape == (4, 2 * cfg.head_dim)       # CSA, coff 2
    assert by["layers.2.attn.compressor.ape"].shape == (128, cfg.head_dim)         # HCA, coff 1
    assert by["layers.1.attn.indexer.compressor.ape"].shape == (4, 2 * cfg.index_head_dim)
    assert by["layers.0.attn.wo_a.weight"].shape == (cfg.o_groups * cfg.o_lora_rank,
                                                     cfg.num_attention_heads * cfg.head_dim // cfg.o_groups)
    assert by["hc_head_fn"].shape == (4, 4 * d) and by["hc_head_scale"].shape == (1,)
    assert by["layers.0.hc_attn_fn"].shape == (24, 4 * d)
    assert by["layers.0.ffn.gate.tid2eid"].shape == (cfg.vocab_size, cfg.num_experts_per_tok)
    kinds = {"layers.0.attn.wq_a.weight": "fp8", "layers.0.attn.wo_a.weight": "fp8", "mtp.0.e_proj.weight": "fp8",
             "layers.1.attn.indexer.wq_b.weight": "fp8", "layers.0.ffn.shared_experts.w2.weight": "fp8",
             "layers.0.ffn.experts.3.w1.weight": "expert", "layers.1.attn.compressor.wkv.weight": "bf16",
             "layers.1.attn.indexer.compressor.wgate.weight": "bf16", "layers.0.attn.wkv.weight": "fp8",
             "layers.1.attn.indexer.weights_proj.weight": "bf16", "head.weight": "bf16", "embed.weight": "bf16",
             "layers.0.attn.q_norm.weight": "bf16", "hc_head_fn": "fp32", "layers.0.hc_attn_base": "fp32",
             "layers.2.attn.compressor.ape": "fp32", "layers.0.attn.attn_sink": "fp32",
             "layers.2.ffn.gate.bias": "fp32", "layers.0.ffn.gate.tid2eid": "int", "mtp.0.hc_head_scale": "fp32"}
    for n, k in kinds.items():
        assert by[n].kind == k == storage_kind(n), n
    # the two directions agree for every tensor; a "model." prefix is accepted
    for t in ts:
        assert module_name(t.name) == (t.module_name, t.expert)
        assert module_name("model." + t.name) == (t.module_name, t.expert)
        assert official_name(t.module_name, t.expert) == t.name
    assert module_name("hc_head_fn") == ("hc.hc_head_fn", None)
    assert module_name("mtp.0.hc_head_base") == ("mtp.0.head_hc.hc_head_base", None)
    assert module_name("layers.2.ffn.experts.5.w2.weight") == ("layers.2.ffn.w2", 5)
    n_state = len(model.state_dict())
    assert len(ts) == n_state + 3 * (E - 1) * (cfg.num_hidden_layers + cfg.num_nextn_predict_layers)


# ---------------------------------------------------------------------------- quantisation helpers
def test_fp4_nibble_layout():
    # byte → [low nibble (even element), high nibble (odd element)]:
    # 0x21 → [1→0.5, 2→1.0]; 0x7F → [15→−6, 7→6]; 0x98 → [8→−0, 9→−0.5]; 0xC3 → [3→1.5, 12→−2]
    raw = torch.tensor([[0x21, 0x7F, 0x98, 0xC3] + [0x00] * 12,
                        [0x54, 0xBA, 0xED, 0x06] + [0x00] * 12], dtype=torch.uint8).view(torch.int8)
    scale = torch.tensor([[127], [128]], dtype=torch.uint8).view(torch.float8_e8m0fnu)  # 1 and 2
    got = unpack_fp4(raw, scale)
    assert got.shape == (2, 32) and got.dtype == torch.float32
    want0 = [0.5, 1.0, -6.0, 6.0, -0.0, -0.5, 1.5, -2.0]
    want1 = [x * 2 for x in [2.0, 3.0, -1.0, -1.5, -3.0, -4.0, 4.0, 0.0]]
    assert got[0, :8].tolist() == want0 and got[1, :8].tolist() == want1
    assert torch.signbit(got[0, 4])  # nibble 8 is −0
    assert torch.equal(got.double(), ref_fp4(raw, scale))


def test_fp4_pack_rounding_ties_to_even():
    x = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 6.0, -0.25, -0.75, -1.25, -1.75, -2.5, -3.5, -5.0,
                      0.2, 0.3, 0.8, 2.2, 2.6, 4.9, 5.1, -6.0, 0.0, 1.0, 1.5, 3.0, 4.0, -0.5, -2.0, 0.5, 0.1])
    packed, scale = pack_fp4(x[None])
    assert packed.dtype == torch.int8 and packed.shape == (1, 16) and scale.shape == (1, 1)
    assert ref_e8m0(scale).item() == 1.0  # amax 6 → 2^⌈log2(1)⌉
    want = [0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0, 6.0, -0.0, -1.0, -1.0, -2.0, -2.0, -4.0, -4.0,
            0.0, 0.5, 1.0, 2.0, 3.0, 4.0, 6.0, -6.0, 0.0, 1.0, 1.5, 3.0, 4.0, -0.5, -2.0, 0.5, 0.0]
    assert ref_fp4(packed, scale)[0].tolist() == want
    b = packed.view(torch.uint8)[0, 0].item()   # elements 0 (0.25 → 0) and 1 (0.75 → 1.0: code 2)
    assert b & 15 == 0 and b >> 4 == 2


@pytest.mark.parametrize("shape", [(200, 300), (64, 32), (256, 128)])
def test_fp4_pack_unpack_random(shape):
    w = spread(shape, 7)
    packed, scale = pack_fp4(w)
    assert packed.shape == (shape[0], shape[1] // 2) and scale.shape == (shape[0], -(-shape[1] // 32))
    assert scale.dtype == torch.float8_e8m0fnu
    ref = ref_fp4(packed, scale)
    assert torch.equal(unpack_fp4(packed, scale).double(), ref)
    s = ref_e8m0(scale)[:, torch.arange(shape[1]) // 32]
    x = w.double() / s
    # minimal power-of-two scale: each block's amax lands in (3, 6]
    amax = w.double().abs().reshape(shape[0], -1, 32).amax(-1) if shape[1] % 32 == 0 else None
    if amax is not None:
        r = amax / ref_e8m0(scale)
        assert ((r > 3) & (r <= 6) | (amax == 0)).all()
    half_step = torch.where(x.abs() <= 2, 0.25, torch.where(x.abs() <= 4, 0.5, 1.0))
    assert ((ref - w.double()).abs() <= half_step * s).all()
    # and it is the nearest e2m1 value
    grid = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0], dtype=torch.float64)
    best = (x.abs()[..., None] - grid).abs().amin(-1)  # 8 candidates: cheap
    assert torch.allclose((ref / s - x).abs(), best, rtol=0, atol=1e-12)


@pytest.mark.parametrize("scale_format", ["ue8m0", "fp32"])
@pytest.mark.parametrize("shape", [(200, 300), (32, 64), (256, 384)])
def test_fp8_quant_dequant(shape, scale_format):
    w = spread(shape, 3)
    q, scale = quant_fp8(w, scale_format)
    ob, ib = -(-shape[0] // 128), -(-shape[1] // 128)
    assert q.dtype == torch.float8_e4m3fn and q.shape == shape and scale.shape == (ob, ib)
    assert scale.dtype == (torch.float8_e8m0fnu if scale_format == "ue8m0" else torch.float32)
    ref = ref_fp8(q, scale)
    deq = dequant_fp8(q, scale)
    assert deq.dtype == torch.float32 and deq.shape == shape
    if scale_format == "ue8m0":
        assert torch.equal(deq.double(), ref)
    else:
        torch.testing.assert_close(deq.double(), ref, rtol=2.0 ** -23, atol=0)
    rows, cols = torch.arange(shape[0]) // 128, torch.arange(shape[1]) // 128
    s = ref_scale(scale)[rows][:, cols]
    wd = w.double()
    # e4m3: 3 mantissa bits → relative error ≤ 2^-4; subnormals (|q| < 2^-6): absolute ≤ 2^-10 · scale
    assert ((ref - wd).abs() <= 2.0 ** -4 * wd.abs() + 2.0 ** -10 * s + 1e-6 * wd.abs()).all()
    # the block scale: amax/448 (fp32) or the smallest power of two with amax/scale ≤ 448 (ue8m0)
    pad = torch.zeros(ob * 128, ib * 128, dtype=torch.float64)
    pad[: shape[0], : shape[1]] = wd.abs()
    amax = pad.reshape(ob, 128, ib, 128).amax(dim=(1, 3))
    ratio = amax / ref_scale(scale)
    nz = amax > 0
    if scale_format == "ue8m0":
        assert ((ratio[nz] > 224) & (ratio[nz] <= 448)).all()
    else:
        torch.testing.assert_close(ratio[nz], torch.full_like(ratio[nz], 448.0), rtol=1e-6, atol=0)
    # every value is a nearest e4m3 value of w/scale (ue8m0: the division is exact)
    if scale_format == "ue8m0":
        grid = ref_e4m3(torch.arange(0, 127, dtype=torch.uint8))  # every finite non-negative e4m3 value
        x = (wd / s).abs()
        hi = torch.searchsorted(grid, x).clamp(max=len(grid) - 1)
        best = torch.minimum((grid[hi] - x).abs(), (x - grid[(hi - 1).clamp(min=0)]).abs())
        assert torch.equal((ref / s).abs().sub(x).abs(), best)


def test_fp8_ue8m0_exact_power_of_two_block():
    w = torch.full((128, 128), 0.5)
    w[0, 0] = 448.0 * 2.0 ** -3  # amax exactly 448 · 2^-3 → scale 2^-3, not 2^-2
    q, s = quant_fp8(w, "ue8m0")
    assert ref_e8m0(s).item() == 2.0 ** -3
    assert torch.equal(dequant_fp8(q, s), w)


def test_helpers_reject_bad_shapes():
    q, s = quant_fp8(torch.randn(130, 260), "ue8m0")
    with pytest.raises(ValueError, match="scale of shape"):
        dequant_fp8(q, s[:1])
    p, s4 = pack_fp4(torch.randn(4, 64))
    with pytest.raises(ValueError, match="scale of shape"):
        unpack_fp4(p, s4[:, :1])
    with pytest.raises(ValueError, match="even"):
        pack_fp4(torch.randn(4, 63))


# ---------------------------------------------------------------------------- round trips
def _check_plain(t, orig: torch.Tensor, got: torch.Tensor):
    if t.kind in ("fp32", "int"):
        assert torch.equal(got, orig), t.name
    else:
        assert torch.equal(got, orig.to(torch.bfloat16).to(orig.dtype)), t.name


def test_float_round_trip(cfg, model, saved):
    with safe_open(str(saved["bf16"] / SINGLE_FILE), "pt") as f:
        dtypes = {k: f.get_slice(k).get_dtype() for k in f.keys()}
    assert dtypes["layers.0.attn.wq_a.weight"] == "BF16" and dtypes["hc_head_fn"] == "F32"
    assert dtypes["layers.0.ffn.experts.0.w1.weight"] == "BF16" and dtypes["layers.0.ffn.gate.tid2eid"] == "I64"
    assert not any(k.endswith(".scale") for k in dtypes)
    m2 = fresh(cfg)
    report = load_weights(m2, saved["bf16"], progress=False)
    assert report["tensors"] == len(official_tensors(model)) and report["mtp"] is True
    assert m2.mtp_enabled is True
    s0, s2 = model.state_dict(), m2.state_dict()
    for t in official_tensors(model):
        a, b = s0[t.module_name], s2[t.module_name]
        if t.expert is not None:
            a, b = a[t.expert], b[t.expert]
        _check_plain(t, a, b)
    # outputs close to the original: bf16 weight rounding moves logits by ~1%; a rare near-tie expert
    # or top-k choice may flip at a position, so the bound is on most positions and on the norm
    ids = torch.randint(0, cfg.vocab_size, (1, 36), generator=torch.Generator().manual_seed(0))
    out2, h2 = m2(ids, return_hidden=True)
    out0, h0 = model(ids, return_hidden=True)
    per_pos = (out2 - out0).abs().amax(-1) / out0.abs().amax(-1)
    assert (per_pos <= 0.03).float().mean() >= 0.9 and (out2 - out0).norm() <= 0.1 * out0.norm()
    mtp2 = m2.mtp_forward(h2[:, :-1], ids[:, 1:])
    mtp0 = model.mtp_forward(h0[:, :-1], ids[:, 1:])
    assert mtp2.shape == (1, 35, cfg.vocab_size) and (mtp2 - mtp0).norm() <= 0.1 * mtp0.norm()
    # config.json
    c = ModelConfig.from_file(saved["bf16"])
    assert (c.weight_format, c.expert_format) == ("bf16", "bf16")
    assert c.replace(name=cfg.name, weight_format=cfg.weight_format, expert_format=cfg.expert_format,
                     scale_format=cfg.scale_format) == cfg


@pytest.mark.parametrize("key,fmt", [("fp4", FMT_FP4), ("base", FMT_BASE), ("sharded", FMT_FP4)])
def test_quantised_round_trip(cfg, model, saved, key, fmt):
    root = saved[key]
    c = ModelConfig.from_file(root)
    assert (c.weight_format, c.expert_format, c.scale_format) == (fmt["weight_format"], fmt["expert_format"],
                                                                   fmt["scale_format"])
    files = sorted(root.glob("*.safetensors"))
    if key == "sharded":
        assert len(files) > 2 and (root / INDEX_FILE).is_file()
        wm = json.loads((root / INDEX_FILE).read_text())["weight_map"]
        for n, shard in wm.items():  # a weight and its scale share a shard
            if n.endswith(".scale"):
                assert wm[n[:-6] + ".weight"] == shard
    else:
        assert [p.name for p in files] == [SINGLE_FILE] and not (root / INDEX_FILE).exists()
    stored = {}
    for p in files:
        stored.update(load_file(str(p)))
    m2 = fresh(cfg)
    load_weights(m2, root, progress=False)
    s0, s2 = model.state_dict(), m2.state_dict()
    want_scale = torch.float8_e8m0fnu if fmt["scale_format"] == "ue8m0" else torch.float32
    for t in official_tensors(model):
        orig, got = s0[t.module_name], s2[t.module_name]
        if t.expert is not None:
            orig, got = orig[t.expert], got[t.expert]
        w = stored[t.name]
        if t.kind == "fp8" or (t.kind == "expert" and fmt["expert_format"] == "fp8"):
            s = stored[t.name[:-7] + ".scale"]
            assert w.dtype == torch.float8_e4m3fn and s.dtype == want_scale, t.name
            ref = ref_fp8(w, s)
            torch.testing.assert_close(got.double(), ref, rtol=2.0 ** -23, atol=0)
            rows, cols = torch.arange(w.shape[0]) // 128, torch.arange(w.shape[1]) // 128
            bound = 2.0 ** -4 * orig.double().abs() + 2.0 ** -10 * ref_scale(s)[rows][:, cols] + 1e-6
            assert ((got.double() - orig.double()).abs() <= bound).all(), t.name
        elif t.kind == "expert":
            s = stored[t.name[:-7] + ".scale"]
            assert w.dtype == torch.int8 and s.dtype == torch.float8_e8m0fnu
            assert w.shape == (t.shape[0], t.shape[1] // 2)
            ref = ref_fp4(w, s)
            assert torch.equal(got.double(), ref), t.name
            sc = ref_e8m0(s)[:, torch.arange(t.shape[1]) // 32]
            x = orig.double().abs() / sc
            half_step = torch.where(x <= 2, 0.25, torch.where(x <= 4, 0.5, 1.0)) * sc
            assert ((got.double() - orig.double()).abs() <= half_step).all(), t.name
        else:
            assert t.name[:-7] + ".scale" not in stored
            _check_plain(t, orig, got)
    assert m2.mtp_enabled
    if key == "fp4":
        ids = torch.randint(0, cfg.vocab_size, (1, 24), generator=torch.Generator().manual_seed(1))
        assert torch.isfinite(m2(ids)).all()


def test_load_into_bf16_model(cfg, model, saved):
    m = fresh(cfg, torch.bfloat16)
    dtypes = {k: v.dtype for k, v in m.state_dict().items()}
    load_weights(m, saved["fp4"], progress=False)
    assert {k: v.dtype for k, v in m.state_dict().items()} == dtypes
    c = ModelConfig.from_file(saved["fp4"])  # the checkpoint's own config builds the same model
    assert c.expert_format == "fp4"
    m32 = V4Model(c)
    load_weights(m32, saved["fp4"], progress=False)
    for k, v in m.state_dict().items():
        want = m32.state_dict()[k]
        assert torch.equal(v, want.to(v.dtype)), k


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_load_onto_cuda(cfg, model, saved):
    m = V4Model(cfg, device="cuda")
    load_weights(m, saved["fp4"], progress=False)
    ref = fresh(cfg)
    load_weights(ref, saved["fp4"], progress=False)
    for k, v in m.state_dict().items():
        assert v.device.type == "cuda" and torch.equal(v.cpu(), ref.state_dict()[k]), k


def test_progress_bar(cfg, saved, capsys):
    load_weights(fresh(cfg), saved["bf16"], progress=True)
    assert "loading weights" in capsys.readouterr().err


# ---------------------------------------------------------------------------- MTP and name variants
def test_missing_mtp_disables_it(cfg, model, saved, tmp_path, caplog):
    root = mutated(saved["fp4"], tmp_path / "c", lambda d: [d.pop(k) for k in list(d) if k.startswith("mtp.")])
    m2 = fresh(cfg)
    before = {k: v.clone() for k, v in m2.state_dict().items() if k.startswith("mtp.")}
    with caplog.at_level(logging.INFO, logger="ascend_v4.checkpoint"):
        report = load_weights(m2, root, progress=False)
    assert m2.mtp_enabled is False and report["mtp"] is False
    lines = [r for r in caplog.records if r.name == "ascend_v4.checkpoint" and "MTP is disabled" in r.getMessage()]
    assert len(lines) == 1 and "mtp_enabled = False" in lines[0].getMessage()
    assert all(torch.equal(v, m2.state_dict()[k]) for k, v in before.items())
    with pytest.raises(ValueError, match="no MTP block"):
        m2.mtp_forward(torch.zeros(1, 4, cfg.hc_mult, cfg.hidden_size), torch.zeros(1, 4, dtype=torch.long))
    load_weights(m2, saved["fp4"], progress=False)  # a later full load turns it back on
    assert m2.mtp_enabled is True


def test_partial_mtp_is_an_error(cfg, saved, tmp_path):
    root = mutated(saved["fp4"], tmp_path / "c",
                   lambda d: [d.pop(k) for k in list(d) if k.startswith("mtp.0.attn.")])
    with pytest.raises(CheckpointError,
                       match=r"model\.safetensors: tensor 'mtp\.0\.attn\.[\w.]+': missing.*partly present"):
        load_weights(fresh(cfg), root, progress=False)


def test_model_prefix_and_shared_mtp_names(cfg, model, saved, tmp_path):
    def prefix(d):
        for k in list(d):
            d["model." + k] = d.pop(k)
        d["model.mtp.0.emb.tok_emb.weight"] = torch.zeros(4, 4, dtype=torch.bfloat16)  # dropped (shared)
        d["mtp.0.head.weight"] = torch.zeros(4, 4, dtype=torch.bfloat16)

    root = mutated(saved["fp4"], tmp_path / "c", prefix)
    m2, ref = fresh(cfg), fresh(cfg)
    report = load_weights(m2, root, progress=False)
    load_weights(ref, saved["fp4"], progress=False)
    assert sorted(report["skipped"]) == ["model.mtp.0.emb.tok_emb.weight", "mtp.0.head.weight"]
    for k, v in ref.state_dict().items():
        assert torch.equal(v, m2.state_dict()[k]), k


def test_int32_tid2eid_accepted(cfg, model, saved, tmp_path):
    root = mutated(saved["bf16"], tmp_path / "c", lambda d: d.update(
        {k: v.to(torch.int32) for k, v in d.items() if k.endswith("tid2eid")}))
    m2 = fresh(cfg)
    load_weights(m2, root, progress=False)
    assert m2.layers[0].ffn.gate.tid2eid.dtype == torch.int64
    assert torch.equal(m2.layers[0].ffn.gate.tid2eid, model.layers[0].ffn.gate.tid2eid)


# ---------------------------------------------------------------------------- errors
def _fp4(d):  # a float where an FP4 expert belongs (its scale left in place)
    d["layers.0.ffn.experts.0.w1.weight"] = torch.zeros(32, 64, dtype=torch.bfloat16)


ERRORS = [
    ("bf16", lambda d: d.pop("layers.1.attn.wq_a.weight"),
     r"model\.safetensors: tensor 'layers\.1\.attn\.wq_a\.weight': missing"),
    ("bf16", lambda d: d.update({"layers.0.attn.bogus.weight": torch.zeros(2, dtype=torch.bfloat16)}),
     r"model\.safetensors: tensor 'layers\.0\.attn\.bogus\.weight': unexpected tensor"),
    ("bf16", lambda d: d.update({"layers.0.attn.wkv.weight": torch.zeros(64, 63, dtype=torch.bfloat16)}),
     r"model\.safetensors: tensor 'layers\.0\.attn\.wkv\.weight': shape mismatch: file has \[64, 63\]"),
    ("bf16", lambda d: d.update({"layers.0.attn.wq_a.weight": torch.zeros(32, 64, dtype=torch.float8_e4m3fn)}),
     r"model\.safetensors: tensor 'layers\.0\.attn\.wq_a\.weight': dtype F8_E4M3 is not allowed"),
    ("bf16", lambda d: d.update({"layers.0.attn.wq_a.scale": torch.ones(1, 1)}),
     r"model\.safetensors: tensor 'layers\.0\.attn\.wq_a\.scale': unexpected tensor: a block scale"),
    ("bf16", lambda d: d.update({"layers.0.ffn.gate.tid2eid": torch.full((512, 2), 8, dtype=torch.int64)}),
     r"model\.safetensors: tensor 'layers\.0\.ffn\.gate\.tid2eid': expert ids must lie in \[0, 7\]"),
    ("bf16", lambda d: d.update({"layers.0.ffn.gate.tid2eid": torch.zeros(512, 2)}),
     r"model\.safetensors: tensor 'layers\.0\.ffn\.gate\.tid2eid': dtype F32 is not allowed"),
    ("fp4", lambda d: d.update({"layers.0.attn.wq_a.scale": d["layers.0.attn.wq_a.scale"].float().bfloat16()}),
     r"model\.safetensors: tensor 'layers\.0\.attn\.wq_a\.scale': dtype BF16 is not allowed"),
    ("fp4", _fp4,
     r"model\.safetensors: tensor 'layers\.0\.ffn\.experts\.0\.w1\.weight': dtype BF16 is not allowed: "
     r"expert_format 'fp4'"),
    ("fp4", lambda d: d.update({"layers.0.ffn.experts.1.w2.scale": d["layers.0.ffn.experts.1.w2.scale"].float()}),
     r"model\.safetensors: tensor 'layers\.0\.ffn\.experts\.1\.w2\.scale': dtype F32 is not allowed"),
    ("fp4", lambda d: d.update({"layers.0.ffn.experts.1.w2.weight": torch.zeros(64, 32, dtype=torch.int8)}),
     r"model\.safetensors: tensor 'layers\.0\.ffn\.experts\.1\.w2\.weight': shape mismatch: file has \[64, 32\], "
     r"the model needs \[64, 16\] \(packed FP4"),
    ("fp4", lambda d: d.pop("layers.2.attn.wo_b.scale"),
     r"model\.safetensors: tensor 'layers\.2\.attn\.wo_b\.weight': FP8 weight without its companion scale "
     r"tensor 'layers\.2\.attn\.wo_b\.scale'"),
    ("fp4", lambda d: d.pop("mtp.0.ffn.experts.2.w3.scale"),
     r"model\.safetensors: tensor 'mtp\.0\.ffn\.experts\.2\.w3\.weight': FP4 weight without its companion scale"),
    ("fp4", lambda d: d.update({"layers.1.attn.wq_b.scale": torch.ones(1, 2, dtype=torch.float8_e8m0fnu)}),
     r"model\.safetensors: tensor 'layers\.1\.attn\.wq_b\.scale': shape mismatch: file has \[1, 2\], the model "
     r"needs \[2, 1\]"),
    ("base", lambda d: d.update({"layers.3.ffn.experts.4.w1.weight": torch.zeros(32, 64, dtype=torch.int8)}),
     r"model\.safetensors: tensor 'layers\.3\.ffn\.experts\.4\.w1\.weight': dtype I8 is not allowed: "
     r"expert_format 'fp8'"),
]


@pytest.mark.parametrize("key,fn,pattern", ERRORS, ids=[f"{k}-{i}" for i, (k, _, _) in enumerate(ERRORS)])
def test_errors_name_file_and_tensor(cfg, saved, tmp_path, key, fn, pattern):
    root = mutated(saved[key], tmp_path / "c", fn)
    m2 = fresh(cfg)
    before = {k: v.clone() for k, v in m2.state_dict().items()}
    with pytest.raises(CheckpointError, match=pattern) as ei:
        load_weights(m2, root, progress=False)
    assert str(root) in str(ei.value)
    # everything is checked before any data is copied: the model is untouched
    assert all(torch.equal(v, m2.state_dict()[k]) for k, v in before.items())


def test_truncated_shard(cfg, saved, tmp_path):
    root = tmp_path / "c"
    shutil.copytree(saved["sharded"], root)
    wm = json.loads((root / INDEX_FILE).read_text())["weight_map"]
    shard = sorted(set(wm.values()))[1]
    data = (root / shard).read_bytes()
    (root / shard).write_bytes(data[:-1000])
    with pytest.raises(CheckpointError, match=rf"{re.escape(shard)}: tensor '([\w.]+)': cannot open the safetensors "
                                               rf"file: truncated") as ei:
        load_weights(fresh(cfg), root, progress=False)
    assert wm[ei.value.tensor] == shard  # the tensor named really lives at the cut tail of that shard


def test_truncated_and_garbage_single_file(cfg, saved, tmp_path):
    root = tmp_path / "c"
    shutil.copytree(saved["bf16"], root)
    f = root / SINGLE_FILE
    data = f.read_bytes()
    f.write_bytes(data[:-10])
    with pytest.raises(CheckpointError, match=r"model\.safetensors: tensor '[\w.]+': cannot open .*truncated"):
        load_weights(fresh(cfg), root, progress=False)
    f.write_bytes(b"\xff" * 64)
    with pytest.raises(CheckpointError,
                       match=r"model\.safetensors: tensor '<unknown: header unreadable>': cannot open"):
        load_weights(fresh(cfg), root, progress=False)


def test_index_points_at_missing_shard(cfg, saved, tmp_path):
    root = tmp_path / "c"
    shutil.copytree(saved["sharded"], root)
    wm = json.loads((root / INDEX_FILE).read_text())["weight_map"]
    shard = sorted(set(wm.values()))[-1]
    first = sorted(n for n, s in wm.items() if s == shard)[0]
    (root / shard).unlink()
    with pytest.raises(CheckpointError,
                       match=rf"{re.escape(shard)}: tensor '{re.escape(first)}': shard file is missing"):
        load_weights(fresh(cfg), root, progress=False)


def test_index_lists_tensor_absent_from_shard(cfg, saved, tmp_path):
    root = tmp_path / "c"
    shutil.copytree(saved["sharded"], root)
    index = json.loads((root / INDEX_FILE).read_text())
    shard = index["weight_map"]["embed.weight"]
    index["weight_map"]["layers.0.attn.extra.weight"] = shard
    (root / INDEX_FILE).write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=rf"{re.escape(shard)}: tensor 'layers\.0\.attn\.extra\.weight': "
                                               rf"listed in {re.escape(INDEX_FILE)} but not in this shard"):
        load_weights(fresh(cfg), root, progress=False)
    (root / INDEX_FILE).write_text("{not json")
    with pytest.raises(CheckpointError, match=re.escape(INDEX_FILE)):
        load_weights(fresh(cfg), root, progress=False)


def test_no_checkpoint_in_directory(cfg, tmp_path):
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        load_weights(fresh(cfg), tmp_path, progress=False)


def test_save_switches_layout_and_rejects_bad_format(model, tmp_path):
    save_model(model, tmp_path, **FMT_BF16, max_shard_bytes=200_000)
    assert (tmp_path / INDEX_FILE).is_file()
    save_model(model, tmp_path, **FMT_BF16)  # single file now: the stale index and shards are gone
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", SINGLE_FILE]
    with pytest.raises(ValueError, match="expert_format"):
        save_model(model, tmp_path, expert_format="int4")
