"""Official-format DeepSeek V4 checkpoints: load into a :class:`~ascend_v4.model.V4Model`, and write
small ones (spec §4, §13.1).

A checkpoint is a directory with ``config.json`` and either ``model.safetensors.index.json`` plus its
shards or a single ``model.safetensors``.  Tensors carry the official names
(:mod:`ascend_v4.checkpoint_names`) and are stored as

* FP8 e4m3 + a ``.scale`` with one scale per 128×128 block, e8m0 (``float8_e8m0fnu``) or fp32:
  ``w[i, j] · scale[i // 128, j // 128]``;
* FP4 e2m1 (routed experts of instruct checkpoints): int8 [out, in/2], element 2k in the low nibble
  and 2k+1 in the high nibble, with an e8m0 ``.scale`` [out, in/32] (one per 32 inputs);
* plain bf16 / fp32 / int64 tensors.

``config.weight_format`` / ``expert_format`` say which of these a checkpoint holds: the loader takes
them from the checkpoint's own ``config.json`` (from ``model.config`` when there is none) and
refuses tensors whose dtype the format does not allow.  Block scales of FP8 tensors may be e8m0 or
fp32 (both are official); FP4 scales must be e8m0.

Reading is lazy (``safetensors.safe_open``, memory-mapped, one tensor at a time, never pickle).
Every name, dtype and shape is checked from the file headers *before* the model is touched, so a
bad checkpoint leaves the model as it was.  Every error is a :class:`CheckpointError` naming the
file and the tensor.
"""

from __future__ import annotations

import json
import logging
import math
import re
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm import tqdm

from .checkpoint_names import (OfficialTensor, is_mtp_name, is_shared_mtp_name, model_state, official_tensors,
                               scale_name, strip_prefix)
from .config import ConfigError, ModelConfig, official_config_dict

__all__ = ["CheckpointError", "FP4_VALUES", "dequant_fp8", "quant_fp8", "unpack_fp4", "pack_fp4", "e8m0_to_float",
           "load_weights", "save_model", "INDEX_FILE", "SINGLE_FILE", "CONFIG_FILE"]

log = logging.getLogger("ascend_v4.checkpoint")

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
_SHARD_RE = re.compile(r"^model-\d{5}-of-\d{5}\.safetensors$")

FP8_BLOCK, FP4_BLOCK = 128, 32
FP8_MAX, FP4_MAX = 448.0, 6.0
#: e2m1 value of each nibble (spec §4.1): bit 3 = sign, bits 0–2 = magnitude code.
FP4_VALUES = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0,
                           -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0], dtype=torch.float32)
# Midpoints between consecutive e2m1 magnitudes (codes 0..7).
_FP4_MIDPOINTS = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0], dtype=torch.float32)

# safetensors dtype strings
_FLOAT_DTYPES = ("BF16", "F16", "F32")
_INT_DTYPES = ("I64", "I32")
_FP8_SCALE_DTYPES = ("F8_E8M0", "F32")


class CheckpointError(ValueError):
    """A checkpoint cannot be loaded; the message names the file and the tensor."""

    def __init__(self, file: Any, tensor: str | None, message: str):
        self.file, self.tensor = str(file), tensor
        where = f"{self.file}: tensor {tensor!r}" if tensor is not None else self.file
        super().__init__(f"{where}: {message}")


# ====================================================================== quantisation helpers
def e8m0_to_float(scale: torch.Tensor) -> torch.Tensor:
    """float8_e8m0fnu → fp32, exactly from the bits: byte b ↦ 2^(b−127), 255 ↦ NaN."""
    b = scale.view(torch.uint8).to(torch.int32)
    bits = torch.where(b == 0, 0x00400000, torch.where(b == 255, 0x7FC00000, b << 23))
    return bits.view(torch.float32)


def _scale_float(scale: torch.Tensor) -> torch.Tensor:
    if scale.dtype == torch.float8_e8m0fnu:
        return e8m0_to_float(scale)
    if scale.dtype == torch.float32:
        return scale
    raise ValueError(f"block scales must be float8_e8m0fnu or float32, got {scale.dtype}")


