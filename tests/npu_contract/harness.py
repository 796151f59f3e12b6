"""Huawei's own shape/dtype/limit (meta) checks from the torch-npu wheel, runnable on CPU.

The torch-npu wheel carries, without needing CANN or an NPU:

* the registered op schemas, as strings inside ``torch_npu/lib/libtorch_npu.so``;
* ``torch_npu/op_plugin/meta/_meta_registrations.py``: the meta function of (almost) every op, with
  Huawei's dimension, dtype and limit checks (what ``torch.compile`` / FakeTensor runs).

``load_meta(version)`` reads both straight from the wheel (a zip file; torch-npu is never installed),
defines every schema in a private ``torch.library`` namespace of that version and executes the meta
file against it, so ``meta.ops.npu_rms_norm(x, gamma)`` on ``device="meta"`` tensors runs Huawei's own
checks and returns Huawei's output shapes and dtypes (ascend_npu.md §9).

Namespaces.  ``torch.library`` namespaces are process-global, so each wheel version gets its own:
``npu_2_13_0``, ``npu_2_14_0`` (``namespace_for``).  The schemas are defined there (a schema string
carries no namespace), the meta file's ``Library("npu", "IMPL", "Meta")`` is redirected to that
namespace, its ``torch.ops.npu.`` references are rewritten, and ``torch.ops.npu`` itself is never
touched, so two versions (or a real torch-npu) can live in one process.  Loaded versions are cached
for the life of the process (a ``torch.library`` namespace cannot be defined twice).

Stand-ins.  The meta file imports ``torch_npu`` and four helpers (``ErrCode``/``ops_error``,
``get_cann_version``, ``get_soc_version``).  They are served by an ``__import__`` hook in the
executed file's own builtins, so ``sys.modules`` is never modified: ``torch_npu`` stays
unimportable afterwards (``importlib.util.find_spec("torch_npu")`` is unchanged).  A caller who wants a
``torch_npu`` module asks for it: ``make_torch_npu_standin(meta)``, installed temporarily with
``standin_installed(meta)``.

Chip and CANN.  The meta functions call ``get_soc_version()`` / ``get_cann_version()`` at call time
(nothing reads them at import time; ``soc_readers`` / ``cann_readers`` / ``import_time_readers`` say
which functions do), so ``meta.set_chip("950")`` / ``with meta.chip("950"):`` and
``meta.set_cann_version("9.2.0")`` switch Huawei's per-chip / per-CANN branches after loading.
"""

from __future__ import annotations

import ast
import builtins
import contextlib
import enum
import importlib.machinery
import json
import linecache
import os
import platform
import re
import subprocess
import sys
import time
import types
import zipfile
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

# --------------------------------------------------------------------------------------- constants
VERSIONS = ("2.13.0", "2.14.0")  # the torch-npu wheels the project pins (setup.py: torch-npu>=2.13,<2.15)

META_FILE = "torch_npu/op_plugin/meta/_meta_registrations.py"
SO_FILE = "torch_npu/lib/libtorch_npu.so"

CACHE_ENV = "ASCEND_V4_WHEEL_CACHE"            # where wheels are cached (default ~/.cache/ascend-v4/wheels)
NO_DOWNLOAD_ENV = "ASCEND_V4_NO_WHEEL_DOWNLOAD"  # "1": never call pip download (offline CI)
DOWNLOAD_TIMEOUT_S = 300

# ascend_npu.md §2: runtime SoC ids per family (vllm-ascend hardware.py); the first id is what set_chip uses.
SOC_RANGES = {"A2": range(220, 226), "A3": range(250, 256), "950": range(260, 261), "310P": range(200, 206)}
FAMILY_SOC = {fam: ids[0] for fam, ids in SOC_RANGES.items()}
FAMILY_ALIASES = {"A2": "A2", "910B": "A2", "A3": "A3", "910C": "A3", "950": "950", "A5": "950",
                  "950PR": "950", "950DT": "950", "310P": "310P"}
DEFAULT_CHIP = "A3"
# get_cann_version() returns a plain dotted string; the meta file compares it as a STRING
# (get_cann_version() >= "9.2.0"), so keep the "X.Y.Z" form.  CANN for torch-npu 2.13 is unknown
# (ascend_npu.md §3: probably 9.1.0 or newer); 9.1.0 is the conservative choice.
DEFAULT_CANN_VERSION = "9.1.0"

# ascend_npu.md §2: torch_npu's extra dtypes are ints passed through *_dtype / dst_type arguments.
NPU_DTYPES = {
    "int4": 285,
    "hifloat8": 290,
    "float8_e5m2": 291,
    "float8_e4m3fn": 292,
    "float8_e8m0fnu": 293,
    "float4_e2m1fn_x2": 296,
    "float4_e1m2fn_x2": 297,
}

