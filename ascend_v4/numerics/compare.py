"""``ascend-v4 compare``: match two dumps tensor by tensor and name the first one that differs.

Per tensor: max abs, max rel, mean rel, cosine similarity, NaN/Inf counts and a pass/fail under a
dtype-aware rule (``rules.yaml`` next to this file, overridable with ``--rules FILE``).  Index
tensors (indexer top-k, expert ids) are compared as sets per row with tie tolerance (recall and
precision).  Tensors are walked in forward order (prefill, then decode steps; within a step in the
order the model produced them); the first failing one is the answer to "where does it start".

Relative errors use ``max(|ref|, atol)`` as the denominator so that reference values near zero do
not dominate them.  Statistics are computed in float64, streamed over chunks of the tensor.
"""

from __future__ import annotations

import datetime
import fnmatch
import json
import math
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
import yaml

from .dump import (DUMP_FORMAT, MANIFEST_FILE, layer_and_kind, read_manifest, split_name, split_patterns,
                   step_index)

REPORT_FORMAT = "ascend-v4-compare/1"
DEFAULT_RULES_FILE = Path(__file__).with_name("rules.yaml")
PRECISION = {"fp64": 4, "fp32": 3, "fp16": 2, "bf16": 1}
RULE_KEYS = {"atol", "rtol", "max_abs", "pass_fraction", "index_recall", "skip"}
_CHUNK = 1 << 22

# Which ops produce each recorded tensor (for the hint that comes with the first failure).
OP_HINTS: dict[str, tuple[str, ...]] = {
    "embed": (),
    "streams_in": (),
    "attn.x_in": ("mhc_pre", "sinkhorn"),
    "attn.kv": ("rms_norm", "apply_rope", "fp8_fake_quant"),
    "attn.compressed": ("compress_pool", "rms_norm", "apply_rope", "fp8_fake_quant"),
    "attn.indexer_topk": ("lightning_indexer", "indexer_scores", "indexer_topk", "compress_pool", "hadamard",
                          "apply_rope", "fp4_fake_quant"),
    "attn.out": ("sparse_attention", "apply_rope", "rms_norm"),
    "ffn.x_in": ("mhc_post", "mhc_pre", "sinkhorn"),
    "ffn.gate_weights": ("moe_gate", "rms_norm"),
    "ffn.expert_ids": ("moe_gate", "rms_norm"),
    "ffn.out": ("moe_experts", "moe_gate", "act_quant", "fp8_fake_quant"),
    "streams_out": ("mhc_post",),
    "logits": ("mhc_head", "rms_norm"),
}


class CompareRefused(ValueError):
    """The two runs cannot be compared (different model, weights or inputs)."""


# ---------------------------------------------------------------------------------------------- rules
_POW = re.compile(r"^\s*([+-]?\d+(?:\.\d+)?)\s*(?:\^|\*\*)\s*([+-]?\d+)\s*$")


def _number(v: Any, where: str) -> float:
    if isinstance(v, bool):
        raise ValueError(f"rules: {where} must be a number, got {v!r}")
    if isinstance(v, (int, float)):
        return float(v)
    if isinstance(v, str):
        m = _POW.match(v)
        if m:
            return float(m.group(1)) ** int(m.group(2))
        try:
            return float(v)
        except ValueError:
            pass
    raise ValueError(f"rules: {where} must be a number or a power like 2^-10, got {v!r}")


def _merge(base: Any, over: Any) -> Any:
    if isinstance(base, dict) and isinstance(over, dict):
        out = dict(base)
        for k, v in over.items():
            out[k] = _merge(base.get(k), v) if k in base else v
        return out
    return over


def _rule_entry(d: dict, where: str) -> dict:
    unknown = set(d) - RULE_KEYS - {"pattern"}
    if unknown:
        raise ValueError(f"rules: {where}: unknown key(s) {sorted(unknown)}; allowed: {sorted(RULE_KEYS)}")
    return {k: (bool(v) if k == "skip" else v if k == "pattern" else _number(v, f"{where}.{k}")) for k, v in d.items()}


def load_rules(path: str | Path | None = None) -> dict[str, Any]:
    """The default rules merged with ``path`` (YAML), numbers normalised and checked."""
    rules = yaml.safe_load(DEFAULT_RULES_FILE.read_text(encoding="utf-8"))
    if path is not None:
        user = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
        if not isinstance(user, dict):
            raise ValueError(f"{path}: a rules file must be a YAML mapping")
        unknown = set(user) - set(rules)
        if unknown:
            raise ValueError(f"{path}: unknown rules key(s) {sorted(unknown)}; known: {sorted(rules)}")
        rules = _merge(rules, user)
    rules["pass_fraction"] = _number(rules["pass_fraction"], "pass_fraction")
    rules["index_recall"] = _number(rules["index_recall"], "index_recall")
    rules["dtypes"] = {k: _rule_entry(v, f"dtypes.{k}") for k, v in rules["dtypes"].items()}
    for k in PRECISION:
        if k not in rules["dtypes"] or not {"atol", "rtol"} <= set(rules["dtypes"][k]):
            raise ValueError(f"rules: dtypes.{k} needs atol and rtol")
    rules["golden"] = {k: _number(v, f"golden.{k}") for k, v in (rules.get("golden") or {}).items()}
    overrides = rules.get("overrides") or []
    if not isinstance(overrides, list) or any(not isinstance(o, dict) or "pattern" not in o for o in overrides):
        raise ValueError("rules: overrides must be a list of mappings with a 'pattern'")
    rules["overrides"] = [_rule_entry(o, f"overrides[{i}]") for i, o in enumerate(overrides)]
    if rules.get("atol_unit") not in ("rms", "absolute"):
        raise ValueError(f"rules: atol_unit must be 'rms' or 'absolute', got {rules.get('atol_unit')!r}")
    rules["exclude_diverged_tokens"] = bool(rules.get("exclude_diverged_tokens", True))
    rules["index_patterns"] = list(rules.get("index_patterns") or [])
    rules["aligned_by"] = dict(rules.get("aligned_by") or {})
    return rules


def _match(name: str, pattern: str) -> bool:
    return fnmatch.fnmatchcase(name, pattern) or fnmatch.fnmatchcase(split_name(name)[1], pattern)


