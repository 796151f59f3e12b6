"""The contract harness itself: Huawei's meta functions from the torch-npu wheels load, really run
their checks on ``device="meta"`` tensors, and can be switched per chip / CANN version.

Every test that needs a wheel gets it through the ``npu_meta`` fixture (parametrised over
``harness.VERSIONS``) and is skipped, with the reason, when the wheel is neither cached nor
downloadable.
"""

from __future__ import annotations

import importlib.util
import sys

import pytest
import torch

from .harness import (
    FAMILY_SOC,
    NPU_DTYPES,
    VERSIONS,
    available_ops,
    cann_version_gte,
    family_of_soc,
    is_standin,
    make_torch_npu_standin,
    meta_for,
    namespace_for,
    npu_meta,  # noqa: F401  (pytest fixture, parametrised over VERSIONS)
    ops_without_meta,
    signature_mismatches,
    skipped_registrations,
    standin_installed,
)

pytestmark = pytest.mark.npu_contract

# the torch-npu ops the V4 NPU path uses (ascend_npu.md §1, §5)
V4_OPS = (
    "npu_mhc_pre", "npu_mhc_sinkhorn", "npu_mhc_post", "npu_moe_gating_top_k", "npu_moe_init_routing_v2",
    "npu_grouped_matmul", "npu_grouped_matmul.List", "npu_moe_finalize_routing", "npu_sparse_flash_attention",
    "npu_lightning_indexer", "npu_rms_norm", "npu_rotary_mul", "npu_swiglu",
)


def mt(*shape, dtype=torch.float32):
    return torch.empty(shape, dtype=dtype, device="meta")


def both_metas():
    return [meta_for(v) for v in VERSIONS]


# ------------------------------------------------------------------------------ loading
def test_schemas_parsed(npu_meta):
    npu_names = [k for k in npu_meta.schemas if k.startswith("npu_")]
    assert len(npu_names) > 100
    assert len(npu_meta.defined) > 100
    # overloads are kept apart from the default overload
    assert "npu_grouped_matmul.List" in npu_meta.schemas
    assert "int[]? group_list" in npu_meta.schemas["npu_grouped_matmul.List"]
    assert "Tensor? group_list" in npu_meta.schemas["npu_grouped_matmul"]
    for op in V4_OPS:
        assert op in npu_meta.defined, op
    # the only schemas torch rejects name torch_npu's C++ process-group class (not registered on CPU)
    for name, why in npu_meta.define_failures.items():
        assert name.startswith("wrap_") and "custom class" in why, (name, why)


def test_meta_loaded(npu_meta):
    ops = available_ops(npu_meta)
    assert len(ops) > 200
    for op in V4_OPS:
        assert op in ops, f"{op} has no meta function in torch-npu {npu_meta.version}"
    # only the two aten overrides are held back (they would change torch's own Meta kernels)
    assert set(skipped_registrations(npu_meta)) == {"aten::matmul_backward", "aten::_convolution"}
    assert npu_meta.toplevel_failures == {}
    assert ops_without_meta(npu_meta)  # plenty of ops have a schema but no meta function
    assert npu_meta.namespace == namespace_for(npu_meta.version)
    assert npu_meta.load_seconds < 30


def test_nothing_leaks_into_sys_modules_or_npu_namespace():
    metas = both_metas()
    assert not any(is_standin(m) for k, m in list(sys.modules.items()) if k.split(".")[0] == "torch_npu")
    real = sys.modules.get("torch_npu")
    spec = real.__spec__ if real is not None else importlib.util.find_spec("torch_npu")
    assert spec is None or spec.origin != "ascend-v4 npu_contract stand-in"
    if "torch_npu" not in sys.modules:  # a real torch_npu would own torch.ops.npu; we never touch it
        with pytest.raises(AttributeError):
            torch.ops.npu.npu_mhc_sinkhorn
    # torch's own aten Meta kernels are untouched: _convolution still goes through torch's meta path
    y = torch.nn.functional.conv2d(mt(1, 3, 8, 8), mt(4, 3, 3, 3))
    assert y.shape == (1, 4, 6, 6)
    assert len({m.namespace for m in metas}) == len(metas)


def test_v4_meta_functions_accept_their_schema(npu_meta):
    bad = signature_mismatches(npu_meta)
    assert not {op: why for op, why in bad.items() if op in V4_OPS}
    # known wheel bugs elsewhere (calls passing these keywords fail inside Huawei's meta function)
    assert set(bad) <= {"npu_deformable_conv2d", "npu_grouped_matmul_add", "npu_moe_distribute_combine",
                        "npu_rms_norm_quant_v2", "obfuscation_calculate"}
    # and the check is real: the dispatcher leaves defaulted keyword-only arguments out
    if "npu_rms_norm_quant_v2" in bad:
        with pytest.raises(TypeError, match="missing 2 required positional arguments: 'offset' and 'beta'"):
            npu_meta.ops.npu_rms_norm_quant_v2(mt(2, 8), mt(8), mt(8))


