"""``ascend-v4 dump``: run a prefill (and greedy decode steps) and record V4's intermediate tensors.

A run directory holds

* ``manifest.json`` — everything needed to decide whether two runs may be compared and to explain
  a difference: package / torch / torch-npu versions, host, chip family, config hash, weights
  identity, input ids, decode ids, seed, dtype, requested backend and the backend that actually ran
  each op (per step), and an entry per tensor (file, shape, dtype, forward order, summary stats);
* ``prefill.safetensors`` and ``step1.safetensors`` … ``stepN.safetensors`` — the tensors.

Tensor names are the model's probe names (``embed``, ``layers.{i}.attn.out``, ``logits``, …, see
:meth:`ascend_v4.model.V4Model.forward`); decode steps carry a ``step{k}/`` prefix.  Include /
exclude glob patterns match either the full name or the name without its step prefix, so
``layers.1.*`` selects layer 1 in the prefill and in every decode step.

Weights identity (``manifest["weights"]["hashes"]``) is independent of the dtype the model was
loaded in, so a bf16 run and an fp64 run of the same weights are comparable:

* presets / YAML configs: ``recipe`` = hash of (config hash, seed) of the deterministic random init;
* checkpoint directories: ``files_sampled`` (safetensors headers + 64 evenly spaced 64 KiB samples of
  each file; always) and ``files_full`` (every byte; when the files total ≤ 16 GiB or
  ``weights_hash="full"``);
* always when cheap: ``state_<dtype>`` = sha256 over the loaded state dict (names, dtypes, shapes,
  bytes, in name order), which only matches runs loaded in the same dtype.
"""

from __future__ import annotations

import datetime
import fnmatch
import hashlib
import importlib.metadata
import json
import os
import platform
import re
import socket
import sys
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch
from safetensors.torch import save_file

DUMP_FORMAT = "ascend-v4-dump/1"
MANIFEST_FILE = "manifest.json"
DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.float64: "fp64"}
FULL_HASH_LIMIT = 16 * 2 ** 30          # bytes: larger checkpoints get the sampled file hash only (unless "full")
_SAMPLES, _SAMPLE_BYTES = 64, 64 * 2 ** 10
_STEP_RE = re.compile(r"^step(\d+)$")
_LAYER_RE = re.compile(r"^layers\.(\d+)\.(.+)$")


# ---------------------------------------------------------------------------------------------- names
def split_name(name: str) -> tuple[str, str]:
    """``"step3/layers.0.attn.out"`` → ``("step3", "layers.0.attn.out")``; no prefix → ``"prefill"``."""
    if "/" in name:
        step, base = name.split("/", 1)
        return step, base
    return "prefill", name


def step_index(step: str) -> int:
    """0 for the prefill, k for ``step{k}``."""
    if step == "prefill":
        return 0
    m = _STEP_RE.match(step)
    if not m:
        raise ValueError(f"not a step name: {step!r}")
    return int(m.group(1))


def layer_and_kind(base: str) -> tuple[int | None, str]:
    """``"layers.3.attn.out"`` → ``(3, "attn.out")``; ``"logits"`` → ``(None, "logits")``."""
    m = _LAYER_RE.match(base)
    return (int(m.group(1)), m.group(2)) if m else (None, base)


def split_patterns(values: Iterable[str] | None) -> list[str]:
    """Flatten repeated / comma-separated pattern arguments."""
    out: list[str] = []
    for v in values or ():
        out += [p.strip() for p in str(v).split(",") if p.strip()]
    return out


def selected(name: str, include: Sequence[str] = (), exclude: Sequence[str] = ()) -> bool:
    """Whether ``name`` passes the include (any; none = all) and exclude (none) glob patterns."""
    _, base = split_name(name)

    def hit(patterns: Sequence[str]) -> bool:
        return any(fnmatch.fnmatchcase(name, p) or fnmatch.fnmatchcase(base, p) for p in patterns)

    if include and not hit(include):
        return False
    return not (exclude and hit(exclude))