def rule_for(name: str, rules: dict[str, Any], cmp_dtype: str) -> dict[str, Any]:
    r = {"pass_fraction": rules["pass_fraction"], "index_recall": rules["index_recall"], "max_abs": math.inf,
         "atol_unit": rules["atol_unit"], **rules["dtypes"][cmp_dtype]}
    for o in rules["overrides"]:
        if _match(name, o["pattern"]):
            r.update({k: v for k, v in o.items() if k != "pattern"})
    return r


def coarser_dtype(*dtypes: str) -> str:
    known = [d for d in dtypes if d in PRECISION]
    if not known:
        raise ValueError(f"no known dtype among {dtypes}")
    return min(known, key=lambda d: PRECISION[d])


# ---------------------------------------------------------------------------------------------- one tensor
def _float_metrics(a: torch.Tensor, r: torch.Tensor, rule: dict[str, Any]) -> dict[str, Any]:
    fa, fr = a.reshape(-1), r.reshape(-1)
    n = fr.numel()
    sumsq, n_ref = 0.0, 0
    for i in range(0, n, _CHUNK):                       # pass 1: the reference's RMS (the unit of atol)
        y = fr[i:i + _CHUNK].double()
        y = y[torch.isfinite(y)]
        sumsq += float((y * y).sum())
        n_ref += y.numel()
    ref_rms = math.sqrt(sumsq / n_ref) if n_ref else 0.0
    unit = (ref_rms if ref_rms > 0 else 1.0) if rule.get("atol_unit", "rms") == "rms" else 1.0
    atol, rtol = rule["atol"] * unit, rule["rtol"]
    m = dict(nan_a=0, inf_a=0, nan_b=0, inf_b=0, nonfinite_mismatch=0)
    within = 0
    max_abs = max_rel = sum_rel = sum_abs = dot = na = nr = ref_absmax = 0.0
    n_fin = 0
    for i in range(0, n, _CHUNK):                       # pass 2: everything else
        x, y = fa[i:i + _CHUNK].double(), fr[i:i + _CHUNK].double()
        xf, yf = torch.isfinite(x), torch.isfinite(y)
        m["nan_a"] += int(torch.isnan(x).sum())
        m["inf_a"] += int(torch.isinf(x).sum())
        m["nan_b"] += int(torch.isnan(y).sum())
        m["inf_b"] += int(torch.isinf(y).sum())
        both = xf & yf
        same_nonfinite = ~xf & ~yf & ((torch.isnan(x) & torch.isnan(y)) | (x == y))
        m["nonfinite_mismatch"] += int((~both & ~same_nonfinite).sum())
        within += int(same_nonfinite.sum())
        x, y = x[both], y[both]
        if not x.numel():
            continue
        d = (x - y).abs()
        ya = y.abs()
        within += int((d <= atol + rtol * ya).sum())
        rel = d / ya.clamp(min=atol if atol > 0 else 1e-300)
        max_abs = max(max_abs, float(d.max()))
        max_rel = max(max_rel, float(rel.max()))
        sum_rel += float(rel.sum())
        sum_abs += float(d.sum())
        dot += float((x * y).sum())
        na += float((x * x).sum())
        nr += float((y * y).sum())
        ref_absmax = max(ref_absmax, float(ya.max()))
        n_fin += x.numel()
    if na == 0.0 and nr == 0.0:
        cos = 1.0
    elif na == 0.0 or nr == 0.0:
        cos = 0.0
    else:
        cos = dot / math.sqrt(na * nr)
    frac = within / n if n else 1.0
    limit = rule["max_abs"] * unit
    m.update(method="float", elements=n, max_abs=max_abs, max_rel=max_rel, mean_rel=sum_rel / n_fin if n_fin else 0.0,
             mean_abs=sum_abs / n_fin if n_fin else 0.0, cosine=cos, within=frac, ref_rms=ref_rms,
             ref_absmax=ref_absmax, atol=atol, rtol=rtol, max_abs_limit=limit if math.isfinite(limit) else None,
             pass_fraction=rule["pass_fraction"])
    unit_txt = " x RMS(ref)" if rule.get("atol_unit", "rms") == "rms" else ""
    if m["nonfinite_mismatch"]:
        reason = (f"{m['nonfinite_mismatch']} NaN/Inf not matched by the other run "
                  f"(A: {m['nan_a']} NaN {m['inf_a']} Inf; ref: {m['nan_b']} NaN {m['inf_b']} Inf)")
    elif frac < rule["pass_fraction"]:
        reason = (f"{100 * frac:.2f}% of elements within atol + rtol*|ref| (atol {rule['atol']:.3g}{unit_txt} = "
                  f"{atol:.3g}, rtol {rtol:.3g}); needs {100 * rule['pass_fraction']:.2f}%")
    elif max_abs > limit:
        reason = f"max abs error {max_abs:.3g} > limit {limit:.3g} ({rule['max_abs']:.3g}{unit_txt})"
    else:
        reason = None
    m["passed"], m["reason"] = reason is None, reason
    return m


def _index_metrics(a: torch.Tensor, r: torch.Tensor, rule: dict[str, Any]) -> dict[str, Any]:
    if a.dim() < 2 or r.dim() < 2 or a.shape[:-1] != r.shape[:-1]:
        return {"method": "index", "passed": False,
                "reason": f"row shapes differ: {list(a.shape)} vs {list(r.shape)}"}
    A = a.reshape(-1, a.shape[-1]).long() if a.shape[-1] else a.reshape(-1, 0).long()
    R = r.reshape(-1, r.shape[-1]).long() if r.shape[-1] else r.reshape(-1, 0).long()
    rows = A.shape[0]
    va, vr = A >= 0, R >= 0
    n_a, n_r = int(va.sum()), int(vr.sum())
    if R.shape[1] and A.shape[1] and rows:
        Rs = torch.where(vr, R, torch.full_like(R, -1)).sort(dim=-1).values
        pos = torch.searchsorted(Rs, A.contiguous()).clamp(max=Rs.shape[1] - 1)
        found = (Rs.gather(-1, pos) == A) & va
    else:
        found = torch.zeros_like(va)
    hits_row = found.sum(-1)
    hits = int(hits_row.sum())
    recall = hits / n_r if n_r else 1.0
    precision = hits / n_a if n_a else 1.0
    differs = (hits_row != vr.sum(-1)) | (va.sum(-1) != vr.sum(-1))
    rows_differ = int(differs.sum())
    need = rule["index_recall"]
    m = {"method": "index", "elements": a.numel(), "recall": recall, "precision": precision, "rows": rows,
         "rows_differ": rows_differ, "same_order": bool(a.shape == r.shape and torch.equal(a, r)),
         "entries_a": n_a, "entries_b": n_r, "index_recall": need, "_row_differs": differs}
    if recall < need or precision < need:
        m["passed"], m["reason"] = False, (f"set overlap recall {recall:.4f} / precision {precision:.4f} < {need} "
                                           f"({rows_differ} of {rows} rows differ)")
    else:
        m["passed"], m["reason"] = True, None
    return m