_SCHEMA_RE = re.compile(r"(?P<name>[A-Za-z_]\w*)(?:\.(?P<overload>\w+))?\(.*\) -> .+")
_SCHEMA_CACHE_FORMAT = 1
_STANDIN_MARK = "__ascend_v4_standin__"


# ------------------------------------------------------------------------------------------- wheel
def cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "ascend-v4" / "wheels")


_WHEEL_ERRORS: dict[str, str] = {}  # version -> why it is unavailable (download is tried once per process)


def _wheel_rank(path: Path) -> tuple[bool, bool]:
    """Prefer a wheel for this interpreter and machine (any platform's wheel carries the same files)."""
    parts = path.name[:-len(".whl")].split("-")
    py_tag = parts[-3] if len(parts) >= 5 else ""
    plat = parts[-1] if len(parts) >= 5 else ""
    want_py = f"cp{sys.version_info.major}{sys.version_info.minor}"
    return (py_tag != want_py, platform.machine() not in plat)


def _cached_wheels(version: str) -> list[Path]:
    d = cache_dir()
    if not d.is_dir():
        return []
    return sorted(d.glob(f"torch_npu-{version}-*.whl"), key=lambda p: (_wheel_rank(p), p.name))


def wheel_path(version: str, *, download: bool = True) -> Path | None:
    """The cached torch-npu ``version`` wheel, downloaded into the cache if absent; None if unavailable.

    The download (``pip download --no-deps --only-binary=:all:`` for this interpreter's platform)
    is tried at most once per process; ``wheel_unavailable_reason(version)`` says why it failed.
    Set ``ASCEND_V4_NO_WHEEL_DOWNLOAD=1`` to never download.
    """
    found = _cached_wheels(version)
    if found:
        return found[0]
    if not download or os.environ.get(NO_DOWNLOAD_ENV) == "1":
        _WHEEL_ERRORS.setdefault(version, f"not in {cache_dir()} and downloads are disabled")
        return None
    if version in _WHEEL_ERRORS:
        return None
    d = cache_dir()
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--quiet",
           "--disable-pip-version-check", "--retries", "1", "--timeout", "20",
           f"torch-npu=={version}", "-d", str(d)]
    try:
        d.mkdir(parents=True, exist_ok=True)
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=DOWNLOAD_TIMEOUT_S)
    except (OSError, subprocess.SubprocessError) as e:
        _WHEEL_ERRORS[version] = f"pip download failed: {type(e).__name__}: {e}"
        return None
    found = _cached_wheels(version)
    if res.returncode != 0 or not found:
        tail = (res.stderr or res.stdout or "").strip().splitlines()
        _WHEEL_ERRORS[version] = f"pip download exited {res.returncode}: {tail[-1] if tail else 'no output'}"
        return None
    return found[0]


def wheel_unavailable_reason(version: str) -> str | None:
    return _WHEEL_ERRORS.get(version)


def extract_schemas(so_bytes: bytes) -> dict[str, str]:
    """``{"op" or "op.overload": schema}`` for every schema string in the binary.

    Schemas are NUL-terminated printable strings shaped ``name[.overload](args) -> returns``; the
    scan jumps between ``") -> "`` occurrences instead of regex-scanning 100 MB.  All of them are
    ops of torch_npu's ``npu`` namespace (most are ``npu_*``; a few are ``_npu_*``, ``fast_gelu``,
    ``scatter_update`` ...), and the meta file registers some of the non-``npu_`` ones too.
    """
    out: dict[str, str] = {}
    pos = 0
    find, rfind = so_bytes.find, so_bytes.rfind
    while True:
        i = find(b") -> ", pos)
        if i < 0:
            break
        start = rfind(b"\x00", 0, i) + 1
        end = find(b"\x00", i)
        if end < 0:
            end = len(so_bytes)
        pos = end + 1
        raw = so_bytes[start:end]
        if len(raw) > 20000:
            continue
        try:
            s = raw.decode("ascii")
        except UnicodeDecodeError:
            continue
        m = _SCHEMA_RE.fullmatch(s)
        if m and s.isprintable():
            key = m["name"] + (f".{m['overload']}" if m["overload"] else "")
            out.setdefault(key, s)
    return out


