"""``ascend-v4 dump`` / ``ascend-v4 compare`` (ascend_v4/numerics): dumps, rules, first failure, reports.

Runs use the tiny preset (4 layers: SWA, CSA, HCA, CSA) and prompts of at most 32 tokens.  Test
backends are registered as "cuda" implementations on a private copy of the op's registry entry
(``monkeypatch.setitem``), and ``simulate_device("cuda")`` makes dispatch run them on CPU tensors.
"""

from __future__ import annotations

import json
import random
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import fallbacks
import op_adapters as oa
from ascend_v4 import cli
from ascend_v4.checkpoint import save_model
from ascend_v4.loader import load_model
from ascend_v4.numerics import compare as nc
from ascend_v4.numerics import dump as nd
from op_adapters import registry

TINY_VOCAB = 512
PROMPT = [random.Random(0).randrange(TINY_VOCAB) for _ in range(32)]


@pytest.fixture(autouse=True)
def _clean(monkeypatch):
    monkeypatch.delenv(registry.ENV_VAR, raising=False)
    registry.reset_fallback_log()


def _dump(out, dtype, *, backend="reference", steps=1, decode_ids=None, prompt=PROMPT, **kw):
    return nd.dump("tiny", out, prompt_ids=prompt, backend=backend, dtype=dtype,
                   decode_steps=0 if decode_ids else steps, decode_ids=decode_ids, **kw)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Reference dumps of tiny in fp64 / fp32 / bf16 (prefill + 1 decode step on fp64's tokens)."""
    root = tmp_path_factory.mktemp("runs")
    m64 = _dump(root / "fp64", "fp64")
    follow = m64["inputs"]["decode_ids"]
    _dump(root / "fp32", "fp32", decode_ids=follow)
    _dump(root / "bf16", "bf16", decode_ids=follow)
    return root


# ---------------------------------------------------------------------------------------------- dump
def test_dump_records_every_probe_point_in_forward_order(runs):
    m = nd.read_manifest(runs / "fp64")
    names = sorted(m["tensors"], key=lambda n: m["tensors"][n]["order"])
    assert names[0] == "embed" and names[-1] == "step1/logits"
    assert names.index("logits") < names.index("step1/embed")
    for i in range(4):
        for kind in ("streams_in", "attn.x_in", "attn.kv", "attn.out", "ffn.x_in", "ffn.gate_weights",
                     "ffn.expert_ids", "ffn.out", "streams_out"):
            assert f"layers.{i}.{kind}" in m["tensors"] and f"step1/layers.{i}.{kind}" in m["tensors"]
    # CSA layers (1, 3) have the indexer top-k; CSA and HCA (2) compressed entries; SWA (0) neither
    assert {n for n in names if n.endswith("indexer_topk") and "/" not in n} == {"layers.1.attn.indexer_topk",
                                                                                 "layers.3.attn.indexer_topk"}
    assert "layers.0.attn.compressed" not in m["tensors"] and "layers.2.attn.compressed" in m["tensors"]
    t = m["tensors"]["layers.1.attn.out"]
    assert t["shape"] == [1, 32, 64] and t["dtype"] == "float64" and t["layer"] == 1 and t["kind"] == "attn.out"
    assert m["tensors"]["layers.1.ffn.expert_ids"]["dtype"] == "int64"
    assert m["tensors"]["layers.3.attn.compressed"]["shape"][1] == 8          # 32 tokens / ratio 4
    assert m["tensors"]["step1/layers.3.attn.compressed"]["shape"][1] == 8    # 33 tokens: no new block
    # the manifest: versions, config and weights identity, inputs, backend per op
    assert m["format"] == nd.DUMP_FORMAT and m["versions"]["torch"] == torch.__version__
    assert m["model"]["config_hash"] == load_model("tiny").config.config_hash()
    assert m["inputs"]["prompt_ids"] == PROMPT and len(m["inputs"]["decode_ids"]) == 1
    assert m["inputs"]["decode_ids"][0] == m["inputs"]["argmax_next"][0]       # greedy
    assert m["run"] == {**m["run"], "backend": "reference", "dtype": "fp64", "decode_steps": 1, "fake_quant": False}
    assert m["backend_per_op"]["sparse_attention"] == ["reference"]
    assert m["steps"][1]["backends"]["mhc_post"] == "reference"
    assert set(m["weights"]["hashes"]) == {"recipe", "state_fp64"}
    # tensors are copies of what the model computed (not views of the cache that changed later)
    data = load_file(str(runs / "fp64" / "prefill.safetensors"))
    model = load_model("tiny", dtype=torch.float64)
    seen = {}
    model(torch.tensor([PROMPT]), probe=lambda n, x: seen.setdefault(n, x.detach().clone()))
    for name in ("layers.2.attn.out", "layers.3.attn.compressed", "layers.1.attn.indexer_topk", "logits"):
        assert torch.equal(data[name], seen[name]), name


def test_include_exclude_decode_steps_and_prefill_chunks(tmp_path):
    m = _dump(tmp_path / "a", "fp32", steps=2, include=["layers.1.*,logits"], exclude=["*.attn.kv"],
              prefill_chunk=8)
    names = set(m["tensors"])
    assert "layers.1.attn.out" in names and "step2/layers.1.attn.out" in names and "step2/logits" in names
    assert not any(".attn.kv" in n or "layers.0." in n or n.endswith("embed") for n in names)
    assert m["selection"]["recorded"] == len(names) < m["selection"]["probe_points"]
    assert m["run"]["prefill_chunk"] == 8
    assert m["tensors"]["layers.1.attn.out"]["shape"] == [1, 32, 64]         # four chunks concatenated
    # chunked prefill computes the same as one chunk (extend ≡ prefill): compare passes under fp32 rules
    whole = _dump(tmp_path / "b", "fp32", steps=2, include=["layers.1.*", "logits"], exclude=["*.attn.kv"])
    assert whole["run"]["prefill_chunk"] >= 32
    cmp = nc.compare_runs(tmp_path / "a", tmp_path / "b")
    assert cmp.passed and cmp.counts() == {"pass": len(names)}


# ---------------------------------------------------------------------------------------------- dtype rules
def _decisive_tiny(dtype):
    """tiny with gate biases that make experts 0 and 1 win every routed choice by a wide margin.

    In the plain preset some tokens' top-2 experts are near-ties (score gaps of 1e-4), which bf16
    rounding may tip on one CPU and not on another; a tipped choice is a real, reported set
    difference (see test_tokens_routed_differently_...).  With decisive gates the bf16 run's error is
    rounding alone, the same on every machine.  (The indexer keeps every entry at <= 33 tokens.)"""
    model = load_model("tiny", dtype=dtype)
    with torch.no_grad():
        for block in model.layers:
            if block.ffn.gate.bias is not None:
                block.ffn.gate.bias[:2] += 100.0
    return model


def test_bf16_and_fp32_against_fp64_pass_their_dtype_rules(runs, tmp_path):
    weights = {"source": "test", "hashes": {"recipe": "tiny seed 0, gate bias +100 on experts 0 and 1"}}
    g = nd.dump_model(_decisive_tiny(torch.float64), PROMPT, tmp_path / "g", backend="reference", decode_steps=1,
                      weights=weights)
    nd.dump_model(_decisive_tiny(torch.bfloat16), PROMPT, tmp_path / "a", backend="reference",
                  decode_ids=g["inputs"]["decode_ids"], weights=weights)
    bf = nc.compare_runs(tmp_path / "a", tmp_path / "g")
    assert bf.cmp_dtype == "bf16"
    assert bf.passed, nc.summary_text(bf)
    assert bf.counts() == {"pass": len(bf.rows)} == {"pass": 86}
    worst = max(r["metrics"]["mean_rel"] for r in bf.rows if r["metrics"]["method"] == "float")
    assert 1e-3 < worst < 0.1                                # bf16 error is visible, and bounded
    f32 = nc.compare_runs(runs / "fp32", runs / "fp64")
    assert f32.cmp_dtype == "fp32" and f32.passed
    assert max(r["metrics"]["mean_rel"] for r in f32.rows if r["metrics"]["method"] == "float") < 1e-4
    # the bf16 run judged by fp32 tolerances fails, from the first tensor that carries bf16 rounding
    strict = tmp_path / "strict.yaml"
    strict.write_text("dtypes:\n  bf16: {atol: 2^-16, rtol: 2^-10, max_abs: 2^-12}\n")
    bad = nc.compare_runs(tmp_path / "a", tmp_path / "g", nc.load_rules(strict))
    assert not bad.passed and bad.first_failure["name"] == "embed"
    # the same run compared with itself: exact
    same = nc.compare_runs(runs / "bf16", runs / "bf16")
    assert all(r["metrics"].get("max_abs", 0) == 0 for r in same.rows)


def test_rules_file_merges_and_is_checked(tmp_path):
    f = tmp_path / "r.yaml"
    f.write_text("pass_fraction: 0.5\ndtypes:\n  fp32: {atol: 2^-8}\noverrides:\n"
                 "  - {pattern: 'layers.*.attn.out', rtol: 0.25}\n  - {pattern: 'step*/logits', skip: true}\n")
    rules = nc.load_rules(f)
    assert rules["pass_fraction"] == 0.5 and rules["dtypes"]["fp32"]["atol"] == 2 ** -8
    assert rules["dtypes"]["fp32"]["rtol"] == 2 ** -10                      # merged with the defaults
    assert nc.rule_for("layers.3.attn.out", rules, "fp32")["rtol"] == 0.25
    assert nc.rule_for("step2/layers.3.attn.out", rules, "fp32")["rtol"] == 0.25
    assert nc.rule_for("step1/logits", rules, "fp32")["skip"] and not nc.rule_for("logits", rules, "fp32").get("skip")
    f.write_text("dtypes:\n  bf16: {atol: lots}\n")
    with pytest.raises(ValueError, match="atol"):
        nc.load_rules(f)
    f.write_text("tolerance: 1\n")
    with pytest.raises(ValueError, match="unknown rules key"):
        nc.load_rules(f)


def test_float_metrics_nan_inf_and_max_abs_limit():
    rules = nc.load_rules()
    rule = nc.rule_for("x", rules, "fp32")
    ref = torch.linspace(-2, 2, 1000, dtype=torch.float64).view(1, 10, 100)
    m = nc.compare_tensor(ref.clone(), ref, rule)
    assert m["passed"] and m["max_abs"] == 0 and m["cosine"] == pytest.approx(1.0)
    a = ref.clone()
    a[0, 0, 0] = float("nan")
    a[0, 1, 1] = float("inf")
    m = nc.compare_tensor(a, ref, rule)
    assert not m["passed"] and m["nan_a"] == 1 and m["inf_a"] == 1 and m["nonfinite_mismatch"] == 2
    assert "NaN" in m["reason"]
    both = ref.clone()
    both[0, 0, 0] = float("nan")
    assert nc.compare_tensor(both.clone(), both, rule)["passed"]           # NaN where the reference has NaN
    one_outlier = ref.clone()
    one_outlier[0, 5, 5] += 0.5                                             # 0.1% of elements: fraction ok
    m = nc.compare_tensor(one_outlier, ref, rule)
    assert not m["passed"] and "max abs" in m["reason"] and m["within"] == pytest.approx(0.999)
    assert m["max_rel"] > 0 and 0 < m["mean_rel"] < m["max_rel"]
    assert not nc.compare_tensor(ref[..., :50], ref, rule)["passed"]       # shapes differ


# ---------------------------------------------------------------------------------------------- index sets
def test_index_sets_tie_tolerance_and_padding():
    rules = nc.load_rules()
    rule = nc.rule_for("layers.1.attn.indexer_topk", rules, "bf16")
    g = torch.Generator().manual_seed(0)
    ref = torch.stack([torch.randperm(64, generator=g)[:8] for _ in range(40)]).view(1, 40, 8)
    # same sets in another order per row: recall 1
    shuffled = torch.stack([r[torch.randperm(8, generator=g)] for r in ref.view(40, 8)]).view(1, 40, 8)
    m = nc.compare_tensor(shuffled, ref, rule, index=True)
    assert m["passed"] and m["recall"] == 1.0 and m["precision"] == 1.0 and not m["same_order"]
    # a tie broken the other way in 2 of 320 entries: recall 318/320 = 0.994 >= 0.99
    tie = shuffled.clone()
    for row in (3, 17):
        free = [i for i in range(64) if i not in ref[0, row].tolist()]
        tie[0, row, 0] = free[0]
    m = nc.compare_tensor(tie, ref, rule, index=True)
    assert m["passed"] and m["recall"] == pytest.approx(318 / 320) and m["rows_differ"] == 2
    strict = dict(rule, index_recall=0.999)
    m = nc.compare_tensor(tie, ref, strict, index=True)
    assert not m["passed"] and "recall 0.9938" in m["reason"]
    # -1 padding (causal: early rows have fewer entries) is no entry, wherever it sits
    pad_ref = torch.tensor([[[5, -1, -1], [1, 2, -1], [3, 4, 0]]])
    pad_a = torch.tensor([[[-1, 5, -1], [2, -1, 1], [0, 3, 4]]])
    m = nc.compare_tensor(pad_a, pad_ref, rule, index=True)
    assert m["passed"] and m["recall"] == 1.0 and m["entries_b"] == 6
    m = nc.compare_tensor(torch.tensor([[[5, 7, -1], [1, 2, -1], [3, 4, 0]]]), pad_ref, rule, index=True)
    assert not m["passed"] and m["recall"] == 1.0 and m["precision"] == pytest.approx(6 / 7)
    assert not nc.compare_tensor(ref[:, :20], ref, rule, index=True)["passed"]   # rows differ


def test_gate_weights_are_aligned_by_expert_ids(runs, tmp_path):
    # A returns each token's experts in the opposite order (with their weights): same routing
    shutil.copytree(runs / "fp32", tmp_path / "swapped")
    f = tmp_path / "swapped" / "prefill.safetensors"
    data = load_file(str(f))
    for i in range(4):
        for kind in ("ffn.expert_ids", "ffn.gate_weights"):
            data[f"layers.{i}.{kind}"] = data[f"layers.{i}.{kind}"].flip(-1).contiguous()
    save_file(data, str(f))
    cmp = nc.compare_runs(tmp_path / "swapped", runs / "fp64")
    assert cmp.passed, nc.summary_text(cmp)
    row = next(r for r in cmp.rows if r["name"] == "layers.2.ffn.gate_weights")
    assert row["aligned_by"] == "layers.2.ffn.expert_ids"
    assert next(r for r in cmp.rows if r["name"] == "layers.2.ffn.expert_ids")["metrics"]["same_order"] is False


def test_tokens_routed_differently_are_reported_and_left_out(runs, tmp_path):
    # token 5 takes other experts in layer 1 (as a near-tie tipped by rounding would)
    shutil.copytree(runs / "fp32", tmp_path / "other")
    f = tmp_path / "other" / "prefill.safetensors"
    data = load_file(str(f))
    ids = data["layers.1.ffn.expert_ids"]
    free = [e for e in range(8) if e not in ids[0, 5].tolist()]
    ids[0, 5] = torch.tensor(free[:2])
    data["layers.1.ffn.out"][0, 5] += 1.0             # ... so its output, and what follows, differ
    data["layers.2.streams_in"][0, 5] += 1.0
    save_file(data, str(f))
    cmp = nc.compare_runs(tmp_path / "other", runs / "fp64")
    ff = cmp.first_failure
    assert ff["name"] == "layers.1.ffn.expert_ids" and "1 of 32 rows differ" in ff["reason"]
    rows = {r["name"]: r for r in cmp.rows}
    assert rows["layers.1.ffn.expert_ids"]["diverged_positions"] == [5]
    assert rows["layers.1.ffn.out"]["status"] == "pass" and rows["layers.1.ffn.out"]["excluded_rows"] == 1
    assert rows["layers.2.streams_in"]["status"] == "pass"
    assert rows["layers.1.ffn.x_in"].get("excluded_rows") is None          # before the choice: compared
    assert any("position(s) 5" in n for n in cmp.notes)
    assert [r["name"] for r in cmp.failures] == ["layers.1.ffn.expert_ids"]


# ---------------------------------------------------------------------------------------------- first failure
def _perturbing(op, layer_call, change):
    """A "cuda" implementation of ``op``: the reference, with ``change`` applied to the output of its
    ``layer_call``-th call in the first forward (the prefill) only."""
    calls = {"n": 0}

    def impl(*args, **kwargs):
        out = fallbacks.OPS[op](*args, **kwargs)
        calls["n"] += 1
        return change(out) if calls["n"] == layer_call + 1 else out
    return impl


def _dump_with(monkeypatch, op, impl, out, dtype, follow):
    monkeypatch.setitem(registry._REGISTRY, op, dict(registry._REGISTRY[op]))
    oa.register(op, "cuda")(impl)
    with oa.simulate_device("cuda", on="cpu"):
        return _dump(out, dtype, backend="cuda", device="cpu", decode_ids=follow)


def test_perturbed_op_in_one_layer_is_the_first_failure(runs, tmp_path, monkeypatch):
    follow = nd.read_manifest(runs / "fp32")["inputs"]["decode_ids"]
    # mhc_post runs twice per layer (after attention, after the MoE): call 5 = layer 2's MoE residual
    m = _dump_with(monkeypatch, "mhc_post", _perturbing("mhc_post", 5, lambda y: y * 1.001), tmp_path / "a", "fp32",
                   follow)
    assert m["backend_per_op"]["mhc_post"] == ["cuda"] and m["backend_per_op"]["rms_norm"] == ["reference"]
    cmp = nc.compare_runs(tmp_path / "a", runs / "fp32")
    ff = cmp.first_failure
    assert ff["name"] == "layers.2.streams_out" and (ff["layer"], ff["kind"]) == (2, "streams_out")
    text = cmp.first_failure_text()
    assert "layers.2.streams_out" in text and "mhc_post (A: cuda, ref: reference)" in text
    before = [r for r in cmp.rows if r is not ff][: cmp.rows.index(ff)]
    assert all(r["status"] == "pass" and r["metrics"].get("max_abs", 0) == 0 for r in before)
    assert any(r["status"] == "fail" for r in cmp.rows if r["layer"] == 3)  # and it propagates


def test_injected_nan_names_the_layer_and_op(runs, tmp_path, monkeypatch):
    follow = nd.read_manifest(runs / "fp32")["inputs"]["decode_ids"]

    def nan_row(o):
        o = o.clone()
        o[0, 7] = float("nan")
        return o
    _dump_with(monkeypatch, "sparse_attention", _perturbing("sparse_attention", 1, nan_row), tmp_path / "a", "fp32",
               follow)
    cmp = nc.compare_runs(tmp_path / "a", runs / "fp32")
    ff = cmp.first_failure
    assert ff["name"] == "layers.1.attn.out"
    assert ff["metrics"]["nan_a"] > 0 and ff["metrics"]["nan_b"] == 0 and "NaN" in ff["reason"]
    assert "sparse_attention (A: cuda, ref: reference)" in cmp.first_failure_text()


def test_golden_mode_accepts_reference_like_error_and_catches_a_bug(runs, tmp_path, monkeypatch):
    # A = a bf16 run identical to the reference's bf16 run (B): its error against G is B's own
    ok = nc.compare(runs / "bf16", runs / "bf16", golden=runs / "fp64")
    assert ok.passed and ok.baseline is not None and ok.b.path == runs / "fp64"
    assert all(r.get("baseline") for r in ok.rows)
    # A = bf16 with a 10% error in layer 1's attention: far beyond B's own bf16 error
    follow = nd.read_manifest(runs / "fp64")["inputs"]["decode_ids"]
    _dump_with(monkeypatch, "sparse_attention", _perturbing("sparse_attention", 1, lambda o: o * 1.1),
               tmp_path / "a", "bf16", follow)
    bad = nc.compare(tmp_path / "a", runs / "bf16", golden=runs / "fp64")
    assert bad.first_failure["name"] == "layers.1.attn.out"
    # a rule so strict that B fails it too: A's bf16 error passes as comparable to B's ("pass~")
    strict = tmp_path / "strict.yaml"
    strict.write_text("dtypes:\n  bf16: {atol: 2^-12, rtol: 2^-12}\n")
    cmp = nc.compare(runs / "bf16", runs / "bf16", golden=runs / "fp64", rules=strict)
    assert cmp.passed and any(r.get("via") == "golden" for r in cmp.rows)
    assert "pass~" in nc.format_table(cmp)


# ---------------------------------------------------------------------------------------------- refusals
def test_refuses_runs_that_cannot_be_compared(runs, tmp_path, capsys):
    _dump(tmp_path / "prompt", "fp32", steps=0, prompt=PROMPT[:-1] + [PROMPT[-1] ^ 1])
    with pytest.raises(nc.CompareRefused, match="different prompt ids: 32 vs 32 tokens, first difference at position 31"):
        nc.compare_runs(tmp_path / "prompt", runs / "fp32")
    _dump(tmp_path / "seed", "fp32", steps=0, seed=1)
    with pytest.raises(nc.CompareRefused, match="different weights"):
        nc.compare_runs(tmp_path / "seed", runs / "fp32")
    shutil.copytree(runs / "fp32", tmp_path / "config")
    m = json.loads((tmp_path / "config" / "manifest.json").read_text())
    m["model"]["config_hash"] = "0" * 16
    (tmp_path / "config" / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(nc.CompareRefused, match="different model config"):
        nc.compare_runs(tmp_path / "config", runs / "fp32")
    cmp = nc.compare_runs(tmp_path / "config", runs / "fp32", force=True)  # --force: compared, with a warning
    assert cmp.passed and "different model config" in cmp.warnings[0]
    # the CLI: exit status 2 and the reason
    assert cli.main(["compare", str(tmp_path / "seed"), str(runs / "fp32")]) == 2
    err = capsys.readouterr().err
    assert "refusing to compare" in err and "different weights" in err and "--force" in err
    assert cli.main(["compare", str(tmp_path), str(runs / "fp32")]) == 2     # not a dump directory
    assert "no manifest.json" in capsys.readouterr().err


def test_missing_and_unreadable_tensors_are_reported(runs, tmp_path):
    _dump(tmp_path / "part", "fp64", steps=0, include=["layers.2.*", "logits"])
    cmp = nc.compare_runs(tmp_path / "part", runs / "fp64")
    assert cmp.passed                                       # what both have matches; the rest is not a failure
    c = cmp.counts()
    assert c["pass"] == 11 and c["missing in A"] == len(cmp.rows) - 11
    assert any("not recorded in A" in line for line in nc.missing_summary(cmp))
    assert "attn.out (layers 0-3; prefill, steps 1)" in nc.summary_text(cmp)
    assert "missing" not in nc.format_table(cmp)
    shutil.copytree(runs / "fp64", tmp_path / "broken")
    (tmp_path / "broken" / "step1.safetensors").unlink()
    cmp = nc.compare_runs(tmp_path / "broken", runs / "fp64")
    assert cmp.first_failure["name"] == "step1/embed" and "cannot read tensor" in cmp.first_failure["reason"]


def test_decode_paths_that_diverge_are_skipped(runs, tmp_path):
    _dump(tmp_path / "other", "fp64", decode_ids=[(nd.read_manifest(runs / "fp64")["inputs"]["decode_ids"][0] + 1)
                                                  % TINY_VOCAB])
    cmp = nc.compare_runs(tmp_path / "other", runs / "fp64")
    assert cmp.passed
    assert {r["status"] for r in cmp.rows if r["step"] == "step1"} == {"skipped"}
    assert any("diverge at step1" in n for n in cmp.notes)


# ---------------------------------------------------------------------------------------------- reports, CLI
def test_report_files_and_plot(runs, tmp_path):
    cmp = nc.compare(runs / "bf16", runs / "bf16", golden=runs / "fp64")
    files = nc.write_report(cmp, tmp_path / "rep")
    assert set(files) == {"json", "md", "png"}
    rep = json.loads(files["json"].read_text())
    assert rep["mode"] == "golden" and rep["result"] == "pass" and rep["compare_dtype"] == "bf16"
    assert len(rep["tensors"]) == len(rep["baseline_tensors"]) == len(cmp.rows)
    assert rep["a"]["run"]["dtype"] == "bf16" and rep["reference"]["run"]["dtype"] == "fp64"
    md = files["md"].read_text()
    assert "| `layers.3.ffn.out` |" in md and "![mean relative error per layer](errors.png)" in md
    png = files["png"].read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and png[12:16] == b"IHDR"
    width, height = int.from_bytes(png[16:20], "big"), int.from_bytes(png[20:24], "big")
    assert width >= 600 and height >= 400


def test_cli_dump_and_compare_on_a_checkpoint(tmp_path, capsys):
    ckpt = tmp_path / "ckpt"
    save_model(load_model("tiny", seed=3), ckpt)
    ids = ",".join(map(str, PROMPT[:16]))
    base = ["dump", "--model", str(ckpt), "--backend", "reference", "--prompt-ids", ids, "--quiet"]
    assert cli.main(base + ["--dtype", "fp64", "--decode-steps", "1", "--out", str(tmp_path / "g")]) == 0
    out = capsys.readouterr().out
    assert "dumped" in out and "manifest:" in out and "fp64 on cpu, backend reference" in out
    assert cli.main(base + ["--dtype", "fp32", "--decode-ids-from", str(tmp_path / "g"), "--out", str(tmp_path / "a")]) == 0
    m = nd.read_manifest(tmp_path / "a")
    assert m["weights"]["source"] == "checkpoint" and {"files_full", "files_sampled"} <= set(m["weights"]["hashes"])
    assert m["inputs"]["decode_ids"] == nd.read_manifest(tmp_path / "g")["inputs"]["decode_ids"]
    capsys.readouterr()
    assert cli.main(["compare", str(tmp_path / "a"), str(tmp_path / "g")]) == 0
    out = capsys.readouterr().out
    assert "RESULT: PASS" in out and "layers.3.attn.indexer_topk" in out
    assert {p.name for p in (tmp_path / "g" / "compare").iterdir()} == {"report.json", "report.md", "errors.png"}
    # the preset with the same seed is not the same weights source: refused
    assert cli.main(["dump", "--model", "tiny", "--seed", "3", "--backend", "reference", "--dtype", "fp32",
                     "--prompt-ids", ids, "--quiet", "--out", str(tmp_path / "p")]) == 0
    assert cli.main(["compare", str(tmp_path / "p"), str(tmp_path / "g")]) == 2
    assert "weights cannot be matched" in capsys.readouterr().err


def test_cli_compare_dumps_two_backends_in_one_process(tmp_path, capsys):
    rc = cli.main(["compare", "--backends", "reference,reference", "--model", "tiny", "--dtype", "fp32",
                   "--golden-dtype", "fp64", "--prompt-ids", ",".join(map(str, PROMPT[:12])), "--decode-steps", "1",
                   "--include", "layers.3.*,logits", "--out", str(tmp_path), "--quiet", "--failures-only"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert {p.name for p in tmp_path.iterdir()} == {"A-reference-fp32", "B-reference-fp32", "G-reference-fp64",
                                                    "compare"}
    assert "RESULT: PASS" in out and "B:" in out
    rep = json.loads((tmp_path / "compare" / "report.json").read_text())
    assert rep["mode"] == "golden" and rep["b"]["path"].endswith("B-reference-fp32")
    assert cli.main(["compare", "--backends", "reference", "--model", "tiny", "--out", str(tmp_path / "x")]) == 2
    assert "two backends" in capsys.readouterr().err
