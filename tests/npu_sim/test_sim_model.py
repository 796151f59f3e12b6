"""The whole model through the NPU code path on CPU, with simulated torch-npu ops (not hardware).

``registry.simulate_device("npu")`` makes dispatch treat CPU tensors as NPU tensors, the simulated
``torch_npu`` (``tests/npu_sim``, written from the op docs) computes each torch-npu op, and
``use_chip`` picks the chip family whose capability table applies.  Two checks:

* fp32, tiny preset (the issue's criterion): logits through the NPU path equal the reference path
  within 1e-4 — the fp32-capable adapters (rms_norm, rotary, sinkhorn, MoE gate and experts) run.
* bf16, a small config inside the attention kernels' limits (head dim 512, index head dim 128), so
  every adapter runs: the NPU path's error against a float64 run must be of the order of the
  reference path's own bf16 error (the golden-reference rule of ascend_npu.md §6.2).
"""

from __future__ import annotations

import pytest
import torch

import op_adapters
from ascend_v4.config import ModelConfig
from ascend_v4.model import V4Model
from op_adapters import registry
from op_adapters.npu.chips import use_chip

from . import simulated_torch_npu

FP32_TOL = 1e-4  # issue 4: simulated NPU path vs reference, fp32 logits


def npu_path(model, ids, chip, **kw):
    with simulated_torch_npu(soc_version=chip), use_chip(chip), registry.simulate_device("npu"), \
            op_adapters.use_backend("npu"):
        registry.reset_last_backends()
        out = model(ids, **kw)
        used = {op for op, backend in registry.last_backends().items() if backend == "npu"}
    return out, used


@pytest.fixture(scope="module")
def seed():
    return int(torch.randint(0, 2**31 - 1, ()).item())


@pytest.mark.parametrize("chip, expected", [
    ("A3", {"rms_norm", "apply_rope", "moe_gate", "moe_experts"}),
    ("950", {"rms_norm", "moe_gate"}),  # mHC takes bf16 streams only; rotary and experts are A2/A3 ops
])
def test_tiny_fp32_npu_path_matches_reference(chip, expected, seed):
    model = V4Model(ModelConfig.preset("tiny")).init_random(seed).eval()
    ids = torch.randint(0, 512, (1, 300), generator=torch.Generator().manual_seed(seed))
    ref = model(ids)
    got, used = npu_path(model, ids, chip)
    assert expected <= used, f"expected the NPU adapters {expected - used} to run on {chip}"
    err = (got - ref).abs().max().item()
    assert err <= FP32_TOL, f"seed {seed}: simulated {chip} path differs from the reference by {err}"


def test_tiny_fp32_npu_path_prefill_then_decode(seed):
    model = V4Model(ModelConfig.preset("tiny")).init_random(seed).eval()
    ids = torch.randint(0, 512, (2, 140), generator=torch.Generator().manual_seed(seed))
    ref = model(ids)
    cache = model.new_cache(2, 140)
    first, _ = npu_path(model, ids[:, :130], "A3", cache=cache)
    steps = [npu_path(model, ids[:, j:j + 1], "A3", cache=cache)[0] for j in range(130, 140)]
    err = (torch.cat([first] + steps, 1) - ref).abs().max().item()
    assert err <= FP32_TOL, f"seed {seed}: {err}"


def npu_shaped_config() -> ModelConfig:
    """Small, but with V4's per-head dims so the attention kernels' limits are met."""
    return ModelConfig.preset("tiny").replace(
        name="tiny-npu", hidden_size=128, num_attention_heads=4, head_dim=512, qk_rope_head_dim=64,
        q_lora_rank=64, o_groups=2, o_lora_rank=32, index_n_heads=8, index_head_dim=128, index_topk=16,
        sliding_window=32, moe_intermediate_size=64)


@pytest.mark.parametrize("chip", ["A3", "950"])
def test_bf16_npu_path_error_is_like_the_reference_bf16_error(chip, seed):
    cfg = npu_shaped_config()
    m64 = V4Model(cfg, dtype=torch.float64).init_random(seed).eval()
    m16 = V4Model(cfg, dtype=torch.bfloat16).init_random(seed).eval()
    ids = torch.randint(0, cfg.vocab_size, (1, 300), generator=torch.Generator().manual_seed(seed))
    golden = m64(ids).double()
    ref16 = m16(ids).double()
    npu16, used = npu_path(m16, ids, chip)
    want = {"rms_norm", "lightning_indexer", "sparse_attention", "moe_gate"}
    want |= {"mhc_pre", "mhc_post", "sinkhorn"} if chip == "950" else {"apply_rope", "moe_experts"}
    assert want <= used, f"adapters not used on {chip}: {want - used}"

    def rel(a):
        return ((a - golden).norm() / golden.norm()).item()

    e_ref, e_npu = rel(ref16), rel(npu16.double())
    assert e_npu <= 2 * e_ref + 1e-3, f"seed {seed}: NPU-path bf16 error {e_npu:.2e} vs reference bf16 {e_ref:.2e}"
