"""The reference path on a CUDA device: same logits as on CPU, prefill ≡ decode there too.

Skipped without a CUDA device (CI has none); run on a GPU host with ``pytest tests/test_cuda.py``.
"""

from __future__ import annotations

import pytest
import torch

import ascend_v4

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

CPU_VS_CUDA_TOL = 1e-4   # fp32 on both sides, TF32 off; different kernels sum in different orders
DECODE_TOL = 1e-5


@pytest.fixture(autouse=True)
def no_tf32():
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


@pytest.fixture(scope="module")
def seed():
    return int(torch.randint(0, 2**31 - 1, ()).item())


def test_tiny_logits_match_cpu(seed):
    ids = torch.randint(0, 512, (2, 300), generator=torch.Generator().manual_seed(seed))
    cpu = ascend_v4.load_model("tiny", seed=seed)(ids)
    gpu = ascend_v4.load_model("tiny", device="cuda", seed=seed)(ids.cuda()).cpu()
    err = (gpu - cpu).abs().max().item()
    assert err <= CPU_VS_CUDA_TOL, f"seed {seed}: CPU vs CUDA logits differ by {err}"


def test_prefill_then_decode_on_cuda(seed):
    model = ascend_v4.load_model("tiny", device="cuda", seed=seed)
    ids = torch.randint(0, 512, (1, 140), generator=torch.Generator().manual_seed(seed), device="cpu").cuda()
    full = model(ids)
    cache = model.new_cache(1, 140)
    parts = [model(ids[:, :130], cache=cache)] + [model(ids[:, j:j + 1], cache=cache) for j in range(130, 140)]
    err = (torch.cat(parts, 1) - full).abs().max().item()
    assert err <= DECODE_TOL, f"seed {seed}: {err}"


def test_generate_on_cuda_bf16():
    model = ascend_v4.load_model("small", device="cuda", dtype="bf16")
    res = ascend_v4.generate(model, [[0, 1, 2, 3]], 8, mtp=True)
    assert len(res.tokens[0]) == 8 and res.peak_memory_bytes > 0