def load_schemas(wheel: Path) -> dict[str, str]:
    """Schemas of a wheel, cached as JSON beside it (reading the 100 MB .so out of the zip takes ~1 s)."""
    st = wheel.stat()
    stamp = {"format": _SCHEMA_CACHE_FORMAT, "wheel": wheel.name, "size": st.st_size, "mtime_ns": st.st_mtime_ns}
    cache = wheel.with_name(wheel.name + ".schemas.json")
    try:
        data = json.loads(cache.read_text())
        if data.get("stamp") == stamp:
            return dict(data["schemas"])
    except (OSError, ValueError, KeyError, TypeError):
        pass
    with zipfile.ZipFile(wheel) as z:
        schemas = extract_schemas(z.read(SO_FILE))
    try:
        tmp = cache.with_name(cache.name + f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"stamp": stamp, "schemas": schemas}, indent=0, sort_keys=True))
        os.replace(tmp, cache)
    except OSError:
        pass  # read-only cache: fine, just slower next time
    return schemas


# -------------------------------------------------------------------------------- chip / CANN state
def normalise_family(name: str) -> str:
    key = str(name).strip().upper().replace("ASCEND", "").replace(" ", "")
    if key not in FAMILY_ALIASES:
        raise ValueError(f"unknown Ascend chip family {name!r}; choose one of {tuple(FAMILY_SOC)}")
    return FAMILY_ALIASES[key]


def family_of_soc(soc: int) -> str | None:
    for fam, ids in SOC_RANGES.items():
        if soc in ids:
            return fam
    return None


def _soc_from(chip: int | str) -> int:
    """A family name ("A2", "A3", "950", "310P", aliases) -> its first SoC id; an int -> itself."""
    if isinstance(chip, int):
        return chip
    return FAMILY_SOC[normalise_family(chip)]  # "950" is the family, never SoC id 950


_PRE = {"alpha": 0, "beta": 1, "rc": 2}


def _cann_key(version: str) -> tuple:
    """Order CANN version strings: numeric fields numerically; alpha < beta < RC < release."""
    key = []
    for tok in re.split(r"[.\-_]", version.strip()):
        m = re.fullmatch(r"(\d+)", tok)
        if m:
            key.append((3, int(m[1])))
            continue
        m = re.fullmatch(r"(?i)(alpha|beta|rc|t)(\d*)", tok)
        if m:
            key.append((_PRE.get(m[1].lower(), 0), int(m[2] or 0)))
        else:
            key.append((-1, 0))
    return tuple(key)


def cann_version_gte(current: str, required: str) -> bool:
    """Stand-in for ``torch_npu._C._is_gte_cann_version`` (real one is C++; this ordering is *inferred*)."""
    a, b = list(_cann_key(current)), list(_cann_key(required))
    n = max(len(a), len(b))
    a += [(2.5, 0)] * (n - len(a))  # a missing field ranks above any pre-release tag, below a number
    b += [(2.5, 0)] * (n - len(b))
    return a >= b


class _ErrCode(enum.Enum):
    """Mirror of ``torch_npu.utils._error_code.ErrCode``."""
    SUCCESS = (0, "success")
    PARAM = (1, "invalid parameter")
    TYPE = (2, "invalid type")
    VALUE = (3, "invalid value")
    PTR = (4, "invalid pointer")
    INTERNAL = (5, "internal error")
    MEMORY = (6, "memory error")
    NOT_SUPPORT = (7, "feature not supported")
    NOT_FOUND = (8, "resource not found")
    UNAVAIL = (9, "resource unavailable")
    SYSCALL = (10, "system call failed")
    TIMEOUT = (11, "timeout error")
    PERMISSION = (12, "permission error")
    ACL = (100, "call acl api failed")
    HCCL = (200, "call hccl api failed")
    GE = (300, "call ge api failed")
    EXCEPT = (999, "applicaiton exception")

    @property
    def code(self):
        return self.value[0]

    @property
    def msg(self):
        return self.value[1]


def _sub_error(submodule: int, name: str) -> Callable[[_ErrCode], str]:
    def err(code: _ErrCode) -> str:
        # the real one adds time/PID/device/rank; the code and message are the stable part
        return f"\n[ERROR] ERR{submodule:02d}{code.code:03d} {name} {code.msg}"
    err.__name__ = f"{name.lower()}_error"
    return err


# ---------------------------------------------------------------------------------------- NpuMeta
class _NpuLibraryShim:
    """What the meta file's ``Library("npu", "IMPL", "Meta")`` returns: our version's namespace."""

    def __init__(self, meta: "NpuMeta", kind: str, dispatch_key: str):
        self.meta, self.ns, self.kind, self.dispatch_key = meta, meta.namespace, kind, dispatch_key or "Meta"


class _ForeignLibraryShim:
    """Any other namespace (the meta file's ``Library("aten", "IMPL", "Meta")``): recorded, never
    registered, because it would replace torch's own Meta kernel process-wide."""

    def __init__(self, ns: str, kind: str, dispatch_key: str):
        self.ns, self.kind, self.dispatch_key = ns, kind, dispatch_key