# ---------------------------------------------------------------------------------------------- hashes
def _update_with_tensor(h, t: torch.Tensor, chunk_bytes: int = 64 * 2 ** 20) -> None:
    flat = t.detach().reshape(-1)
    step = max(1, chunk_bytes // max(1, flat.element_size()))
    for i in range(0, flat.numel(), step):
        part = flat[i:i + step].to("cpu").contiguous()
        h.update(part.view(torch.uint8).numpy())


def state_hash(model: torch.nn.Module) -> str:
    """sha256 over the state dict: names, dtypes, shapes and bytes, in name order (streamed in chunks)."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(f"{name}|{str(t.dtype).replace('torch.', '')}|{tuple(t.shape)}\n".encode())
        _update_with_tensor(h, t)
    return h.hexdigest()


def _files_hash(files: Sequence[Path], full: bool) -> str:
    h = hashlib.sha256(b"full\n" if full else b"sampled\n")
    for f in files:
        size = f.stat().st_size
        h.update(f"{f.name}|{size}\n".encode())
        with open(f, "rb") as fh:
            if full:
                while chunk := fh.read(16 * 2 ** 20):
                    h.update(chunk)
                continue
            head = fh.read(8)
            h.update(head)
            n = int.from_bytes(head, "little") if len(head) == 8 else 0
            h.update(fh.read(min(n, size)))
            start = 8 + n
            span = max(0, size - start - _SAMPLE_BYTES)
            for k in range(_SAMPLES):
                fh.seek(start + (span * k) // max(1, _SAMPLES - 1))
                h.update(fh.read(_SAMPLE_BYTES))
    return h.hexdigest()


def weights_identity(spec: str | Path | None, model, *, seed: int = 0, mode: str = "auto") -> dict[str, Any]:
    """How the weights of ``model`` (loaded from ``spec``) are identified in the manifest.

    ``mode``: ``auto`` (full file hash up to 16 GiB of checkpoint files), ``full`` or ``sampled``.
    ``spec=None``: an in-memory model of unknown origin (only the dtype-specific state hash).
    """
    if mode not in ("auto", "full", "sampled"):
        raise ValueError(f"weights hash mode must be auto, full or sampled, got {mode!r}")
    hashes: dict[str, str] = {}
    ident: dict[str, Any] = {"spec": None if spec is None else str(spec)}
    param_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    path = Path(spec) if spec is not None else None
    if path is not None and path.is_dir():
        files = sorted(path.glob("*.safetensors"))
        if not files:
            raise FileNotFoundError(f"{path}: no *.safetensors files to hash")
        total = sum(f.stat().st_size for f in files)
        ident.update(source="checkpoint", files=len(files), file_bytes=total)
        hashes["files_sampled"] = _files_hash(files, full=False)
        if mode == "full" or (mode == "auto" and total <= FULL_HASH_LIMIT):
            hashes["files_full"] = _files_hash(files, full=True)
    elif spec is not None:
        recipe = {"init": "V4Model.init_random", "config_hash": model.config.config_hash(), "seed": int(seed)}
        ident.update(source="random-init", seed=int(seed))
        hashes["recipe"] = hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()
    else:
        ident.update(source="in-memory")
    if spec is None or mode == "full" or param_bytes <= FULL_HASH_LIMIT:
        hashes[f"state_{DTYPE_NAMES.get(model.dtype, str(model.dtype))}"] = state_hash(model)
    ident["hashes"] = hashes
    ident["state_bytes"] = param_bytes
    return ident


# ---------------------------------------------------------------------------------------------- environment
def _dist_version(*names: str) -> str | None:
    for n in names:
        try:
            return importlib.metadata.version(n)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def versions() -> dict[str, Any]:
    from .. import __version__

    v = {"ascend_v4": __version__, "torch": torch.__version__, "torch_npu": _dist_version("torch-npu", "torch_npu"),
         "python": platform.python_version(), "safetensors": _dist_version("safetensors")}
    if "torch_npu" in sys.modules:
        v["torch_npu_runtime"] = getattr(getattr(sys.modules["torch_npu"], "version", None), "__version__", None)
    return v


def host_info(device: torch.device) -> dict[str, Any]:
    info: dict[str, Any] = {"platform": platform.platform(), "machine": platform.machine(),
                            "hostname": socket.gethostname(), "device": str(device), "chip": None}
    if device.type == "npu":
        from op_adapters.devices import npu_status
        from op_adapters.npu.chips import current_family

        info["npu_status"] = npu_status()[1]
        info["chip"] = current_family()
        try:
            info["device_name"] = torch.npu.get_device_name(device)  # type: ignore[attr-defined]
        except Exception:
            pass
    elif device.type == "cuda":
        info["device_name"] = torch.cuda.get_device_name(device)
        info["chip"] = info["device_name"]
    for var in ("ASCEND_V4_BACKEND", "ASCEND_V4_NPU_CHIP", "ASCEND_TOOLKIT_HOME"):
        if os.environ.get(var):
            info.setdefault("env", {})[var] = os.environ[var]
    return info


def resolve_backend(backend: str, device: str | None) -> tuple[str, torch.device]:
    """(backend, device) for a dump: each backend's natural device unless ``device`` is given."""
    from op_adapters.devices import npu_status

    if backend not in ("auto", "reference", "npu", "cuda"):
        raise ValueError(f"unknown backend {backend!r}; choose npu, cuda, reference or auto")
    if backend == "auto":
        if device is not None:
            kind = torch.device(device).type if not str(device).startswith("npu") else "npu"
            backend = {"npu": "npu", "cuda": "cuda"}.get(kind, "reference")
        elif npu_status()[0]:
            backend = "npu"
        elif torch.cuda.is_available():
            backend = "cuda"
        else:
            backend = "reference"
    if device is None:
        device = {"npu": "npu:0", "cuda": "cuda:0", "reference": "cpu"}[backend]
    if str(device).startswith("npu"):
        ok, why = npu_status()
        if not ok:
            raise ValueError(f"device {device} (backend {backend}) is not usable here: {why}")
    elif str(device).startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {device} (backend {backend}) is not usable here: no CUDA device")
    return backend, torch.device(device)


# ---------------------------------------------------------------------------------------------- recording
class _Recorder:
    """The model's probe: copies selected tensors to the CPU, concatenating prefill chunks."""

    def __init__(self, include: Sequence[str], exclude: Sequence[str]):
        self.include, self.exclude = list(include), list(exclude)
        self.prefix = ""
        self.parts: dict[str, list[torch.Tensor]] = {}
        self.probe_points: list[str] = []          # every name the model offered, selected or not
        self._seen: set[str] = set()

    def __call__(self, name: str, tensor: torch.Tensor) -> None:
        full = self.prefix + name
        if full not in self._seen:
            self._seen.add(full)
            self.probe_points.append(full)
        if not selected(full, self.include, self.exclude):
            return
        t = tensor.detach().to("cpu", copy=True).contiguous()  # a copy: cache views change later
        if name.endswith("attn.compressed"):
            self.parts[full] = [t]                 # the cache's entries so far: the last chunk has them all
        else:
            self.parts.setdefault(full, []).append(t)

    def take(self) -> dict[str, torch.Tensor]:
        out = {k: (v[0] if len(v) == 1 else _cat_chunks(v)) for k, v in self.parts.items()}
        self.parts = {}
        return out


def _cat_chunks(parts: list[torch.Tensor]) -> torch.Tensor:
    """Concatenate prefill chunks along the sequence; index tensors whose width grew (top-k over
    min(k, entries so far)) are padded with -1 (= no entry) to the widest chunk."""
    width = max(p.shape[-1] for p in parts)
    if any(p.shape[-1] != width for p in parts) and not parts[0].is_floating_point():
        parts = [torch.nn.functional.pad(p, (0, width - p.shape[-1]), value=-1) for p in parts]
    return torch.cat(parts, dim=1)


def _stats(t: torch.Tensor) -> dict[str, Any]:
    if t.numel() == 0:
        return {}
    if t.is_floating_point():
        x = t.double()
        fin = torch.isfinite(x)
        xf = x[fin].abs()
        return {"absmax": float(xf.max()) if xf.numel() else None, "mean_abs": float(xf.mean()) if xf.numel() else None,
                "nan": int(torch.isnan(x).sum()), "inf": int(torch.isinf(x).sum())}
    return {"min": int(t.min()), "max": int(t.max())}


def _reset_last_backends() -> None:
    # op_adapters keeps the backend that *last* ran each op in this process; clear it so a step's
    # record lists only the ops that step ran.
    from op_adapters import registry

    registry.reset_last_backends()


def dump_model(model, prompt_ids: Sequence[int], out: str | Path, *, backend: str = "auto", decode_steps: int = 0,
               decode_ids: Sequence[int] | None = None, include: Iterable[str] | None = None,
               exclude: Iterable[str] | None = None, prefill_chunk: int | None = None,
               weights: dict[str, Any] | None = None, source: str | None = None, seed: int | None = None,
               note: str | None = None) -> dict[str, Any]:
    """Run ``model`` on ``prompt_ids`` (batch 1) under ``backend`` and write a run directory.

    ``decode_steps`` greedy one-token steps follow the prefill; ``decode_ids`` instead feeds those
    tokens (to follow another run's decode path).  ``prefill_chunk`` (default: the whole prompt in
    one chunk) is the model's chunk size during the dump; chunks are concatenated along the
    sequence.  ``weights``: a :func:`weights_identity` dict (default: the in-memory state hash).
    Returns the manifest.
    """
    import op_adapters

    from .. import __version__

    ids = [int(i) for i in prompt_ids]
    if not ids:
        raise ValueError("prompt_ids is empty")
    if decode_ids is not None:
        decode_ids = [int(i) for i in decode_ids]
        if decode_steps not in (0, len(decode_ids)):
            raise ValueError(f"decode_steps={decode_steps} disagrees with {len(decode_ids)} decode_ids")
        decode_steps = len(decode_ids)
    if decode_steps < 0:
        raise ValueError(f"decode_steps must be >= 0, got {decode_steps}")
    vocab = model.config.vocab_size
    bad = [i for i in ids + list(decode_ids or []) if not 0 <= i < vocab]
    if bad:
        raise ValueError(f"token ids {bad[:8]} are outside the vocabulary [0, {vocab - 1}]")
    include, exclude = split_patterns(include), split_patterns(exclude)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for stale in list(out.glob("*.safetensors")):
        if stale.stem == "prefill" or _STEP_RE.match(stale.stem):
            stale.unlink()
    (out / MANIFEST_FILE).unlink(missing_ok=True)
    if weights is None:
        weights = weights_identity(None, model)

    rec = _Recorder(include, exclude)
    tensors: dict[str, dict[str, Any]] = {}
    steps: list[dict[str, Any]] = []
    fed: list[int] = []
    greedy: list[int] = []
    order = 0
    old_chunk = model.prefill_chunk
    used_chunk = int(prefill_chunk) if prefill_chunk else max(old_chunk, len(ids))
    model.prefill_chunk = used_chunk
    try:
        with torch.no_grad(), op_adapters.use_backend(backend):
            cache = model.new_cache(1, len(ids) + decode_steps + 1)
            x = torch.tensor([ids], dtype=torch.int64, device=model.device)
            for k in range(decode_steps + 1):
                step = "prefill" if k == 0 else f"step{k}"
                rec.prefix = "" if k == 0 else f"{step}/"
                _reset_last_backends()
                logits = model(x, cache, probe=rec)
                ran = op_adapters.last_backends()
                nxt = int(logits[0, -1].float().argmax())
                greedy.append(nxt)
                got = rec.take()
                file = f"{step}.safetensors"
                if got:
                    save_file({split_name(n)[1]: t for n, t in got.items()}, str(out / file),
                              metadata={"format": "pt", "step": step})
                for n, t in got.items():
                    layer, kind = layer_and_kind(split_name(n)[1])
                    tensors[n] = {"file": file, "key": split_name(n)[1], "step": step, "layer": layer, "kind": kind,
                                  "shape": list(t.shape), "dtype": str(t.dtype).replace("torch.", ""),
                                  "order": order, "bytes": t.numel() * t.element_size(), "stats": _stats(t)}
                    order += 1
                steps.append({"step": step, "input_ids": ids if k == 0 else [fed[-1]],
                              "positions": [len(ids) + k - 1, len(ids) + k - 1] if k else [0, len(ids) - 1],
                              "argmax_next": nxt, "file": file if got else None, "tensors": len(got),
                              "backends": dict(sorted(ran.items()))})
                if k < decode_steps:
                    tok = decode_ids[k] if decode_ids is not None else nxt
                    fed.append(tok)
                    x = torch.tensor([[tok]], dtype=torch.int64, device=model.device)
    finally:
        model.prefill_chunk = old_chunk

    per_op: dict[str, list[str]] = {}
    for s in steps:
        for op, b in s["backends"].items():
            if b not in per_op.setdefault(op, []):
                per_op[op].append(b)
    cfg = model.config
    manifest = {
        "format": DUMP_FORMAT,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "note": note,
        "versions": versions(),
        "host": host_info(model.device),
        "model": {"source": source, "config_name": cfg.name, "config_hash": cfg.config_hash(),
                  "num_hidden_layers": cfg.num_hidden_layers, "layer_ratios": list(cfg.layer_ratios),
                  "vocab_size": cfg.vocab_size},
        "weights": weights,
        "run": {"backend": backend, "device": str(model.device), "dtype": DTYPE_NAMES.get(model.dtype, str(model.dtype)),
                "fake_quant": bool(model.fake_quant), "prefill_chunk": used_chunk, "decode_steps": decode_steps,
                "decode_mode": "forced" if decode_ids is not None else "greedy", "seed": seed,
                "ascend_v4": __version__},
        "inputs": {"prompt_ids": ids, "decode_ids": fed, "argmax_next": greedy},
        "backend_per_op": dict(sorted(per_op.items())),
        "steps": steps,
        "selection": {"include": include, "exclude": exclude, "probe_points": len(rec.probe_points),
                      "recorded": len(tensors),
                      "not_recorded": [n for n in rec.probe_points if n not in tensors]},
        "tensors": tensors,
    }
    (out / MANIFEST_FILE).write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")
    return manifest


def dump(model_spec: str | Path, out: str | Path, *, prompt_ids: Sequence[int], backend: str = "auto",
         dtype: str | torch.dtype = "bf16", device: str | None = None, decode_steps: int = 0,
         decode_ids: Sequence[int] | None = None, include: Iterable[str] | None = None,
         exclude: Iterable[str] | None = None, seed: int = 0, fake_quant: bool | None = None,
         weights_hash: str = "auto", prefill_chunk: int | None = None, progress: bool = False,
         note: str | None = None) -> dict[str, Any]:
    """Load ``model_spec`` (preset, YAML config or checkpoint dir) and :func:`dump_model` it."""
    from ..loader import load_model

    backend, dev = resolve_backend(backend, device)
    torch.manual_seed(seed)
    model = load_model(model_spec, device=dev, dtype=dtype, fake_quant=fake_quant, seed=seed, progress=progress)
    weights = weights_identity(model_spec, model, seed=seed, mode=weights_hash)
    return dump_model(model, prompt_ids, out, backend=backend, decode_steps=decode_steps, decode_ids=decode_ids,
                      include=include, exclude=exclude, prefill_chunk=prefill_chunk, weights=weights,
                      source=str(model_spec), seed=seed, note=note)


def read_manifest(run: str | Path) -> dict[str, Any]:
    path = Path(run)
    file = path / MANIFEST_FILE if path.is_dir() else path
    if not file.is_file():
        raise FileNotFoundError(f"{run}: no {MANIFEST_FILE} (not an ascend-v4 dump directory)")
    return json.loads(file.read_text(encoding="utf-8"))


# ---------------------------------------------------------------------------------------------- CLI
def add_arguments(p, *, default_model: str) -> None:
    """``ascend-v4 dump`` options (also used by ``compare --backends``, which adds its own)."""
    p.add_argument("--model", default=default_model,
                   help=f"checkpoint directory, preset or YAML config (default: {default_model}, random weights)")
    p.add_argument("--backend", default="auto", choices=["npu", "cuda", "reference", "auto"],
                   help="op backend (default auto: npu if available, else cuda, else reference)")
    p.add_argument("--device", help="torch device (default: npu:0 / cuda:0 / cpu after the backend)")
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32", "fp64"], help="model dtype (default bf16)")
    p.add_argument("--prompt-ids", help="prompt token ids, e.g. '0,17,42' (default: a fixed 16-token prompt)")
    p.add_argument("--prompt", help="prompt text (needs tokenizer.json in the model directory)")
    p.add_argument("--decode-steps", type=int, default=0, help="greedy one-token decode steps after the prefill")
    p.add_argument("--decode-ids", help="feed these tokens in the decode steps instead of the greedy ones")
    p.add_argument("--decode-ids-from", metavar="RUN",
                   help="follow another run: its prompt ids and decode tokens (compare decode steps on one path)")
    p.add_argument("--include", action="append", metavar="GLOB",
                   help="record only tensors matching (repeatable or comma-separated), e.g. 'layers.1.*,logits'")
    p.add_argument("--exclude", action="append", metavar="GLOB", help="do not record tensors matching")
    p.add_argument("--seed", type=int, default=0, help="seed of random preset weights and of torch")
    p.add_argument("--fake-quant", dest="fake_quant", action=argparse_bool(), default=None,
                   help="QAT fake-quant points (default: on for FP8/FP4 checkpoints, off otherwise)")
    p.add_argument("--weights-hash", default="auto", choices=["auto", "full", "sampled"],
                   help="checkpoint hash: every byte (auto: up to 16 GiB of files) or headers + samples")
    p.add_argument("--prefill-chunk", type=int, help="prefill chunk during the dump (default: whole prompt)")
    p.add_argument("--note", help="free text stored in the manifest")
    p.add_argument("--quiet", action="store_true", help="no progress bar while loading")


def argparse_bool():
    import argparse

    return argparse.BooleanOptionalAction


def prompt_from_args(args, default_ids: Sequence[int], parse_ids) -> tuple[list[int], list[int] | None]:
    """(prompt ids, decode ids or None) from --prompt-ids / --prompt / --decode-ids[-from]."""
    decode_ids = parse_ids(args.decode_ids) if getattr(args, "decode_ids", None) else None
    follow = getattr(args, "decode_ids_from", None)
    if follow:
        m = read_manifest(follow)
        if decode_ids is not None:
            raise ValueError("give either --decode-ids or --decode-ids-from, not both")
        decode_ids = list(m["inputs"]["decode_ids"])
        ids = list(m["inputs"]["prompt_ids"])
        if args.prompt_ids and parse_ids(args.prompt_ids) != ids:
            raise ValueError(f"--prompt-ids differ from the prompt of {follow}")
        return ids, decode_ids
    if args.prompt is not None and args.prompt_ids is not None:
        raise ValueError("give either --prompt or --prompt-ids, not both")
    if args.prompt is not None:
        from ..config import load_config
        from ..loader import load_tokenizer

        path = Path(args.model)
        tok = load_tokenizer(path) if path.is_dir() else None
        if tok is None:
            raise ValueError("--prompt needs a tokenizer.json in the model directory (and the 'tokenizers' package); "
                             "use --prompt-ids instead")
        cfg = load_config(args.model)
        return [cfg.bos_token_id] + tok.encode(args.prompt, add_special_tokens=False).ids, decode_ids
    if args.prompt_ids is not None:
        return parse_ids(args.prompt_ids), decode_ids
    from ..config import load_config

    vocab = load_config(args.model).vocab_size
    return [i % vocab for i in default_ids], decode_ids


def summary(manifest: dict[str, Any], out: str | Path) -> str:
    t = manifest["tensors"]
    nbytes = sum(v["bytes"] for v in t.values())
    run = manifest["run"]
    lines = [f"dumped {len(t)} of {manifest['selection']['probe_points']} probe tensors "
             f"({nbytes / 2 ** 20:.1f} MiB) to {out}",
             f"model {manifest['model']['source']} ({manifest['model']['config_name']}, config "
             f"{manifest['model']['config_hash']}), {run['dtype']} on {run['device']}, backend {run['backend']}, "
             f"fake-quant {run['fake_quant']}",
             f"prompt {len(manifest['inputs']['prompt_ids'])} tokens; decode steps {run['decode_steps']} "
             f"({run['decode_mode']}): {manifest['inputs']['decode_ids']}; argmax after each step "
             f"{manifest['inputs']['argmax_next']}"]
    ops = ", ".join(f"{op}={'/'.join(b)}" for op, b in manifest["backend_per_op"].items())
    lines.append(f"ops ran on: {ops}")
    if run["backend"] != "reference":
        fell = [op for op, b in manifest["backend_per_op"].items() if run["backend"] not in b]
        if fell:
            lines.append(f"ran the reference instead of {run['backend']}: {', '.join(fell)}")
    lines.append(f"manifest: {Path(out) / MANIFEST_FILE}")
    return "\n".join(lines)


def run_cli(args, *, default_prompt_ids: Sequence[int], parse_ids) -> int:
    ids, decode_ids = prompt_from_args(args, default_prompt_ids, parse_ids)
    manifest = dump(args.model, args.out, prompt_ids=ids, backend=args.backend, dtype=args.dtype, device=args.device,
                    decode_steps=args.decode_steps, decode_ids=decode_ids,
                    include=args.include, exclude=args.exclude, seed=args.seed, fake_quant=args.fake_quant,
                    weights_hash=args.weights_hash, prefill_chunk=args.prefill_chunk, progress=not args.quiet,
                    note=args.note)
    print(summary(manifest, args.out))
    return 0
