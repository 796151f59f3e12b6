"""The op_adapters dispatch registry: backend selection, fallback logging, registration.

Every test that registers a fake implementation does it on a copy of the op's registry entry
(``monkeypatch.setitem``), so the real registry is restored afterwards even when a test fails.
"""

from __future__ import annotations

import logging

import pytest
import torch

import op_adapters as oa
from op_adapters import registry

LOGGER = "ascend_v4.dispatch"


@pytest.fixture(autouse=True)
def _clean_dispatch_state(monkeypatch):
    monkeypatch.delenv(registry.ENV_VAR, raising=False)
    registry.reset_fallback_log()
    yield
    registry.reset_fallback_log()


@pytest.fixture
def scratch_op(monkeypatch):
    """Give an op a private copy of its implementation table; returns a function that does so."""
    def make(op: str) -> None:
        monkeypatch.setitem(registry._REGISTRY, op, dict(registry._REGISTRY[op]))
    return make


def fake_status(available: dict[str, tuple[bool, str]]):
    real = registry.backend_status

    def status(backend: str) -> tuple[bool, str]:
        return available.get(backend) or real(backend)
    return status


def ref_rms(x: torch.Tensor) -> torch.Tensor:
    x64 = x.double()
    return x64 / torch.sqrt((x64 * x64).mean(-1, keepdim=True) + 1e-6)


def warnings_for(caplog, op: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == LOGGER and r.levelno == logging.WARNING
            and f"op {op}:" in r.getMessage()]


# ------------------------------------------------------------------------------- the registry
def test_every_op_is_registered_with_a_reference():
    want = {"rms_norm", "apply_rope", "sinkhorn", "mhc_pre", "mhc_post", "mhc_head", "compress_pool",
            "indexer_scores", "indexer_topk", "sparse_attention", "moe_gate", "moe_experts", "hadamard",
            "fp8_fake_quant", "fp4_fake_quant", "act_quant", "lightning_indexer"}
    assert want <= set(oa.ops())
    for op in want:
        assert "reference" in registry.implementations(op)
        assert callable(getattr(oa, op))


def test_unknown_op_and_backend():
    with pytest.raises(KeyError, match="unknown op"):
        registry.implementations("flash_attention")
    with pytest.raises(ValueError, match="unknown backend"):
        registry.register("rms_norm", "tpu")


# ------------------------------------------------------------------------ requested backend
@pytest.mark.parametrize("value,want", [("reference", "reference"), ("npu", "npu"), ("cuda", "cuda"),
                                        ("auto", "auto"), ("  CUDA ", "cuda"), ("", "auto")])
def test_env_var_selects_backend(monkeypatch, value, want):
    monkeypatch.setenv("ASCEND_V4_BACKEND", value)
    assert registry.requested_backend() == want


def test_env_var_unset_means_auto():
    assert registry.requested_backend() == "auto"


def test_env_var_invalid_value(monkeypatch):
    monkeypatch.setenv("ASCEND_V4_BACKEND", "tpu")
    with pytest.raises(ValueError, match="ASCEND_V4_BACKEND"):
        registry.requested_backend()
    with pytest.raises(ValueError, match="not a backend"):
        oa.rms_norm(torch.ones(2, 4))


def test_use_backend_context_manager(monkeypatch):
    monkeypatch.setenv("ASCEND_V4_BACKEND", "cuda")
    assert registry.requested_backend() == "cuda"
    with oa.use_backend("reference"):
        assert registry.requested_backend() == "reference"   # the context wins over the env var
        with oa.use_backend("npu"):
            assert registry.requested_backend() == "npu"
        assert registry.requested_backend() == "reference"
    assert registry.requested_backend() == "cuda"


def test_use_backend_restores_after_exception():
    with pytest.raises(RuntimeError):
        with oa.use_backend("npu"):
            raise RuntimeError("boom")
    assert registry.requested_backend() == "auto"