def _exact_metrics(a: torch.Tensor, r: torch.Tensor) -> dict[str, Any]:
    diff = int((a != r).sum())
    return {"method": "exact", "elements": a.numel(), "mismatches": diff, "passed": diff == 0,
            "reason": None if diff == 0 else f"{diff} of {a.numel()} integer elements differ"}


def compare_tensor(a: torch.Tensor, ref: torch.Tensor, rule: dict[str, Any], *, index: bool | None = None) -> dict:
    """Metrics and verdict of ``a`` against ``ref`` under ``rule`` (see :func:`rule_for`).

    ``index=None``: integer tensors are compared as index sets.  Keys: ``method`` (float / index /
    exact), ``passed``, ``reason`` (why it failed) and the metrics of the method.
    """
    if a.is_floating_point() != ref.is_floating_point():
        return {"method": "float", "passed": False, "reason": f"dtypes differ: {a.dtype} vs {ref.dtype}"}
    if not ref.is_floating_point():
        if index is None or index:
            return _index_metrics(a, ref, rule)
        if a.shape != ref.shape:
            return {"method": "exact", "passed": False, "reason": f"shapes differ: {list(a.shape)} vs {list(ref.shape)}"}
        return _exact_metrics(a, ref)
    if a.shape != ref.shape:
        return {"method": "float", "passed": False, "reason": f"shapes differ: {list(a.shape)} vs {list(ref.shape)}"}
    return _float_metrics(a, ref, rule)


