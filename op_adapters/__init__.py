"""One dispatch point per op.  Model code calls ``op_adapters.<op>(...)`` and never names a device.

Every op has the signature and semantics of its reference twin in :mod:`fallbacks` (see there and
docs/ops.md); fast backends (``npu``: torch-npu, ``cuda``: Triton) register beside it and are
chosen by :mod:`op_adapters.registry`.
"""

from __future__ import annotations

import functools

import fallbacks

from .registry import (BACKENDS, choose, dispatch, last_backends, ops, register, requested_backend, simulate_device,
                       use_backend)

for _name, _fn in fallbacks.OPS.items():
    register(_name, "reference")(_fn)

from . import npu  # noqa: E402,F401  (registers the torch-npu adapters; imports no torch_npu)


def _dispatcher(name: str):
    ref = fallbacks.OPS[name]

    @functools.wraps(ref)
    def call(*args, **kwargs):
        return dispatch(name, *args, **kwargs)

    return call


rms_norm = _dispatcher("rms_norm")
apply_rope = _dispatcher("apply_rope")
sinkhorn = _dispatcher("sinkhorn")
mhc_pre = _dispatcher("mhc_pre")
mhc_post = _dispatcher("mhc_post")
mhc_head = _dispatcher("mhc_head")
compress_pool = _dispatcher("compress_pool")
indexer_scores = _dispatcher("indexer_scores")
indexer_topk = _dispatcher("indexer_topk")
lightning_indexer = _dispatcher("lightning_indexer")
sparse_attention = _dispatcher("sparse_attention")
moe_gate = _dispatcher("moe_gate")
moe_experts = _dispatcher("moe_experts")
hadamard = _dispatcher("hadamard")
fp8_fake_quant = _dispatcher("fp8_fake_quant")
fp4_fake_quant = _dispatcher("fp4_fake_quant")
act_quant = _dispatcher("act_quant")

__all__ = sorted(fallbacks.OPS) + ["BACKENDS", "choose", "dispatch", "last_backends", "ops", "register",
                                   "requested_backend", "simulate_device", "use_backend"]