def test_use_backend_invalid_value():
    with pytest.raises(ValueError, match="unknown backend"):
        with oa.use_backend("tpu"):
            pass
    assert registry.requested_backend() == "auto"


# ---------------------------------------------------------------------------- choosing / falling back
def test_auto_on_cpu_runs_reference_silently(caplog, torch_gen):
    caplog.set_level(logging.WARNING, logger=LOGGER)
    x = torch.randn(3, 8, generator=torch_gen)
    y = oa.rms_norm(x)
    torch.testing.assert_close(y.double(), ref_rms(x), rtol=1e-5, atol=1e-6)
    assert oa.last_backends()["rms_norm"] == "reference"
    assert registry.choose("rms_norm", (x,))[0] == "reference"
    assert warnings_for(caplog, "rms_norm") == []   # auto → reference on CPU is not a fallback


@pytest.mark.parametrize("backend", ["npu", "cuda"])
@pytest.mark.parametrize("how", ["env", "context"])
def test_forced_fast_backend_on_cpu_falls_back_and_logs_once(monkeypatch, caplog, torch_gen, backend, how):
    caplog.set_level(logging.WARNING, logger=LOGGER)
    registry.reset_fallback_log()
    x = torch.randn(3, 8, generator=torch_gen)

    def run(op_fn, *args):
        if how == "env":
            monkeypatch.setenv("ASCEND_V4_BACKEND", backend)
            return op_fn(*args)
        with oa.use_backend(backend):
            return op_fn(*args)

    y1 = run(oa.rms_norm, x)
    y2 = run(oa.rms_norm, x)
    torch.testing.assert_close(y1.double(), ref_rms(x), rtol=1e-5, atol=1e-6)
    assert torch.equal(y1, y2)
    assert oa.last_backends()["rms_norm"] == "reference"
    recs = warnings_for(caplog, "rms_norm")
    assert len(recs) == 1, [r.getMessage() for r in recs]          # once per (op, reason)
    assert backend in recs[0].getMessage() and "reference" in recs[0].getMessage()

    run(oa.hadamard, x)                                            # another op: its own record
    assert len(warnings_for(caplog, "hadamard")) == 1
    assert len(warnings_for(caplog, "rms_norm")) == 1

    registry.reset_fallback_log()                                  # after a reset it is logged again
    run(oa.rms_norm, x)
    assert len(warnings_for(caplog, "rms_norm")) == 2


def test_fallback_logged_once_per_reason(monkeypatch, caplog, scratch_op, torch_gen):
    caplog.set_level(logging.WARNING, logger=LOGGER)
    x = torch.randn(2, 8, generator=torch_gen)
    scratch_op("rms_norm")
    calls = []
    registry.register("rms_norm", "npu")(lambda *a, **k: calls.append(1))
    reasons = iter(["driver A missing", "driver B missing"])
    reason = next(reasons)
    monkeypatch.setattr(registry, "backend_status", lambda b: (False, reason) if b == "npu" else (True, "ok"))
    with oa.use_backend("npu"):
        oa.rms_norm(x)
        oa.rms_norm(x)
        reason = next(reasons)                                     # a new reason: a new record
        oa.rms_norm(x)
        oa.rms_norm(x)
    msgs = [r.getMessage() for r in warnings_for(caplog, "rms_norm")]
    assert len(msgs) == 2, msgs
    assert "driver A missing" in msgs[0] and "driver B missing" in msgs[1]
    assert calls == []                                             # the unavailable npu fn never ran


