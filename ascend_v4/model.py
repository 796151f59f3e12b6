"""The DeepSeek V4 model (spec §5): Embed → [Block × L] → HcHead → norm → head, plus MTP.

``model(input_ids)`` runs a prefill from position 0 and returns fp32 logits for every position.
``model(input_ids, cache=cache)`` appends the tokens to the cache (prefill, extend or one-token
decode: the same code path) and returns their logits.  Long inputs are processed in chunks of
``prefill_chunk`` tokens, which is exact (extend ≡ prefill) and keeps memory proportional to the
chunk times the compressed length instead of the square of the sequence.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from .block import Block, HcHead
from .cache import KVCache, cache_bytes_per_token
from .config import ModelConfig
from .context import StepContext
from .layers import Linear, RMSNorm
from .mtp import MTPBlock

log = logging.getLogger("ascend_v4.model")


class V4Model(nn.Module):
    def __init__(self, config: ModelConfig, dtype: torch.dtype = torch.float32, device="cpu"):
        super().__init__()
        if dtype not in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
            raise ValueError(f"model dtype must be float32, bfloat16, float16 or float64, got {dtype}")
        self.config, self.dtype = config, dtype
        with torch.device(device):
            self.embed = nn.Embedding(config.vocab_size, config.hidden_size, dtype=dtype)
            self.embed.weight.requires_grad_(False)
            self.layers = nn.ModuleList(Block(config, i, r, dtype) for i, r in enumerate(config.layer_ratios))
            self.hc = HcHead(config, dtype)
            self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype)
            self.head = Linear(config.hidden_size, config.vocab_size, kind="fp32", dtype=dtype)
            self.mtp = nn.ModuleList(MTPBlock(config, config.num_hidden_layers + i, r, dtype)
                                     for i, r in enumerate(config.mtp_ratios))
        self.prefill_chunk = 2048
        self.fake_quant = False
        self.mtp_enabled = len(self.mtp) > 0

    # ------------------------------------------------------------------ switches
    @property
    def fake_quant(self) -> bool:
        return self._fake_quant

    @fake_quant.setter
    def fake_quant(self, on: bool) -> None:
        """The reference's QAT fake-quant points: FP8 activations of FP8/FP4 linears, FP8 KV (nope
        dims, blocks of 64), FP4 indexer q/k after the Hadamard.  Off = exact float computation."""
        self._fake_quant = bool(on)
        for m in self.modules():
            if hasattr(m, "fake_quant") and m is not self:
                m.fake_quant = self._fake_quant

    @property
    def device(self) -> torch.device:
        return self.embed.weight.device

    # ------------------------------------------------------------------ cache
    def new_cache(self, batch_size: int, max_len: int) -> KVCache:
        return KVCache.create(self.config, batch_size, max_len, dtype=self.dtype, device=self.device)

    def cache_bytes(self) -> dict[str, dict[str, float]]:
        """Bytes per token per layer kind of this implementation's cache (see cache_bytes_per_token)."""
        return cache_bytes_per_token(self.config, self.dtype)

    # ------------------------------------------------------------------ forward
    def _check_ids(self, input_ids: torch.Tensor, name: str = "input_ids") -> None:
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
            raise ValueError(f"{name} must be a [batch, seq] tensor, got "
                             f"{tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else type(input_ids)}")
        if input_ids.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"{name} must be int32 or int64 token ids, got {input_ids.dtype}")
        if input_ids.numel() and (input_ids.min() < 0 or input_ids.max() >= self.config.vocab_size):
            raise ValueError(f"{name} must lie in [0, {self.config.vocab_size - 1}] (vocab_size), got range "
                             f"[{int(input_ids.min())}, {int(input_ids.max())}]")

    def _lengths(self, lengths, B: int, S: int) -> torch.Tensor:
        if lengths is None:
            return torch.full((B,), S, dtype=torch.int64, device=self.device)
        lengths = torch.as_tensor(lengths, dtype=torch.int64, device=self.device)
        if lengths.shape != (B,) or (lengths < 0).any() or (lengths > S).any():
            raise ValueError(f"lengths must be [batch={B}] with values in [0, {S}], got {lengths.tolist()}")
        return lengths

    def forward(self, input_ids: torch.Tensor, cache: KVCache | None = None, *, lengths=None,
                last_only: bool = False, return_hidden: bool = False, probe=None):
        """Logits [B, S, vocab] fp32 (``last_only``: [B, vocab] at each row's last valid token).

        ``lengths`` [B]: valid tokens per row of a right-padded batch (default: all S).  Logits at
        padded positions are meaningless.  ``return_hidden`` also returns the last streams
        [B, S, n_hc, d] (input of the MTP block).  ``probe(name, tensor)`` receives intermediate
        tensors (used by ``ascend-v4 dump``).
        """
        self._check_ids(input_ids)
        B, S = input_ids.shape
        if S == 0:
            raise ValueError("input_ids has no tokens (shape [batch, 0])")
        input_ids = input_ids.to(self.device)
        if cache is None:
            cache = self.new_cache(B, S)
        if cache.batch_size != B:
            raise ValueError(f"input batch {B} does not match the cache's batch_size {cache.batch_size}")
        lengths = self._lengths(lengths, B, S)
        end = cache.lengths + lengths
        if int(end.max()) > cache.max_len:
            raise ValueError(f"context too long: {int(end.max())} tokens exceed the cache's max_len "
                             f"{cache.max_len} (create the cache with a larger max_len)")
        logits, hidden = [], []
        for s0 in range(0, S, self.prefill_chunk):
            s1 = min(S, s0 + self.prefill_chunk)
            chunk_len = (lengths - s0).clamp(0, s1 - s0)
            ctx = StepContext.build(self.config, cache.lengths.clone(), chunk_len, s1 - s0, self.fake_quant, probe)
            X = self._run_layers(input_ids[:, s0:s1], ctx, cache)
            cache.lengths += chunk_len
            logits.append(self._logits(X, chunk_len if last_only else None))
            ctx.prefix = ""
            ctx.record("logits", logits[-1])
            if return_hidden:
                hidden.append(X)
        if last_only:
            # the last valid token of each row lies in the last chunk that had any for that row
            out = logits[0]
            for s0, lg in zip(range(0, S, self.prefill_chunk), logits):
                has = (lengths > s0)
                out = torch.where(has.unsqueeze(-1), lg, out)
            logits = out
        else:
            logits = torch.cat(logits, dim=1)
        if return_hidden:
            return logits, torch.cat(hidden, dim=1)
        return logits

    def _run_layers(self, ids: torch.Tensor, ctx: StepContext, cache: KVCache) -> torch.Tensor:
        X = self.embed(ids).unsqueeze(2).expand(-1, -1, self.config.hc_mult, -1).contiguous()
        ctx.record("embed", X[:, :, 0])
        for i, (layer, lc) in enumerate(zip(self.layers, cache.layers)):
            ctx.prefix = f"layers.{i}."
            X = layer(X, ctx, lc, ids)
        ctx.prefix = ""
        return X

    def _logits(self, X: torch.Tensor, last_len: torch.Tensor | None) -> torch.Tensor:
        if last_len is not None:
            idx = (last_len - 1).clamp(min=0)
            X = X[torch.arange(X.shape[0], device=X.device), idx].unsqueeze(1)
        y = self.norm(self.hc.collapse(X))
        logits = self.head(y)  # fp32 weight, fp32 input → fp32 logits
        return logits[:, 0] if last_len is not None else logits

    # ------------------------------------------------------------------ MTP
    def mtp_forward(self, hidden: torch.Tensor, next_ids: torch.Tensor, cache: KVCache | None = None, *,
                    lengths=None, depth: int = 0) -> torch.Tensor:
        """Logits for token p+2 from the main streams at p and token p+1: [B, S, vocab] fp32.

        With a cache, positions start at ``cache.mtp_lengths`` and the MTP window cache advances.
        """
        if not self.mtp_enabled:
            raise ValueError("this model has no MTP block (num_nextn_predict_layers = 0 or MTP weights missing)")
        self._check_ids(next_ids, "next_ids")
        B, S = next_ids.shape
        if hidden.shape[:2] != (B, S):
            raise ValueError(f"hidden {tuple(hidden.shape)} and next_ids {tuple(next_ids.shape)} disagree on [B, S]")
        block = self.mtp[depth]
        if cache is None:
            cache = self.new_cache(B, max(S, 1))
        lengths = self._lengths(lengths, B, S)
        if int((cache.mtp_lengths + lengths).max()) > cache.max_len:
            raise ValueError(f"context too long for the MTP cache (max_len {cache.max_len})")
        ctx = StepContext.build(self.config, cache.mtp_lengths.clone(), lengths, S, self.fake_quant)
        X = block.embed_inputs(hidden, self.embed(next_ids.to(self.device)))
        X = block(X, ctx, cache.mtp_layers[depth], next_ids)
        cache.mtp_lengths += lengths
        return self.head(block.norm(block.head_hc.collapse(X)))

    def mtp_logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Prefill helper: next-next-token logits for positions 0..S−2, [B, S−1, vocab]."""
        _, hidden = self.forward(input_ids, return_hidden=True)
        return self.mtp_forward(hidden[:, :-1], input_ids[:, 1:])

    # ------------------------------------------------------------------ random weights
    @torch.no_grad()
    def init_random(self, seed: int = 0) -> "V4Model":
        """Deterministic random weights (for presets without a checkpoint, tests and benchmarks)."""
        g = torch.Generator().manual_seed(seed)

        def randn(t: torch.Tensor, std: float, mean: float = 0.0) -> None:
            t.copy_((torch.randn(t.shape, generator=g, dtype=torch.float64) * std + mean).to(t.dtype))

        c = self.config
        for name, p in self.named_parameters():
            leaf = name.rsplit(".", 1)[-1]
            if name.endswith("norm.weight"):
                randn(p, 0.1, 1.0)
            elif leaf in ("w1", "w3"):
                randn(p, p.shape[-1] ** -0.5)
            elif leaf == "w2":
                randn(p, p.shape[-1] ** -0.5)
            elif leaf.endswith("_fn"):
                randn(p, 0.5 * p.shape[-1] ** -0.5)
            elif leaf.endswith("_base"):
                randn(p, 0.5)
            elif leaf.endswith("_scale"):
                randn(p, 0.1, 1.0)
            elif leaf == "ape":
                randn(p, 0.5)
            elif leaf == "attn_sink":
                randn(p, 1.0)
            elif leaf == "bias":
                randn(p, 0.05)
            elif name == "embed.weight":
                randn(p, 1.0)
            elif p.dim() == 2:
                randn(p, p.shape[1] ** -0.5)
            else:
                raise AssertionError(f"init_random: no rule for parameter {name}")
        for name, b in self.named_buffers():
            if name.endswith("tid2eid"):
                b.copy_(torch.stack([torch.randperm(c.n_routed_experts, generator=g)[: c.num_experts_per_tok]
                                     for _ in range(c.vocab_size)]))
        return self
