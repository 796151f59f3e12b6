"""The dispatch point of every op: op name → {reference, cuda, npu} implementation.

Selection, in order:
1. the backend forced by :func:`use_backend` (a context manager), else
2. the ``ASCEND_V4_BACKEND`` environment variable (``reference|npu|cuda|auto``), else ``auto``;
3. ``auto`` maps the tensors' device to a backend (npu → npu, cuda → cuda, else reference).
A requested fast backend is used only if it is registered for the op, available on this machine,
matches the tensors' device and accepts the arguments (its ``supports`` check).  Otherwise the
reference implementation runs and the reason is logged once per (op, backend, reason).
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import os
import threading
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch

from .devices import backend_status

log = logging.getLogger("ascend_v4.dispatch")

BACKENDS = ("reference", "cuda", "npu")
CHOICES = BACKENDS + ("auto",)
ENV_VAR = "ASCEND_V4_BACKEND"


@dataclass
class Implementation:
    fn: Callable[..., Any]
    # returns None when the implementation can take these arguments, else the reason it cannot
    supports: Callable[..., str | None] | None = None


_REGISTRY: dict[str, dict[str, Implementation]] = {}
_forced: contextvars.ContextVar[str | None] = contextvars.ContextVar("ascend_v4_backend", default=None)
# Tests only: treat tensors on this device type as if they lived on the named accelerator, so a
# backend's code path (with a stand-in torch_npu module) runs on CPU tensors.
_simulated: contextvars.ContextVar[tuple[str, str] | None] = contextvars.ContextVar("ascend_v4_sim", default=None)
_logged: set[tuple[str, str, str]] = set()
_last_used: dict[str, str] = {}
_lock = threading.Lock()


def register(op: str, backend: str, *, supports: Callable[..., str | None] | None = None):
    """Decorator: register ``fn`` as ``backend``'s implementation of ``op``."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose from {BACKENDS}")

    def deco(fn):
        _REGISTRY.setdefault(op, {})[backend] = Implementation(fn, supports)
        return fn

    return deco


def ops() -> list[str]:
    return sorted(_REGISTRY)


def implementations(op: str) -> dict[str, Implementation]:
    if op not in _REGISTRY:
        raise KeyError(f"unknown op {op!r}; known ops: {ops()}")
    return dict(_REGISTRY[op])


def requested_backend() -> str:
    forced = _forced.get()
    if forced is not None:
        return forced
    value = os.environ.get(ENV_VAR, "auto").strip().lower() or "auto"
    if value not in CHOICES:
        raise ValueError(f"{ENV_VAR}={value!r} is not a backend; choose one of {CHOICES}")
    return value


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Force a backend inside a ``with`` block (``reference``, ``npu``, ``cuda`` or ``auto``)."""
    if name not in CHOICES:
        raise ValueError(f"unknown backend {name!r}; choose one of {CHOICES}")
    token = _forced.set(name)
    try:
        yield
    finally:
        _forced.reset(token)


@contextlib.contextmanager
def simulate_device(backend: str, on: str = "cpu") -> Iterator[None]:
    """Run ``backend``'s implementations for tensors on ``on`` (for simulated-NPU tests only)."""
    if backend not in ("npu", "cuda"):
        raise ValueError(f"can only simulate npu or cuda, got {backend!r}")
    token = _simulated.set((on, backend))
    try:
        yield
    finally:
        _simulated.reset(token)


def _first_device(args: tuple, kwargs: dict) -> torch.device:
    for a in list(args) + list(kwargs.values()):
        if isinstance(a, torch.Tensor):
            return a.device
    return torch.device("cpu")


def _note_fallback(op: str, backend: str, reason: str) -> None:
    key = (op, backend, reason)
    with _lock:
        if key in _logged:
            return
        _logged.add(key)
    log.warning("op %s: %s backend not used (%s); running the reference implementation", op, backend, reason)


def choose(op: str, args: tuple = (), kwargs: dict | None = None) -> tuple[str, Implementation]:
    """The backend and implementation that a call with these arguments would run."""
    kwargs = kwargs or {}
    impls = implementations(op)
    requested = requested_backend()
    device_type = _first_device(args, kwargs).type
    sim = _simulated.get()
    simulated = sim is not None and sim[0] == device_type
    if simulated:
        device_type = sim[1]
    wanted = requested
    if requested == "auto":
        wanted = {"npu": "npu", "cuda": "cuda"}.get(device_type, "reference")
    if wanted != "reference":
        impl = impls.get(wanted)
        ok, why = (True, "simulated") if simulated and wanted == device_type else backend_status(wanted)
        if impl is None:
            reason = f"no {wanted} implementation registered"
        elif not ok:
            reason = why
        elif device_type != wanted:
            reason = f"tensors are on {device_type}, not {wanted}"
        else:
            reason = impl.supports(*args, **kwargs) if impl.supports else None
            if reason is None:
                return wanted, impl
        _note_fallback(op, wanted, reason)
    return "reference", impls["reference"]


def dispatch(op: str, *args: Any, **kwargs: Any) -> Any:
    backend, impl = choose(op, args, kwargs)
    _last_used[op] = backend
    return impl.fn(*args, **kwargs)


def last_backends() -> dict[str, str]:
    """Backend that last ran each op in this process (recorded in dump manifests)."""
    return dict(_last_used)


def reset_last_backends() -> None:
    """Forget which backend ran each op (before a run whose backends should be recorded alone)."""
    _last_used.clear()


def reset_fallback_log() -> None:
    with _lock:
        _logged.clear()