class NpuMeta:
    """Huawei's meta functions of one torch-npu wheel, live in namespace ``torch.ops.<namespace>``.

    Attributes: ``version``, ``wheel``, ``namespace``, ``ops`` (``torch.ops.<namespace>``),
    ``schemas`` ({"op[.overload]": schema string}), ``defined`` (schemas that torch accepted),
    ``define_failures``, ``meta_functions`` ({"op[.overload]": python function} registered as Meta
    kernels), ``skipped`` ({name: reason} for registrations that were not installed),
    ``toplevel_failures`` ({"line N": error} for other module-level statements that failed),
    ``soc_readers`` / ``cann_readers`` ({op: meta function} reading the SoC / CANN version at call
    time), ``import_time_readers`` (module-level statements that read them: expected empty),
    ``soc_version``, ``cann_version``, ``load_seconds``.
    """

    def __init__(self, version: str, wheel: Path, namespace: str, soc_version: int, cann_version: str):
        self.version, self.wheel, self.namespace = version, Path(wheel), namespace
        self.soc_version, self.cann_version = soc_version, cann_version
        self.schemas: dict[str, str] = {}
        self.defined: set[str] = set()
        self.define_failures: dict[str, str] = {}
        self.meta_functions: dict[str, Callable] = {}
        self.skipped: dict[str, str] = {}
        self.toplevel_failures: dict[str, str] = {}
        self.soc_readers: dict[str, str] = {}
        self.cann_readers: dict[str, str] = {}
        self.import_time_readers: list[str] = []
        self.meta_source = ""
        self.meta_filename = ""
        self.globals: dict[str, Any] = {}
        self.load_seconds = 0.0
        self._lib: torch.library.Library | None = None  # keeps the namespace alive (finalizer)
        self._helpers: dict[str, types.ModuleType] = {}

    # ---- ops
    @property
    def ops(self):
        return getattr(torch.ops, self.namespace)

    def op(self, name: str):
        """``torch.ops.<ns>.<op>`` (packet) or, for ``"op.overload"``, that overload."""
        base, _, overload = name.partition(".")
        packet = getattr(self.ops, base)
        return getattr(packet, overload or "default") if overload else packet

    def has_meta(self, name: str) -> bool:
        return name in self.meta_functions

    def meta_function_source(self, name: str) -> str:
        """The source of the meta function registered for ``name`` (as in the wheel)."""
        import inspect
        return inspect.getsource(self.meta_functions[name])

    # ---- chip / CANN (read by the stand-in get_soc_version / get_cann_version at call time)
    @property
    def family(self) -> str | None:
        return family_of_soc(self.soc_version)

    def set_chip(self, family: str | int) -> int:
        """Make ``get_soc_version()`` return a SoC id of ``family`` ("A2", "A3", "950", "310P",
        aliases 910B/910C/A5) or the given int id.  Returns the previous id."""
        prev, self.soc_version = self.soc_version, _soc_from(family)
        return prev

    def set_soc_version(self, soc: int) -> int:
        return self.set_chip(int(soc))

    def set_cann_version(self, version: str) -> str:
        """What ``get_cann_version()`` returns (a dotted string like "9.2.0": the meta file compares
        it as a string).  Returns the previous value."""
        prev, self.cann_version = self.cann_version, str(version)
        return prev

    @contextlib.contextmanager
    def chip(self, family: str | int) -> Iterator["NpuMeta"]:
        prev = self.set_chip(family)
        try:
            yield self
        finally:
            self.soc_version = prev

    @contextlib.contextmanager
    def cann(self, version: str) -> Iterator["NpuMeta"]:
        prev = self.set_cann_version(version)
        try:
            yield self
        finally:
            self.cann_version = prev

    def __repr__(self) -> str:
        return (f"NpuMeta(version={self.version!r}, namespace={self.namespace!r}, "
                f"schemas={len(self.schemas)}, meta={len(self.meta_functions)}, skipped={len(self.skipped)}, "
                f"chip={self.family}/{self.soc_version}, cann={self.cann_version!r})")

    # ---- loading internals
    def _register(self, lib: Any, name: str, fn: Callable, dispatch_key: str = "") -> None:
        if isinstance(lib, _ForeignLibraryShim):
            self.skipped[f"{lib.ns}::{name}"] = (
                f"overrides torch's own {lib.ns}::{name} {lib.dispatch_key} kernel; not installed "
                f"(it would change {lib.ns} for the whole process, not only the stand-in)")
            return
        if not isinstance(lib, _NpuLibraryShim):
            self.skipped[str(name)] = f"impl() on an unexpected library object {type(lib).__name__}"
            return
        if name not in self.defined:
            why = self.define_failures.get(name)
            self.skipped[name] = (f"schema did not define: {why}" if why else
                                  "no schema with this name/overload in libtorch_npu.so")
            return
        try:
            self._lib.impl(name, fn, dispatch_key or lib.dispatch_key)
        except Exception as e:  # noqa: BLE001 - record and continue, like the demo's wrapper
            self.skipped[name] = _first_line(e)
            return
        self.meta_functions[name] = fn