# ----------------------------------------------------------------------------- registering a backend
def test_registered_cuda_impl_is_chosen_when_supported(monkeypatch, caplog, scratch_op, torch_gen):
    caplog.set_level(logging.WARNING, logger=LOGGER)
    scratch_op("rms_norm")
    seen = []

    def fake_rms_norm(x, weight=None, eps=1e-6):
        seen.append(x.shape)
        return torch.full_like(x, 7.0)

    def supports(x, weight=None, eps=1e-6):
        return None if x.shape[-1] % 4 == 0 else f"last dim {x.shape[-1]} is not a multiple of 4"

    registry.register("rms_norm", "cuda", supports=supports)(fake_rms_norm)
    monkeypatch.setattr(registry, "backend_status", fake_status({"cuda": (True, "pretend CUDA")}))

    x = torch.randn(2, 8, generator=torch_gen)
    x6 = torch.randn(2, 6, generator=torch_gen)
    # We only have CPU tensors: simulate_device makes the registry treat them as CUDA tensors.
    with oa.simulate_device("cuda", on="cpu"):
        for mode in ("auto", "cuda"):      # auto maps a cuda device to cuda; an explicit request too
            monkeypatch.setenv("ASCEND_V4_BACKEND", mode)
            y = oa.rms_norm(x)
            assert torch.equal(y, torch.full_like(x, 7.0))
            assert oa.last_backends()["rms_norm"] == "cuda"
            assert registry.choose("rms_norm", (x,))[0] == "cuda"
        assert len(seen) == 2

        # supports() refuses: the reference runs and the refusal reason is logged once
        for _ in range(2):
            y6 = oa.rms_norm(x6)
            torch.testing.assert_close(y6.double(), ref_rms(x6), rtol=1e-5, atol=1e-6)
        assert oa.last_backends()["rms_norm"] == "reference"
        recs = warnings_for(caplog, "rms_norm")
        assert len(recs) == 1 and "not a multiple of 4" in recs[0].getMessage()
        assert len(seen) == 2

        with oa.use_backend("reference"):  # forcing the reference bypasses the fake entirely
            y = oa.rms_norm(x)
        torch.testing.assert_close(y.double(), ref_rms(x), rtol=1e-5, atol=1e-6)
        assert len(seen) == 2

    # outside the simulation the tensors are plain CPU tensors again: auto runs the reference
    monkeypatch.setenv("ASCEND_V4_BACKEND", "auto")
    y = oa.rms_norm(x)
    assert oa.last_backends()["rms_norm"] == "reference"
    torch.testing.assert_close(y.double(), ref_rms(x), rtol=1e-5, atol=1e-6)
    assert len(seen) == 2


def test_registered_cuda_impl_refused_when_unavailable_or_wrong_device(monkeypatch, caplog, scratch_op, torch_gen):
    caplog.set_level(logging.WARNING, logger=LOGGER)
    scratch_op("hadamard")
    registry.register("hadamard", "cuda", supports=lambda x: None)(lambda x: pytest.fail("fake cuda ran"))
    x = torch.randn(2, 8, generator=torch_gen)
    monkeypatch.setenv("ASCEND_V4_BACKEND", "cuda")

    # backend unavailable (the real status on this machine may differ, so pretend it explicitly)
    monkeypatch.setattr(registry, "backend_status", fake_status({"cuda": (False, "pretend: no CUDA device")}))
    oa.hadamard(x)
    assert oa.last_backends()["hadamard"] == "reference"
    # backend available but the tensors are on the CPU
    monkeypatch.setattr(registry, "backend_status", fake_status({"cuda": (True, "pretend CUDA")}))
    oa.hadamard(x)
    assert oa.last_backends()["hadamard"] == "reference"
    msgs = [r.getMessage() for r in warnings_for(caplog, "hadamard")]
    assert len(msgs) == 2, msgs
    assert "pretend: no CUDA device" in msgs[0]
    assert "cpu" in msgs[1] and "cuda" in msgs[1]


def test_scratch_registration_is_cleaned_up():
    # runs after the registering tests in file order: no fake backend may remain registered
    for op in ("rms_norm", "hadamard"):
        assert set(registry.implementations(op)) <= {"reference"} | _real_fast_backends(op)


_ORIGINAL = {op: set(impls) for op, impls in registry._REGISTRY.items()}


def _real_fast_backends(op: str) -> set[str]:
    return _ORIGINAL.get(op, set()) - {"reference"}
