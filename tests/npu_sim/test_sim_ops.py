"""Tests of the simulated torch-npu ops (tests/npu_sim/ops.py).

Each op is checked against an independent float64 statement of its documented formula (mostly explicit
loops), on fresh random inputs (the ``torch_gen`` fixture of tests/conftest.py), plus invariants and the
call contract: signatures against the registered torch-npu 2.13.0 schemas, and output shapes / dtypes
against Huawei's meta functions from the cached torch-npu wheel (skipped when the wheel is not cached).
"""

from __future__ import annotations

import glob
import importlib.util
import inspect
import math
import os
import re
import sys
import types
import warnings
import zipfile

import pytest
import torch

from . import SOC_FAMILIES, make_simulated_torch_npu, simulated_torch_npu

NAN = float("nan")


@pytest.fixture(scope="module")
def tn():
    return make_simulated_torch_npu(260, cann_version="9.2.0")


@pytest.fixture(scope="module")
def tn_a3():
    return make_simulated_torch_npu("A3")


def _close(actual, expected, dtype, rtol=None, atol=None):
    """Compare an op output with a float64 reference, with tolerances for the output dtype's rounding."""
    tol = {torch.float32: (2e-5, 2e-5), torch.bfloat16: (1e-2, 1e-2), torch.float16: (2e-3, 2e-3)}[dtype]
    torch.testing.assert_close(actual.double(), expected.double(), rtol=rtol or tol[0], atol=atol or tol[1])


def _sig(z):
    return 1.0 / (1.0 + math.exp(-z))


# =================================================================================================
# module, signatures, meta contract
# =================================================================================================


def test_module_install_and_restore():
    before_spec = importlib.util.find_spec("torch_npu") is not None
    before_mod = sys.modules.get("torch_npu")
    before_attr = "npu" in torch.__dict__
    with simulated_torch_npu(250) as mod:
        spec = importlib.util.find_spec("torch_npu")
        assert spec is not None and spec.name == "torch_npu"
        import torch_npu  # noqa: F401  (the simulated module)

        assert torch_npu is mod and torch_npu.SIMULATED
        assert torch.npu.is_available() and torch_npu.npu.is_available()
        assert torch_npu.npu.utils.get_soc_version() == 250
        from torch_npu.npu.utils import get_soc_version
        from torch_npu.npu._backends import get_soc_version as get_soc_version2

        assert get_soc_version() == get_soc_version2() == 250
        assert torch_npu.npu.utils.get_cann_version() == "9.1.0"
        assert (torch_npu.int4, torch_npu.hifloat8, torch_npu.float8_e5m2, torch_npu.float8_e4m3fn,
                torch_npu.float8_e8m0fnu, torch_npu.float4_e2m1fn_x2) == (285, 290, 291, 292, 293, 296)
        assert hasattr(torch_npu._C, "_npu_setDevice")
        assert importlib.util.find_spec("torch_npu.npu.utils") is not None
    assert (importlib.util.find_spec("torch_npu") is not None) == before_spec
    assert sys.modules.get("torch_npu") is before_mod
    assert ("npu" in torch.__dict__) == before_attr


def test_soc_family_names():
    for fam, soc in SOC_FAMILIES.items():
        assert make_simulated_torch_npu(fam).npu.utils.get_soc_version() == soc
    assert make_simulated_torch_npu(223).SIM_CONFIG.family == "A2"
    with pytest.raises(ValueError):
        make_simulated_torch_npu("B7")


# The registered schemas of the torch-npu 2.13.0 wheel (strings of libtorch_npu.so).
SCHEMAS = r"""
npu_rms_norm(Tensor input, Tensor gamma, float epsilon=1e-06) -> (Tensor, Tensor)
npu_rotary_mul(Tensor input, Tensor r1, Tensor r2, str rotary_mode='half', Tensor? rotate=None) -> Tensor
npu_swiglu(Tensor input, int dim=-1) -> Tensor
npu_mhc_pre(Tensor x, Tensor phi, Tensor alpha, Tensor bias, *, Tensor? gamma=None, float norm_eps=1e-6, float hc_eps=1e-6, int out_flag=0, int inner_precise=0) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)
npu_mhc_sinkhorn(Tensor x, *, float eps=1e-6, SymInt num_iters=20, int out_flag=0) -> (Tensor, Tensor, Tensor)
npu_mhc_post(Tensor x, Tensor? h_res, Tensor h_out, Tensor h_post) -> Tensor
npu_moe_gating_top_k(Tensor x, int k, *, Tensor? bias=None, Tensor? input_ids=None, Tensor? tid2eid=None, int k_group=1, int group_count=1, int group_select_mode=0, int renorm=0, int norm_type=0, bool out_flag=False, float routed_scaling_factor=1.0, float eps=1e-20) -> (Tensor, Tensor, Tensor)
npu_moe_init_routing_v2(Tensor x, Tensor expert_idx, *, Tensor? scale=None, Tensor? offset=None, int active_num=-1, int expert_capacity=-1, int expert_num=-1, int drop_pad_mode=0, int expert_tokens_num_type=0, bool expert_tokens_num_flag=False, int quant_mode=-1, int[2] active_expert_range=[], int row_idx_type=0, int? x_dtype=None) -> (Tensor, Tensor, Tensor, Tensor)
npu_grouped_matmul(Tensor[] x, Tensor[] weight, *, Tensor[]? bias=None, Tensor[]? scale=None, Tensor[]? offset=None, Tensor[]? antiquant_scale=None, Tensor[]? antiquant_offset=None, Tensor[]? per_token_scale=None, Tensor? group_list=None, Tensor[]? activation_input=None, Tensor[]? activation_quant_scale=None, Tensor[]? activation_quant_offset=None, int? split_item=0, int? group_type=None, int? group_list_type=0, int? act_type=0, int[]? tuning_config=None, int? output_dtype=None, int? x_dtype=None, int? weight_dtype=None, int? scale_dtype=None, int? per_token_scale_dtype=None) -> Tensor[]
npu_moe_finalize_routing(Tensor expanded_permuted_rows, Tensor? skip1, Tensor? skip2, Tensor? bias, Tensor? scales, Tensor expanded_src_to_dst_row, Tensor? export_for_source_row, int? drop_pad_mode=0, int? k=1) -> Tensor
npu_lightning_indexer(Tensor query, Tensor key, Tensor weights, *, Tensor? actual_seq_lengths_query=None, Tensor? actual_seq_lengths_key=None, Tensor? block_table=None, str layout_query="BSND", str layout_key="BSND", int sparse_count=2048, int sparse_mode=3, int pre_tokens=9223372036854775807, int next_tokens=9223372036854775807, bool return_value=False) -> (Tensor, Tensor)
npu_sparse_flash_attention(Tensor query, Tensor key, Tensor? value, Tensor sparse_indices, float scale_value, *, Tensor? block_table=None, Tensor? actual_seq_lengths_query=None, Tensor? actual_seq_lengths_kv=None, Tensor? query_rope=None, Tensor? key_rope=None, int sparse_block_size=1, str layout_query="BSND", str layout_kv="BSND", int sparse_mode=3, int pre_tokens=9223372036854775807, int next_tokens=9223372036854775807, int attention_mode=0, bool return_softmax_lse=False, Tensor? sinks=None) -> (Tensor, Tensor, Tensor)
"""


def _parse_schema(line):
    name, rest = line.split("(", 1)
    args = rest.rsplit(") ->", 1)[0]
    params, kw_only = [], False
    for part in [p.strip() for p in args.split(",")]:
        if part == "*":
            kw_only = True
            continue
        decl, _, default = part.partition("=")
        pname = decl.split()[-1]
        if not _:
            params.append((pname, kw_only, inspect.Parameter.empty))
            continue
        d = default.strip()
        if d == "None":
            val = None
        elif d in ("True", "False"):
            val = d == "True"
        elif d == "[]":
            val = []
        elif d[0] in "'\"":
            val = d[1:-1]
        elif re.fullmatch(r"-?\d+", d):
            val = int(d)
        else:
            val = float(d)
        params.append((pname, kw_only, val))
    return name, params


@pytest.mark.parametrize("line", [ln for ln in SCHEMAS.strip().splitlines()], ids=lambda s: s.split("(")[0])
def test_signature_matches_registered_schema(tn, line):
    name, params = _parse_schema(line)
    sig = inspect.signature(getattr(tn, name))
    got = list(sig.parameters.values())
    assert [p.name for p in got] == [p[0] for p in params]
    for p, (pname, kw_only, default) in zip(got, params):
        want_kind = inspect.Parameter.KEYWORD_ONLY if kw_only else inspect.Parameter.POSITIONAL_OR_KEYWORD
        assert p.kind == want_kind, pname
        if isinstance(default, float):
            assert p.default == pytest.approx(default, rel=1e-12), pname
        else:
            assert p.default == default, pname


