"""RoPE tables per layer kind (spec §7.3, trap 2).

SWA-only layers (ratio 0) and the MTP block: base ``rope_theta`` (10000), no YaRN.  CSA/HCA layers
(ratio 4 or 128): base ``compress_rope_theta`` (160000) with the YaRN blend, for everything in the
layer (q, window kv, compressed entries, indexer q/k, output de-rotation).
"""

from __future__ import annotations

import functools

import torch

from fallbacks.rope import rope_cos_sin, rope_frequencies

from .config import ModelConfig

_KINDS = {"swa": 0, "csa": 4, "hca": 128}


def _ratio_of(layer_kind: int | str) -> int:
    if isinstance(layer_kind, str):
        if layer_kind not in _KINDS:
            raise ValueError(f"unknown layer kind {layer_kind!r}; use one of {sorted(_KINDS)} or a ratio 0/4/128")
        return _KINDS[layer_kind]
    if layer_kind not in (0, 4, 128):
        raise ValueError(f"unknown compression ratio {layer_kind!r}; allowed 0, 4, 128")
    return layer_kind


@functools.lru_cache(maxsize=32)
def _theta(rope_dim: int, base: float, factor: float, orig: int, beta_fast: float, beta_slow: float) -> torch.Tensor:
    return rope_frequencies(rope_dim, base, yarn_factor=factor, original_max_position=orig,
                            beta_fast=beta_fast, beta_slow=beta_slow)


def layer_frequencies(config: ModelConfig, layer_kind: int | str) -> torch.Tensor:
    """θ_i (fp64, [r/2]) for a layer kind: ``"swa"|"csa"|"hca"`` or its ratio 0/4/128."""
    if _ratio_of(layer_kind) == 0:
        return _theta(config.qk_rope_head_dim, float(config.rope_theta), 1.0, 0, 0.0, 0.0)
    return _theta(config.qk_rope_head_dim, float(config.compress_rope_theta), float(config.rope_factor),
                  int(config.rope_original_max_position), float(config.rope_beta_fast), float(config.rope_beta_slow))


def rope_tables(config: ModelConfig, layer_kind: int | str, positions: torch.Tensor | int
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos, sin) fp64 tables of shape [*positions.shape, r/2] for ``op_adapters.apply_rope``."""
    if isinstance(positions, int):
        positions = torch.arange(positions)
    return rope_cos_sin(layer_frequencies(config, layer_kind).to(positions.device), positions)
