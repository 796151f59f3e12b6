"""Mixture of experts (spec §12): sqrt-softplus gate with bias or hash routing, clamped SwiGLU
routed experts and one shared expert.

The routed experts are held stacked ([E, I, d] / [E, d, I]) so ``op_adapters.moe_experts`` runs
them as grouped matmuls over tokens sorted by expert; the checkpoint name map splits them into
the official per-expert tensors ``ffn.experts.E.w{1,2,3}.weight``.
"""

from __future__ import annotations

import torch
from torch import nn

import op_adapters as ops

from .config import ModelConfig
from .layers import Linear, hp_dtype


class Gate(nn.Module):
    def __init__(self, config: ModelConfig, hash_layer: bool, dtype: torch.dtype):
        super().__init__()
        self.k, self.score_func = config.num_experts_per_tok, config.scoring_func
        self.route_scale, self.renormalize = config.routed_scaling_factor, config.norm_topk_prob
        self.weight = nn.Parameter(torch.empty(config.n_routed_experts, config.hidden_size, dtype=hp_dtype(dtype)),
                                   requires_grad=False)
        self.hash_layer = hash_layer
        if hash_layer:
            self.register_buffer("tid2eid", torch.zeros(config.vocab_size, self.k, dtype=torch.int64))
            self.bias = None
        else:
            self.bias = nn.Parameter(torch.zeros(config.n_routed_experts, dtype=hp_dtype(dtype)), requires_grad=False)
            self.tid2eid = None

    def forward(self, x: torch.Tensor, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = torch.nn.functional.linear(x.to(self.weight.dtype), self.weight)  # fp32 gate (§12.1)
        return ops.moe_gate(logits, bias=self.bias, k=self.k, route_scale=self.route_scale,
                            score_func=self.score_func, input_ids=input_ids if self.hash_layer else None,
                            tid2eid=self.tid2eid, renormalize=self.renormalize)


class MoE(nn.Module):
    def __init__(self, config: ModelConfig, hash_layer: bool, dtype: torch.dtype):
        super().__init__()
        E, I, d = config.n_routed_experts, config.moe_intermediate_size, config.hidden_size
        self.swiglu_limit = config.swiglu_limit
        self.gate = Gate(config, hash_layer, dtype)
        self.w1 = nn.Parameter(torch.empty(E, I, d, dtype=dtype), requires_grad=False)
        self.w2 = nn.Parameter(torch.empty(E, d, I, dtype=dtype), requires_grad=False)
        self.w3 = nn.Parameter(torch.empty(E, I, d, dtype=dtype), requires_grad=False)
        self.shared_experts = SharedExpert(d, I, dtype) if config.n_shared_experts else None
        self.fake_quant = False

    def forward(self, x: torch.Tensor, input_ids: torch.Tensor, ctx=None) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        weights, indices = self.gate(x, input_ids.reshape(-1))
        if ctx is not None:
            ctx.record("ffn.gate_weights", weights.view(*shape[:-1], -1))
            ctx.record("ffn.expert_ids", indices.view(*shape[:-1], -1))
        xq = ops.fp8_fake_quant(x, 128) if self.fake_quant else x
        acc = hp_dtype(x.dtype)
        y = ops.moe_experts(xq, weights, indices, self.w1, self.w2, self.w3, swiglu_limit=self.swiglu_limit,
                            out_dtype=acc, act_quant_block=128 if self.fake_quant else None)
        if self.shared_experts is not None:
            y = y + self.shared_experts(xq, self.swiglu_limit, self.fake_quant).to(acc)
        return y.to(x.dtype).view(shape)


class SharedExpert(nn.Module):
    """The always-on expert: the same clamped SwiGLU (current reference revision clamps it too)."""

    def __init__(self, d: int, inter: int, dtype: torch.dtype):
        super().__init__()
        self.w1 = Linear(d, inter, kind="fp8", dtype=dtype)
        self.w2 = Linear(inter, d, kind="fp8", dtype=dtype)
        self.w3 = Linear(d, inter, kind="fp8", dtype=dtype)

    def forward(self, x: torch.Tensor, swiglu_limit: float, fake_quant: bool) -> torch.Tensor:
        T = x.shape[0]
        ones = torch.ones(T, 1, dtype=hp_dtype(x.dtype), device=x.device)
        zeros = torch.zeros(T, 1, dtype=torch.int64, device=x.device)
        return ops.moe_experts(x, ones, zeros, self.w1.weight[None], self.w2.weight[None], self.w3.weight[None],
                               swiglu_limit=swiglu_limit, act_quant_block=128 if fake_quant else None)
