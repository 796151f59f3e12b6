"""A stand-in ``torch_npu`` module whose ops run CPU simulations of the documented torch-npu formulas.

    from tests.npu_sim import simulated_torch_npu          # or: from npu_sim import ... (pytest rootdir)
    with simulated_torch_npu(soc_version=250) as torch_npu:  # an A3 (Ascend 910C)
        ...  # code under test does ``import torch_npu`` / ``torch.npu.is_available()`` as on an NPU host

The module has:
* the simulated ops of ``ops.SIMULATED_OPS`` (same schemas as torch-npu 2.13.0; see ``ops.py``);
* the NPU dtype ints as attributes (``int4`` 285, ``hifloat8`` 290, ``float8_e5m2`` 291, ``float8_e4m3fn``
  292, ``float8_e8m0fnu`` 293, ``float4_e2m1fn_x2`` 296, ``float4_e1m2fn_x2`` 297);
* ``npu`` with ``is_available()`` → True, ``device_count()`` → 1, ``current_device()`` → 0,
  ``synchronize()``, ``get_device_name()``, ``utils.get_soc_version()``, ``utils.get_cann_version()`` and
  ``_backends.get_soc_version()``;
* ``_C`` (with ``_npu_setDevice`` / ``_npu_getDeviceCount``), ``__version__`` "2.13.0" and a proper
  ``__spec__``, so ``importlib.util.find_spec("torch_npu")`` works once it is in ``sys.modules``.

Tensors stay on the CPU: the simulation checks the maths and the call contract, not device placement.
``simulated_torch_npu`` also sets ``torch.npu`` (as importing the real torch_npu does) and restores
everything on exit.  Detection code that caches its answer (e.g. ``op_adapters.devices.npu_status``,
an ``lru_cache``) must have its cache cleared by the caller.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.machinery
import sys
import types
from typing import Iterator, Union

import torch

from . import ops
from .ops import DTYPE_INTS, SIMULATED_OPS, SimConfig

__all__ = ["make_simulated_torch_npu", "simulated_torch_npu", "SimConfig", "SOC_FAMILIES", "ops"]

# representative runtime SoC ids per family (ascend_npu.md §2)
SOC_FAMILIES = {"310P": 200, "A2": 220, "A3": 250, "A5": 260, "950": 260}



def _spec(name: str, is_package: bool) -> importlib.machinery.ModuleSpec:
    spec = importlib.machinery.ModuleSpec(name, loader=None, origin="npu-sim", is_package=is_package)
    if is_package:
        spec.submodule_search_locations = []
    return spec


def _new_module(name: str, is_package: bool, doc: str) -> types.ModuleType:
    mod = types.ModuleType(name, doc)
    mod.__spec__ = _spec(name, is_package)
    if is_package:
        mod.__path__ = []
    return mod


def _bind(fn, cfg: SimConfig):
    """Wrap an op so that it runs with this module's SoC / CANN configuration (for the chip gates)."""

    @functools.wraps(fn)  # keeps the signature (inspect follows __wrapped__) and the doc string
    def op(*args, **kwargs):
        token = ops._CONFIG.set(cfg)
        try:
            return fn(*args, **kwargs)
        finally:
            ops._CONFIG.reset(token)

    return op


def make_simulated_torch_npu(soc_version: Union[int, str] = 260, *, cann_version: str = "9.1.0") -> types.ModuleType:
    """Build (without installing) a module named ``torch_npu`` backed by the CPU simulations.

    ``soc_version``: a runtime SoC id (220–225 A2, 250–255 A3, 260 Ascend 950, 200–205 310P) or a family
    name ("A2", "A3", "A5"/"950", "310P").  ``cann_version`` is what ``npu.utils.get_cann_version()``
    returns; the only gate that reads it is ``npu_sparse_flash_attention(value=None)`` (CANN ≥ 9.2.0).
    """
    if isinstance(soc_version, str):
        if soc_version not in SOC_FAMILIES:
            raise ValueError(f"unknown SoC family {soc_version!r}; use one of {sorted(SOC_FAMILIES)} or an int id")
        soc_version = SOC_FAMILIES[soc_version]
    cfg = SimConfig(soc_version=int(soc_version), cann_version=str(cann_version))

    mod = _new_module("torch_npu", True, "Simulated torch_npu (CPU simulations of documented op formulas).")
    mod.__version__ = "2.13.0"
    mod.__file__ = None
    mod.SIMULATED = True
    mod.SIM_CONFIG = cfg
    for name in SIMULATED_OPS:
        setattr(mod, name, _bind(getattr(ops, name), cfg))
    for name, value in DTYPE_INTS.items():
        setattr(mod, name, value)

    npu = _new_module("torch_npu.npu", True, "Simulated torch_npu.npu")
    utils = _new_module("torch_npu.npu.utils", False, "Simulated torch_npu.npu.utils")
    backends = _new_module("torch_npu.npu._backends", False, "Simulated torch_npu.npu._backends")
    c_mod = _new_module("torch_npu._C", False, "Simulated torch_npu._C")

    def get_soc_version() -> int:
        return cfg.soc_version

    def get_cann_version(module: str = "CANN") -> str:
        return cfg.cann_version

    utils.get_soc_version = get_soc_version
    utils.get_cann_version = get_cann_version
    backends.get_soc_version = get_soc_version
    npu.utils = utils
    npu._backends = backends
    npu.get_soc_version = get_soc_version
    npu.is_available = lambda: True
    npu.device_count = lambda: 1
    npu.current_device = lambda: 0
    npu.set_device = lambda device=None: None
    npu.synchronize = lambda device=None: None
    npu.get_device_name = lambda device=None: f"Simulated Ascend (SoC {cfg.soc_version}, {cfg.family})"
    c_mod._npu_setDevice = lambda device=0: None
    c_mod._npu_getDeviceCount = lambda: 1
    mod.npu = npu
    mod._C = c_mod
    return mod


@contextlib.contextmanager
def simulated_torch_npu(soc_version: Union[int, str] = 260, *, cann_version: str = "9.1.0") -> Iterator[types.ModuleType]:
    """Install a simulated ``torch_npu`` (and its submodules, and ``torch.npu``) for the duration of the block.

    The previous ``sys.modules`` entries and ``torch.npu`` attribute (present or absent) are restored on exit.
    """
    mod = make_simulated_torch_npu(soc_version, cann_version=cann_version)
    entries = {
        "torch_npu": mod,
        "torch_npu.npu": mod.npu,
        "torch_npu.npu.utils": mod.npu.utils,
        "torch_npu.npu._backends": mod.npu._backends,
        "torch_npu._C": mod._C,
    }
    missing = object()
    saved_modules = {name: sys.modules.get(name, missing) for name in entries}
    saved_torch_npu_attr = torch.__dict__.get("npu", missing)
    try:
        sys.modules.update(entries)
        torch.npu = mod.npu
        yield mod
    finally:
        for name, old in saved_modules.items():
            if old is missing:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = old
        if saved_torch_npu_attr is missing:
            if "npu" in torch.__dict__:
                delattr(torch, "npu")
        else:
            torch.npu = saved_torch_npu_attr