def test_versions_live_side_by_side():
    m13, m14 = both_metas()
    assert (m13.namespace, m14.namespace) == ("npu_2_13_0", "npu_2_14_0")
    x = mt(6, 4, 4)
    assert m13.ops.npu_mhc_sinkhorn(x)[0].shape == m14.ops.npu_mhc_sinkhorn(x)[0].shape == (6, 4, 4)
    with m13.chip("950"):
        assert m13.family == "950" and m14.family != "950"  # chip state is per version


def test_v4_ops_identical_in_213_and_214():
    m13, m14 = both_metas()
    for op in V4_OPS:
        assert m13.schemas[op] == m14.schemas[op], op
        assert m13.meta_function_source(op) == m14.meta_function_source(op), op


# --------------------------------------------------------------- Huawei's checks really run
def test_mhc_sinkhorn(npu_meta):
    y, norm, sums = npu_meta.ops.npu_mhc_sinkhorn(mt(9, 4, 4))
    assert y.shape == (9, 4, 4) and y.dtype == torch.float32
    assert norm is None and sums is None  # out_flag=0: no saved tensors
    with pytest.raises(RuntimeError, match="should be 4 or 6 or 8, but got 5"):
        npu_meta.ops.npu_mhc_sinkhorn(mt(9, 5, 5))
    with pytest.raises(RuntimeError, match=r"num_iters must be within \(0, 100\]"):
        npu_meta.ops.npu_mhc_sinkhorn(mt(9, 4, 4), num_iters=101)


def test_moe_gating_top_k(npu_meta):
    t, e, k, vocab = 5, 16, 4, 100
    x = mt(t, e)
    y, idx, out = npu_meta.ops.npu_moe_gating_top_k(x, k, bias=mt(e), norm_type=2, renorm=0)
    assert (y.shape, y.dtype) == ((t, k), torch.float32)
    assert (idx.shape, idx.dtype) == ((t, k), torch.int32)
    assert (out.shape, out.dtype) == ((t, e), torch.float32)
    ids = mt(t, dtype=torch.int64)
    npu_meta.ops.npu_moe_gating_top_k(x, k, input_ids=ids, tid2eid=mt(vocab, k, dtype=torch.int32))
    with pytest.raises(RuntimeError, match="tid2eid second dim should be same as k"):
        npu_meta.ops.npu_moe_gating_top_k(x, k, input_ids=ids, tid2eid=mt(vocab, k + 1, dtype=torch.int32))
    with pytest.raises(RuntimeError, match="both provided or both omitted"):
        npu_meta.ops.npu_moe_gating_top_k(x, k, input_ids=ids)


def test_rms_norm(npu_meta):
    y, rstd = npu_meta.ops.npu_rms_norm(mt(7, 64, dtype=torch.bfloat16), mt(64, dtype=torch.bfloat16), epsilon=1e-6)
    assert (y.shape, y.dtype) == ((7, 64), torch.bfloat16)
    assert (rstd.shape, rstd.dtype) == ((7, 1), torch.float32)
    # per-head RMS: gamma over the last dim only -> one rstd per (b, s, h)
    y, rstd = npu_meta.ops.npu_rms_norm(mt(2, 3, 8, 128), mt(128))
    assert y.shape == (2, 3, 8, 128) and rstd.shape == (2, 3, 8, 1)


# ------------------------------------------------------------ per-chip / per-CANN branches
def _mla_prolog_args(t=4, hidden=64, heads=2, d_nope=16, d_rope=8, d_kv=32):
    return (mt(t, hidden), mt(hidden, 24), mt(24, heads * (d_nope + d_rope)), mt(heads, d_nope, d_kv),
            mt(hidden, d_kv + d_rope), mt(24), mt(d_kv), mt(t, d_rope), mt(t, d_rope),
            mt(t, dtype=torch.int64), mt(16, 8, 1, d_kv), mt(16, 8, 1, d_rope))


@pytest.mark.parametrize("family", ["A2", "A3", "950", "310P"])
def test_chip_branch_mla_prolog(npu_meta, family):
    # npu_mla_prolog's meta function checks get_soc_version() < 260 at call time: A2/A3/310P pass, 950 is refused
    assert "npu_mla_prolog" in npu_meta.soc_readers
    with npu_meta.chip(family):
        assert npu_meta.family == family and family_of_soc(FAMILY_SOC[family]) == family
        if family == "950":
            with pytest.raises(RuntimeError, match="not support on this soc version"):
                npu_meta.ops.npu_mla_prolog(*_mla_prolog_args())
        else:
            q, q_rope, kv, kr = npu_meta.ops.npu_mla_prolog(*_mla_prolog_args())
            assert q.shape == (4, 2, 32) and q_rope.shape == (4, 2, 8)


