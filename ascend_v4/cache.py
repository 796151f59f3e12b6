"""KV cache and compressor state (spec §10.3, §11).

Per layer and sequence the cache holds:
* the window ring: the last ``sliding_window`` raw kv entries (post-norm, post-RoPE, fake-quantised
  when enabled), slot = position mod window;
* CSA/HCA: the compressed entries, one per complete block, slot = block index;
* CSA: the indexer keys, one per complete 4-block;
* per compressor, the raw fp32 projections (C = x Wkvᵀ and Z = x Wgateᵀ, ``ape`` not yet added)
  of the last ``coff·ratio`` tokens, slot = position mod (coff·ratio).  This covers the spec's
  partial-block state (§11.3): the tokens of the incomplete block plus, for CSA, the previous
  complete block whose first-half channels feed the next entry.

Positions live in ``lengths`` (tokens cached per sequence), so prefill, extend and decode are the
same code path: a call appends tokens at ``lengths`` and moves it.  Sequences of one batch may
have different lengths.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .config import CSA, ModelConfig


@dataclass
class CompressorState:
    kv: torch.Tensor       # [B, coff·ratio, coff·D] fp32 projections of the most recent tokens
    score: torch.Tensor    # [B, coff·ratio, coff·D] fp32 gate logits (without ape)
    entries: torch.Tensor  # [B, max_len // ratio, D] compressed entries in the model dtype
    ratio: int
    overlap: bool


@dataclass
class LayerCache:
    window: torch.Tensor                      # [B, W, head_dim]
    compressor: CompressorState | None = None
    indexer: CompressorState | None = None

    def tensors(self) -> list[torch.Tensor]:
        out = [self.window]
        for st in (self.compressor, self.indexer):
            if st is not None:
                out += [st.kv, st.score, st.entries]
        return out


def _compressor_state(batch: int, max_len: int, ratio: int, dim: int, dtype, device) -> CompressorState:
    overlap = ratio == CSA
    coff = 2 if overlap else 1
    width = coff * dim
    return CompressorState(
        kv=torch.zeros(batch, coff * ratio, width, dtype=torch.float32 if dtype != torch.float64 else dtype, device=device),
        score=torch.zeros(batch, coff * ratio, width, dtype=torch.float32 if dtype != torch.float64 else dtype, device=device),
        entries=torch.zeros(batch, max_len // ratio, dim, dtype=dtype, device=device),
        ratio=ratio, overlap=overlap)


def new_layer_cache(config: ModelConfig, ratio: int, batch: int, max_len: int, dtype, device) -> LayerCache:
    lc = LayerCache(window=torch.zeros(batch, config.sliding_window, config.head_dim, dtype=dtype, device=device))
    if ratio:
        lc.compressor = _compressor_state(batch, max_len, ratio, config.head_dim, dtype, device)
    if ratio == CSA:
        lc.indexer = _compressor_state(batch, max_len, ratio, config.index_head_dim, dtype, device)
    return lc


@dataclass
class KVCache:
    """The whole model's cache for ``batch_size`` sequences of at most ``max_len`` tokens."""

    config: ModelConfig
    batch_size: int
    max_len: int
    layers: list[LayerCache]
    mtp_layers: list[LayerCache]
    lengths: torch.Tensor        # [B] int64: tokens already in the main layers' cache
    mtp_lengths: torch.Tensor    # [B] int64: positions already run through the MTP block(s)
    dtype: torch.dtype = torch.float32
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @classmethod
    def create(cls, config: ModelConfig, batch_size: int, max_len: int, *, dtype=torch.float32,
               device="cpu") -> "KVCache":
        if batch_size < 1:
            raise ValueError(f"cache batch_size must be >= 1, got {batch_size}")
        if max_len < 1:
            raise ValueError(f"cache max_len must be >= 1, got {max_len}")
        if max_len > config.max_position_embeddings:
            raise ValueError(f"cache max_len {max_len} exceeds the model's max_position_embeddings "
                             f"({config.max_position_embeddings})")
        device = torch.device(device)
        layers = [new_layer_cache(config, r, batch_size, max_len, dtype, device) for r in config.layer_ratios]
        mtp = [new_layer_cache(config, r, batch_size, max_len, dtype, device) for r in config.mtp_ratios]
        zeros = torch.zeros(batch_size, dtype=torch.int64, device=device)
        return cls(config, batch_size, max_len, layers, mtp, zeros, zeros.clone(), dtype, device)

    def tensors(self) -> list[torch.Tensor]:
        return [t for lc in self.layers + self.mtp_layers for t in lc.tensors()]

    def nbytes(self) -> int:
        """Bytes this cache object holds (all buffers, allocated for ``max_len``)."""
        return sum(t.numel() * t.element_size() for t in self.tensors())

    # Speculative decoding verifies draft tokens and must be able to undo them.  Compressed
    # entries past the restored length are simply rewritten later, so only the rings and the
    # lengths need saving.
    def snapshot(self) -> dict:
        rings = []
        for lc in self.layers + self.mtp_layers:
            rings.append([lc.window.clone()] + [t.clone() for st in (lc.compressor, lc.indexer) if st is not None
                                                for t in (st.kv, st.score)])
        return {"rings": rings, "lengths": self.lengths.clone(), "mtp_lengths": self.mtp_lengths.clone()}

    def restore(self, snap: dict) -> None:
        for lc, saved in zip(self.layers + self.mtp_layers, snap["rings"]):
            targets = [lc.window] + [t for st in (lc.compressor, lc.indexer) if st is not None for t in (st.kv, st.score)]
            for dst, src in zip(targets, saved):
                dst.copy_(src)
        self.lengths.copy_(snap["lengths"])
        self.mtp_lengths.copy_(snap["mtp_lengths"])


def cache_bytes_per_token(config: ModelConfig, dtype: torch.dtype = torch.bfloat16) -> dict[str, dict[str, float]]:
    """Real bytes of this implementation's cache, per layer kind: growth per token and fixed part.

    ``per_token`` counts what grows with the context (compressed entries, indexer keys);
    ``fixed`` counts the window ring and the fp32 compressor state of one sequence.
    """
    el = torch.tensor([], dtype=dtype).element_size()
    c, ci, w = config.head_dim, config.index_head_dim, config.sliding_window
    out = {}
    for kind, ratio in (("swa", 0), ("csa", 4), ("hca", 128)):
        per_token = 0.0
        fixed = w * c * el
        if ratio:
            coff = 2 if ratio == 4 else 1
            per_token += c * el / ratio
            fixed += 2 * coff * ratio * coff * c * 4
        if ratio == 4:
            per_token += ci * el / 4
            fixed += 2 * 2 * 4 * 2 * ci * 4
        out[kind] = {"per_token": per_token, "fixed": fixed,
                     "layers": sum(1 for r in config.layer_ratios if r == ratio)}
    total = sum(v["per_token"] * v["layers"] for v in out.values())
    out["model"] = {"per_token": total, "fixed": sum(v["fixed"] * v["layers"] for v in out.values()),
                    "layers": config.num_hidden_layers}
    return out