def _load_meta_functions():
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
    wheels = glob.glob(os.path.join(cache, "npu-op-docs", "2.13.0", "torch_npu-*.whl"))
    if not wheels:
        return None
    src = zipfile.ZipFile(wheels[0]).read("torch_npu/op_plugin/meta/_meta_registrations.py").decode()
    src = "\n".join(ln for ln in src.splitlines()
                    if not re.match(r"^(import torch_npu|from torch_npu|from torch\.library|from torch\.fx\.node"
                                    r"|has_side_effect\()", ln))
    registry = {}

    class Library:
        def __init__(self, *a, **k):
            pass

    def impl(lib, name, *a, **k):
        def deco(fn):
            registry.setdefault(name, fn)
            return fn
        return deco

    err = type("ErrCode", (), {"VALUE": "", "TYPE": "", "PARAM": "", "NOT_SUPPORT": "", "INTERNAL": ""})
    fake = types.ModuleType("torch_npu")
    for k, v in dict(int4=285, hifloat8=290, float8_e5m2=291, float8_e4m3fn=292, float8_e8m0fnu=293,
                     float4_e2m1fn_x2=296, float4_e1m2fn_x2=297).items():
        setattr(fake, k, v)
    ns = dict(__name__="npu_meta_sim", math=math, os=os, warnings=warnings, torch=torch, torch_npu=fake,
              Library=Library, impl=impl, has_side_effect=lambda *a, **k: None, ErrCode=err,
              ops_error=lambda *a, **k: "", get_cann_version=lambda: "9.2.0", get_soc_version=lambda: 260)
    exec(compile(src, "_meta_registrations.py", "exec"), ns)
    return registry


@pytest.fixture(scope="module")
def meta_fns():
    try:
        fns = _load_meta_functions()
    except Exception as e:  # a wheel with a different layout: report, do not fail the op tests
        pytest.skip(f"could not load the meta functions from the cached wheel: {e}")
    if fns is None:
        pytest.skip("torch-npu 2.13.0 wheel not cached (run /work/shared/tools/npu_op_doc once)")
    return fns


def _to_meta(v):
    if isinstance(v, torch.Tensor):
        return torch.empty_like(v, device="meta")
    if isinstance(v, (list, tuple)) and v and all(isinstance(t, torch.Tensor) for t in v):
        return [torch.empty_like(t, device="meta") for t in v]
    return v


def _meta_cases():
    g = torch.Generator().manual_seed(1)
    bf, f32, i32 = torch.bfloat16, torch.float32, torch.int32

    def r(*s, dtype=f32):
        return torch.randn(*s, generator=g).to(dtype)

    T, n, D = 6, 4, 8
    x_hc = r(T, n, D, dtype=bf)
    phi, bias_hc = r(n * n + 2 * n, n * D), r(n * n + 2 * n)
    alpha = torch.tensor([0.5, 0.6, 0.7])
    yield "npu_rms_norm", (r(3, 5, 16, dtype=bf), r(16, dtype=bf)), {}
    yield "npu_rms_norm", (r(3, 5, 16), r(5, 16)), {"epsilon": 1e-5}
    yield "npu_rotary_mul", (r(2, 3, 4, 8, dtype=bf), r(1, 3, 1, 8, dtype=bf), r(1, 3, 1, 8, dtype=bf), "interleave"), {}
    yield "npu_swiglu", (r(4, 6, 10),), {"dim": -1}
    for flag in (0, 1):
        yield "npu_mhc_pre", (x_hc, phi, alpha, bias_hc), {"out_flag": flag}
        yield "npu_mhc_pre", (x_hc.reshape(2, 3, n, D), phi, alpha, bias_hc), {"out_flag": flag, "gamma": r(n, D)}
        yield "npu_mhc_sinkhorn", (r(T, n, n).abs() + 0.1,), {"out_flag": flag, "num_iters": 7}
        yield "npu_mhc_sinkhorn", (r(2, 3, 6, 6).abs() + 0.1,), {"out_flag": flag}
    yield "npu_mhc_pre", (x_hc, phi[:2 * n], alpha[:2], bias_hc[:2 * n]), {"out_flag": 1}
    yield "npu_mhc_post", (x_hc, r(T, n, n), r(T, D, dtype=bf), r(T, n)), {}
    yield "npu_mhc_post", (x_hc, None, r(T, D, dtype=bf), r(T, n)), {}
    E, K = 16, 3
    logits = r(T, E)
    for flag in (False, True):
        yield "npu_moe_gating_top_k", (logits, K), {"norm_type": 1, "bias": r(E), "out_flag": flag}
    yield "npu_moe_gating_top_k", (logits, K), {"norm_type": 2, "input_ids": torch.arange(T),
                                                "tid2eid": torch.randint(0, E, (10, K), generator=g, dtype=i32)}
    H = 8
    xr = r(T, H, dtype=bf)
    eidx = torch.randint(0, E, (T, K), generator=g, dtype=i32)
    for ttype in (0, 1, 2):
        for rit in (0, 1):
            yield "npu_moe_init_routing_v2", (xr, eidx), {
                "expert_num": E, "expert_tokens_num_type": ttype, "expert_tokens_num_flag": True,
                "active_expert_range": [2, 11], "row_idx_type": rit, "active_num": T * K}
    yield "npu_moe_init_routing_v2", (xr, eidx), {"expert_num": E, "scale": r(T)}
    yield "npu_moe_init_routing_v2", (xr, eidx), {"expert_num": E, "quant_mode": 1, "scale": r(E, H),
                                                  "expert_tokens_num_type": 1, "expert_tokens_num_flag": True}
    counts = torch.tensor([5, 0, 7, 6], dtype=torch.int64)
    yield "npu_grouped_matmul", ([r(18, 8, dtype=bf)], [r(4, 8, 12, dtype=bf)]), {
        "group_list": counts, "split_item": 2, "group_type": 0, "group_list_type": 1}
    yield "npu_grouped_matmul", ([r(18, 8)], [r(4, 8, 12)]), {
        "group_list": torch.cumsum(counts, 0), "split_item": 3, "group_type": 0, "group_list_type": 0,
        "output_dtype": 6}
    yield "npu_grouped_matmul", ([r(3, 8), r(5, 4)], [r(8, 6), r(4, 7)]), {
        "bias": [r(6), r(7)], "split_item": 0, "group_type": -1}
    rows = r(T * K, H, dtype=bf)
    src = torch.randperm(T * K, generator=g).to(i32)
    yield "npu_moe_finalize_routing", (rows, r(T, H, dtype=bf), None, None, r(T, K, dtype=bf), src, eidx), {}
    yield "npu_moe_finalize_routing", (rows, None, None, None, None, src, None), {"drop_pad_mode": 2, "k": K}
    B, S1, S2, N1, Dq = 2, 3, 10, 4, 16
    q, kk, w = r(B, S1, N1, Dq, dtype=bf), r(B, S2, 1, Dq, dtype=bf), r(B, S1, N1, dtype=bf)
    for rv in (False, True):
        yield "npu_lightning_indexer", (q, kk, w), {"sparse_count": 5, "return_value": rv}
        yield "npu_lightning_indexer", (q.reshape(B * S1, N1, Dq), kk.reshape(B * S2, 1, Dq), w.reshape(B * S1, N1)), {
            "sparse_count": 4, "return_value": rv, "layout_query": "TND", "layout_key": "TND",
            "actual_seq_lengths_query": torch.tensor([3, 6], dtype=i32),
            "actual_seq_lengths_key": torch.tensor([10, 20], dtype=i32)}
    idx = torch.randint(0, S2, (B, S1, 1, 6), generator=g, dtype=i32)
    for lse in (False, True):
        yield "npu_sparse_flash_attention", (q, kk, kk, idx, 0.25), {"return_softmax_lse": lse, "sparse_mode": 0}
        yield "npu_sparse_flash_attention", (
            q.reshape(B * S1, N1, Dq), kk.reshape(B * S2, 1, Dq), kk.reshape(B * S2, 1, Dq), idx.reshape(B * S1, 1, 6), 0.25), {
            "return_softmax_lse": lse, "sparse_mode": 0, "layout_query": "TND", "layout_kv": "TND",
            "actual_seq_lengths_query": torch.tensor([3, 6], dtype=i32),
            "actual_seq_lengths_kv": torch.tensor([10, 20], dtype=i32)}


