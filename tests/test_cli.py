"""The ``ascend-v4`` command line: ``ops`` and ``config``."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

import fallbacks
from ascend_v4 import cli

BACKEND_NAMES = ("reference", "cuda", "npu")


@pytest.fixture(autouse=True)
def _default_backend(monkeypatch):
    monkeypatch.delenv("ASCEND_V4_BACKEND", raising=False)


def test_ops_lists_every_op_and_backend(capsys):
    assert cli.main(["ops"]) == 0
    out, err = capsys.readouterr()
    lines = out.splitlines()
    header = lines[0].split()
    assert header[0] == "op"
    assert set(BACKEND_NAMES) <= set(header[1:])
    row_names = {line.split()[0] for line in lines[2:] if line.strip()}
    assert len(fallbacks.OPS) >= 10
    for op in fallbacks.OPS:
        assert op in row_names, f"op {op!r} missing from the ops table"
    # every op has the reference implementation, usable on any machine
    ref_col = header.index("reference")
    for line in lines[2:]:
        cells = line.split()
        if cells and cells[0] in fallbacks.OPS:
            assert cells[ref_col] == "yes", line
    for b in BACKEND_NAMES:
        assert any(line.startswith(b) and ("available" in line) for line in lines), f"no status line for {b}"
    assert "requested backend: auto" in out


def test_ops_with_bad_backend_env_is_an_error(capsys, monkeypatch):
    monkeypatch.setenv("ASCEND_V4_BACKEND", "tpu")
    assert cli.main(["ops"]) == 2
    _, err = capsys.readouterr()
    assert "ASCEND_V4_BACKEND" in err and "tpu" in err


def test_config_tiny_prints_json(capsys):
    assert cli.main(["config", "tiny"]) == 0
    out, _ = capsys.readouterr()
    d = json.loads(out)
    assert d["name"] == "tiny"
    assert d["hidden_size"] == 64
    assert d["compress_ratios"] == [0, 4, 128, 4, 0]  # tiny.yaml: SWA, CSA, HCA, CSA, MTP


def test_config_flash_prints_spec_numbers(capsys):
    assert cli.main(["config", "v4-flash"]) == 0
    d = json.loads(capsys.readouterr().out)
    # spec §2.1
    assert (d["hidden_size"], d["num_hidden_layers"], d["index_topk"], d["routed_scaling_factor"]) == (4096, 43, 512, 1.5)


def test_config_reads_official_checkpoint_dir(tmp_path, capsys):
    official = {
        "architectures": ["DeepseekV4ForCausalLM"], "model_type": "deepseek_v4", "num_key_value_heads": 1,
        "vocab_size": 512, "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "head_dim": 64,
        "qk_rope_head_dim": 16, "q_lora_rank": 32, "o_groups": 2, "o_lora_rank": 32, "sliding_window": 32,
        "compress_ratios": [4, 128, 0], "index_n_heads": 4, "index_head_dim": 32, "index_topk": 8,
        "n_routed_experts": 8, "num_experts_per_tok": 2, "moe_intermediate_size": 32, "num_hash_layers": 1,
        "max_position_embeddings": 4096,
    }
    (tmp_path / "config.json").write_text(json.dumps(official))
    assert cli.main(["config", str(tmp_path)]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["hidden_size"] == 64
    assert d["compress_ratios"] == [4, 128, 0]
    assert d["weight_format"] == "bf16"  # no quantization_config


def test_config_missing_path_exit_code_2(capsys):
    assert cli.main(["config", "/nonexistent"]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert "error" in err
    assert "/nonexistent" in err


def test_config_invalid_yaml_exit_code_2(tmp_path, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text("hidden_size: 64\nnum_hidden_layers: 4\nwhat_is_this: 1\n")
    assert cli.main(["config", str(path)]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert "what_is_this" in err


def test_config_without_argument_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["config"])
    assert info.value.code == 2


def test_console_script_ops():
    exe = shutil.which("ascend-v4", path=os.path.dirname(sys.executable)) or shutil.which("ascend-v4")
    if exe is None:
        pytest.skip("the ascend-v4 console script is not installed (pip install -e .)")
    env = {k: v for k, v in os.environ.items() if k != "ASCEND_V4_BACKEND"}
    proc = subprocess.run([exe, "ops"], capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr
    for op in fallbacks.OPS:
        assert op in proc.stdout
    for b in BACKEND_NAMES:
        assert b in proc.stdout
