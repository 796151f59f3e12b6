"""Ascend chip families and which torch-npu op serves which V4 op on each (ascend_npu.md §1, §2, §5).

The runtime SoC id (``torch_npu.npu.utils.get_soc_version()``) maps to a family: A2 (910B,
220–225), A3 (910C, 250–255), 950 (A5, 260), 310P (200–205).  ``CAPABILITIES`` is the per-chip
table, taken from the "supported models" lines of the torch-npu 2.13 docs; it drives dispatch and
``ascend-v4 ops --chip``.  Nothing here imports torch_npu at module import time.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
from dataclasses import dataclass, field
from typing import Iterator

FAMILIES = ("A2", "A3", "950", "310P")
_SOC_RANGES = {"A2": range(220, 226), "A3": range(250, 256), "950": range(260, 261), "310P": range(200, 206)}
CHIP_ENV = "ASCEND_V4_NPU_CHIP"

_forced_chip: contextvars.ContextVar[str | None] = contextvars.ContextVar("ascend_v4_chip", default=None)


def family_of_soc(soc: int) -> str | None:
    for fam, ids in _SOC_RANGES.items():
        if soc in ids:
            return fam
    return None


def normalise_family(name: str) -> str:
    key = str(name).strip().upper().replace("ASCEND", "")
    aliases = {"A2": "A2", "910B": "A2", "A3": "A3", "910C": "A3", "950": "950", "A5": "950", "950PR": "950",
               "950DT": "950", "310P": "310P"}
    if key not in aliases:
        raise ValueError(f"unknown Ascend chip family {name!r}; choose one of {FAMILIES} (aliases: 910B, 910C, A5)")
    return aliases[key]


@contextlib.contextmanager
def use_chip(family: str) -> Iterator[None]:
    """Pretend to run on ``family`` (tests, ``ascend-v4 ops --chip``)."""
    token = _forced_chip.set(normalise_family(family))
    try:
        yield
    finally:
        _forced_chip.reset(token)


def current_family() -> str | None:
    """The chip family this process runs on: forced, ``ASCEND_V4_NPU_CHIP``, else the SoC id."""
    forced = _forced_chip.get()
    if forced:
        return forced
    if os.environ.get(CHIP_ENV):
        return normalise_family(os.environ[CHIP_ENV])
    try:
        import torch_npu  # only reached after the NPU backend was found available

        soc = torch_npu.npu.utils.get_soc_version()
    except Exception:
        return None
    return family_of_soc(int(soc))


@dataclass(frozen=True)
class Capability:
    torch_npu_ops: tuple[str, ...]           # the torch-npu ops the adapter calls
    chips: frozenset[str]                    # families whose docs list every one of them
    how: str                                 # how V4's semantics are mapped onto the op(s)
    limits: str = ""                         # shape/dtype conditions checked before each call
    unverified: tuple[str, ...] = field(default=())  # semantics the docs do not state


def _cap(ops, chips, how, limits="", unverified=()):
    return Capability(tuple(ops), frozenset(chips), how, limits, tuple(unverified))


CAPABILITIES: dict[str, Capability] = {
    "rms_norm": _cap(["npu_rms_norm"], FAMILIES, "gamma = weight cast to x's dtype (ones when unweighted)",
                     "x fp16/bf16/fp32, 2-8 dims"),
    "apply_rope": _cap(["npu_rotary_mul"], {"A2", "A3"},
                       "interleave mode on the last r dims; r1/r2 = cos/sin repeated per pair; inverse = −sin",
                       "positions shared by the whole batch (1S1D), B·N < 1000, D < 896"),
    "sinkhorn": _cap(["npu_mhc_sinkhorn"], {"950"},
                     "row softmax + eps in PyTorch, then the op with num_iters = iters",
                     "n in {4, 6, 8}, iters in [1, 100]",
                     ("row/column order of the op; if it starts with rows, the first one re-normalises rows that "
                      "already sum to 1 + n·eps (relative change ≤ n·eps)",)),
    "mhc_pre": _cap(["npu_mhc_pre", "npu_mhc_sinkhorn"], {"950"},
                    "h_in from the op (σ + hc_eps, collapse); post = 2σ and comb recomputed in PyTorch from "
                    "h_mix·inv_rms (out_flag=1), comb through the sinkhorn adapter",
                    "streams bf16/fp16, n in {4, 6, 8}",
                    ("whether h_mix is taken before the 1/rms scaling (assumed: before)",)),
    "mhc_post": _cap(["npu_mhc_post"], {"950"}, "exact: h_res = comb untransposed (the op applies h_resᵀ)",
                     "streams bf16/fp16, n in {4, 6, 8}"),
    "mhc_head": _cap([], (), "no torch-npu op: the reference composite (matmul, sigmoid, weighted sum)"),
    "compress_pool": _cap([], (), "no torch-npu op (the V4 compressor kernels live outside torch-npu)"),
    "indexer_scores": _cap([], (), "no torch-npu op returns the full score matrix; see lightning_indexer"),
    "indexer_topk": _cap([], (), "no torch-npu op; see lightning_indexer"),
    "lightning_indexer": _cap(["npu_lightning_indexer"], {"A2", "A3", "950"},
                              "queries grouped by equal ⌊(p+1)/4⌋, keys paged once (PA_BSND) and shared by every "
                              "group through block_table, actual_seq_lengths_key = ⌊(p+1)/4⌋, sparse_mode 0; "
                              "indices ≥ the limit or < 0 are set to −1",
                              "q/k bf16/fp16, index_head_dim 128, heads ≤ 64 (950: 8/16/24/32/64), top-k ≤ 2048",
                              ("padding of rows with fewer keys than sparse_count (−1 assumed, re-masked anyway)",)),
    "sparse_attention": _cap(["npu_sparse_flash_attention"], {"A2", "A3", "950"},
                             "MLA-absorb layout: query = [q_nope | 0], query_rope = q_rope, key = value = kv, "
                             "key_rope = kv_rope; indices compacted valid-first; sink applied afterwards from the "
                             "returned softmax max/sum",
                             "bf16/fp16, head_dim 512 (448 + 64 rope)",
                             ("meaning of softmax_max/softmax_sum (assumed: max of scaled logits, Σexp(l − max))",)),
    "moe_gate": _cap(["npu_moe_gating_top_k"], {"A2", "A3", "950"},
                     "norm_type 2 (sqrt-softplus; undocumented, probed once), 1 sigmoid, 0 softmax; bias for "
                     "selection; hash routing via input_ids + tid2eid; routed_scaling_factor; renorm 0",
                     "E ≤ 2048, logits fp32/bf16/fp16",
                     ("norm_type=2 is absent from the torch-npu doc; a refusal falls back for the process",)),
    "moe_experts": _cap(["npu_moe_init_routing_v2", "npu_grouped_matmul", "npu_moe_finalize_routing"], {"A2", "A3"},
                        "dropless routing; gate/up/down as grouped matmuls over expert-sorted rows; clamp + SwiGLU "
                        "and the routing weight (before W2, fp32) in PyTorch; fp32 combine with scales=None",
                        "x/weights bf16/fp16/fp32 of one dtype, E ≤ 1024, dims < 65536",
                        ("expanded_row_idx (row_idx_type 0) numbers (token, slot) pairs token-major and "
                         "finalize_routing reads that layout with drop_pad_mode 2 (from the CANN kernel source, "
                         "not the torch-npu doc)",)),
    "hadamard": _cap([], (), "plain matmul with the Sylvester matrix (runs on the NPU as an ordinary op)"),
    "fp8_fake_quant": _cap([], (), "no torch-npu op with V4's power-of-two 1×64 scales; PyTorch ops on the NPU"),
    "fp4_fake_quant": _cap([], (), "npu_dynamic_mx_quant's scale rule differs from V4's (ascend_npu.md §5.8)"),
    "act_quant": _cap([], (), "no torch-npu op with V4's power-of-two 1×128 scales; PyTorch ops on the NPU"),
}


def capability_rows(family: str) -> list[tuple[str, str, str]]:
    """(V4 op, what runs on ``family``, why/how) for every op, for ``ascend-v4 ops --chip``."""
    family = normalise_family(family)
    rows = []
    for op, cap in sorted(CAPABILITIES.items()):
        if not cap.torch_npu_ops:
            rows.append((op, "reference", cap.how))
        elif family in cap.chips:
            rows.append((op, " → ".join(cap.torch_npu_ops), f"{cap.how}; limits: {cap.limits}" if cap.limits else cap.how))
        else:
            docs = ", ".join(sorted(cap.chips))
            rows.append((op, "reference", f"{'/'.join(cap.torch_npu_ops)} is documented for {docs} only"))
    return rows
