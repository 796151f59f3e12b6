"""Which accelerator backends this machine has, detected without importing torch_npu at import time.

NPU detection follows ascend_npu.md §4.2: torch-npu installed? importable (ImportError without
CANN, RuntimeError from the two-accelerator guard)? ``torch.npu.is_available()``?  Each answer is
cached for the process and comes with the reason, so fallbacks can say why.
"""

from __future__ import annotations

import functools
import importlib.util


@functools.lru_cache(maxsize=1)
def npu_status() -> tuple[bool, str]:
    if importlib.util.find_spec("torch_npu") is None:
        return False, "torch-npu is not installed"
    try:
        import torch_npu  # noqa: F401  (only here, after the check, never at module import)
    except Exception as e:  # ImportError without CANN; RuntimeError with a second accelerator
        return False, f"import torch_npu failed: {type(e).__name__}: {str(e).splitlines()[0][:160]}"
    import torch

    if not (hasattr(torch, "npu") and torch.npu.is_available()):
        return False, "torch_npu imported but torch.npu.is_available() is False (no device or driver)"
    return True, "torch-npu with an available NPU"


@functools.lru_cache(maxsize=1)
def cuda_status() -> tuple[bool, str]:
    import torch

    if not torch.cuda.is_available():
        return False, "no CUDA device"
    if importlib.util.find_spec("triton") is None:
        return False, "CUDA device present but Triton is not installed"
    return True, f"CUDA ({torch.cuda.get_device_name(0)}) with Triton"


def backend_status(backend: str) -> tuple[bool, str]:
    if backend == "reference":
        return True, "plain PyTorch, every device"
    if backend == "npu":
        return npu_status()
    if backend == "cuda":
        return cuda_status()
    raise ValueError(f"unknown backend {backend!r}")