def _first_line(e: BaseException) -> str:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return f"{type(e).__name__}: {(lines[0] if lines else '')[:300]}"


def namespace_for(version: str) -> str:
    """``"2.13.0"`` -> ``"npu_2_13_0"`` (the private torch.library namespace of that wheel)."""
    return "npu_" + re.sub(r"\W", "_", version)


def _module(name: str, *, package: bool = False, **attrs) -> types.ModuleType:
    mod = types.ModuleType(name, attrs.pop("__doc__", f"ascend-v4 npu_contract stand-in for {name}"))
    mod.__spec__ = importlib.machinery.ModuleSpec(name, loader=None, origin="ascend-v4 npu_contract stand-in",
                                                  is_package=package)
    if package:
        mod.__path__ = []
    mod.__file__ = None
    setattr(mod, _STANDIN_MARK, True)
    for k, v in attrs.items():
        setattr(mod, k, v)
    return mod


def _forwarder(meta: NpuMeta, name: str) -> Callable:
    def call(*args, **kwargs):
        return getattr(getattr(torch.ops, meta.namespace), name)(*args, **kwargs)

    call.__name__ = call.__qualname__ = name
    schemas = [s for k, s in meta.schemas.items() if k == name or k.startswith(name + ".")]
    call.__doc__ = f"Forwards to torch.ops.{meta.namespace}.{name} (torch-npu {meta.version} schema):\n  " + \
        "\n  ".join(schemas)
    return call


def _build_modules(meta: NpuMeta, *, with_ops: bool, npu_available: bool = False) -> dict[str, types.ModuleType]:
    """A ``torch_npu`` package of stand-ins: ``{"torch_npu": pkg, "torch_npu.npu": ..., ...}``."""
    get_soc_version = lambda: meta.soc_version  # noqa: E731 - read at call time: set_chip works after load

    def get_cann_version(module: str = "CANN") -> str:
        return meta.cann_version

    def _is_gte_cann_version(version: str, module: str = "CANN") -> bool:
        return cann_version_gte(meta.cann_version, version)

    ops_error = _sub_error(1, "OPS")
    error_code = _module("torch_npu.utils._error_code", ErrCode=_ErrCode, ops_error=ops_error,
                         pta_error=_sub_error(0, "PTA"), dist_error=_sub_error(2, "DIST"),
                         graph_error=_sub_error(3, "GRAPH"), prof_error=_sub_error(4, "PROF"))
    utils = _module("torch_npu.utils", package=True, _error_code=error_code)
    npu_backends = _module("torch_npu.npu._backends", get_soc_version=get_soc_version)
    npu_utils = _module("torch_npu.npu.utils", get_soc_version=get_soc_version, get_cann_version=get_cann_version,
                        _is_gte_cann_version=_is_gte_cann_version)
    npu = _module("torch_npu.npu", package=True, utils=npu_utils, _backends=npu_backends,
                  get_soc_version=get_soc_version, get_cann_version=get_cann_version,
                  is_available=lambda: npu_available, device_count=lambda: int(npu_available),
                  _lazy_init=lambda: None)
    c = _module("torch_npu._C", _npu_get_soc_version=get_soc_version, _get_cann_version=get_cann_version,
                _is_gte_cann_version=_is_gte_cann_version)
    pkg = _module("torch_npu", package=True, __version__=meta.version, npu=npu, utils=utils, _C=c,
                  # the meta file uses torch_npu.uint8 as a torch dtype (the default of a dtype lookup)
                  uint8=torch.uint8, _ascend_v4_meta=meta,
                  __doc__=f"ascend-v4 stand-in for torch_npu {meta.version}: ops forward to torch.ops.{meta.namespace}")
    for k, v in NPU_DTYPES.items():
        setattr(pkg, k, v)
    if with_ops:
        for base in sorted({k.partition(".")[0] for k in meta.defined}):
            if not hasattr(pkg, base):
                setattr(pkg, base, _forwarder(meta, base))
    mods = {m.__name__: m for m in (pkg, c, npu, npu_utils, npu_backends, utils, error_code)}
    return mods