def test_chip_branch_changes_output_shape(npu_meta):
    # npu_moe_distribute_dispatch_v2: with expert_scales, ep_recv_counts is longer before the 950
    def recv_counts():
        out = npu_meta.ops.npu_moe_distribute_dispatch_v2(
            mt(8, 64, dtype=torch.bfloat16), mt(8, 2, dtype=torch.int32), "ep", 8, 3, 16,
            expert_scales=mt(8, 2))
        return out[4].shape[0]

    with npu_meta.chip("A3"):
        a3 = recv_counts()
    with npu_meta.chip("950"):
        a5 = recv_counts()
    assert a5 == 8 * 2  # ep_world_size * local experts
    assert a3 == 8 * 2 + (8 * 8) * 2 * 2 * (8 // 8)  # + global_bs * 2 * k * (ep_world_size // 8)


def test_cann_branch_sparse_flash_attention(npu_meta):
    q, kv, idx = mt(1, 4, 8, 64, dtype=torch.bfloat16), mt(1, 32, 1, 64, dtype=torch.bfloat16), \
        mt(1, 4, 1, 16, dtype=torch.int32)
    out, *_ = npu_meta.ops.npu_sparse_flash_attention(q, kv, kv, idx, 0.125)
    assert out.shape == (1, 4, 8, 64)
    with npu_meta.cann("9.1.0"):
        with pytest.raises(RuntimeError, match=r"value=None is only supported with CANN >= 9.2.0"):
            npu_meta.ops.npu_sparse_flash_attention(q, kv, None, idx, 0.125)
    with npu_meta.cann("9.2.0"):
        assert npu_meta.ops.npu_sparse_flash_attention(q, kv, None, idx, 0.125)[0].shape == (1, 4, 8, 64)


def test_soc_and_cann_are_read_at_call_time_only(npu_meta):
    assert npu_meta.import_time_readers == []
    assert set(npu_meta.soc_readers) == {
        "npu_mla_prolog", "npu_mla_prolog_v2", "npu_mla_prolog_v3", "npu_mla_prolog_v3_functional",
        "npu_moe_distribute_dispatch_v2", "npu_fusion_attention"}
    assert set(npu_meta.cann_readers) == {
        "npu_sparse_flash_attention", "npu_sparse_flash_attention_grad", "npu_mla_prolog_v3",
        "npu_mla_prolog_v3_functional", "npu_transpose_batchmatmul"}
    assert not set(npu_meta.soc_readers) & {op.split(".")[0] for op in V4_OPS}  # V4 ops: chip-independent


# ------------------------------------------------------------------------ torch_npu stand-in
def test_torch_npu_standin(npu_meta):
    tnpu = make_torch_npu_standin(npu_meta)
    assert tnpu.__name__ == "torch_npu" and tnpu.__spec__.name == "torch_npu"
    assert "torch_npu" not in sys.modules or not is_standin(sys.modules["torch_npu"])
    for name, value in NPU_DTYPES.items():
        assert getattr(tnpu, name) == value
    with standin_installed(tnpu):
        assert importlib.util.find_spec("torch_npu") is tnpu.__spec__
        assert importlib.util.find_spec("torch_npu.npu.utils") is not None
        import torch_npu  # noqa: PLC0415

        assert torch_npu is tnpu
        y, rstd = torch_npu.npu_rms_norm(mt(3, 32), mt(32), epsilon=1e-5)  # keyword args forwarded
        assert y.shape == (3, 32) and rstd.shape == (3, 1)
        y, idx, _ = torch_npu.npu_moe_gating_top_k(mt(3, 8), k=2, norm_type=1)
        assert idx.shape == (3, 2)
        with npu_meta.chip("950"):
            assert torch_npu.npu.utils.get_soc_version() == 260
            assert torch_npu.npu._backends.get_soc_version() == 260
        with npu_meta.chip("A2"):
            assert torch_npu.npu.utils.get_soc_version() in range(220, 226)
        assert torch_npu.npu.utils.get_cann_version() == npu_meta.cann_version
        assert torch_npu.npu.is_available() is False
    assert "torch_npu" not in sys.modules or not is_standin(sys.modules["torch_npu"])
    assert not any(is_standin(m) for k, m in list(sys.modules.items()) if k.split(".")[0] == "torch_npu")


# ------------------------------------------------------------------------------- no wheel needed
def test_cann_version_ordering():
    assert cann_version_gte("9.2.0", "9.2.0")
    assert cann_version_gte("10.0.0", "9.2.0")  # numeric, unlike the meta file's string compare
    assert cann_version_gte("8.5.0", "8.5.0.alpha003")
    assert not cann_version_gte("8.5.0.alpha002", "8.5.0.alpha003")
    assert not cann_version_gte("8.3.RC1", "8.5.0")
    assert not cann_version_gte("9.1.0", "9.2.0")
