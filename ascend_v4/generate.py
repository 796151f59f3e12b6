"""Autoregressive generation with the compressed KV cache, optionally drafting with the MTP block.

``generate`` runs one prefill of every prompt (right-padded batch; each row keeps its own length)
and then one-token decode steps.  Sampling: greedy when ``temperature == 0``, else temperature
plus nucleus (``top_p``) sampling from a seeded generator.

With ``mtp=True`` (batch size 1) the MTP block proposes token p+2 from the streams at p and the
token at p+1; the main model then runs the current token and the draft as a two-token extend.
A draft equal to the main model's own choice is accepted and the token after it comes free;
otherwise the cache is restored from a snapshot and only the current token is run.  The output is
therefore exactly what decoding without MTP would give for greedy sampling.
"""

from __future__ import annotations

import resource
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from .model import V4Model


@dataclass
class GenerationResult:
    tokens: list[list[int]]                 # generated ids per prompt (prompt not included)
    prefill_tokens: int = 0
    prefill_seconds: float = 0.0
    decode_tokens: int = 0
    decode_seconds: float = 0.0
    peak_memory_bytes: int = 0
    mtp_drafted: int = 0
    mtp_accepted: int = 0
    stats: dict = field(default_factory=dict)

    @property
    def prefill_tokens_per_s(self) -> float:
        return self.prefill_tokens / self.prefill_seconds if self.prefill_seconds else 0.0

    @property
    def decode_tokens_per_s(self) -> float:
        return self.decode_tokens / self.decode_seconds if self.decode_seconds else 0.0

    @property
    def mtp_acceptance(self) -> float:
        return self.mtp_accepted / self.mtp_drafted if self.mtp_drafted else 0.0


def sample(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator | None) -> torch.Tensor:
    """Pick one token per row of fp32 logits [B, V]: greedy at temperature 0, else top-p sampling."""
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if temperature == 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        drop = sorted_p.cumsum(-1) - sorted_p > top_p  # keep the smallest prefix reaching top_p
        sorted_p = sorted_p.masked_fill(drop, 0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_p)
    choice = torch.multinomial(probs.cpu(), 1, generator=generator).squeeze(-1)
    return choice.to(logits.device)


def _peak_memory(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    rss_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss_kb * 1024 if sys.platform != "darwin" else rss_kb


@torch.no_grad()
def generate(model: V4Model, prompt_ids: Sequence[Sequence[int]] | torch.Tensor, max_new_tokens: int, *,
             temperature: float = 0.0, top_p: float = 1.0, seed: int | None = 0, mtp: bool = False,
             eos_token_id: int | None = None, on_token: Callable[[int, int], None] | None = None) -> GenerationResult:
    """Generate up to ``max_new_tokens`` per prompt.  ``on_token(row, token_id)`` streams tokens."""
    if isinstance(prompt_ids, torch.Tensor):
        prompts = [list(map(int, r)) for r in (prompt_ids if prompt_ids.dim() == 2 else prompt_ids.unsqueeze(0))]
    else:
        prompts = [list(map(int, p)) for p in prompt_ids]
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if mtp and len(prompts) != 1:
        raise ValueError("MTP speculative decoding supports batch size 1")
    if mtp and not model.mtp_enabled:
        raise ValueError("--mtp needs an MTP block, and this model has none (or its weights were missing)")
    device = model.device
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    B = len(prompts)
    lens = torch.tensor([len(p) for p in prompts], device=device)
    S = int(lens.max())
    ids = torch.zeros(B, S, dtype=torch.int64, device=device)
    for i, p in enumerate(prompts):
        ids[i, : len(p)] = torch.tensor(p)
    max_len = S + max_new_tokens + 1
    cache = model.new_cache(B, max_len)
    result = GenerationResult(tokens=[[] for _ in range(B)])
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    t0 = time.perf_counter()
    if mtp:
        logits, hidden = model(ids, cache, return_hidden=True)
        last_logits = logits[:, -1]
    else:
        last_logits = model(ids, cache, lengths=lens, last_only=True)
    _sync(device)
    result.prefill_tokens, result.prefill_seconds = int(lens.sum()), time.perf_counter() - t0

    finished = torch.zeros(B, dtype=torch.bool)
    t1 = time.perf_counter()
    if max_new_tokens:
        if mtp:
            _generate_mtp(model, ids, hidden, last_logits, cache, max_new_tokens, temperature, top_p, gen,
                          eos_token_id, on_token, result)
        else:
            for step in range(max_new_tokens):
                tok = sample(last_logits, temperature, top_p, gen)
                for b in range(B):
                    if not finished[b]:
                        result.tokens[b].append(int(tok[b]))
                        if on_token:
                            on_token(b, int(tok[b]))
                        if eos_token_id is not None and int(tok[b]) == eos_token_id:
                            finished[b] = True
                if bool(finished.all()) or step == max_new_tokens - 1:
                    break
                last_logits = model(tok.view(B, 1), cache, last_only=True)
    _sync(device)
    result.decode_seconds = time.perf_counter() - t1
    result.decode_tokens = sum(len(t) for t in result.tokens)
    result.peak_memory_bytes = _peak_memory(device)
    return result


def _generate_mtp(model, ids, hidden, last_logits, cache, max_new, temperature, top_p, gen, eos, on_token, result):
    """Speculative decoding with the MTP draft (batch 1); see the module docstring."""
    out = result.tokens[0]

    def emit(tok: int) -> bool:
        out.append(tok)
        if on_token:
            on_token(0, tok)
        return (eos is not None and tok == eos) or len(out) >= max_new

    # MTP catches up on the prompt: positions 0..S-2 use the prompt's own next tokens
    S = ids.shape[1]
    if S > 1:
        model.mtp_forward(hidden[:, : S - 1], ids[:, 1:], cache)
    tok = int(sample(last_logits, temperature, top_p, gen))
    if emit(tok):
        return
    h_last = hidden[:, -1:]                     # streams at position p (the last cached token)
    while True:
        # draft token p+2 from streams at p and token p+1 (= tok, not yet cached)
        mtp_logits = model.mtp_forward(h_last, torch.tensor([[tok]], device=ids.device), cache)
        draft = int(sample(mtp_logits[:, -1], temperature, top_p, gen))
        snap = cache.snapshot()
        logits, hid = model(torch.tensor([[tok, draft]], device=ids.device), cache, return_hidden=True)
        result.mtp_drafted += 1
        nxt = int(sample(logits[:, 0], temperature, top_p, gen))
        if nxt == draft:
            result.mtp_accepted += 1
            if emit(draft):
                return
            # the MTP cache must see position p+1 (streams at p+1, token p+2 = draft)
            model.mtp_forward(hid[:, :1], torch.tensor([[draft]], device=ids.device), cache)
            tok = int(sample(logits[:, 1], temperature, top_p, gen))
            h_last = hid[:, 1:2]
        else:
            cache.restore(snap)
            logits, hid = model(torch.tensor([[tok]], device=ids.device), cache, return_hidden=True)
            tok = nxt
            h_last = hid[:, :1]
        if emit(tok):
            return


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