def _import_hook(modules: dict[str, types.ModuleType], torch_library_shim: types.ModuleType):
    real_import = builtins.__import__

    def _import(name, globals=None, locals=None, fromlist=(), level=0):
        if level == 0:
            top = name.partition(".")[0]
            if top == "torch_npu":
                if name not in modules:
                    raise ImportError(f"{name} is not part of the npu_contract stand-in", name=name)
                return modules[name] if fromlist else modules["torch_npu"]
            if name == "torch.library" and fromlist:
                return torch_library_shim
        return real_import(name, globals, locals, fromlist, level)

    return _import


def _analyse(tree: ast.Module) -> tuple[dict[str, str], dict[str, str], list[str]]:
    """Which registered meta functions read the SoC / CANN version (directly or via helpers)."""
    funcs: dict[str, ast.AST] = {}
    op_of: dict[str, list[str]] = {}

    def visit_block(body):
        for node in body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                funcs[node.name] = node
                for d in node.decorator_list:
                    if (isinstance(d, ast.Call) and len(d.args) == 2 and isinstance(d.args[0], ast.Name)
                            and d.args[0].id == "m" and isinstance(d.args[1], ast.Constant)):
                        op_of.setdefault(node.name, []).append(d.args[1].value)
            elif isinstance(node, ast.If):
                visit_block(node.body)
                visit_block(node.orelse)

    visit_block(tree.body)

    def names(node) -> set[str]:
        out = set()
        for n in ast.walk(node):
            if isinstance(n, ast.Name):
                out.add(n.id)
            elif isinstance(n, ast.Attribute):
                out.add(n.attr)
        return out

    refs = {f: names(node) for f, node in funcs.items()}

    def closure(seeds: set[str]) -> dict[str, str]:
        via: dict[str, str] = {f: "direct" for f, r in refs.items() if r & seeds}
        changed = True
        while changed:
            changed = False
            for f, r in refs.items():
                if f not in via:
                    hit = sorted(r & set(via))
                    if hit:
                        via[f] = f"via {hit[0]}()"
                        changed = True
        return via

    def by_op(via: dict[str, str]) -> dict[str, str]:
        return {op: f"{f} ({how})" for f, how in via.items() for op in op_of.get(f, [])}

    soc = closure({"get_soc_version", "_npu_get_soc_version"})
    cann = closure({"get_cann_version", "_is_gte_cann_version", "_get_cann_version"})
    import_time = []

    def scan_toplevel(body):
        for node in body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Import, ast.ImportFrom)):
                continue
            if isinstance(node, ast.If):
                scan_toplevel(node.body)
                scan_toplevel(node.orelse)
                node = node.test
            hit = names(node) & ({"get_soc_version", "get_cann_version", "_is_gte_cann_version"} | set(soc) | set(cann))
            calls = {n.func.id for n in ast.walk(node) if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)}
            if hit & calls:
                import_time.append(f"line {node.lineno}: {sorted(hit & calls)}")

    scan_toplevel(tree.body)
    return by_op(soc), by_op(cann), import_time


def _define_schemas(meta: NpuMeta) -> None:
    lib = torch.library.Library(meta.namespace, "DEF")
    meta._lib = lib
    # default overloads first (defining "op.overload" before "op" is fine too, this is just tidy)
    for key in sorted(meta.schemas, key=lambda k: ("." in k, k)):
        try:
            lib.define(meta.schemas[key])
        except Exception as e:  # noqa: BLE001
            meta.define_failures[key] = _first_line(e)
        else:
            meta.defined.add(key)


def _exec_meta_file(meta: NpuMeta, source: str) -> None:
    ns = meta.namespace
    source = re.sub(r"\btorch\.ops\.npu\.", f"torch.ops.{ns}.", source)
    meta.meta_source = source
    filename = f"<torch_npu {meta.version} wheel>/{META_FILE}"
    meta.meta_filename = filename
    linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)  # tracebacks show lines

    def Library(lib_ns: str, kind: str, dispatch_key: str = "", *args, **kwargs):  # noqa: N802
        if lib_ns == "npu":
            return _NpuLibraryShim(meta, kind, dispatch_key)
        return _ForeignLibraryShim(lib_ns, kind, dispatch_key)

    def impl(lib, name, dispatch_key: str = "", *args, **kwargs):
        def deco(fn):
            meta._register(lib, name, fn, dispatch_key if isinstance(dispatch_key, str) else "")
            return fn
        return deco

    library_shim = types.ModuleType("torch.library")
    library_shim.Library, library_shim.impl = Library, impl
    library_shim.__getattr__ = lambda attr: getattr(torch.library, attr)  # anything else: the real one

    modules = _build_modules(meta, with_ops=False)
    meta._helpers = modules
    my_builtins = dict(builtins.__dict__)
    my_builtins["__import__"] = _import_hook(modules, library_shim)
    g: dict[str, Any] = {"__name__": f"torch_npu_meta_{ns}", "__file__": filename, "__builtins__": my_builtins}
    meta.globals = g

    tree = ast.parse(source, filename)
    meta.soc_readers, meta.cann_readers, meta.import_time_readers = _analyse(tree)
    # one top-level statement at a time: a failing one (e.g. has_side_effect on an op this wheel's
    # .so lacks) is recorded and the rest of the file still loads
    for node in tree.body:
        code = compile(ast.Module(body=[node], type_ignores=[]), filename, "exec")
        try:
            exec(code, g)  # noqa: S102 - Huawei's meta file from the wheel, the point of this harness
        except Exception as e:  # noqa: BLE001
            meta.toplevel_failures[f"line {node.lineno}"] = _first_line(e)