# ---------------------------------------------------------------------------------------------- runs
class Run:
    """A dump directory: its manifest and lazy access to its tensors."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.manifest = read_manifest(self.path)
        fmt = self.manifest.get("format")
        if fmt != DUMP_FORMAT:
            raise CompareRefused(f"{self.path}: dump format {fmt!r} is not {DUMP_FORMAT!r}; re-dump with this version")
        self.tensors: dict[str, dict[str, Any]] = self.manifest["tensors"]

    @property
    def dtype(self) -> str:
        return self.manifest["run"]["dtype"]

    @property
    def label(self) -> str:
        run, host = self.manifest["run"], self.manifest["host"]
        chip = f", {host['chip']}" if host.get("chip") else ""
        return f"{run['backend']} {run['dtype']} on {run['device']}{chip}"

    def order(self, name: str) -> tuple[int, int]:
        return step_index(self.tensors[name]["step"]), self.tensors[name]["order"]

    def load(self, name: str) -> torch.Tensor:
        from safetensors import safe_open

        info = self.tensors[name]
        with safe_open(str(self.path / info["file"]), framework="pt") as f:
            return f.get_tensor(info["key"])

    def backends(self, step: str) -> dict[str, str]:
        for s in self.manifest.get("steps", []):
            if s["step"] == step:
                return s.get("backends", {})
        return {}


def load_run(path: str | Path) -> Run:
    return Run(path)


def _weights_problem(a: Run, b: Run) -> str | None:
    ha, hb = a.manifest["weights"].get("hashes", {}), b.manifest["weights"].get("hashes", {})
    common = sorted(set(ha) & set(hb))
    if not common:
        return (f"weights cannot be matched: {a.path} has {sorted(ha) or 'no hashes'} "
                f"({a.manifest['weights'].get('source')}), {b.path} has {sorted(hb) or 'no hashes'} "
                f"({b.manifest['weights'].get('source')})")
    diff = [k for k in common if ha[k] != hb[k]]
    if diff:
        return (f"different weights: {diff[0]} hash {ha[diff[0]][:16]}… ({a.manifest['weights'].get('spec')}) vs "
                f"{hb[diff[0]][:16]}… ({b.manifest['weights'].get('spec')})")
    return None


def check_comparable(a: Run, b: Run, *, force: bool = False) -> list[str]:
    """Problems that make ``a`` and ``b`` incomparable; raises :class:`CompareRefused` unless ``force``."""
    ma, mb = a.manifest, b.manifest
    problems = []
    if ma["model"]["config_hash"] != mb["model"]["config_hash"]:
        problems.append(f"different model config: hash {ma['model']['config_hash']} ({ma['model']['config_name']}) "
                        f"vs {mb['model']['config_hash']} ({mb['model']['config_name']})")
    w = _weights_problem(a, b)
    if w:
        problems.append(w)
    ia, ib = ma["inputs"]["prompt_ids"], mb["inputs"]["prompt_ids"]
    if ia != ib:
        j = next((k for k, (x, y) in enumerate(zip(ia, ib)) if x != y), min(len(ia), len(ib)))
        problems.append(f"different prompt ids: {len(ia)} vs {len(ib)} tokens, first difference at position {j}")
    if ma["run"]["fake_quant"] != mb["run"]["fake_quant"]:
        problems.append(f"fake-quant differs: {ma['run']['fake_quant']} vs {mb['run']['fake_quant']} "
                        f"(different computations)")
    if problems and not force:
        raise CompareRefused(f"refusing to compare {a.path} with {b.path}:\n  - " + "\n  - ".join(problems)
                             + "\n(--force compares anyway)")
    return problems


@dataclass
class Comparison:
    """The result of comparing run ``a`` with reference run ``b`` (``b`` may be the golden run)."""

    a: Run
    b: Run
    cmp_dtype: str
    rules: dict[str, Any]
    rows: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    baseline: "Comparison | None" = None     # golden mode: B against G (self is A against G)

    @property
    def failures(self) -> list[dict[str, Any]]:
        return [r for r in self.rows if r["status"] == "fail"]

    @property
    def first_failure(self) -> dict[str, Any] | None:
        f = self.failures
        return f[0] if f else None

    @property
    def passed(self) -> bool:
        return not self.failures

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for r in self.rows:
            out[r["status"]] = out.get(r["status"], 0) + 1
        return out

    def first_failure_text(self) -> str:
        r = self.first_failure
        if r is None:
            return "no tensor fails"
        where = f"{r['step']}, " + (f"layer {r['layer']}, " if r["layer"] is not None else "") + r["kind"]
        text = f"first failure in forward order: {r['name']} ({where}): {r['reason']}"
        ops = OP_HINTS.get(r["kind"], ())
        if ops:
            ba, bb = self.a.backends(r["step"]), self.b.backends(r["step"])
            ran = [f"{op} (A: {ba[op]}, ref: {bb.get(op, '-')})" for op in ops if op in ba]
            if ran:
                text += "\n  computed by: " + ", ".join(ran)
        return text


def _sibling(name: str, kind: str, other_kind: str) -> str:
    return name[: len(name) - len(kind)] + other_kind


def _decode_divergence(a: Run, b: Run) -> tuple[int | None, str | None]:
    da, db = a.manifest["inputs"]["decode_ids"], b.manifest["inputs"]["decode_ids"]
    for j, (x, y) in enumerate(zip(da, db)):
        if x != y:
            return j + 1, f"decode inputs diverge at step{j + 1}: A was fed token {x}, the reference token {y}"
    return None, None


def compare_runs(a: Run | str | Path, b: Run | str | Path, rules: dict[str, Any] | None = None, *,
                 force: bool = False) -> Comparison:
    """Compare every tensor of ``a`` with ``b`` (the reference) in forward order."""
    a = a if isinstance(a, Run) else Run(a)
    b = b if isinstance(b, Run) else Run(b)
    rules = rules or load_rules()
    warnings = [f"compared despite: {p}" for p in check_comparable(a, b, force=force)]
    cmp_dtype = coarser_dtype(a.dtype, b.dtype)
    cmp = Comparison(a, b, cmp_dtype, rules, warnings=warnings)
    diverge_step, why = _decode_divergence(a, b)
    if why:
        cmp.notes.append(why + "; later decode steps are skipped (dump with --decode-ids-from to follow one path)")
    for k, (x, y) in enumerate(zip(a.manifest["inputs"]["argmax_next"], b.manifest["inputs"]["argmax_next"])):
        if x != y:
            cmp.notes.append(f"argmax next token after {'prefill' if k == 0 else f'step{k}'}: A {x}, reference {y}")
    names = sorted(set(a.tensors) | set(b.tensors), key=lambda n: b.order(n) if n in b.tensors else a.order(n))
    paths = _Paths(b.manifest)
    for name in names:
        step, base = split_name(name)
        layer, kind = layer_and_kind(base)
        row: dict[str, Any] = {"name": name, "step": step, "layer": layer, "kind": kind, "status": None,
                               "reason": None, "shape": None, "metrics": {}}
        info = b.tensors.get(name) or a.tensors.get(name)
        row["shape"] = info["shape"]
        if name not in a.tensors or name not in b.tensors:
            row["status"] = "missing in A" if name not in a.tensors else "missing in B"
            row["reason"] = f"recorded only in {'B' if name not in a.tensors else 'A'}"
            cmp.rows.append(row)
            continue
        if diverge_step is not None and step_index(step) >= diverge_step:
            row["status"], row["reason"] = "skipped", f"decode inputs diverged at step{diverge_step}"
            cmp.rows.append(row)
            continue
        rule = rule_for(name, rules, cmp_dtype)
        try:
            ta, tb = a.load(name), b.load(name)
        except Exception as e:  # a damaged or partial run directory: report, do not crash
            row["status"], row["reason"] = "fail", f"cannot read tensor: {type(e).__name__}: {e}"
            cmp.rows.append(row)
            continue
        # rows (tokens / compressed entries) along dim 1, and those already on a different path
        positions = paths.positions(step, layer, kind, ta, tb)
        keep = None
        if positions is not None and rules["exclude_diverged_tokens"]:
            keep = paths.keep(positions, step, layer)
        aligned_differs = None
        for pattern, other in rules["aligned_by"].items():
            if _match(name, pattern) and ta.is_floating_point() and ta.shape == tb.shape:
                sib = _sibling(name, kind, other)
                if sib in a.tensors and sib in b.tensors:
                    ia, ib = a.load(sib), b.load(sib)
                    if ia.shape == ta.shape and ib.shape == tb.shape:
                        ta = ta.gather(-1, ia.argsort(dim=-1, stable=True))
                        tb = tb.gather(-1, ib.argsort(dim=-1, stable=True))
                        row["aligned_by"] = sib
                        # rows routed to other experts compare weights of different experts: left to the ids
                        aligned_differs = (ia.sort(dim=-1).values != ib.sort(dim=-1).values).any(dim=-1)
                break
        if aligned_differs is not None and positions is not None and rules["exclude_diverged_tokens"]:
            routed = ~aligned_differs.reshape(-1, aligned_differs.shape[1]).any(dim=0)
            keep = routed if keep is None else keep & routed
        if keep is not None and not bool(keep.all()):
            ta, tb = ta[:, keep], tb[:, keep]
            row["excluded_rows"] = int((~keep).sum())
        is_index = any(_match(name, p) for p in rules["index_patterns"])
        m = compare_tensor(ta, tb, rule, index=is_index if not ta.is_floating_point() else None)
        differs = m.pop("_row_differs", None)
        if differs is not None and positions is not None and rules["exclude_diverged_tokens"] and differs.any():
            kept = [p for p, k in zip(positions, keep.tolist() if keep is not None else [True] * len(positions)) if k]
            cols = len(kept)
            new = sorted({kept[j % cols] for j in differs.nonzero().flatten().tolist()}) if cols else []
            if new:
                paths.diverge(new, step, layer, name)
                row["diverged_positions"] = new
        row["metrics"] = m
        if rule.get("skip"):
            row["status"], row["reason"] = "skipped", "skip rule" + (f" (would fail: {m['reason']})" if m["reason"] else "")
        else:
            row["status"], row["reason"] = ("pass", None) if m["passed"] else ("fail", m["reason"])
        cmp.rows.append(row)
    for text in paths.notes():
        cmp.notes.append(text)
    return cmp


class _Paths:
    """Token positions whose discrete choices (top-k entries, experts) already differ from the reference.

    A tie-tolerated set difference puts a token on another path: from there on its tensors differ
    by much more than rounding, so its rows are left out of the element rules of later tensors (and
    compressed entries that pool it), and the count is reported.
    """

    def __init__(self, manifest: dict[str, Any]):
        self.prompt_len = len(manifest["inputs"]["prompt_ids"])
        self.ratios = list(manifest["model"].get("layer_ratios", []))
        self.diverged: dict[int, tuple[int, float, str]] = {}   # position -> (step index, layer, tensor name)

    def positions(self, step: str, layer: int | None, kind: str, ta: torch.Tensor, tb: torch.Tensor):
        """One entry per index along dim 1: a position, or (lo, hi) for a compressed entry; None if no such dim."""
        if ta.dim() < 2 or tb.dim() < 2 or ta.shape[:2] != tb.shape[:2]:
            return None
        n = ta.shape[1]
        if kind == "attn.compressed":
            if layer is None or layer >= len(self.ratios) or not self.ratios[layer]:
                return None
            m = self.ratios[layer]
            back = m if m == 4 else 0          # CSA entries pool their block and the previous one
            return [(max(0, m * j - back), m * j + m - 1) for j in range(n)]
        k = step_index(step)
        expect = self.prompt_len if k == 0 else 1
        if n != expect or ta.dim() < 3:
            return None
        return list(range(self.prompt_len)) if k == 0 else [self.prompt_len + k - 1]

    def _hit(self, pos: int, step: str, layer: int | None) -> bool:
        d = self.diverged.get(pos)
        if d is None:
            return False
        return d[0] == step_index(step) or d[1] < (math.inf if layer is None else layer)

    def keep(self, positions, step: str, layer: int | None) -> torch.Tensor:
        out = []
        for p in positions:
            if isinstance(p, tuple):
                out.append(not any(self._hit(q, step, layer) for q in range(p[0], p[1] + 1) if q in self.diverged))
            else:
                out.append(not self._hit(p, step, layer))
        return torch.tensor(out, dtype=torch.bool)

    def diverge(self, positions: list[int], step: str, layer: int | None, name: str) -> None:
        for p in positions:
            self.diverged.setdefault(p, (step_index(step), math.inf if layer is None else layer, name))

    def notes(self) -> list[str]:
        by: dict[str, list[int]] = {}
        for p, (_, _, name) in self.diverged.items():     # insertion order = forward order
            by.setdefault(name, []).append(p)
        by = {n: sorted(ps) for n, ps in by.items()}
        return [f"token position(s) {', '.join(map(str, ps))} chose other {'entries' if 'indexer' in n else 'experts'} "
                f"at {n}: left out of the element rules of later tensors (different path)" for n, ps in by.items()]


def apply_golden(ca: Comparison, cb: Comparison) -> Comparison:
    """Golden mode: ``ca`` = A vs G, ``cb`` = B vs G.  A's failures comparable to B's own error pass."""
    g = ca.rules["golden"]
    base = {r["name"]: r for r in cb.rows}
    for row in ca.rows:
        rb = base.get(row["name"])
        if rb is None or not rb["metrics"]:
            continue
        ma, mb = row["metrics"], rb["metrics"]
        row["baseline"] = {k: mb.get(k) for k in ("max_abs", "mean_rel", "cosine", "within", "recall", "precision")
                           if k in mb}
        row["baseline"]["status"] = rb["status"]
        if row["status"] != "fail" or not ma or ma.get("method") != mb.get("method"):
            continue
        if ma["method"] == "float" and "max_abs" in ma and "max_abs" in mb and not ma.get("nonfinite_mismatch"):
            ok = (ma["mean_rel"] <= g["mean_rel_ratio"] * mb["mean_rel"] and
                  ma["max_abs"] <= g["max_abs_ratio"] * mb["max_abs"])
            why = (f"comparable to the reference's own error against the golden run (mean rel {ma['mean_rel']:.3g} vs "
                   f"{mb['mean_rel']:.3g}, max abs {ma['max_abs']:.3g} vs {mb['max_abs']:.3g})")
        elif ma["method"] == "index" and "recall" in ma and "recall" in mb:
            # entries missed (1 - recall) and extra (1 - precision): at most miss_ratio x B's own, plus a slack
            r, s = g.get("miss_ratio", 2.0), g.get("recall_slack", 0.01)
            ok = (1 - ma["recall"] <= r * (1 - mb["recall"]) + s and
                  1 - ma["precision"] <= r * (1 - mb["precision"]) + s)
            why = (f"set overlap comparable to the reference's own against the golden run (recall {ma['recall']:.4f} "
                   f"vs {mb['recall']:.4f}, precision {ma['precision']:.4f} vs {mb['precision']:.4f})")
        else:
            ok, why = False, ""
        if ok:
            row["status"], row["via"] = "pass", "golden"
            row["rule_reason"], row["reason"] = row["reason"], why
        elif ma["method"] == "float" and "mean_rel" in ma and "mean_rel" in mb:
            row["reason"] += (f"; not comparable to B's own error against G either (mean rel {ma['mean_rel']:.3g} vs "
                              f"B {mb['mean_rel']:.3g}, max abs {ma['max_abs']:.3g} vs B {mb['max_abs']:.3g})")
        elif ma["method"] == "index" and "recall" in ma and "recall" in mb:
            row["reason"] += f"; B's own recall against G is {mb['recall']:.4f}"
    ca.baseline = cb
    return ca


def compare(run_a: str | Path, run_b: str | Path, *, golden: str | Path | None = None,
            rules: dict[str, Any] | str | Path | None = None, force: bool = False) -> Comparison:
    """A vs B, or (``golden``) A vs G with B vs G as the baseline."""
    rules = rules if isinstance(rules, dict) else load_rules(rules)
    if golden is None:
        return compare_runs(run_a, run_b, rules, force=force)
    g = Run(golden)
    ca = compare_runs(run_a, g, rules, force=force)
    cb = compare_runs(run_b, g, rules, force=force)
    return apply_golden(ca, cb)


# ---------------------------------------------------------------------------------------------- output
def _f(x: Any, spec: str = ".2e") -> str:
    if x is None:
        return "-"
    if isinstance(x, float) and x == 0.0:
        return "0"
    return format(x, spec)


def _cells(row: dict[str, Any], golden: bool) -> list[str]:
    m = row["metrics"]
    shape = "x".join(str(s) for s in row["shape"]) if row["shape"] is not None else "-"
    status = {"pass": "pass", "fail": "FAIL", "skipped": "skip"}.get(row["status"], row["status"])
    if row.get("via") == "golden":
        status = "pass~"
    if m.get("method") == "float" and "max_abs" in m:
        nonfin = f"{m['nan_a'] + m['inf_a']}/{m['nan_b'] + m['inf_b']}"
        cells = [_f(m["max_abs"]), _f(m["max_rel"]), _f(m["mean_rel"]), _f(m["cosine"], ".6f"), nonfin,
                 f"{100 * m['within']:.2f}%"]
    elif m.get("method") == "index" and "recall" in m:
        cells = ["-", "-", "-", "-", "-", f"R {m['recall']:.3f} P {m['precision']:.3f}"]
        if m.get("rows_differ"):
            cells[-1] += f" ({m['rows_differ']} rows differ)"
    elif m.get("method") == "exact" and "mismatches" in m:
        cells = ["-", "-", "-", "-", "-", f"{m['mismatches']} diff"]
    else:
        cells = ["-"] * 6
    if row.get("excluded_rows"):
        cells[-1] += f" [-{row['excluded_rows']} rows]"
    out = [row["name"], shape] + cells
    if golden:
        bl = row.get("baseline") or {}
        out.append(_f(bl.get("mean_rel")) if "mean_rel" in bl else
                   (f"R {bl['recall']:.3f}" if bl.get("recall") is not None else "-"))
    return out + [status]


def _header(golden: bool) -> list[str]:
    h = ["tensor", "shape", "max_abs", "max_rel", "mean_rel", "cosine", "nan+inf A/ref", "within / sets"]
    return h + (["B mean_rel"] if golden else []) + ["result"]


def _rows_for_table(cmp: Comparison, failures_only: bool) -> list[dict[str, Any]]:
    """Compared tensors (missing ones are summarised by :func:`missing_summary` instead)."""
    return [r for r in cmp.rows if not r["status"].startswith("missing") and
            (not failures_only or r["status"] != "pass" or r.get("via"))]


def _ranges(xs: list[int]) -> str:
    xs, out, i = sorted(set(xs)), [], 0
    while i < len(xs):
        j = i
        while j + 1 < len(xs) and xs[j + 1] == xs[j] + 1:
            j += 1
        out.append(str(xs[i]) if i == j else f"{xs[i]}-{xs[j]}")
        i = j + 1
    return ",".join(out)


def missing_summary(cmp: Comparison) -> list[str]:
    """One line per side: the tensors only the other run recorded, by kind, layers and steps."""
    out = []
    for status, side in (("missing in A", "A"), ("missing in B", "the reference")):
        rows = [r for r in cmp.rows if r["status"] == status]
        if not rows:
            continue
        kinds: dict[str, tuple[list[int], list[int]]] = {}
        for r in rows:
            layers, steps = kinds.setdefault(r["kind"], ([], []))
            if r["layer"] is not None:
                layers.append(r["layer"])
            steps.append(step_index(r["step"]))
        parts = []
        for kind, (layers, steps) in kinds.items():
            where = [f"layers {_ranges(layers)}"] if layers else []
            st = sorted(set(steps))
            where.append("prefill" if st == [0] else ("steps " if 0 not in st else "prefill, steps ") +
                         _ranges([k for k in st if k]) if st != [0] else "prefill")
            parts.append(f"{kind} ({'; '.join(where)})")
        out.append(f"{len(rows)} tensors not recorded in {side} (not compared): {', '.join(parts)}")
    return out


def format_table(cmp: Comparison, *, failures_only: bool = False) -> str:
    golden = cmp.baseline is not None
    header = _header(golden)
    rows = [_cells(r, golden) for r in _rows_for_table(cmp, failures_only)]
    widths = [max(len(x[i]) for x in rows + [header]) for i in range(len(header))]
    fmt = lambda cells: "  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))
    lines = [fmt(header), "  ".join("-" * w for w in widths)] + [fmt(r) for r in rows]
    return "\n".join(lines)


def _title(cmp: Comparison) -> tuple[str, str, str | None]:
    if cmp.baseline is not None:
        return "A", "G", "B"
    return "A", "B", None


def summary_text(cmp: Comparison) -> str:
    la, lb, lc = _title(cmp)
    lines = [f"{la}: {cmp.a.path} ({cmp.a.label})"]
    if lc:
        lines.append(f"{lc}: {cmp.baseline.a.path} ({cmp.baseline.a.label})  [baseline: its own error against G]")
    lines.append(f"{lb}: {cmp.b.path} ({cmp.b.label})  [reference]")
    r = cmp.rules["dtypes"][cmp.cmp_dtype]
    unit = "·RMS(ref)" if cmp.rules["atol_unit"] == "rms" else ""
    lines.append(f"rule ({cmp.cmp_dtype}): >= {100 * cmp.rules['pass_fraction']:g}% of elements within "
                 f"{r['atol']:.3g}{unit} + {r['rtol']:.3g}·|ref|, max abs <= {r.get('max_abs', math.inf):.3g}{unit}; "
                 f"index sets: recall and precision >= {cmp.rules['index_recall']}")
    c = cmp.counts()
    lines.append("tensors: " + ", ".join(f"{v} {k}" for k, v in c.items())
                 + (f" ({sum(1 for x in cmp.rows if x.get('via') == 'golden')} of the passes only comparable to B)"
                    if lc else ""))
    for w in cmp.warnings:
        lines.append(f"warning: {w}")
    for m in missing_summary(cmp):
        lines.append(f"note: {m}")
    for n in cmp.notes:
        lines.append(f"note: {n}")
    lines.append(("RESULT: PASS — " if cmp.passed else "RESULT: FAIL — ") + cmp.first_failure_text())
    return "\n".join(lines)


def _clean(x: Any) -> Any:
    if isinstance(x, float) and not math.isfinite(x):
        return None if math.isnan(x) else ("inf" if x > 0 else "-inf")
    if isinstance(x, dict):
        return {k: _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    return x


def _run_json(run: Run) -> dict[str, Any]:
    m = run.manifest
    return {"path": str(run.path), "label": run.label, "run": m["run"], "versions": m["versions"], "host": m["host"],
            "model": m["model"], "weights": m["weights"], "inputs": m["inputs"],
            "backend_per_op": m.get("backend_per_op", {})}


def to_json(cmp: Comparison) -> dict[str, Any]:
    ff = cmp.first_failure
    out = {"format": REPORT_FORMAT,
           "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "mode": "golden" if cmp.baseline is not None else "pair",
           "a": _run_json(cmp.a), "reference": _run_json(cmp.b),
           "b": _run_json(cmp.baseline.a) if cmp.baseline is not None else None,
           "compare_dtype": cmp.cmp_dtype, "rules": cmp.rules, "result": "pass" if cmp.passed else "fail",
           "counts": cmp.counts(), "first_failure": ff["name"] if ff else None,
           "first_failure_text": cmp.first_failure_text(), "notes": cmp.notes, "warnings": cmp.warnings,
           "tensors": cmp.rows,
           "baseline_tensors": cmp.baseline.rows if cmp.baseline is not None else None}
    return _clean(out)


def to_markdown(cmp: Comparison, plot_name: str | None = "errors.png") -> str:
    golden = cmp.baseline is not None
    la, lb, lc = _title(cmp)
    lines = ["# ascend-v4 compare", ""]
    lines.append("| run | directory | backend / dtype / device | versions |")
    lines.append("|---|---|---|---|")
    runs = [(la, cmp.a)] + ([(lc, cmp.baseline.a)] if lc else []) + [(lb + " (reference)", cmp.b)]
    for tag, run in runs:
        v = run.manifest["versions"]
        ver = f"ascend_v4 {v['ascend_v4']}, torch {v['torch']}" + (f", torch-npu {v['torch_npu']}" if v.get("torch_npu")
                                                                   else "")
        lines.append(f"| {tag} | `{run.path}` | {run.label} | {ver} |")
    m = cmp.b.manifest
    lines += ["", f"Model `{m['model']['source']}` ({m['model']['config_name']}, config hash "
                  f"`{m['model']['config_hash']}`), prompt of {len(m['inputs']['prompt_ids'])} tokens, "
                  f"{m['run']['decode_steps']} decode steps.", ""]
    lines += ["```", summary_text(cmp), "```", ""]
    if plot_name:
        lines += [f"![mean relative error per layer]({plot_name})", ""]
    header = _header(golden)
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|" + "---|" * len(header))
    for r in _rows_for_table(cmp, False):
        cells = _cells(r, golden)
        cells[0] = f"`{cells[0]}`"
        if r["status"] == "fail":
            cells[-1] = "**FAIL**"
        lines.append("| " + " | ".join(cells) + " |")
    reasons = [r for r in _rows_for_table(cmp, False) if r["status"] != "pass" or r.get("via")]
    if reasons:
        lines += ["", "## Details", ""]
        for r in reasons:
            lines.append(f"- `{r['name']}` — {r['status']}{' (via golden)' if r.get('via') else ''}: {r['reason']}")
    if golden:
        lines += ["", "`pass~`: misses the dtype rule against G, but the error is comparable to B's own error "
                      "against G (golden rule). `B mean_rel`: B's own mean relative error against G."]
    return "\n".join(lines) + "\n"


def plot_errors(cmp: Comparison, path: str | Path) -> Path | None:
    """PNG: mean relative error per layer, one line per tensor kind (golden: B dashed). None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    def usable(r: dict[str, Any]) -> bool:
        m = r["metrics"]
        return r["layer"] is not None and m.get("mean_rel") is not None and m.get("elements", 1) > 0

    positive = [r["metrics"]["mean_rel"] for c in (cmp, cmp.baseline) if c is not None for r in c.rows
                if usable(r) and r["metrics"]["mean_rel"] > 0]
    floor = min(positive) / 10 if positive else 1e-12      # exact matches are drawn at the floor

    def series(c: Comparison) -> tuple[str, dict[str, list[tuple[int, float]]]]:
        steps = [r["step"] for r in c.rows if usable(r)]
        step = "prefill" if "prefill" in steps else (steps[0] if steps else "prefill")
        out: dict[str, list[tuple[int, float]]] = {}
        for r in c.rows:
            if r["step"] == step and usable(r):
                out.setdefault(r["kind"], []).append((r["layer"], max(r["metrics"]["mean_rel"], floor)))
        return step, out

    step, sa = series(cmp)
    fig, ax = plt.subplots(figsize=(9, 5), dpi=100)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    kinds = list(sa)
    sb = series(cmp.baseline)[1] if cmp.baseline is not None else {}
    kinds += [k for k in sb if k not in kinds]
    for i, kind in enumerate(kinds):
        col = colours[i % len(colours)]
        if kind in sa:
            xs, ys = zip(*sorted(sa[kind]))
            ax.plot(xs, ys, marker="o", color=col, label=kind)
        if kind in sb:
            xs, ys = zip(*sorted(sb[kind]))
            ax.plot(xs, ys, linestyle="--", marker=".", color=col, alpha=0.6)
    fails = [r for r in cmp.failures if r["step"] == step and usable(r)]
    if fails:
        ax.plot([r["layer"] for r in fails], [max(r["metrics"]["mean_rel"], floor) for r in fails], marker="o",
                markersize=11, markerfacecolor="none", markeredgecolor="red", linestyle="none", label="fails")
    ff = cmp.first_failure
    if ff is not None and ff["step"] == step and usable(ff):
        ax.plot([ff["layer"]], [max(ff["metrics"]["mean_rel"], floor)], marker="x", color="red", markersize=14,
                markeredgewidth=3, linestyle="none", label=f"first failure: {ff['kind']}")
    rtol = cmp.rules["dtypes"][cmp.cmp_dtype]["rtol"]
    ax.axhline(rtol, color="grey", linestyle=":", label=f"rtol ({cmp.cmp_dtype})")
    if not kinds:
        ax.text(0.5, 0.5, "no per-layer float tensors in these runs", ha="center", transform=ax.transAxes)
    ax.set_yscale("log")
    ax.set_xlabel("layer")
    ax.set_ylabel("mean relative error")
    la, lb, lc = _title(cmp)
    title = f"{cmp.a.label} vs {cmp.b.label} ({step})"
    if lc:
        title += "\nsolid: A vs G, dashed: B vs G"
    ax.set_title(title, fontsize=10)
    if kinds:
        ax.set_xticks(sorted({x for v in sa.values() for x, _ in v}))
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, format="png")
    plt.close(fig)
    return path


