"""Multi-token prediction block (spec §15): predicts token p+2 from the main model's last streams
at p and the embedding of token p+1.

    e  = enorm(Embed(ids_next));  Xh = hnorm(H) per stream
    X' = e_proj(e) (broadcast over streams) + h_proj(Xh)
    X' = Block_L(X')        SWA-only attention, biased top-k gate, its own window cache
    logits = head(norm(HcHead_mtp(X')))     embedding and head shared with the main model
"""

from __future__ import annotations

import torch

from .block import Block, HcHead
from .config import ModelConfig
from .layers import Linear, RMSNorm


class MTPBlock(Block):
    def __init__(self, config: ModelConfig, layer_id: int, ratio: int, dtype: torch.dtype):
        super().__init__(config, layer_id, ratio, dtype)
        d = config.hidden_size
        self.e_proj = Linear(d, d, kind="fp8", dtype=dtype)
        self.h_proj = Linear(d, d, kind="fp8", dtype=dtype)
        self.enorm = RMSNorm(d, config.rms_norm_eps, dtype)
        self.hnorm = RMSNorm(d, config.rms_norm_eps, dtype)
        self.norm = RMSNorm(d, config.rms_norm_eps, dtype)
        self.head_hc = HcHead(config, dtype)

    def embed_inputs(self, hidden: torch.Tensor, next_embeds: torch.Tensor) -> torch.Tensor:
        e = self.e_proj(self.enorm(next_embeds)).unsqueeze(2)
        return e + self.h_proj(self.hnorm(hidden))
