"""Argument checks shared by the reference ops: every bad input raises a ValueError naming it."""

from __future__ import annotations

from typing import Sequence

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
INDEX_DTYPES = (torch.int32, torch.int64)


def check_tensor(op: str, name: str, t, *, min_dim: int | None = None, dim: int | None = None,
                 dtypes: Sequence[torch.dtype] | None = FLOAT_DTYPES) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if dim is not None and t.dim() != dim:
        raise ValueError(f"{op}: {name} must have {dim} dims, got shape {tuple(t.shape)}")
    if min_dim is not None and t.dim() < min_dim:
        raise ValueError(f"{op}: {name} must have at least {min_dim} dims, got shape {tuple(t.shape)}")
    if dtypes is not None and t.dtype not in dtypes:
        raise ValueError(f"{op}: {name} has dtype {t.dtype}; allowed {[str(d) for d in dtypes]}")


def check_size(op: str, name: str, got: int, want: int, what: str) -> None:
    if got != want:
        raise ValueError(f"{op}: {name} has {what} {got}, expected {want}")


def check_same_device(op: str, **tensors) -> None:
    devs = {n: t.device for n, t in tensors.items() if isinstance(t, torch.Tensor)}
    if len(set(devs.values())) > 1:
        raise ValueError(f"{op}: tensors are on different devices: {devs}")
