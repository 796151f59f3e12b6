"""The official checkpoint tensor names of DeepSeek V4 (spec §4) and how they map to this model.

The module attribute names of :class:`ascend_v4.model.V4Model` already mirror the official names
(``layers.N.attn.wq_a.weight``, ``layers.N.hc_attn_fn``, ...).  The only differences:

=========================================  ==========================================
model state                                 official checkpoint
=========================================  ==========================================
``layers.N.ffn.w1`` [E, I, d] (stacked)     ``layers.N.ffn.experts.{e}.w1.weight`` [I, d] (w2, w3 alike)
``hc.hc_head_fn`` (``_base``, ``_scale``)   ``hc_head_fn`` (top level)
``mtp.i.head_hc.hc_head_fn``                ``mtp.i.hc_head_fn``
=========================================  ==========================================

Every official tensor also has a *storage kind* saying what the checkpoint may hold for it:

* ``fp8``    dense linears stored FP8 e4m3 + 128×128 ``.scale`` when ``weight_format == "fp8"``;
* ``expert`` routed experts: FP4 (int8 packed + e8m0 ``.scale`` per 32), FP8 128×128 or plain;
* ``bf16``   plain bf16 (norm weights, embed, head, gate weight, compressor wkv/wgate, ...);
* ``fp32``   plain fp32 (all ``hc_*``, ``ape``, ``attn_sink``, gate ``bias``);
* ``int``    integer table (``ffn.gate.tid2eid``, int64; int32 accepted).

Official names may carry a ``model.`` prefix (:func:`strip_prefix`).  The MTP block shares the
embedding and head with the main model, so ``mtp.*`` names containing ``emb`` or ending in
``head.weight`` are not part of the model (:func:`is_shared_mtp_name`); the official converter drops them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import nn

__all__ = ["OfficialTensor", "FP8_WEIGHTS", "official_tensors", "official_name", "module_name",
           "storage_kind", "scale_name", "strip_prefix", "is_shared_mtp_name", "is_mtp_name", "model_state"]

# Names inside a block (after ``layers.N.`` / ``mtp.N.``) stored FP8 e4m3 with 128×128 block scales.
FP8_WEIGHTS = frozenset({
    "attn.wq_a.weight", "attn.wq_b.weight", "attn.wkv.weight", "attn.wo_a.weight", "attn.wo_b.weight",
    "attn.indexer.wq_b.weight",
    "ffn.shared_experts.w1.weight", "ffn.shared_experts.w2.weight", "ffn.shared_experts.w3.weight",
    "e_proj.weight", "h_proj.weight",
})
# Leaf names stored in fp32 (spec §4.2–4.4); ``hc_*`` leaves are fp32 too.
_FP32_LEAVES = frozenset({"attn_sink", "ape", "bias"})

# (model pattern, official replacement) and the reverse; the experts are handled separately.
_TO_OFFICIAL = ((re.compile(r"^hc\.(hc_head_\w+)$"), r"\1"),
                (re.compile(r"^mtp\.(\d+)\.head_hc\.(hc_head_\w+)$"), r"mtp.\1.\2"))
_TO_MODULE = ((re.compile(r"^(hc_head_\w+)$"), r"hc.\1"),
              (re.compile(r"^mtp\.(\d+)\.(hc_head_\w+)$"), r"mtp.\1.head_hc.\2"))
_STACKED_EXPERTS = re.compile(r"^((?:layers|mtp)\.\d+\.ffn)\.(w[123])$")
_OFFICIAL_EXPERT = re.compile(r"^((?:layers|mtp)\.\d+\.ffn)\.experts\.(\d+)\.(w[123])\.weight$")
_BLOCK_PREFIX = re.compile(r"^(?:layers|mtp)\.\d+\.")


@dataclass(frozen=True)
class OfficialTensor:
    """One official checkpoint tensor (the ``.scale`` companions are implied by ``kind``)."""

    name: str                 # official name, e.g. "layers.0.ffn.experts.3.w1.weight"
    module_name: str          # name in the model's state_dict, e.g. "layers.0.ffn.w1"
    expert: int | None        # index into the stacked expert tensor, else None
    shape: tuple[int, ...]    # logical (dequantised) shape
    kind: str                 # "fp8" | "expert" | "bf16" | "fp32" | "int"


def strip_prefix(name: str) -> str:
    """Drop a leading ``model.`` (some releases prefix every name with it)."""
    return name[len("model."):] if name.startswith("model.") else name


def is_mtp_name(name: str) -> bool:
    return name.startswith("mtp.")


def is_shared_mtp_name(name: str) -> bool:
    """``mtp.*`` tensors that are the main model's embedding/head (never loaded; spec §4.4)."""
    return name.startswith("mtp.") and ("emb" in name or name.endswith("head.weight"))


def scale_name(name: str) -> str:
    """``x.weight`` → ``x.scale`` (the FP8/FP4 block-scale companion)."""
    if not name.endswith(".weight"):
        raise ValueError(f"tensor {name!r} has no .scale companion (not a .weight)")
    return name[: -len(".weight")] + ".scale"


def storage_kind(name: str) -> str:
    """Storage kind of an official tensor name (see the module docstring)."""
    local = _BLOCK_PREFIX.sub("", name)
    leaf = name.rsplit(".", 1)[-1]
    if local in FP8_WEIGHTS:
        return "fp8"
    if _OFFICIAL_EXPERT.match(name):
        return "expert"
    if leaf == "tid2eid":
        return "int"
    if leaf in _FP32_LEAVES or leaf.startswith("hc_"):
        return "fp32"
    return "bf16"


def official_name(module_name: str, expert: int | None = None) -> str:
    """Model state name (+ expert index for the stacked experts) → official name."""
    m = _STACKED_EXPERTS.match(module_name)
    if m:
        if expert is None:
            raise ValueError(f"{module_name!r} holds stacked experts: an expert index is needed")
        return f"{m.group(1)}.experts.{expert}.{m.group(2)}.weight"
    if expert is not None:
        raise ValueError(f"{module_name!r} is not a stacked expert tensor")
    for pat, rep in _TO_OFFICIAL:
        if pat.match(module_name):
            return pat.sub(rep, module_name)
    return module_name


def module_name(name: str) -> tuple[str, int | None]:
    """Official name (``model.`` prefix allowed) → (model state name, expert index or None)."""
    name = strip_prefix(name)
    m = _OFFICIAL_EXPERT.match(name)
    if m:
        return f"{m.group(1)}.{m.group(3)}", int(m.group(2))
    for pat, rep in _TO_MODULE:
        if pat.match(name):
            return pat.sub(rep, name), None
    return name, None


def official_tensors(model: nn.Module) -> list[OfficialTensor]:
    """Every official tensor the model's state (parameters + persistent buffers) corresponds to, in
    state order, the stacked experts split per expert."""
    out: list[OfficialTensor] = []
    for mod_name, t in model.state_dict(keep_vars=True).items():
        if _STACKED_EXPERTS.match(mod_name):
            for e in range(t.shape[0]):
                name = official_name(mod_name, e)
                out.append(OfficialTensor(name, mod_name, e, tuple(t.shape[1:]), storage_kind(name)))
        else:
            name = official_name(mod_name)
            out.append(OfficialTensor(name, mod_name, None, tuple(t.shape), storage_kind(name)))
    return out


def model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model tensors the checkpoint fills, by state name (live parameters and buffers)."""
    return dict(model.state_dict(keep_vars=True))