def write_report(cmp: Comparison, out_dir: str | Path) -> dict[str, Path]:
    """``report.json``, ``report.md`` and ``errors.png`` (when matplotlib is installed) in ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = {}
    png = plot_errors(cmp, out / "errors.png")
    if png is not None:
        files["png"] = png
    else:
        cmp.notes.append("no plot: matplotlib is not installed (pip install matplotlib)")
    (out / "report.json").write_text(json.dumps(to_json(cmp), indent=1) + "\n", encoding="utf-8")
    (out / "report.md").write_text(to_markdown(cmp, "errors.png" if png else None), encoding="utf-8")
    files["json"], files["md"] = out / "report.json", out / "report.md"
    return files


# ---------------------------------------------------------------------------------------------- CLI
def add_arguments(p, *, default_model: str) -> None:
    from .dump import argparse_bool

    p.add_argument("runs", nargs="*", metavar="RUN", help="RUN_A RUN_B: dump directories (A is judged, B is the "
                                                          "reference)")
    p.add_argument("--golden", metavar="RUN", help="golden run G (e.g. reference fp64): judge A and B each against G")
    p.add_argument("--rules", metavar="FILE", help="YAML rules merged over the defaults (ascend_v4/numerics/rules.yaml)")
    p.add_argument("--report", metavar="DIR", help="report directory (default: RUN_B/compare/)")
    p.add_argument("--force", action="store_true", help="compare runs even when config, weights or inputs differ")
    p.add_argument("--failures-only", action="store_true", help="print only tensors that do not pass")
    g = p.add_argument_group("dump and compare in one process (instead of RUN_A RUN_B)")
    g.add_argument("--backends", metavar="A,B", help="e.g. npu,reference: dump both, then compare A against B")
    g.add_argument("--model", default=default_model, help=f"checkpoint directory or preset (default {default_model})")
    g.add_argument("--dtype", default="bf16", help="model dtype of both runs, or one per backend: bf16 | bf16,fp64")
    g.add_argument("--golden-dtype", choices=["fp32", "fp64"], help="also dump the reference in this dtype on the CPU "
                                                                     "as the golden run G")
    g.add_argument("--devices", metavar="DA,DB", help="torch devices of the two runs (default: per backend)")
    g.add_argument("--out", metavar="DIR", help="where the dumps go (default: a new temporary directory)")
    g.add_argument("--prompt-ids", help="prompt token ids (default: a fixed 16-token prompt)")
    g.add_argument("--prompt", help="prompt text (needs tokenizer.json in the model directory)")
    g.add_argument("--decode-steps", type=int, default=0, help="greedy decode steps (B's tokens are fed to A)")
    g.add_argument("--include", action="append", metavar="GLOB", help="record only tensors matching")
    g.add_argument("--exclude", action="append", metavar="GLOB", help="do not record tensors matching")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--fake-quant", dest="fake_quant", action=argparse_bool(), default=None)
    g.add_argument("--quiet", action="store_true", help="no progress bar while loading")


def _dump_pair(args, *, default_prompt_ids: Sequence[int], parse_ids) -> tuple[Path, Path, Path | None, Path]:
    from .dump import dump, prompt_from_args

    backends = split_patterns([args.backends])
    if len(backends) != 2:
        raise ValueError(f"--backends needs two backends, e.g. npu,reference; got {args.backends!r}")
    dtypes = split_patterns([args.dtype])
    if len(dtypes) == 1:
        dtypes *= 2
    if len(dtypes) != 2 or any(d not in PRECISION for d in dtypes):
        raise ValueError(f"--dtype must be one or two of {sorted(PRECISION)}, got {args.dtype!r}")
    devices = split_patterns([args.devices]) if args.devices else [None, None]
    if len(devices) != 2:
        raise ValueError(f"--devices needs two devices, got {args.devices!r}")
    args.decode_ids = args.decode_ids_from = None
    ids, _ = prompt_from_args(args, default_prompt_ids, parse_ids)
    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="ascend-v4-compare-"))
    common = dict(prompt_ids=ids, include=args.include, exclude=args.exclude, seed=args.seed,
                  fake_quant=args.fake_quant, progress=not args.quiet)
    # the reference side first: A (and G) follow its decode tokens, so decode steps compare on one path
    dir_b = out / f"B-{backends[1]}-{dtypes[1]}"
    mb = dump(args.model, dir_b, backend=backends[1], dtype=dtypes[1], device=devices[1],
              decode_steps=args.decode_steps, **common)
    follow = mb["inputs"]["decode_ids"]
    dir_a = out / f"A-{backends[0]}-{dtypes[0]}"
    dump(args.model, dir_a, backend=backends[0], dtype=dtypes[0], device=devices[0], decode_steps=len(follow),
         decode_ids=follow, **common)
    dir_g = None
    if args.golden_dtype:
        dir_g = out / f"G-reference-{args.golden_dtype}"
        dump(args.model, dir_g, backend="reference", dtype=args.golden_dtype, device="cpu", decode_steps=len(follow),
             decode_ids=follow, **common)
    print(f"dumps in {out}: {dir_a.name}, {dir_b.name}" + (f", {dir_g.name}" if dir_g else ""))
    return dir_a, dir_b, dir_g, out


def run_cli(args, *, default_prompt_ids: Sequence[int], parse_ids) -> int:
    """Exit status: 0 all tensors pass, 1 some fail, (2 for refusals and errors, from the caller)."""
    if args.backends:
        if args.runs or args.golden:
            raise ValueError("give either RUN_A RUN_B [--golden G] or --backends A,B (which dumps them), not both")
        run_a, run_b, golden, out = _dump_pair(args, default_prompt_ids=default_prompt_ids, parse_ids=parse_ids)
        report = Path(args.report) if args.report else out / "compare"
    else:
        if len(args.runs) != 2:
            raise ValueError(f"compare needs two run directories RUN_A RUN_B (or --backends A,B); got {len(args.runs)}")
        run_a, run_b = (Path(r) for r in args.runs)
        golden = Path(args.golden) if args.golden else None
        for r in (run_a, run_b) + ((golden,) if golden else ()):
            if not (r / MANIFEST_FILE).is_file():
                raise FileNotFoundError(f"{r}: no {MANIFEST_FILE} (not an ascend-v4 dump directory)")
        report = Path(args.report) if args.report else run_b / "compare"
    cmp = compare(run_a, run_b, golden=golden, rules=args.rules, force=args.force)
    files = write_report(cmp, report)
    print(format_table(cmp, failures_only=args.failures_only))
    print()
    print(summary_text(cmp))
    print("report: " + ", ".join(str(p) for p in files.values()))
    return 0 if cmp.passed else 1