@pytest.mark.npu_contract
def test_output_shapes_and_dtypes_match_meta_functions(tn, meta_fns):
    n_cases = 0
    for name, args, kwargs in _meta_cases():
        sim_out = getattr(tn, name)(*args, **kwargs)
        meta_out = meta_fns[name](*[_to_meta(a) for a in args], **{k: _to_meta(v) for k, v in kwargs.items()})
        sim_t = sim_out if isinstance(sim_out, (tuple, list)) else (sim_out,)
        meta_t = meta_out if isinstance(meta_out, (tuple, list)) else (meta_out,)
        assert len(sim_t) == len(meta_t), name
        for i, (s, m) in enumerate(zip(sim_t, meta_t)):
            if m is None:
                assert s is None, f"{name} output {i}: meta None, sim {type(s)}"
                continue
            assert tuple(s.shape) == tuple(m.shape), f"{name} {kwargs} output {i}: {tuple(s.shape)} vs meta {tuple(m.shape)}"
            assert s.dtype == m.dtype, f"{name} output {i}: {s.dtype} vs meta {m.dtype}"
        n_cases += 1
    assert n_cases > 30


# =================================================================================================
# norms, RoPE, SwiGLU
# =================================================================================================


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("gamma_dims", [1, 2])
def test_rms_norm(tn, torch_gen, dtype, gamma_dims):
    x = (torch.randn(3, 4, 5, 32, generator=torch_gen) * 3).to(dtype)
    gamma = torch.randn(*(5, 32)[2 - gamma_dims:], generator=torch_gen).to(dtype)
    y, rstd = tn.npu_rms_norm(x, gamma, epsilon=1e-5)
    x64 = x.double()
    dims = tuple(range(x.dim() - gamma_dims, x.dim()))
    cnt = math.prod(x.shape[d] for d in dims)
    ref_rstd = 1.0 / torch.sqrt((x64 * x64).sum(dim=dims, keepdim=True) / cnt + 1e-5)
    assert y.dtype == dtype and rstd.dtype == torch.float32
    assert tuple(rstd.shape) == tuple(x.shape[:x.dim() - gamma_dims]) + (1,) * gamma_dims
    torch.testing.assert_close(rstd.double(), ref_rstd, rtol=1e-5, atol=0)
    _close(y, x64 * ref_rstd * gamma.double(), dtype)


def test_rms_norm_rejects_gamma_dtype_mismatch(tn):
    with pytest.raises(TypeError):
        tn.npu_rms_norm(torch.randn(2, 8, dtype=torch.bfloat16), torch.ones(8))