# one cache per process, shared even if this module is imported twice under two names
_REGISTRY_NAME = "_ascend_v4_npu_contract_registry"
_REGISTRY = sys.modules.setdefault(_REGISTRY_NAME, types.ModuleType(_REGISTRY_NAME, "loaded NpuMeta per version"))
_LOADED: dict[str, NpuMeta] = _REGISTRY.__dict__.setdefault("loaded", {})


def load_meta(version: str, soc_version: int | str | None = None, cann_version: str | None = None, *,
              wheel: Path | str | None = None) -> NpuMeta:
    """Load (once per process) Huawei's meta functions of torch-npu ``version``.

    ``soc_version``: a family ("A2", "A3", "950", "310P") or SoC id; ``cann_version``: what
    ``get_cann_version()`` returns.  Both default to ``DEFAULT_CHIP`` / ``DEFAULT_CANN_VERSION`` on
    the first load; when given for an already loaded version they are applied to it (the object is
    shared: prefer ``with meta.chip(...)`` in tests).  Raises FileNotFoundError when no wheel.
    """
    meta = _LOADED.get(version)
    if meta is None:
        t0 = time.perf_counter()
        path = Path(wheel) if wheel is not None else wheel_path(version)
        if path is None:
            raise FileNotFoundError(f"torch-npu {version} wheel not cached in {cache_dir()} and not downloadable: "
                                    f"{wheel_unavailable_reason(version)}")
        meta = NpuMeta(version, path, namespace_for(version), _soc_from(soc_version or DEFAULT_CHIP),
                       cann_version or DEFAULT_CANN_VERSION)
        meta.schemas = load_schemas(path)
        with zipfile.ZipFile(path) as z:
            source = z.read(META_FILE).decode("utf-8")
        _define_schemas(meta)
        _exec_meta_file(meta, source)
        meta.load_seconds = time.perf_counter() - t0
        _LOADED[version] = meta
        return meta
    if soc_version is not None:
        meta.set_chip(soc_version)
    if cann_version is not None:
        meta.set_cann_version(cann_version)
    return meta


def available_ops(meta: NpuMeta) -> set[str]:
    """Ops ("op" or "op.overload") that have a schema AND Huawei's meta function installed:
    calling ``meta.op(name)`` on meta tensors runs Huawei's checks."""
    return set(meta.meta_functions)


def ops_without_meta(meta: NpuMeta) -> set[str]:
    """Ops with a schema but no meta function (calling them on meta tensors raises NotImplementedError)."""
    return meta.defined - set(meta.meta_functions)


def signature_mismatches(meta: NpuMeta) -> dict[str, list[str]]:
    """Meta functions that cannot be called the way their schema allows (bugs in the wheel).

    The dispatcher calls a Python meta kernel with the schema's positional arguments positionally
    and its keyword-only arguments by name.  Each meta function is bound (``inspect.Signature.bind``)
    with the positional plus the required keyword-only arguments, and with every keyword-only one; a
    TypeError there (missing parameter, extra required parameter) is what a real call would raise.
    """
    import inspect

    out: dict[str, list[str]] = {}
    for name, fn in meta.meta_functions.items():
        schema = meta.op(name if "." in name else name + ".default")._schema
        sig = inspect.signature(fn)
        pos = [None] * sum(1 for a in schema.arguments if not a.kwarg_only)
        kw_all = {a.name: None for a in schema.arguments if a.kwarg_only}
        kw_req = {a.name: None for a in schema.arguments if a.kwarg_only and not a.has_default_value()}
        issues = []
        for label, kwargs in (("defaults left out", kw_req), ("every keyword-only argument given", kw_all)):
            try:
                sig.bind(*pos, **kwargs)
            except TypeError as e:
                issues.append(f"{label}: {e}")
        if issues:
            out[name] = issues
    return out


