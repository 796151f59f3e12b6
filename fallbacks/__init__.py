"""Reference implementations of every V4 op in plain PyTorch (CPU, CUDA, and NPU tensors alike).

These are the numerics every fast path is tested against.  Model code never calls them directly:
it goes through :mod:`op_adapters`, which picks a backend and falls back to these.
"""

from .attention import sparse_attention
from .compressor import compress_pool
from .indexer import indexer_scores, indexer_topk, lightning_indexer
from .mhc import mhc_head, mhc_post, mhc_pre, sinkhorn
from .moe import moe_experts, moe_gate
from .norm import rms_norm
from .quant import act_quant, fp4_fake_quant, fp8_fake_quant, hadamard
from .rope import apply_rope, rope_cos_sin, rope_frequencies

OPS = {
    "rms_norm": rms_norm,
    "apply_rope": apply_rope,
    "sinkhorn": sinkhorn,
    "mhc_pre": mhc_pre,
    "mhc_post": mhc_post,
    "mhc_head": mhc_head,
    "compress_pool": compress_pool,
    "indexer_scores": indexer_scores,
    "indexer_topk": indexer_topk,
    "lightning_indexer": lightning_indexer,
    "sparse_attention": sparse_attention,
    "moe_gate": moe_gate,
    "moe_experts": moe_experts,
    "hadamard": hadamard,
    "fp8_fake_quant": fp8_fake_quant,
    "fp4_fake_quant": fp4_fake_quant,
    "act_quant": act_quant,
}

__all__ = sorted(OPS) + ["OPS", "rope_frequencies", "rope_cos_sin"]
