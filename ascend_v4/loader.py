"""``load_model``: a preset with deterministic random weights, or an official checkpoint directory."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from .config import ModelConfig, preset_names
from .model import V4Model

log = logging.getLogger("ascend_v4.loader")

# Above this many parameters a random-weight model is refused: it would only exhaust memory.
RANDOM_WEIGHTS_LIMIT = 4_000_000_000

DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
          "fp16": torch.float16, "float16": torch.float16, "fp64": torch.float64, "float64": torch.float64}


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of {sorted(DTYPES)}")
    return DTYPES[dtype]


def parameter_count(config: ModelConfig) -> int:
    """Parameters V4Model allocates for ``config`` (embedding, head, blocks, MTP)."""
    model = V4Model(config, device="meta")
    return sum(p.numel() for p in model.parameters()) + sum(b.numel() for b in model.buffers())


def load_model(path_or_preset: str | Path, device: str | torch.device = "cpu", dtype: str | torch.dtype = torch.float32,
               fake_quant: bool | None = None, *, seed: int = 0, progress: bool = True) -> V4Model:
    """A ready V4 model in eval mode.

    ``path_or_preset``: a preset name (``tiny``, ``small``, ...) or a YAML config file → random
    weights from ``seed``; a directory with ``config.json`` and safetensors → the checkpoint.
    ``fake_quant=None`` turns the QAT fake-quant points on for FP8/FP4-quantised checkpoints and
    off for float ones and random weights.  ``model.tokenizer`` is the directory's
    ``tokenizer.json`` (through the ``tokenizers`` library) when present, else None.
    """
    dtype = parse_dtype(dtype)
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device} requested but no CUDA device is available (torch.cuda.is_available() is False)")
    if device.type == "npu" and not hasattr(torch, "npu"):
        raise ValueError(f"device {device} requested but torch-npu is not loaded (see README: installing on an Ascend host)")
    s = str(path_or_preset)
    path = Path(path_or_preset)
    tokenizer = None
    if s in preset_names() or path.is_file():
        config = ModelConfig.preset(s) if s in preset_names() else ModelConfig.from_file(path)
        n = parameter_count(config)
        if n > RANDOM_WEIGHTS_LIMIT:
            raise ValueError(f"{s}: random weights for {n / 1e9:.0f}B parameters would not fit; pass a checkpoint "
                             f"directory, or use the 'tiny' or 'small' preset")
        model = V4Model(config, dtype=dtype, device=device).init_random(seed)
        quantised = False
    elif path.is_dir():
        from .checkpoint import load_weights

        config = ModelConfig.from_file(path)
        model = V4Model(config, dtype=dtype, device=device)
        load_weights(model, path, progress=progress)
        quantised = config.weight_format != "bf16" or config.expert_format != "bf16"
        tokenizer = load_tokenizer(path)
    else:
        raise ValueError(f"{s!r} is neither a preset ({', '.join(preset_names())}), a config file nor a "
                         f"checkpoint directory")
    model.fake_quant = quantised if fake_quant is None else fake_quant
    model.tokenizer = tokenizer
    return model.eval()


def load_tokenizer(path: Path):
    file = Path(path) / "tokenizer.json"
    if not file.is_file():
        return None
    try:
        from tokenizers import Tokenizer
    except ImportError:
        log.warning("%s exists but the 'tokenizers' package is not installed; use --prompt-ids "
                    "(pip install tokenizers)", file)
        return None
    return Tokenizer.from_file(str(file))