def skipped_registrations(meta: NpuMeta) -> dict[str, str]:
    """``{name: reason}`` for every meta registration in the file that was not installed."""
    return dict(meta.skipped)


# ---------------------------------------------------------------------------- torch_npu stand-in
def make_torch_npu_standin(meta: NpuMeta, *, npu_available: bool = False) -> types.ModuleType:
    """A fresh module named ``torch_npu`` backed by ``meta``.

    * ``torch_npu.<op>(...)`` for every defined schema name (``npu_*`` and the rest) forwards to
      ``torch.ops.<ns>.<op>(...)`` with positional and keyword arguments as given;
    * the dtype ints of ascend_npu.md §2 (``int4`` 285, ``hifloat8`` 290, ``float8_e5m2`` 291,
      ``float8_e4m3fn`` 292, ``float8_e8m0fnu`` 293, ``float4_e2m1fn_x2`` 296, ``float4_e1m2fn_x2`` 297);
    * ``npu.utils.get_soc_version()`` / ``npu._backends.get_soc_version()`` / ``npu.utils.get_cann_version()``
      reading ``meta``'s current chip and CANN (so ``meta.set_chip`` is seen); ``npu.is_available()``
      returns ``npu_available``; ``_C`` with ``_npu_get_soc_version`` etc.;
    * a real ``__spec__`` on the package and its submodules (``torch_npu.npu``, ``.npu.utils``,
      ``.npu._backends``, ``._C``, ``.utils``, ``.utils._error_code``), so
      ``importlib.util.find_spec("torch_npu")`` works once it is in ``sys.modules``.

    Not placed in ``sys.modules``: use ``standin_installed``.  Note: real torch_npu wraps a few ops in
    Python with a different signature than the schema; the stand-in always exposes the schema.
    """
    return _build_modules(meta, with_ops=True, npu_available=npu_available)["torch_npu"]


def _standin_submodules(pkg: types.ModuleType) -> dict[str, types.ModuleType]:
    out: dict[str, types.ModuleType] = {}

    def walk(mod):
        out[mod.__name__] = mod
        for v in vars(mod).values():
            if isinstance(v, types.ModuleType) and getattr(v, _STANDIN_MARK, False) and v.__name__ not in out:
                walk(v)

    walk(pkg)
    return out


@contextlib.contextmanager
def standin_installed(meta_or_module: NpuMeta | types.ModuleType, **kwargs) -> Iterator[types.ModuleType]:
    """Put a ``torch_npu`` stand-in (and its submodules) into ``sys.modules`` for the block, then
    restore exactly what was there before (including a real torch_npu, if any)."""
    pkg = (meta_or_module if isinstance(meta_or_module, types.ModuleType)
           else make_torch_npu_standin(meta_or_module, **kwargs))
    mods = _standin_submodules(pkg)
    saved = {k: v for k, v in sys.modules.items() if k == "torch_npu" or k.startswith("torch_npu.")}
    try:
        for k in saved:
            del sys.modules[k]
        sys.modules.update(mods)
        yield pkg
    finally:
        for k in [k for k in sys.modules if k == "torch_npu" or k.startswith("torch_npu.")]:
            del sys.modules[k]
        sys.modules.update(saved)


def is_standin(module: Any) -> bool:
    return bool(getattr(module, _STANDIN_MARK, False))


# ------------------------------------------------------------------------------------ pytest helpers
def require_wheel(version: str) -> Path:
    """The wheel path, or ``pytest.skip`` with the reason when it is neither cached nor downloadable."""
    import pytest

    path = wheel_path(version)
    if path is None:
        pytest.skip(f"torch-npu {version} wheel not cached and not downloadable: {wheel_unavailable_reason(version)}")
    return path


def meta_for(version: str) -> NpuMeta:
    """For tests: the process-cached ``NpuMeta`` of ``version`` (skips when the wheel is unavailable)."""
    if version in _LOADED:
        return _LOADED[version]
    return load_meta(version, wheel=require_wheel(version))


def _npu_meta_fixture(request) -> NpuMeta:
    meta = meta_for(request.param)
    soc, cann = meta.soc_version, meta.cann_version
    yield meta
    meta.soc_version, meta.cann_version = soc, cann  # a test's set_chip/set_cann_version never leaks


try:  # the fixture is importable by test modules: ``from .harness import npu_meta``
    import pytest as _pytest_mod

    npu_meta = _pytest_mod.fixture(params=VERSIONS, ids=lambda v: f"torch_npu-{v}")(_npu_meta_fixture)
except ImportError:  # pragma: no cover - harness used outside pytest
    npu_meta = None