def _rope_ref(x, c, s, mode):
    x, c, s = x.double(), c.double().expand_as(x), s.double().expand_as(x)
    out = torch.empty_like(x)
    d = x.shape[-1]
    for j in range(d // 2):
        if mode == "half":
            a, b = j, j + d // 2
        else:
            a, b = 2 * j, 2 * j + 1
        out[..., a] = x[..., a] * c[..., a] - x[..., b] * s[..., a]
        out[..., b] = x[..., b] * c[..., b] + x[..., a] * s[..., b]
    return out


@pytest.mark.parametrize("mode", ["half", "interleave"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rotary_mul(tn, torch_gen, mode, dtype):
    B, S, N, D = 2, 5, 3, 16
    x = torch.randn(B, S, N, D, generator=torch_gen).to(dtype)
    theta = torch.rand(1, S, 1, D // 2, generator=torch_gen) * 6
    ang = theta.repeat_interleave(2, -1) if mode == "interleave" else torch.cat([theta, theta], -1)
    cos, sin = ang.cos().to(dtype), ang.sin().to(dtype)  # 1S1D broadcast (BSND)
    out = tn.npu_rotary_mul(x, cos, sin, mode)
    assert out.dtype == dtype and out.shape == x.shape
    _close(out, _rope_ref(x, cos, sin, mode), dtype)
    if dtype == torch.float32:  # a rotation: norms of each rotated pair are kept
        torch.testing.assert_close(out.norm(dim=-1), x.norm(dim=-1), rtol=1e-5, atol=1e-5)
        # inverse RoPE = pass −sin
        back = tn.npu_rotary_mul(out, cos, -sin, mode)
        torch.testing.assert_close(back, x, rtol=1e-5, atol=1e-5)


def test_rotary_mul_rotate_matrix_equals_half_mode(tn, torch_gen):
    n = 8
    rotate = torch.zeros(n, n)
    rotate[:n // 2, n // 2:] = torch.eye(n // 2)   # the doc's half-mode example matrix
    rotate[n // 2:, :n // 2] = -torch.eye(n // 2)
    x = torch.randn(2, 2, 5, n, generator=torch_gen)
    r1, r2 = torch.randn(1, 1, 5, n, generator=torch_gen), torch.randn(1, 1, 5, n, generator=torch_gen)
    torch.testing.assert_close(tn.npu_rotary_mul(x, r1, r2, "half", rotate), tn.npu_rotary_mul(x, r1, r2, "half"))


@pytest.mark.parametrize("dim", [-1, 0, 1])
def test_swiglu(tn, torch_gen, dim):
    x = torch.randn(6, 8, 10, generator=torch_gen).to(torch.bfloat16)
    out = tn.npu_swiglu(x, dim=dim)
    h = x.shape[dim] // 2
    a, b = x.double().narrow(dim, 0, h), x.double().narrow(dim, h, h)
    _close(out, a / (1 + torch.exp(-a)) * b, torch.bfloat16)
    with pytest.raises(ValueError):
        tn.npu_swiglu(torch.randn(3, 5), dim=-1)


# =================================================================================================
# mHC
# =================================================================================================


def _mhc_pre_ref(x, phi, alpha, bias, gamma, norm_eps, hc_eps):
    lead, n, d = x.shape[:-2], x.shape[-2], x.shape[-1]
    xt = x.double().reshape(-1, n, d)
    T = xt.shape[0]
    a = [float(v) for v in alpha]
    out = {k: [] for k in ("h_in", "h_post", "h_res", "inv_rms", "h_mix", "h_pre")}
    for t in range(T):
        flat = xt[t].reshape(-1)
        r = 1.0 / math.sqrt(float((flat * flat).mean()) + norm_eps)
        xn = flat * r * (gamma.double().reshape(-1) if gamma is not None else 1.0)
        mix = phi.double() @ xn                     # normalise first, then mix (the paper's form)
        pre = [_sig(a[0] * float(mix[i]) + float(bias[i])) + hc_eps for i in range(n)]
        post = [2 * _sig(a[1] * float(mix[n + i]) + float(bias[n + i])) for i in range(n)]
        res = [[a[2] * float(mix[2 * n + i * n + j]) + float(bias[2 * n + i * n + j]) for j in range(n)]
               for i in range(n)] if len(a) == 3 else None
        out["h_in"].append(sum(pre[i] * xt[t, i] for i in range(n)))
        out["h_post"].append(torch.tensor(post, dtype=torch.float64))
        out["h_res"].append(torch.tensor(res, dtype=torch.float64) if res else None)
        out["inv_rms"].append(torch.tensor(r, dtype=torch.float64))
        out["h_mix"].append(mix / r)                # the raw GEMM output, before 1/rms
        out["h_pre"].append(torch.tensor(pre, dtype=torch.float64))
    res = {}
    for k, v in out.items():
        if v[0] is None:
            res[k] = None
            continue
        st = torch.stack(v)
        res[k] = st.reshape(*lead, *st.shape[1:])
    return res


@pytest.mark.parametrize("lead", [(7,), (2, 3)])
@pytest.mark.parametrize("with_gamma", [False, True])
def test_mhc_pre(tn, torch_gen, lead, with_gamma):
    n, D = 4, 16
    x = torch.randn(*lead, n, D, generator=torch_gen).to(torch.bfloat16)
    phi = torch.randn(n * n + 2 * n, n * D, generator=torch_gen) * 0.1
    alpha = torch.rand(3, generator=torch_gen) + 0.2
    bias = torch.randn(n * n + 2 * n, generator=torch_gen) * 0.5
    gamma = torch.rand(n, D, generator=torch_gen) + 0.5 if with_gamma else None
    outs = tn.npu_mhc_pre(x, phi, alpha, bias, gamma=gamma, norm_eps=1e-6, hc_eps=1e-4, out_flag=1)
    ref = _mhc_pre_ref(x, phi, alpha, bias, gamma, 1e-6, 1e-4)
    names = ("h_in", "h_post", "h_res", "inv_rms", "h_mix", "h_pre")
    for name, o in zip(names, outs):
        assert o.dtype == (torch.bfloat16 if name == "h_in" else torch.float32), name
        assert tuple(o.shape) == tuple(ref[name].shape), name
        _close(o, ref[name], o.dtype, rtol=1e-4 if o.dtype == torch.float32 else None,
               atol=1e-4 if o.dtype == torch.float32 else None)
    # out_flag=0: same main outputs; the optional ones keep the meta shapes with undefined contents
    outs0 = tn.npu_mhc_pre(x, phi, alpha, bias, gamma=gamma, norm_eps=1e-6, hc_eps=1e-4)
    for a, b in zip(outs0[:3], outs[:3]):
        torch.testing.assert_close(a, b)
    for a, b in zip(outs0[3:], outs[3:]):
        assert a.shape == b.shape and torch.isnan(a).all()


def test_mhc_pre_without_residual_map(tn, torch_gen):
    n, D = 4, 8
    x = torch.randn(5, n, D, generator=torch_gen).to(torch.float16)
    phi = torch.randn(2 * n, n * D, generator=torch_gen) * 0.1
    alpha, bias = torch.tensor([0.7, 1.3]), torch.randn(2 * n, generator=torch_gen)
    h_in, h_post, h_res, *_ = tn.npu_mhc_pre(x, phi, alpha, bias)
    ref = _mhc_pre_ref(x, phi, alpha, bias, None, 1e-6, 1e-6)
    assert tuple(h_res.shape) == (1,)
    _close(h_in, ref["h_in"], torch.float16)
    _close(h_post, ref["h_post"], torch.float32, rtol=1e-4, atol=1e-5)


def _sinkhorn_ref(x, eps, iters):
    y = x.double().reshape(-1, x.shape[-2], x.shape[-1]).clone()
    n = y.shape[-1]
    for t in range(y.shape[0]):
        for _ in range(iters):
            for i in range(n):
                y[t, i, :] = y[t, i, :] / (float(y[t, i, :].sum()) + eps)
            for j in range(n):
                y[t, :, j] = y[t, :, j] / (float(y[t, :, j].sum()) + eps)
    return y.reshape(x.shape)


@pytest.mark.parametrize("n,iters", [(4, 1), (4, 20), (6, 3), (8, 7)])
def test_mhc_sinkhorn(tn, torch_gen, n, iters):
    x = torch.rand(2, 3, n, n, generator=torch_gen).clamp(min=1e-4)
    y, norm, ssum = tn.npu_mhc_sinkhorn(x, eps=1e-6, num_iters=iters)
    assert norm is None and ssum is None and y.dtype == torch.float32 and y.shape == x.shape
    torch.testing.assert_close(y.double(), _sinkhorn_ref(x, 1e-6, iters), rtol=1e-5, atol=1e-6)
    # the last step normalises columns: each column sums to 1 up to eps
    torch.testing.assert_close(y.sum(dim=-2), torch.ones(2, 3, n), rtol=0, atol=1e-5)


def test_mhc_sinkhorn_converges_to_doubly_stochastic(tn, torch_gen):
    x = torch.rand(16, 4, 4, generator=torch_gen) + 0.05
    y, _, _ = tn.npu_mhc_sinkhorn(x, num_iters=100)
    torch.testing.assert_close(y.sum(-1), torch.ones(16, 4), rtol=0, atol=1e-4)
    torch.testing.assert_close(y.sum(-2), torch.ones(16, 4), rtol=0, atol=1e-4)
    _, norm, ssum = tn.npu_mhc_sinkhorn(x, num_iters=5, out_flag=1)
    assert norm.shape == (2 * 5 * 16 * 4 * 8,) and ssum.shape == (2 * 5 * 16 * 8,)


def test_mhc_sinkhorn_on_softmax_input_is_close_to_v4_chain(tn, torch_gen):
    """Consequence of the rows-first assumption: fed softmax(R) + eps, 20 iterations agree with V4's chain
    (softmax, column, then (row, column) × 19) to ~1e-6."""
    r = torch.randn(32, 4, 4, generator=torch_gen) * 2
    eps = 1e-6
    comb = (torch.softmax(r.double(), -1) + eps)
    v4 = comb / (comb.sum(-2, keepdim=True) + eps)
    for _ in range(19):
        v4 = v4 / (v4.sum(-1, keepdim=True) + eps)
        v4 = v4 / (v4.sum(-2, keepdim=True) + eps)
    y, _, _ = tn.npu_mhc_sinkhorn((torch.softmax(r, -1) + eps).float(), eps=eps, num_iters=20)
    torch.testing.assert_close(y.double(), v4, rtol=0, atol=2e-5)


@pytest.mark.parametrize("lead", [(5,), (2, 3)])
def test_mhc_post(tn, torch_gen, lead):
    n, D = 4, 16
    x = torch.randn(*lead, n, D, generator=torch_gen).to(torch.bfloat16)
    h_res = torch.rand(*lead, n, n, generator=torch_gen)
    h_out = torch.randn(*lead, D, generator=torch_gen).to(torch.bfloat16)
    h_post = torch.rand(*lead, n, generator=torch_gen) * 2
    y = tn.npu_mhc_post(x, h_res, h_out, h_post)
    xt, rt, ot, pt = (t.double().reshape(-1, *t.shape[len(lead):]) for t in (x, h_res, h_out, h_post))
    ref = torch.zeros_like(xt)
    for t in range(xt.shape[0]):
        for j in range(n):
            ref[t, j] = pt[t, j] * ot[t] + sum(rt[t, i, j] * xt[t, i] for i in range(n))
    assert y.dtype == torch.bfloat16 and y.shape == x.shape
    _close(y, ref.reshape(x.shape), torch.bfloat16)
    y0 = tn.npu_mhc_post(x, None, h_out, h_post)
    _close(y0, x.double() + pt.reshape(*lead, n)[..., None] * ot.reshape(*lead, D)[..., None, :], torch.bfloat16)


def test_mhc_post_without_h_res_only_on_950(tn_a3, torch_gen):
    x = torch.randn(3, 4, 8, generator=torch_gen).to(torch.bfloat16)
    with pytest.raises(RuntimeError, match="950"):
        tn_a3.npu_mhc_post(x, None, torch.randn(3, 8).to(torch.bfloat16), torch.rand(3, 4))


# =================================================================================================
# MoE gate
# =================================================================================================


def _norm_ref(x, norm_type):
    x = x.double()
    if norm_type == 0:
        return torch.softmax(x, -1)
    if norm_type == 1:
        return 1 / (1 + torch.exp(-x))
    return torch.sqrt(torch.log1p(torch.exp(x)))


def _gate_ref(x, k, bias, norm_type, rsf, eps, group_count=1, k_group=1, group_select_mode=0, hash_idx=None):
    s = _norm_ref(x, norm_type)
    T, E = s.shape
    ys, idxs = [], []
    for t in range(T):
        if hash_idx is not None:
            chosen = [int(e) for e in hash_idx[t]]
        else:
            sel = [float(s[t, e]) + (float(bias[e]) if bias is not None else 0.0) for e in range(E)]
            allowed = set(range(E))
            if group_count > 1:
                gs = E // group_count
                gscore = []
                for gi in range(group_count):
                    vals = sorted(sel[gi * gs:(gi + 1) * gs], reverse=True)
                    gscore.append(vals[0] if group_select_mode == 0 else vals[0] + vals[1])
                groups = sorted(range(group_count), key=lambda gi: (-gscore[gi], gi))[:k_group]
                allowed = {e for gi in groups for e in range(gi * gs, (gi + 1) * gs)}
            chosen = sorted(allowed, key=lambda e: (-sel[e], e))[:k]
        w = [float(s[t, e]) for e in chosen]
        if norm_type in (1, 2):
            tot = sum(w) + eps
            w = [v / tot for v in w]
        ys.append([v * rsf for v in w])
        idxs.append(chosen)
    return torch.tensor(ys, dtype=torch.float64), torch.tensor(idxs), s


@pytest.mark.parametrize("norm_type", [0, 1, 2])
@pytest.mark.parametrize("with_bias", [False, True])
def test_moe_gating_top_k(tn, torch_gen, norm_type, with_bias):
    T, E, K = 9, 32, 6
    x = torch.randn(T, E, generator=torch_gen) * 2
    bias = torch.randn(E, generator=torch_gen) * 0.3 if with_bias else None
    y, idx, norm_out = tn.npu_moe_gating_top_k(x, K, bias=bias, norm_type=norm_type, out_flag=True,
                                               routed_scaling_factor=1.5, eps=1e-20)
    ry, ridx, rs = _gate_ref(x, K, bias, norm_type, 1.5, 1e-20)
    assert y.dtype == torch.float32 and idx.dtype == torch.int32 and norm_out.dtype == torch.float32
    assert torch.equal(idx.long(), ridx)
    torch.testing.assert_close(y.double(), ry, rtol=1e-5, atol=1e-6)
    # sqrt-softplus is computed literally as sqrt(ln(1 + eˣ)) in fp32 (as the kernel): 1 + eˣ loses eˣ's low
    # bits for negative x, an absolute error of ~1e-5 at x ≈ −12 against the float64 log1p reference
    torch.testing.assert_close(norm_out.double(), rs, rtol=1e-5, atol=5e-5 if norm_type == 2 else 1e-7)
    if norm_type in (1, 2):  # renormalised weights sum to the scaling factor
        torch.testing.assert_close(y.sum(-1), torch.full((T,), 1.5), rtol=1e-5, atol=0)
    _, _, undefined = tn.npu_moe_gating_top_k(x, K, bias=bias, norm_type=norm_type)
    assert undefined.shape == (T, E) and torch.isnan(undefined).all()


def test_moe_gating_top_k_bf16_and_ties(tn, torch_gen):
    x = torch.randn(5, 16, generator=torch_gen).to(torch.bfloat16)
    bias = (torch.randn(16, generator=torch_gen) * 0.1).to(torch.bfloat16)
    y, idx, _ = tn.npu_moe_gating_top_k(x, 4, bias=bias, norm_type=1)
    ry, ridx, _ = _gate_ref(x.float(), 4, bias.float(), 1, 1.0, 1e-20)
    assert y.dtype == torch.bfloat16 and torch.equal(idx.long(), ridx)
    _close(y, ry, torch.bfloat16)
    # equal scores: the lower expert index wins
    y, idx, _ = tn.npu_moe_gating_top_k(torch.zeros(2, 8), 3, norm_type=0)
    assert idx.tolist() == [[0, 1, 2], [0, 1, 2]]
    torch.testing.assert_close(y, torch.full((2, 3), 1 / 8))  # softmax: scaled, not renormalised
    with pytest.raises(TypeError):
        tn.npu_moe_gating_top_k(x, 4, bias=bias.float())


def test_moe_gating_top_k_hash_routing(tn, torch_gen):
    T, E, K, V = 7, 24, 3, 50
    x = torch.randn(T, E, generator=torch_gen)
    tid2eid = torch.stack([torch.randperm(E, generator=torch_gen)[:K] for _ in range(V)]).to(torch.int32)
    ids = torch.randint(0, V, (T,), generator=torch_gen)
    y, idx, _ = tn.npu_moe_gating_top_k(x, K, bias=torch.randn(E, generator=torch_gen), input_ids=ids,
                                        tid2eid=tid2eid, norm_type=2, routed_scaling_factor=2.5)
    ry, ridx, _ = _gate_ref(x, K, None, 2, 2.5, 1e-20, hash_idx=tid2eid[ids])
    assert torch.equal(idx.long(), ridx)
    torch.testing.assert_close(y.double(), ry, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError):
        tn.npu_moe_gating_top_k(x, K, input_ids=ids)


@pytest.mark.parametrize("mode", [0, 1])
def test_moe_gating_top_k_group_limited(tn, torch_gen, mode):
    T, E, K = 6, 32, 4
    x = torch.randn(T, E, generator=torch_gen)
    bias = torch.randn(E, generator=torch_gen) * 0.2
    y, idx, _ = tn.npu_moe_gating_top_k(x, K, bias=bias, k_group=2, group_count=8, group_select_mode=mode, norm_type=1)
    ry, ridx, _ = _gate_ref(x, K, bias, 1, 1.0, 1e-20, group_count=8, k_group=2, group_select_mode=mode)
    assert torch.equal(idx.long(), ridx)
    torch.testing.assert_close(y.double(), ry, rtol=1e-5, atol=1e-6)
    for row in idx.tolist():  # every token's experts come from at most k_group groups of 4
        assert len({e // 4 for e in row}) <= 2


def test_moe_gating_top_k_sqrt_softplus_has_no_large_x_shortcut(tn):
    x = torch.tensor([[100.0, 0.0, -1.0, 5.0]])
    _, _, s = tn.npu_moe_gating_top_k(x, 2, norm_type=2, out_flag=True)
    assert math.isinf(s[0, 0].item())  # ln(1 + e^100) overflows in fp32, as the kernel does
    torch.testing.assert_close(s[0, 1:].double(), torch.sqrt(torch.log1p(torch.exp(x[0, 1:].double()))))


# =================================================================================================
# MoE dispatch / GEMM / combine
# =================================================================================================


def _routing_ref(expert_idx, start, end):
    N, K = expert_idx.shape
    pairs = [(int(expert_idx[r, k]), r * K + k) for r in range(N) for k in range(K)
             if start <= int(expert_idx[r, k]) < end]
    pairs.sort()
    return [f for _, f in pairs], pairs


@pytest.mark.parametrize("rng", [None, (3, 9)])
@pytest.mark.parametrize("row_idx_type", [0, 1])
def test_moe_init_routing_v2(tn, torch_gen, rng, row_idx_type):
    N, K, E, H = 7, 3, 12, 5
    x = torch.randn(N, H, generator=torch_gen).to(torch.bfloat16)
    eidx = torch.randint(0, E, (N, K), generator=torch_gen, dtype=torch.int32)
    scale = torch.randn(N, generator=torch_gen)
    start, end = rng if rng else (0, E)
    kw = dict(active_expert_range=list(rng)) if rng else {}
    ex, ridx, counts, escale = tn.npu_moe_init_routing_v2(
        x, eidx, scale=scale, expert_num=E, expert_tokens_num_type=1, expert_tokens_num_flag=True,
        row_idx_type=row_idx_type, **kw)
    order, pairs = _routing_ref(eidx, start, end)
    A = len(order)
    assert ex.shape == (N * K, H) and ex.dtype == torch.bfloat16 and ridx.dtype == torch.int32
    assert counts.dtype == torch.int64 and counts.shape == (end - start,) and escale.dtype == torch.float32
    for i, f in enumerate(order):
        assert torch.equal(ex[i], x[f // K])
        assert escale[i] == scale[f // K]
    assert torch.isnan(ex[A:].float()).all()  # rows past the valid ones are undefined
    if row_idx_type == 0:
        want = [-1] * (N * K)
        for i, f in enumerate(order):
            want[f] = i
        assert ridx.tolist() == want
    else:
        assert ridx[:A].tolist() == order
    want_counts = [sum(1 for e, _ in pairs if e == ex_id) for ex_id in range(start, end)]
    assert counts.tolist() == want_counts


def test_moe_init_routing_v2_count_formats(tn, torch_gen):
    N, K, E, H = 6, 2, 10, 4
    x = torch.randn(N, H, generator=torch_gen)
    eidx = torch.tensor([[1, 4], [4, 7], [1, 2], [7, 8], [4, 1], [2, 9]], dtype=torch.int32)
    common = dict(expert_num=E, expert_tokens_num_flag=True, active_expert_range=[1, 8])
    _, _, cum, _ = tn.npu_moe_init_routing_v2(x, eidx, expert_tokens_num_type=0, **common)
    _, _, cnt, _ = tn.npu_moe_init_routing_v2(x, eidx, expert_tokens_num_type=1, **common)
    _, _, kv, _ = tn.npu_moe_init_routing_v2(x, eidx, expert_tokens_num_type=2, **common)
    assert cnt.tolist() == [3, 2, 0, 3, 0, 0, 2]          # experts 1..7
    assert cum.tolist() == [3, 5, 5, 8, 8, 8, 10]
    assert kv.shape == (E, 2)
    assert kv[:4].tolist() == [[1, 3], [2, 2], [4, 3], [7, 2]] and kv[4].tolist() == [0, 0]


def test_moe_init_routing_v2_dynamic_int8_quant(tn, torch_gen):
    N, K, E, H = 5, 2, 6, 16
    x = (torch.randn(N, H, generator=torch_gen) * 3).to(torch.bfloat16)
    eidx = torch.randint(0, E, (N, K), generator=torch_gen, dtype=torch.int32)
    smooth = torch.rand(E, H, generator=torch_gen) + 0.5
    ex, _, _, dyn = tn.npu_moe_init_routing_v2(x, eidx, scale=smooth, expert_num=E, quant_mode=1,
                                               expert_tokens_num_type=1, expert_tokens_num_flag=True)
    order, pairs = _routing_ref(eidx, 0, E)
    assert ex.dtype == torch.int8
    for i, (e, f) in enumerate(pairs):
        xs = x[f // K].double() * smooth[e].double()
        d = float(xs.abs().max()) / 127
        assert dyn[i].item() == pytest.approx(d, rel=1e-5)
        q = torch.round(xs / d)
        assert (ex[i].double() - q).abs().max() <= 1  # rounding of exact halves may differ by one
        torch.testing.assert_close(ex[i].double() * dyn[i].double(), xs, rtol=0, atol=d * 0.51)


def _gmm_ref(x, ws, bounds, bias=None):
    out = torch.full((x.shape[0], ws[0].shape[-1]), NAN, dtype=torch.float64)
    for g, (a, b) in enumerate(bounds):
        out[a:b] = x[a:b].double() @ ws[g].double() + (bias[g].double() if bias is not None else 0)
    return out


@pytest.mark.parametrize("list_type", [0, 1])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grouped_matmul_moe_form(tn, torch_gen, list_type, dtype):
    E, Kd, Nd = 4, 12, 10
    counts = [3, 0, 5, 2]
    M = sum(counts) + 2  # two trailing rows outside every group
    x = torch.randn(M, Kd, generator=torch_gen).to(dtype)
    w = torch.randn(E, Kd, Nd, generator=torch_gen).to(dtype)
    b = torch.randn(E, Nd, generator=torch_gen)
    gl = torch.tensor(counts) if list_type == 1 else torch.cumsum(torch.tensor(counts), 0)
    (y,) = tn.npu_grouped_matmul([x], [w], bias=[b], group_list=gl, split_item=2, group_type=0, group_list_type=list_type)
    ends = torch.cumsum(torch.tensor(counts), 0).tolist()
    bounds = list(zip([0] + ends[:-1], ends))
    ref = _gmm_ref(x, [w[g] for g in range(E)], bounds, [b[g] for g in range(E)])
    assert y.shape == (M, Nd) and y.dtype == dtype
    _close(y[:sum(counts)], ref[:sum(counts)], dtype, rtol=2e-2 if dtype == torch.bfloat16 else None,
           atol=5e-2 if dtype == torch.bfloat16 else None)
    assert torch.isnan(y[sum(counts):].float()).all()
    # a transposed view of [E, N, K] storage is the same logical weight
    wt = w.transpose(1, 2).contiguous().transpose(1, 2)
    (y2,) = tn.npu_grouped_matmul([x], [wt], bias=[b], group_list=gl, split_item=3, group_type=0, group_list_type=list_type)
    torch.testing.assert_close(y2[:sum(counts)], y[:sum(counts)])
    (y3,) = tn.npu_grouped_matmul([x], [w], group_list=gl, split_item=2, group_type=0, group_list_type=list_type,
                                  output_dtype=6)
    assert y3.dtype == torch.float32


def test_grouped_matmul_list_forms(tn, torch_gen):
    xs = [torch.randn(3, 8, generator=torch_gen), torch.randn(2, 5, 4, generator=torch_gen)]
    ws = [torch.randn(8, 6, generator=torch_gen), torch.randn(4, 7, generator=torch_gen)]
    bs = [torch.randn(6, generator=torch_gen), torch.randn(7, generator=torch_gen)]
    ys = tn.npu_grouped_matmul(xs, ws, bias=bs, group_type=-1)
    assert len(ys) == 2
    for x, w, b, y in zip(xs, ws, bs, ys):
        torch.testing.assert_close(y.double(), x.double() @ w.double() + b.double(), rtol=1e-5, atol=1e-5)
    # single x, weight list, List[int] cumulative group_list (the .List overload, group_type None)
    x = torch.randn(9, 8, generator=torch_gen)
    wl = [torch.randn(8, 5, generator=torch_gen) for _ in range(3)]
    (y,) = tn.npu_grouped_matmul([x], wl, group_list=[2, 2, 9], split_item=2)
    ref = _gmm_ref(x, wl, [(0, 2), (2, 2), (2, 9)])
    torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-5)
    parts = tn.npu_grouped_matmul([x], wl, group_list=[2, 2, 9], split_item=0)
    assert [p.shape[0] for p in parts] == [2, 0, 7]


def test_grouped_matmul_quantised(tn, torch_gen):
    M, Kd, Nd, E = 7, 16, 6, 2
    xq = torch.randint(-127, 128, (M, Kd), generator=torch_gen, dtype=torch.int8)
    wq = torch.randint(-127, 128, (E, Kd, Nd), generator=torch_gen, dtype=torch.int8)
    sc = torch.rand(E, Nd, generator=torch_gen) * 0.01
    pts = torch.rand(M, generator=torch_gen) * 0.02
    counts = torch.tensor([4, 3])
    (y,) = tn.npu_grouped_matmul([xq], [wq], scale=[sc], per_token_scale=[pts], group_list=counts, split_item=3,
                                 group_type=0, group_list_type=1, act_type=5, output_dtype=torch.bfloat16)
    ref = torch.empty(M, Nd, dtype=torch.float64)
    for g, (a, b) in enumerate([(0, 4), (4, 7)]):
        acc = xq[a:b].double() @ wq[g].double()
        z = acc * sc[g].double() * pts[a:b].double()[:, None]
        ref[a:b] = z / (1 + torch.exp(-z))
    assert y.dtype == torch.bfloat16
    _close(y, ref, torch.bfloat16, rtol=1e-2, atol=1e-2)
    # weight-only int8 ("antiquant"): x · ((w + offset) · scale) + bias
    xf = torch.randn(M, Kd, generator=torch_gen).to(torch.bfloat16)
    aoff = torch.randn(E, Nd, generator=torch_gen).to(torch.bfloat16)
    ascl = (torch.rand(E, Nd, generator=torch_gen) * 0.02).to(torch.bfloat16)
    (y2,) = tn.npu_grouped_matmul([xf], [wq], antiquant_scale=[ascl], antiquant_offset=[aoff], group_list=counts,
                                  split_item=2, group_type=0, group_list_type=1)
    ref2 = torch.empty(M, Nd, dtype=torch.float64)
    for g, (a, b) in enumerate([(0, 4), (4, 7)]):
        ref2[a:b] = xf[a:b].double() @ ((wq[g].double() + aoff[g].double()) * ascl[g].double())
    _close(y2, ref2, torch.bfloat16, rtol=2e-2, atol=2e-2)


def _finalize_ref(rows, skip1, skip2, bias, scales, src, experts, mode, K):
    N = src.numel() // K
    H = rows.shape[1]
    out = torch.zeros(N, H, dtype=torch.float64)
    for i in range(N):
        if skip1 is not None:
            out[i] += skip1[i].double()
        if skip2 is not None:
            out[i] += skip2[i].double()
        for k in range(K):
            pos = i + k * N if mode == 0 else i * K + k
            j = int(src[pos])
            row = rows[j].double() if j >= 0 else torch.zeros(H, dtype=torch.float64)
            if bias is not None:
                row = row + bias[int(experts[i, k])].double()
            out[i] += (float(scales[i, k]) if scales is not None else 1.0) * row
    return out


@pytest.mark.parametrize("mode", [0, 2])
@pytest.mark.parametrize("full", [False, True])
def test_moe_finalize_routing(tn, torch_gen, mode, full):
    N, K, E, H = 6, 3, 5, 8
    rows = torch.randn(N * K, H, generator=torch_gen)
    src = torch.randperm(N * K, generator=torch_gen).to(torch.int32)
    src[2] = -1  # an invalid (dropped) pair contributes nothing but its bias
    experts = torch.randint(0, E, (N, K), generator=torch_gen, dtype=torch.int32)
    skip1 = torch.randn(N, H, generator=torch_gen) if full else None
    skip2 = torch.randn(N, H, generator=torch_gen) if full else None
    bias = torch.randn(E, H, generator=torch_gen) if full else None
    scales = torch.randn(N, K, generator=torch_gen) if full else None
    out = tn.npu_moe_finalize_routing(rows, skip1, skip2, bias, scales, src, experts if full else None,
                                      drop_pad_mode=mode, k=K)
    ref = _finalize_ref(rows, skip1, skip2, bias, scales, src, experts, mode, K)
    assert out.shape == (N, H) and out.dtype == torch.float32
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_moe_pipeline_composes_to_dense_expert_mlp(tn, torch_gen, dtype):
    """gate → init_routing_v2 → grouped_matmul → swiglu → grouped_matmul → finalize == Σ_k w_k · expert_k(x)."""
    T, E, K, H, I = 11, 8, 3, 16, 12
    x = torch.randn(T, H, generator=torch_gen).to(dtype)
    logits = torch.randn(T, E, generator=torch_gen)
    w13 = (torch.randn(E, H, 2 * I, generator=torch_gen) * 0.3).to(dtype)
    w2 = (torch.randn(E, I, H, generator=torch_gen) * 0.3).to(dtype)
    shared = torch.randn(T, H, generator=torch_gen).to(dtype)
    weights, idx, _ = tn.npu_moe_gating_top_k(logits, K, bias=torch.randn(E, generator=torch_gen) * 0.1, norm_type=2,
                                              routed_scaling_factor=1.5)

    def dense(lo, hi):
        out = shared.double().clone()
        for t in range(T):
            for k in range(K):
                e = int(idx[t, k])
                if not lo <= e < hi:
                    continue
                h = x[t].double() @ w13[e].double()
                a, b = h[:I], h[I:]
                out[t] += float(weights[t, k]) * ((a / (1 + torch.exp(-a)) * b) @ w2[e].double())
        return out

    for lo, hi in [(0, E), (2, 6)]:  # all experts, then an expert-parallel rank's slice
        ex, ridx, counts, _ = tn.npu_moe_init_routing_v2(
            x, idx, active_num=T * K, expert_num=E, expert_tokens_num_type=1, expert_tokens_num_flag=True,
            active_expert_range=[lo, hi], row_idx_type=0)
        wl13 = w13[lo:hi]
        (h,) = tn.npu_grouped_matmul([ex], [wl13], group_list=counts, split_item=2, group_type=0, group_list_type=1)
        h = tn.npu_swiglu(h, dim=-1)
        (o,) = tn.npu_grouped_matmul([h], [w2[lo:hi]], group_list=counts, split_item=2, group_type=0, group_list_type=1)
        out = tn.npu_moe_finalize_routing(o, shared, None, None, weights.to(dtype), ridx, None, drop_pad_mode=2)
        tol = (1e-4, 1e-4) if dtype == torch.float32 else (3e-2, 6e-2)
        torch.testing.assert_close(out.double(), dense(lo, hi), rtol=tol[0], atol=tol[1])
        # the same combine through the k-major index of drop_pad_mode 0
        kmajor = ridx.reshape(T, K).t().reshape(-1).contiguous()
        out0 = tn.npu_moe_finalize_routing(o, shared, None, None, weights.to(dtype), kmajor, None, drop_pad_mode=0)
        torch.testing.assert_close(out0, out)


# =================================================================================================
# lightning indexer
# =================================================================================================


def _indexer_ref(q, k, w, q_lens, k_lens, sparse_count, sparse_mode):
    """BSND float64 reference: per batch, query, kv head: scores, mask, order (score desc, index asc)."""
    B, S1, N1, D = q.shape
    N2 = k.shape[2]
    G = N1 // N2
    idx = torch.full((B, S1, N2, sparse_count), -1, dtype=torch.int64)
    val = torch.full((B, S1, N2, sparse_count), float("-inf"), dtype=torch.float64)
    for b in range(B):
        L, S1b = k_lens[b], q_lens[b]
        for i in range(S1b):
            for n in range(N2):
                scores = {}
                for s in range(L):
                    if sparse_mode == 3 and s > (L - S1b) + i:
                        continue
                    tot = 0.0
                    for gi in range(G):
                        h = n * G + gi
                        tot += float(w[b, i, h]) * max(0.0, float(q[b, i, h].double() @ k[b, s, n].double()))
                    scores[s] = tot
                chosen = sorted(scores, key=lambda s: (-scores[s], s))[:sparse_count]
                for j, s in enumerate(chosen):
                    idx[b, i, n, j] = s
                    val[b, i, n, j] = scores[s]
    return idx, val


def _indexer_inputs(gen, B, S1, S2, N1, N2, D, integer):
    if integer:  # small integers: every score is exact in fp32, so the order (and ties) must match exactly
        q = torch.randint(-2, 3, (B, S1, N1, D), generator=gen).to(torch.bfloat16)
        k = torch.randint(-2, 3, (B, S2, N2, D), generator=gen).to(torch.bfloat16)
        w = torch.randint(-1, 3, (B, S1, N1), generator=gen).to(torch.bfloat16)
    else:
        q = torch.randn(B, S1, N1, D, generator=gen).to(torch.bfloat16)
        k = torch.randn(B, S2, N2, D, generator=gen).to(torch.bfloat16)
        w = torch.randn(B, S1, N1, generator=gen).to(torch.bfloat16)
    return q, k, w


@pytest.mark.parametrize("sparse_mode", [0, 3])
@pytest.mark.parametrize("n2", [1, 2])
def test_lightning_indexer_exact_order_and_ties(tn, torch_gen, sparse_mode, n2):
    B, S1, S2, N1, D, SC = 2, 4, 9, 4, 8, 6
    q, k, w = _indexer_inputs(torch_gen, B, S1, S2, N1, n2, D, integer=True)
    q_lens, k_lens = [4, 3], [9, 5]
    idx, val = tn.npu_lightning_indexer(q, k, w, actual_seq_lengths_query=torch.tensor(q_lens, dtype=torch.int32),
                                        actual_seq_lengths_key=torch.tensor(k_lens, dtype=torch.int32),
                                        sparse_count=SC, sparse_mode=sparse_mode, return_value=True)
    ridx, rval = _indexer_ref(q, k, w, q_lens, k_lens, SC, sparse_mode)
    assert idx.dtype == torch.int32 and idx.shape == (B, S1, n2, SC) and val.dtype == torch.bfloat16
    assert torch.equal(idx.long(), ridx)
    _close(val.float().nan_to_num(neginf=-1e30), rval.nan_to_num(neginf=-1e30), torch.bfloat16)


def test_lightning_indexer_random_scores_and_key_limits(tn, torch_gen):
    B, S1, S2, N1, D, SC = 3, 5, 12, 8, 16, 7
    q, k, w = _indexer_inputs(torch_gen, B, S1, S2, N1, 1, D, integer=False)
    k_lens = torch.randint(1, S2 + 1, (B,), generator=torch_gen).tolist()
    q_lens = [S1] * B
    idx, val = tn.npu_lightning_indexer(q, k, w, actual_seq_lengths_key=torch.tensor(k_lens, dtype=torch.int32),
                                        sparse_count=SC, sparse_mode=3, return_value=True)
    ridx, _ = _indexer_ref(q, k, w, q_lens, k_lens, SC, 3)
    full = (torch.relu(torch.einsum("bihd,bsd->bihs", q.double(), k[:, :, 0].double())) * w.double()[..., None]).sum(2)
    for b in range(B):
        for i in range(S1):
            got = [s for s in idx[b, i, 0].tolist() if s >= 0]
            want = [s for s in ridx[b, i, 0].tolist() if s >= 0]
            assert len(got) == len(want) and idx[b, i, 0, len(got):].eq(-1).all()
            # never a key past the batch's length, nor past the right-down causal limit
            assert len(set(got)) == len(got) and all(s < k_lens[b] and s <= k_lens[b] - S1 + i for s in got)
            # a top-k in descending order of the float64 scores, up to fp32 near-ties
            sc = full[b, i].tolist()
            assert all(sc[a] >= sc[c] - 1e-3 for a, c in zip(got, got[1:]))
            rest = [sc[s] for s in range(k_lens[b]) if s <= k_lens[b] - S1 + i and s not in got]
            assert not rest or min(sc[s] for s in got) >= max(rest) - 1e-3
            torch.testing.assert_close(val[b, i, 0, :len(got)].double(), torch.tensor([sc[s] for s in got]).double(),
                                       rtol=1e-2, atol=2e-2)


def test_lightning_indexer_layouts_agree(tn, torch_gen):
    """TND and paged (PA_BSND) keys give the BSND result for the valid rows."""
    B, S1, S2, N1, D, SC, BS = 2, 3, 8, 4, 16, 5, 4
    q, k, w = _indexer_inputs(torch_gen, B, S1, S2, N1, 1, D, integer=True)
    q_lens, k_lens = [3, 2], [8, 6]
    ql, kl = torch.tensor(q_lens, dtype=torch.int32), torch.tensor(k_lens, dtype=torch.int32)
    ref, _ = tn.npu_lightning_indexer(q, k, w, actual_seq_lengths_query=ql, actual_seq_lengths_key=kl, sparse_count=SC)
    assert (ref[1, 2] == -1).all()  # a padded query row
    qt = torch.cat([q[b, :q_lens[b]] for b in range(B)])
    wt = torch.cat([w[b, :q_lens[b]] for b in range(B)])
    kt = torch.cat([k[b, :k_lens[b]] for b in range(B)])
    got, _ = tn.npu_lightning_indexer(qt, kt, wt, actual_seq_lengths_query=torch.cumsum(ql, 0).int(),
                                      actual_seq_lengths_key=torch.cumsum(kl, 0).int(), layout_query="TND",
                                      layout_key="TND", sparse_count=SC)
    assert torch.equal(got, torch.cat([ref[b, :q_lens[b]] for b in range(B)]))
    # paged keys: blocks of BS tokens scattered through a pool in a random order
    nblk = S2 // BS
    perm = torch.randperm(B * nblk, generator=torch_gen)
    pool = torch.zeros(B * nblk, BS, 1, D, dtype=k.dtype)
    table = perm.reshape(B, nblk).int()
    for b in range(B):
        for j in range(nblk):
            pool[table[b, j]] = k[b, j * BS:(j + 1) * BS]
    got_pa, _ = tn.npu_lightning_indexer(q, pool, w, actual_seq_lengths_query=ql, actual_seq_lengths_key=kl,
                                         block_table=table, layout_key="PA_BSND", sparse_count=SC)
    assert torch.equal(got_pa, ref)


# =================================================================================================
# sparse flash attention
# =================================================================================================


def _sfa_ref(q, k, v, idx, scale, q_lens, k_lens, mode, qr=None, kr=None, sinks=None, block=1):
    B, S1, N1, D = q.shape
    KVN = k.shape[2]
    G = N1 // KVN
    out = torch.zeros(B, S1, N1, v.shape[-1], dtype=torch.float64)
    mx = torch.full((B, S1, N1), float("-inf"), dtype=torch.float64)
    sm = torch.zeros(B, S1, N1, dtype=torch.float64)
    for b in range(B):
        L, S1b = k_lens[b], q_lens[b]
        for i in range(S1b):
            for h in range(N1):
                n = h // G
                toks = []
                for j in idx[b, i, n].tolist():
                    if j < 0:
                        break  # valid entries first: everything after the first −1 is padding
                    for t in range(j * block, j * block + block):
                        if t < L and (mode == 0 or t <= L - S1b + i):
                            toks.append(t)
                if not toks:
                    continue
                logits = []
                for t in toks:
                    l_ = float(q[b, i, h].double() @ k[b, t, n].double())
                    if qr is not None:
                        l_ += float(qr[b, i, h].double() @ kr[b, t, n].double())
                    logits.append(l_ * scale)
                m = max(logits)
                p = [math.exp(l_ - m) for l_ in logits]
                den = sum(p) + (math.exp(float(sinks[h]) - m) if sinks is not None else 0.0)
                out[b, i, h] = sum(pi * v[b, t, n].double() for pi, t in zip(p, toks)) / den
                mx[b, i, h], sm[b, i, h] = m, den
    return out, mx, sm


def _sfa_inputs(gen, B, S1, S2, N1, KVN, D, K, Dr=0):
    q = torch.randn(B, S1, N1, D, generator=gen).to(torch.bfloat16)
    k = torch.randn(B, S2, KVN, D, generator=gen).to(torch.bfloat16)
    v = torch.randn(B, S2, KVN, D, generator=gen).to(torch.bfloat16)
    idx = torch.randint(0, S2, (B, S1, KVN, K), generator=gen, dtype=torch.int32)
    qr = torch.randn(B, S1, N1, Dr, generator=gen).to(torch.bfloat16) if Dr else None
    kr = torch.randn(B, S2, KVN, Dr, generator=gen).to(torch.bfloat16) if Dr else None
    return q, k, v, idx, qr, kr


@pytest.mark.parametrize("mode", [0, 3])
@pytest.mark.parametrize("kvn,rope,with_sinks", [(1, 0, True), (2, 8, False), (1, 8, True)])
def test_sparse_flash_attention(tn, torch_gen, mode, kvn, rope, with_sinks):
    B, S1, S2, N1, D, K = 2, 4, 11, 4, 16, 6
    q, k, v, idx, qr, kr = _sfa_inputs(torch_gen, B, S1, S2, N1, kvn, D, K, rope)
    idx[0, 1, :, 4:] = -1       # padding after the valid entries
    idx[1, 0, :, 2] = -1        # everything after the first −1 is ignored, even valid-looking indices
    idx[0, 2, :, 0] = S2 - 1    # past the causal limit in mode 3 for short queries
    q_lens, k_lens = [4, 3], [11, 7]
    sinks = torch.randn(N1, generator=torch_gen) if with_sinks else None
    scale = D ** -0.5
    out, smax, ssum = tn.npu_sparse_flash_attention(
        q, k, v, idx, scale, actual_seq_lengths_query=torch.tensor(q_lens, dtype=torch.int32),
        actual_seq_lengths_kv=torch.tensor(k_lens, dtype=torch.int32), query_rope=qr, key_rope=kr,
        sparse_mode=mode, return_softmax_lse=True, sinks=sinks)
    ro, rm, rs = _sfa_ref(q, k, v, idx, scale, q_lens, k_lens, mode, qr, kr, sinks)
    assert out.shape == q.shape and out.dtype == torch.bfloat16
    _close(out, ro, torch.bfloat16)
    G = N1 // kvn
    assert smax.shape == (B, kvn, S1, G) and ssum.shape == (B, kvn, S1, G)
    to_bnsg = lambda t: t.reshape(B, S1, kvn, G).permute(0, 2, 1, 3)  # noqa: E731
    torch.testing.assert_close(smax.double().nan_to_num(neginf=-1e30), to_bnsg(rm).nan_to_num(neginf=-1e30),
                               rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(ssum.double(), to_bnsg(rs), rtol=1e-4, atol=1e-4)
    assert (out[1, 3] == 0).all()  # a padded query row


def test_sparse_flash_attention_sink_equals_lse_rescale(tn, torch_gen):
    """With sinks: out = out_no_sink · exp(lse) / (exp(lse) + exp(sink)), lse from the sink-free call."""
    B, S1, S2, N1, D, K = 1, 3, 9, 4, 16, 5
    q, k, v, idx, _, _ = _sfa_inputs(torch_gen, B, S1, S2, N1, 1, D, K)
    sinks = torch.randn(N1, generator=torch_gen)
    o0, m0, s0 = tn.npu_sparse_flash_attention(q, k, v, idx, 0.3, sparse_mode=0, return_softmax_lse=True)
    o1, _, _ = tn.npu_sparse_flash_attention(q, k, v, idx, 0.3, sparse_mode=0, sinks=sinks)
    lse = (m0 + s0.log()).permute(0, 2, 1, 3).reshape(B, S1, N1)                # [B, S1, N1]
    factor = torch.exp(lse) / (torch.exp(lse) + torch.exp(sinks))
    _close(o1, o0.double() * factor.double()[..., None], torch.bfloat16)


def test_sparse_flash_attention_layouts_blocks_and_value_none(tn, tn_a3, torch_gen):
    B, S1, S2, N1, D, K, BS = 2, 3, 8, 4, 16, 4, 4
    q, k, v, idx, _, _ = _sfa_inputs(torch_gen, B, S1, S2, N1, 1, D, K)
    q_lens, k_lens = [3, 2], [8, 6]
    ql, kl = torch.tensor(q_lens, dtype=torch.int32), torch.tensor(k_lens, dtype=torch.int32)
    ref, _, _ = tn.npu_sparse_flash_attention(q, k, v, idx, 0.25, actual_seq_lengths_query=ql,
                                              actual_seq_lengths_kv=kl, sparse_mode=3)
    cat = lambda t, lens: torch.cat([t[b, :lens[b]] for b in range(B)])  # noqa: E731
    got, _, _ = tn.npu_sparse_flash_attention(
        cat(q, q_lens), cat(k, k_lens), cat(v, k_lens), cat(idx, q_lens), 0.25,
        actual_seq_lengths_query=torch.cumsum(ql, 0).int(), actual_seq_lengths_kv=torch.cumsum(kl, 0).int(),
        layout_query="TND", layout_kv="TND", sparse_mode=3)
    torch.testing.assert_close(got, cat(ref, q_lens))
    nblk = S2 // BS
    table = torch.randperm(B * nblk, generator=torch_gen).reshape(B, nblk).int()
    kp = torch.zeros(B * nblk, BS, 1, D, dtype=k.dtype)
    vp = torch.zeros_like(kp)
    for b in range(B):
        for j in range(nblk):
            kp[table[b, j]], vp[table[b, j]] = k[b, j * BS:(j + 1) * BS], v[b, j * BS:(j + 1) * BS]
    got_pa, _, _ = tn.npu_sparse_flash_attention(q, kp, vp, idx, 0.25, block_table=table, actual_seq_lengths_query=ql,
                                                 actual_seq_lengths_kv=kl, layout_kv="PA_BSND", sparse_mode=3)
    torch.testing.assert_close(got_pa, ref)
    # sparse_block_size 2: index j names tokens 2j, 2j + 1
    bidx = torch.randint(0, S2 // 2, (B, S1, 1, 3), generator=torch_gen, dtype=torch.int32)
    ob, _, _ = tn.npu_sparse_flash_attention(q, k, v, bidx, 0.25, actual_seq_lengths_query=ql,
                                             actual_seq_lengths_kv=kl, sparse_block_size=2, sparse_mode=3)
    rb, _, _ = _sfa_ref(q, k, v, bidx, 0.25, q_lens, k_lens, 3, block=2)
    _close(ob, rb, torch.bfloat16)
    # value=None means V = K; the meta function allows it only from CANN 9.2.0
    on, _, _ = tn.npu_sparse_flash_attention(q, k, None, idx, 0.25, sparse_mode=0)
    ok_, _, _ = tn.npu_sparse_flash_attention(q, k, k, idx, 0.25, sparse_mode=0)
    torch.testing.assert_close(on, ok_)
    with pytest.raises(RuntimeError, match="9.2.0"):
        tn_a3.npu_sparse_flash_attention(q, k, None, idx, 0.25, sparse_mode=0)