def _pow2_exponent(amax: torch.Tensor, qmax: float) -> torch.Tensor:
    """Smallest integer e with qmax·2^e ≥ amax (= ⌈log2(amax/qmax)⌉, exact), as int32."""
    _, e = torch.frexp(amax / qmax)
    q = torch.full_like(amax, qmax)
    e = torch.where(torch.ldexp(q, e - 1) >= amax, e - 1, e)  # frexp rounds v into [0.5, 1)
    e = torch.where(torch.ldexp(q, e) < amax, e + 1, e)       # amax / qmax rounded down
    return e.to(torch.int32)


def _e8m0(e: torch.Tensor) -> torch.Tensor:
    return (e + 127).clamp(0, 254).to(torch.uint8).view(torch.float8_e8m0fnu)


def _blocks_2d(w: torch.Tensor, bo: int, bi: int) -> tuple[torch.Tensor, int, int]:
    """Zero-pad a 2-D tensor to whole blocks and view it as [ob, bo, ib, bi]."""
    out, inn = w.shape
    ob, ib = -(-out // bo), -(-inn // bi)
    if (ob * bo, ib * bi) != (out, inn):
        w = torch.nn.functional.pad(w, (0, ib * bi - inn, 0, ob * bo - out))
    return w.reshape(ob, bo, ib, bi), ob, ib


def dequant_fp8(w_fp8: torch.Tensor, scale: torch.Tensor, *, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """FP8 e4m3 [out, in] with 128×128 block scales [⌈out/128⌉, ⌈in/128⌉] (e8m0 or fp32) →
    ``w[i, j] · scale[i // 128, j // 128]`` in ``dtype`` (fp32 by default)."""
    if w_fp8.dim() != 2 or w_fp8.dtype != torch.float8_e4m3fn:
        raise ValueError(f"dequant_fp8: expected a 2-D float8_e4m3fn weight, got {w_fp8.dtype} {tuple(w_fp8.shape)}")
    out, inn = w_fp8.shape
    want = (-(-out // FP8_BLOCK), -(-inn // FP8_BLOCK))
    if tuple(scale.shape) != want:
        raise ValueError(f"dequant_fp8: weight {tuple(w_fp8.shape)} needs a scale of shape {list(want)}, "
                         f"got {list(scale.shape)}")
    s = _scale_float(scale).to(dtype)
    blocks, ob, ib = _blocks_2d(w_fp8.to(dtype), FP8_BLOCK, FP8_BLOCK)
    full = (blocks * s[:, None, :, None]).reshape(ob * FP8_BLOCK, ib * FP8_BLOCK)
    return full[:out, :inn].contiguous()


def quant_fp8(w: torch.Tensor, scale_format: str = "ue8m0") -> tuple[torch.Tensor, torch.Tensor]:
    """[out, in] float → (float8_e4m3fn [out, in], scale [⌈out/128⌉, ⌈in/128⌉]), one scale per
    128×128 block: ``amax/448`` in fp32 (``scale_format="fp32"``, -Base) or the power of two
    ``2^⌈log2(amax/448)⌉`` stored as float8_e8m0fnu (``"ue8m0"``).  e4m3 rounding is to nearest even."""
    if scale_format not in ("ue8m0", "fp32"):
        raise ValueError(f"quant_fp8: scale_format must be 'ue8m0' or 'fp32', got {scale_format!r}")
    if w.dim() != 2:
        raise ValueError(f"quant_fp8: expected a 2-D weight, got shape {tuple(w.shape)}")
    out, inn = w.shape
    blocks, _, _ = _blocks_2d(w.detach().to(torch.float32), FP8_BLOCK, FP8_BLOCK)
    amax = blocks.abs().amax(dim=(1, 3)).clamp(min=FP8_MAX * 2.0 ** -126)  # keeps the scale ≥ 2^-126
    if scale_format == "ue8m0":
        e = _pow2_exponent(amax, FP8_MAX)
        s_float, scale = torch.ldexp(torch.ones_like(amax), e), _e8m0(e)
    else:
        s_float = scale = amax / FP8_MAX
    q = (blocks / s_float[:, None, :, None]).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    q = q.reshape(blocks.shape[0] * FP8_BLOCK, blocks.shape[2] * FP8_BLOCK)[:out, :inn].contiguous()
    return q, scale.contiguous()


def unpack_fp4(packed: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """int8 [out, in/2] (low nibble = element 2k, high nibble = element 2k+1) with e8m0 scales
    [out, ⌈in/32⌉] → fp32 [out, in]: ``FP4_VALUES[nibble] · scale``."""
    if packed.dim() != 2 or packed.dtype not in (torch.int8, torch.uint8):
        raise ValueError(f"unpack_fp4: expected a 2-D int8 tensor, got {packed.dtype} {tuple(packed.shape)}")
    out, half = packed.shape
    inn = 2 * half
    want = (out, -(-inn // FP4_BLOCK))
    if tuple(scale.shape) != want:
        raise ValueError(f"unpack_fp4: packed {tuple(packed.shape)} (in = {inn}) needs a scale of shape "
                         f"{list(want)}, got {list(scale.shape)}")
    b = packed.view(torch.uint8)
    codes = torch.stack((b & 0x0F, b >> 4), dim=-1).reshape(out, inn).long()
    values = FP4_VALUES.to(packed.device)[codes]
    s = _scale_float(scale).repeat_interleave(FP4_BLOCK, dim=1)[:, :inn]
    return values * s


def _round_e2m1(x: torch.Tensor) -> torch.Tensor:
    """|x| ≤ 6 → nibble codes (uint8) of the nearest e2m1 value, ties to the even code."""
    mag = x.abs()
    code = torch.zeros(x.shape, dtype=torch.uint8, device=x.device)
    tie = torch.zeros(x.shape, dtype=torch.bool, device=x.device)
    for c, m in enumerate(_FP4_MIDPOINTS.tolist()):  # 7 thresholds, each a whole-tensor op
        code += mag > m  # code = number of midpoints strictly below |x|: a tie picks the lower code c
        if c % 2 == 1:   # ... which is odd at 0.75, 1.75 and 3.5: round those ties up to the even code
            tie |= mag == m
    code += tie
    return code | (torch.signbit(x).to(torch.uint8) << 3)


def pack_fp4(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[out, in] float (in even) → (int8 [out, in/2], float8_e8m0fnu scale [out, ⌈in/32⌉]).

    Per 32 inputs, scale = 2^⌈log2(amax/6)⌉ (amax ≥ 6·2^-126); each value is rounded to the nearest
    e2m1 value (ties to even) of w/scale; element 2k goes to the low nibble, 2k+1 to the high one."""
    if w.dim() != 2 or w.shape[1] % 2:
        raise ValueError(f"pack_fp4: expected a 2-D weight with an even input dim, got shape {tuple(w.shape)}")
    out, inn = w.shape
    blocks, _, nb = _blocks_2d(w.detach().to(torch.float32), 1, FP4_BLOCK)
    blocks = blocks.reshape(out, nb, FP4_BLOCK)
    amax = blocks.abs().amax(dim=-1).clamp(min=FP4_MAX * 2.0 ** -126)
    e = _pow2_exponent(amax, FP4_MAX)
    x = (blocks / torch.ldexp(torch.ones_like(amax), e)[..., None]).clamp(-FP4_MAX, FP4_MAX)
    codes = _round_e2m1(x.reshape(out, nb * FP4_BLOCK)[:, :inn])
    packed = (codes[:, 0::2] | (codes[:, 1::2] << 4)).view(torch.int8)
    return packed.contiguous(), _e8m0(e).contiguous()


# ====================================================================== reading
@dataclass
class _Src:
    file: Path
    key: str                 # the name as stored in the file (maybe with "model.")
    dtype: str               # safetensors dtype string
    shape: tuple[int, ...]


@dataclass
class _Item:
    t: OfficialTensor
    mode: str                # "float" | "int" | "fp8" | "fp4"
    src: _Src
    scale: _Src | None


def _storage_mode(kind: str, cfg: ModelConfig) -> str:
    """What the checkpoint format holds for a tensor of this storage kind."""
    if kind == "fp8":
        return "fp8" if cfg.weight_format == "fp8" else "float"
    if kind == "expert":
        return {"fp4": "fp4", "fp8": "fp8", "bf16": "float"}[cfg.expert_format]
    return "int" if kind == "int" else "float"


def _header_diagnosis(file: Path) -> tuple[str, list[str]]:
    """Why a safetensors file cannot be opened, read from its raw header: (reason, tensors hit)."""
    try:
        size = file.stat().st_size
        with open(file, "rb") as fh:
            head = fh.read(8)
            if len(head) < 8:
                return f"the file has {size} bytes, fewer than the 8-byte header length", []
            n = int.from_bytes(head, "little")
            if n > size - 8:
                return f"the header claims {n} bytes but the file has only {size}", []
            header = json.loads(fh.read(n))
    except (OSError, ValueError) as e:
        return f"the header is unreadable ({e})", []
    if not isinstance(header, dict):
        return "the header is not a JSON object", []
    data = size - 8 - n
    beyond = [k for k, v in header.items()
              if k != "__metadata__" and isinstance(v, dict) and v.get("data_offsets", [0, 0])[-1] > data]
    if beyond:
        return f"truncated: its data ends at byte {size} but tensors extend past it", beyond
    return "corrupt header or data", []


def _open(stack: ExitStack, file: Path, listed: list[str]):
    if not file.is_file():
        raise CheckpointError(file, min(listed) if listed else None,
                              f"shard file is missing ({len(listed)} tensors are mapped to it in {INDEX_FILE})")
    try:
        return stack.enter_context(safe_open(str(file), framework="pt", device="cpu"))
    except Exception as e:  # SafetensorError, OSError, ...: rewrap with the file and a tensor name
        reason, hit = _header_diagnosis(file)
        tensor = hit[0] if hit else (min(listed) if listed else None)
        extra = f" ({len(hit)} tensors affected)" if len(hit) > 1 else ""
        raise CheckpointError(file, tensor if tensor is not None else "<unknown: header unreadable>",
                              f"cannot open the safetensors file: {reason}{extra}; {type(e).__name__}: {e}") from None


def _checkpoint_files(root: Path) -> tuple[Path, dict[Path, list[str]] | None]:
    """(the file that lists the tensors, {shard: [names]} from the index or None for a single file)."""
    if root.is_file():
        return root, None
    if not root.is_dir():
        raise CheckpointError(root, None, "checkpoint directory does not exist")
    index = root / INDEX_FILE
    if index.is_file():
        try:
            data = json.loads(index.read_text(encoding="utf-8"))
            weight_map = data["weight_map"]
            if not isinstance(weight_map, dict):
                raise TypeError("'weight_map' is not an object")
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise CheckpointError(index, None, f"cannot read the index: {type(e).__name__}: {e}") from None
        shards: dict[Path, list[str]] = {}
        for name, shard in weight_map.items():
            if not isinstance(shard, str) or Path(shard).name != shard:
                raise CheckpointError(index, name, f"index maps it to {shard!r}, not a file name in the directory")
            shards.setdefault(root / shard, []).append(name)
        return index, shards
    single = root / SINGLE_FILE
    if single.is_file():
        return single, None
    raise CheckpointError(root, None, f"no {INDEX_FILE} or {SINGLE_FILE} in the checkpoint directory")


def _read_formats(root: Path, model) -> tuple[ModelConfig, str]:
    cfg_file = root / CONFIG_FILE if root.is_dir() else root.parent / CONFIG_FILE
    if cfg_file.is_file():
        try:
            return ModelConfig.from_file(cfg_file), str(cfg_file)
        except ConfigError as e:
            raise CheckpointError(cfg_file, None, f"cannot read the checkpoint config: {e}") from None
    return model.config, "model.config"


def _check_item(item: _Item, cfg: ModelConfig) -> None:
    """dtype and shape of one tensor (and its scale) against the format, from the headers only."""
    t, src, mode = item.t, item.src, item.mode
    shape = t.shape
    fmt = (f"weight_format {cfg.weight_format!r}" if t.kind == "fp8" else
           f"expert_format {cfg.expert_format!r}" if t.kind == "expert" else f"a plain {t.kind} tensor")

    def bad_dtype(want: str, what: Any = None) -> CheckpointError:
        s = what or src
        return CheckpointError(s.file, s.key, f"dtype {s.dtype} is not allowed: {fmt} needs {want}")

    def bad_shape(want, what: Any = None, note: str = "") -> CheckpointError:
        s = what or src
        return CheckpointError(s.file, s.key, f"shape mismatch: file has {list(s.shape)}, the model needs "
                                              f"{list(want)}{note}")

    if mode == "float":
        if src.dtype not in _FLOAT_DTYPES:
            raise bad_dtype("bf16/fp16/fp32 (no .scale)")
        if src.shape != shape:
            raise bad_shape(shape)
    elif mode == "int":
        if src.dtype not in _INT_DTYPES:
            raise bad_dtype("int64 or int32")
        if src.shape != shape:
            raise bad_shape(shape)
    else:
        if len(shape) != 2:
            raise CheckpointError(src.file, src.key, f"a quantised tensor must be 2-D, the model has {list(shape)}")
        out, inn = shape
        if mode == "fp8":
            if src.dtype != "F8_E4M3":
                raise bad_dtype("F8_E4M3 with a 128x128 F8_E8M0/F32 .scale")
            if src.shape != shape:
                raise bad_shape(shape)
            want_s, s_dtypes = (math.ceil(out / FP8_BLOCK), math.ceil(inn / FP8_BLOCK)), _FP8_SCALE_DTYPES
        else:
            if src.dtype != "I8":
                raise bad_dtype("I8 (packed FP4 e2m1, two per byte) with an F8_E8M0 .scale per 32 inputs")
            if inn % 2 or src.shape != (out, inn // 2):
                raise bad_shape((out, inn // 2), note=f" (packed FP4 of logical [{out}, {inn}])")
            want_s, s_dtypes = (out, math.ceil(inn / FP4_BLOCK)), ("F8_E8M0",)
        sc = item.scale
        if sc is None:
            raise CheckpointError(src.file, src.key, f"{'FP8' if mode == 'fp8' else 'FP4'} weight without its "
                                                     f"companion scale tensor {scale_name(t.name)!r}")
        if sc.dtype not in s_dtypes:
            raise CheckpointError(sc.file, sc.key, f"dtype {sc.dtype} is not allowed for the block scale of "
                                                   f"{t.name!r}: {fmt} needs {' or '.join(s_dtypes)}")
        if sc.shape != want_s:
            raise bad_shape(want_s, sc, f" (block scale of {t.name!r})")


def _read(handle, src: _Src) -> torch.Tensor:
    try:
        return handle.get_tensor(src.key)
    except Exception as e:  # e.g. the file changed under the memory map
        raise CheckpointError(src.file, src.key, f"cannot read the tensor data: {type(e).__name__}: {e}") from None


@torch.no_grad()
def load_weights(model, path, *, progress: bool = True) -> dict[str, Any]:
    """Load an official-format checkpoint into ``model`` in place (dequantising into each parameter's
    dtype, on the model's device).  ``path``: a directory with ``model.safetensors.index.json`` +
    shards or ``model.safetensors`` (or the ``.safetensors`` file itself).

    When every ``mtp.*`` tensor is absent the MTP block is skipped and ``model.mtp_enabled`` set to
    False; a partly present MTP block is an error.  Returns a report dict (files, tensors, bytes,
    formats, mtp, skipped).  Raises :class:`CheckpointError` naming the file and the tensor.
    """
    root = Path(path)
    listing, shards = _checkpoint_files(root)
    cfg, cfg_source = _read_formats(root, model)
    state = model_state(model)
    expected = official_tensors(model)

    with ExitStack() as stack:
        # ---- headers: every stored tensor, by its official name
        handles: dict[Path, Any] = {}
        found: dict[str, _Src] = {}
        skipped: list[str] = []
        for file, listed in (shards or {listing: None}).items():
            f = _open(stack, file, listed or [])
            handles[file] = f
            keys = list(f.keys())
            if listed is not None:
                missing_in_shard = sorted(set(listed) - set(keys))
                if missing_in_shard:
                    raise CheckpointError(file, missing_in_shard[0], f"listed in {INDEX_FILE} but not in this shard"
                                          + (f" ({len(missing_in_shard)} such tensors)" if len(missing_in_shard) > 1
                                             else ""))
                not_listed = sorted(set(keys) - set(listed))
                if not_listed:
                    raise CheckpointError(file, not_listed[0], f"unexpected tensor: in the shard but not mapped to it "
                                                               f"by {INDEX_FILE}")
            for key in keys:
                name = strip_prefix(key)
                if is_shared_mtp_name(name):  # MTP embedding/head: shared with the main model (§4.4)
                    skipped.append(key)
                    continue
                if name in found:
                    raise CheckpointError(file, key, f"duplicate tensor: {found[name].key!r} in "
                                                     f"{found[name].file.name} has the same name")
                sl = f.get_slice(key)
                found[name] = _Src(file, key, sl.get_dtype(), tuple(sl.get_shape()))

        # ---- names: missing, MTP, unexpected
        model_mtp = [t for t in expected if is_mtp_name(t.name)]
        mtp_loaded = bool(model_mtp) and any(is_mtp_name(n) for n in found)
        if model_mtp and not mtp_loaded:
            expected = [t for t in expected if not is_mtp_name(t.name)]
        missing = [t.name for t in expected if t.name not in found]
        if missing:
            note = ""
            if mtp_loaded and all(is_mtp_name(n) for n in missing):
                note = " (the MTP block is only partly present: include all of its tensors or none)"
            more = f"; {len(missing) - 1} more missing, e.g. {missing[1:4]}" if len(missing) > 1 else ""
            raise CheckpointError(listing, missing[0], f"missing from the checkpoint{more}{note}")
        items: list[_Item] = []
        used: set[str] = set()
        for t in expected:
            mode = _storage_mode(t.kind, cfg)
            scale = None
            if mode in ("fp8", "fp4"):
                scale = found.get(scale_name(t.name))
                used.add(scale_name(t.name))
            items.append(_Item(t, mode, found[t.name], scale))
            used.add(t.name)
        unexpected = [n for n in found if n not in used]
        if unexpected:
            src = found[unexpected[0]]
            weight = unexpected[0][: -len(".scale")] + ".weight" if unexpected[0].endswith(".scale") else None
            plain = {it.t.name for it in items if it.mode not in ("fp8", "fp4")}
            why = (f"a block scale, but the checkpoint format ({cfg_source}: weight_format {cfg.weight_format!r}, "
                   f"expert_format {cfg.expert_format!r}) stores {weight!r} unquantised" if weight in plain
                   else "not a tensor of this model (it has no MTP block: num_nextn_predict_layers = 0)"
                   if is_mtp_name(unexpected[0]) and not model_mtp else "not a tensor of this model")
            more = f" ({len(unexpected)} unexpected tensors, e.g. {unexpected[:4]})" if len(unexpected) > 1 else ""
            raise CheckpointError(src.file, src.key, f"unexpected tensor: {why}{more}")

        # ---- dtypes and shapes, still from the headers only; the small integer tables by value
        n_experts = model.config.n_routed_experts
        tables: dict[str, torch.Tensor] = {}
        for item in items:
            _check_item(item, cfg)
            if item.mode == "int":
                src = item.src
                v = _read(handles[src.file], src)
                if v.numel() and (int(v.min()) < 0 or int(v.max()) >= n_experts):
                    raise CheckpointError(src.file, src.key, f"expert ids must lie in [0, {n_experts - 1}], got "
                                                             f"range [{int(v.min())}, {int(v.max())}]")
                tables[item.t.name] = v

        # ---- data, one tensor at a time
        n_bytes = 0
        for item in tqdm(items, desc="loading weights", unit="tensor", disable=not progress):
            t, src = item.t, item.src
            dst = state[t.module_name]
            if t.expert is not None:
                dst = dst[t.expert]
            raw = tables.pop(t.name) if t.name in tables else _read(handles[src.file], src)
            n_bytes += raw.numel() * raw.element_size()
            if item.mode in ("fp8", "fp4"):
                s = _read(handles[item.scale.file], item.scale)
                n_bytes += s.numel() * s.element_size()
                hp = torch.float64 if dst.dtype == torch.float64 else torch.float32
                value = dequant_fp8(raw, s, dtype=hp) if item.mode == "fp8" else unpack_fp4(raw, s)
            else:
                value = raw
            dst.copy_(value)

    if len(model.mtp):
        model.mtp_enabled = mtp_loaded
        if not mtp_loaded:
            log.warning("%s: the checkpoint has no mtp.* tensors; MTP is disabled (model.mtp_enabled = False)",
                        listing)
    files = sorted(p.name for p in handles)
    log.info("loaded %d tensors (%.1f MB) from %s (%d files)", len(items), n_bytes / 1e6, root, len(files))
    return {"path": str(root), "files": files, "tensors": len(items), "bytes": n_bytes, "mtp": mtp_loaded,
            "skipped": skipped, "weight_format": cfg.weight_format, "expert_format": cfg.expert_format,
            "scale_format": cfg.scale_format, "format_source": cfg_source}


# ====================================================================== writing
def _stored_bytes(t: OfficialTensor, mode: str, scale_format: str) -> int:
    n = math.prod(t.shape)
    if mode == "fp8":
        out, inn = t.shape
        return n + math.ceil(out / FP8_BLOCK) * math.ceil(inn / FP8_BLOCK) * (1 if scale_format == "ue8m0" else 4)
    if mode == "fp4":
        return n // 2 + t.shape[0] * math.ceil(t.shape[1] / FP4_BLOCK)
    if mode == "int":
        return 8 * n
    return (4 if t.kind == "fp32" else 2) * n


def _encode(t: OfficialTensor, value: torch.Tensor, mode: str, cfg: ModelConfig) -> dict[str, torch.Tensor]:
    value = value.detach().to("cpu")
    if mode == "fp8":
        q, s = quant_fp8(value, cfg.scale_format)
        return {t.name: q, scale_name(t.name): s}
    if mode == "fp4":
        q, s = pack_fp4(value)
        return {t.name: q, scale_name(t.name): s}
    if mode == "int":
        return {t.name: value.to(torch.int64).contiguous()}
    return {t.name: value.to(torch.float32 if t.kind == "fp32" else torch.bfloat16).contiguous()}


@torch.no_grad()
def save_model(model, path, *, weight_format: str | None = None, expert_format: str | None = None,
               scale_format: str | None = None, max_shard_bytes: int = 4 * 2 ** 30) -> dict[str, Any]:
    """Write ``model`` as an official-format checkpoint directory: ``config.json``, and
    ``model.safetensors`` (when it fits in ``max_shard_bytes``) or ``model-0000i-of-0000n.safetensors``
    shards + ``model.safetensors.index.json``.  Formats default to ``model.config``'s; FP8 tensors are
    quantised per 128×128 block and FP4 experts per 32 inputs.  Stale checkpoint files of the other
    layout in the directory are removed.  Returns {files, tensors (official tensors), entries (file
    entries, scales included), total_size (bytes)}."""
    changes = {k: v for k, v in (("weight_format", weight_format), ("expert_format", expert_format),
                                 ("scale_format", scale_format)) if v is not None}
    cfg = model.config.replace(**changes)  # validates the format names (ConfigError)
    if max_shard_bytes <= 0:
        raise ValueError(f"max_shard_bytes must be > 0, got {max_shard_bytes}")
    root = Path(path)
    root.mkdir(parents=True, exist_ok=True)
    state = model_state(model)
    tensors = official_tensors(model)

    shards: list[list[OfficialTensor]] = [[]]
    sizes = [0]
    total = 0
    for t in tensors:
        nb = _stored_bytes(t, _storage_mode(t.kind, cfg), cfg.scale_format)
        if shards[-1] and sizes[-1] + nb > max_shard_bytes:
            shards.append([])
            sizes.append(0)
        shards[-1].append(t)
        sizes[-1] += nb
        total += nb

    for p in root.iterdir():  # stale files of a previous save (either layout)
        if p.name in (INDEX_FILE, SINGLE_FILE) or _SHARD_RE.match(p.name):
            p.unlink()
    n = len(shards)
    names = [SINGLE_FILE] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    weight_map: dict[str, str] = {}
    for fname, group in zip(names, shards):
        data: dict[str, torch.Tensor] = {}
        for t in group:
            value = state[t.module_name] if t.expert is None else state[t.module_name][t.expert]
            data.update(_encode(t, value, _storage_mode(t.kind, cfg), cfg))
        save_file(data, str(root / fname), metadata={"format": "pt"})
        weight_map.update({k: fname for k in data})
    if n > 1:
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (root / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
    (root / CONFIG_FILE).write_text(json.dumps(official_config_dict(cfg), indent=2) + "\n", encoding="utf-8")
    log.info("saved %d tensors (%d bytes) to %s in %d file(s)", len(weight_map), total, root, n)
    return {"files": names, "tensors": len(tensors), "entries": len(weight_map), "total_size": total}
