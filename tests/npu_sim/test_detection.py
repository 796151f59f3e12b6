"""NPU detection without importing torch_npu at import time (ascend_npu.md §4.2), the per-chip
capability table and ``ascend-v4 ops --chip``."""

from __future__ import annotations

import sys

import pytest

from ascend_v4.cli import main
from op_adapters import devices
from op_adapters.npu import chips

from . import simulated_torch_npu


@pytest.fixture(autouse=True)
def fresh_detection():
    devices.npu_status.cache_clear()
    yield
    devices.npu_status.cache_clear()


def test_importing_the_package_does_not_import_torch_npu():
    import subprocess

    code = "import sys, ascend_v4, op_adapters, op_adapters.npu; print('torch_npu' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_not_installed_is_reported():
    ok, why = devices.npu_status()
    assert not ok and "not installed" in why


def test_installed_but_unimportable_is_reported(tmp_path, monkeypatch):
    pkg = tmp_path / "torch_npu"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("raise ImportError('libhccl.so: cannot open shared object file')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    ok, why = devices.npu_status()
    assert not ok and "import torch_npu failed" in why and "libhccl" in why
    sys.modules.pop("torch_npu", None)


@pytest.mark.parametrize("soc, family", [(220, "A2"), (250, "A3"), (260, "950"), (202, "310P")])
def test_soc_version_maps_to_its_family(soc, family, monkeypatch):
    monkeypatch.delenv(chips.CHIP_ENV, raising=False)
    with simulated_torch_npu(soc_version=soc):
        assert devices.npu_status()[0]
        assert chips.current_family() == family


def test_env_override_and_context_override(monkeypatch):
    monkeypatch.setenv(chips.CHIP_ENV, "910B")
    assert chips.current_family() == "A2"
    with chips.use_chip("950"):
        assert chips.current_family() == "950"
    with pytest.raises(ValueError, match="unknown Ascend chip family"):
        chips.normalise_family("H100")


def test_capability_table_follows_the_docs():
    rows = {fam: {op: runs for op, runs, _ in chips.capability_rows(fam)} for fam in ("A2", "A3", "950")}
    assert rows["950"]["mhc_pre"].startswith("npu_mhc_pre") and rows["A3"]["mhc_pre"] == "reference"
    assert rows["A2"]["apply_rope"] == "npu_rotary_mul" and rows["950"]["apply_rope"] == "reference"
    assert "npu_moe_init_routing_v2" in rows["A3"]["moe_experts"] and rows["950"]["moe_experts"] == "reference"
    for fam in rows:
        assert rows[fam]["sparse_attention"] == "npu_sparse_flash_attention"
        assert rows[fam]["compress_pool"] == "reference"


def test_ops_chip_command(capsys):
    assert main(["ops", "--chip", "950"]) == 0
    out = capsys.readouterr().out
    assert "Ascend 950" in out and "npu_mhc_sinkhorn" in out and "npu_rotary_mul is documented for A2, A3" in out
    assert main(["ops", "--chip", "A5"]) == 0   # alias
    assert main(["ops", "--chip", "B200"]) == 2


def test_ops_table_on_a_simulated_npu_host_shows_the_chip(capsys, monkeypatch):
    monkeypatch.delenv(chips.CHIP_ENV, raising=False)
    with simulated_torch_npu(soc_version=250):
        assert main(["ops"]) == 0
    out = capsys.readouterr().out
    assert "npu      : available" in out and "Ascend A3" in out


def test_fallback_is_logged_once_with_the_reason(caplog):
    import torch

    import op_adapters
    from op_adapters import registry

    registry.reset_fallback_log()
    x = torch.randn(2, 3, 4, 8)
    with simulated_torch_npu(soc_version=250), chips.use_chip("A3"), registry.simulate_device("npu"):
        for _ in range(3):
            op_adapters.mhc_post(x, torch.randn(2, 3, 8), torch.rand(2, 3, 4), torch.rand(2, 3, 4, 4))
    msgs = [r.getMessage() for r in caplog.records if "mhc_post" in r.getMessage()]
    assert len(msgs) == 1 and "documented for 950" in msgs[0]


def test_gate_norm_type_refused_once_falls_back_for_the_process(caplog, monkeypatch):
    """norm_type=2 (sqrt-softplus) is undocumented: if the installed CANN refuses it, the adapter
    falls back to the reference for the rest of the process and says so once."""
    import torch

    import fallbacks
    import op_adapters
    from op_adapters import registry
    from op_adapters.npu import ops as npu_ops

    monkeypatch.setattr(npu_ops, "_refused", {})
    logits = torch.randn(6, 16)
    bias = torch.randn(16) * 0.1
    want = fallbacks.moe_gate(logits, bias=bias, k=2, route_scale=1.5)
    with simulated_torch_npu(soc_version=250) as tnpu, chips.use_chip("A3"), registry.simulate_device("npu"):
        calls = []

        def refuse(*args, **kwargs):
            calls.append(kwargs.get("norm_type"))
            raise RuntimeError("EZ1001: norm_type 2 is not supported")

        monkeypatch.setattr(tnpu, "npu_moe_gating_top_k", refuse)
        for _ in range(3):
            w, idx = op_adapters.moe_gate(logits, bias=bias, k=2, route_scale=1.5)
            assert torch.equal(idx, want[1]) and torch.allclose(w, want[0])
    assert calls == [2], "the refused op must be tried exactly once"
    assert "sqrtsoftplus" in npu_ops._refused
    assert sum("refused norm_type 2" in r.getMessage() for r in caplog.records) >= 1
