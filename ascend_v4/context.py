"""Per-call positional context shared by every layer of one forward chunk."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from .config import ModelConfig
from .rope import rope_tables


@dataclass
class StepContext:
    """Where the new tokens of this call sit in each sequence.

    start [B]: tokens already cached per sequence (the first new token's position);
    lengths [B]: valid new tokens per row (rows are right-padded up to S);
    positions [B, S] = start + arange(S); valid [B, S] marks real tokens.
    rope: (cos, sin) fp32 [B, S, r/2] per layer kind ("swa" for ratio 0, "compressed" otherwise).
    """

    start: torch.Tensor
    lengths: torch.Tensor
    positions: torch.Tensor
    valid: torch.Tensor
    rope: dict
    config: ModelConfig
    fake_quant: bool = False
    probe: Callable[[str, torch.Tensor], None] | None = None  # receives intermediate tensors (dump)
    prefix: str = ""                                           # "layers.3." while layer 3 runs

    def record(self, name: str, tensor: torch.Tensor) -> None:
        """Hand ``tensor`` to the probe as ``<prefix><name>``; free when no probe is set."""
        if self.probe is not None:
            self.probe(self.prefix + name, tensor)

    @property
    def end(self) -> torch.Tensor:
        return self.start + self.lengths

    @classmethod
    def build(cls, config: ModelConfig, start: torch.Tensor, lengths: torch.Tensor, S: int,
              fake_quant: bool, probe=None) -> "StepContext":
        ar = torch.arange(S, device=start.device)
        positions = start.unsqueeze(1) + ar
        valid = ar.unsqueeze(0) < lengths.unsqueeze(1)
        rope = {"swa": rope_tables(config, "swa", positions), "compressed": rope_tables(config, "csa", positions)}
        return cls(start, lengths, positions, valid, rope, config, fake_quant, probe)

    def rope_for(self, ratio: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.rope["swa" if ratio == 0 else "compressed"]
