"""The ``ascend-v4`` command line.

``generate`` (the main job: a prompt through prefill and decode with the compressed cache), ``ops``
(op × backend table for this machine), ``config`` (a resolved model config).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from .config import ConfigError, load_config, preset_names


def ops_table() -> str:
    """The op × backend table with what is available on this machine and why."""
    from op_adapters import registry
    from op_adapters.devices import backend_status

    status = {b: backend_status(b) for b in registry.BACKENDS}
    rows = []
    header = ["op"] + list(registry.BACKENDS)
    for op in registry.ops():
        impls = registry.implementations(op)
        row = [op]
        for b in registry.BACKENDS:
            if b not in impls:
                row.append("-")
            else:
                row.append("yes" if status[b][0] else "no")
        rows.append(row)
    widths = [max(len(r[i]) for r in rows + [header]) for i in range(len(header))]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths)),
             "  ".join("-" * w for w in widths)]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
    lines.append("")
    lines.append("yes = implemented and usable here; no = implemented, backend unavailable; - = not implemented "
                 "(the reference runs instead)")
    for b in registry.BACKENDS:
        lines.append(f"{b:9s}: {'available' if status[b][0] else 'unavailable'} ({status[b][1]})")
    lines.append(f"requested backend: {registry.requested_backend()} (set ASCEND_V4_BACKEND=reference|npu|cuda|auto)")
    return "\n".join(lines)


def chip_table(family: str) -> str:
    """Which torch-npu op serves each V4 op on an Ascend chip family, and how (or why not)."""
    from op_adapters.npu.chips import capability_rows, normalise_family

    fam = normalise_family(family)
    rows = capability_rows(fam)
    w0 = max(len(r[0]) for r in rows)
    w1 = max(len(r[1]) for r in rows)
    lines = [f"Ascend {fam}: V4 op -> what runs (from the torch-npu 2.13 docs' supported-model lines)", ""]
    lines.append(f"{'op'.ljust(w0)}  {'runs'.ljust(w1)}  how / why")
    lines.append(f"{'-' * w0}  {'-' * w1}  {'-' * 9}")
    for op, runs, how in rows:
        lines.append(f"{op.ljust(w0)}  {runs.ljust(w1)}  {how}")
    lines.append("")
    lines.append("Shapes and dtypes outside an op's limits fall back to the reference at run time, logged once "
                 "with the reason. Nothing here has run on real Ascend hardware (see README).")
    return "\n".join(lines)


def _cmd_ops(args: argparse.Namespace) -> int:
    if args.chip:
        print(chip_table(args.chip))
        return 0
    print(ops_table())
    from op_adapters.devices import npu_status

    if npu_status()[0]:
        from op_adapters.npu.chips import current_family

        fam = current_family()
        print()
        print(chip_table(fam) if fam else "NPU available but its SoC version is not a known family")
    return 0


def _cmd_config(args: argparse.Namespace) -> int:
    cfg = load_config(args.model)
    print(json.dumps(cfg.to_dict(), indent=2))
    return 0


DEFAULT_MODEL = "small"
DEFAULT_PROMPT_IDS = [0, 17, 42, 256, 1024, 7, 99, 3000, 12, 512, 64, 2048, 5, 77, 888, 31]


def _parse_ids(text: str) -> list[int]:
    try:
        ids = [int(t) for t in text.replace(",", " ").split()]
    except ValueError:
        raise ValueError(f"--prompt-ids must be integers separated by commas or spaces, got {text!r}") from None
    if not ids:
        raise ValueError("--prompt-ids is empty")
    return ids


def _cmd_generate(args: argparse.Namespace) -> int:
    import torch

    from .generate import generate
    from .loader import load_model

    if args.greedy:
        args.temperature = 0.0
    torch.manual_seed(args.seed)
    model = load_model(args.model, device=args.device, dtype=args.dtype, fake_quant=args.fake_quant,
                       seed=args.seed, progress=not args.quiet)
    cfg = model.config
    random_weights = not Path(args.model).is_dir()
    tok = getattr(model, "tokenizer", None)
    if args.prompt is not None and args.prompt_ids is not None:
        raise ValueError("give either --prompt or --prompt-ids, not both")
    if args.prompt is not None:
        if tok is None:
            raise ValueError("--prompt needs a tokenizer.json in the model directory (and the 'tokenizers' "
                             "package); use --prompt-ids instead")
        ids = [cfg.bos_token_id] + tok.encode(args.prompt, add_special_tokens=False).ids
    elif args.prompt_ids is not None:
        ids = _parse_ids(args.prompt_ids)
    else:
        ids = [i % cfg.vocab_size for i in DEFAULT_PROMPT_IDS]
    what = (f"{args.model} preset with RANDOM weights (seed {args.seed}): the output tokens are meaningless; "
            f"pass --model DIR for a real checkpoint") if random_weights else f"checkpoint {args.model}"
    print(f"model: {what}")
    print(f"config: {cfg.name}, {cfg.num_hidden_layers} layers "
          f"({cfg.layer_ratios.count(0)} SWA, {cfg.layer_ratios.count(4)} CSA, {cfg.layer_ratios.count(128)} HCA), "
          f"hidden {cfg.hidden_size}, dtype {model.dtype}, device {model.device}, fake-quant {model.fake_quant}")
    print(f"prompt ids ({len(ids)}): {ids}")
    print("output: ", end="", flush=True)

    generated: list[int] = []
    shown = [""]

    def on_token(row: int, token: int) -> None:
        if tok is None:
            print(f"{token} ", end="", flush=True)
            return
        # decode the whole continuation and print what is new: tokens that only make sense
        # together (byte pieces, word boundaries) come out right
        generated.append(token)
        text = tok.decode(generated)
        print(text[len(shown[0]):] if text.startswith(shown[0]) else text, end="", flush=True)
        shown[0] = text

    res = generate(model, [ids], args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                   seed=args.seed, mtp=args.mtp, eos_token_id=cfg.eos_token_id if tok is not None else None,
                   on_token=on_token)
    print()
    line = (f"prefill {res.prefill_tokens} tok in {res.prefill_seconds:.3f}s ({res.prefill_tokens_per_s:.1f} tok/s) | "
            f"decode {res.decode_tokens} tok in {res.decode_seconds:.3f}s ({res.decode_tokens_per_s:.1f} tok/s) | "
            f"peak memory {res.peak_memory_bytes / 2**20:.0f} MiB")
    if args.mtp:
        line += f" | MTP accepted {res.mtp_accepted}/{res.mtp_drafted} drafts ({100 * res.mtp_acceptance:.0f}%)"
    print(line)
    return 0


def _cmd_dump(args: argparse.Namespace) -> int:
    from .numerics import dump as numerics_dump

    return numerics_dump.run_cli(args, default_prompt_ids=DEFAULT_PROMPT_IDS, parse_ids=_parse_ids)


def _cmd_compare(args: argparse.Namespace) -> int:
    from .numerics import compare as numerics_compare

    return numerics_compare.run_cli(args, default_prompt_ids=DEFAULT_PROMPT_IDS, parse_ids=_parse_ids)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ascend-v4", description="DeepSeek V4 on Ascend NPUs, with reference numerics.")
    p.add_argument("-v", "--verbose", action="store_true", help="log dispatch decisions and fallbacks")
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("generate", help="generate tokens (default: the small preset with random weights)")
    s.add_argument("--model", default=DEFAULT_MODEL,
                   help=f"checkpoint directory, preset ({', '.join(preset_names())}) or YAML config "
                        f"(default: {DEFAULT_MODEL}, random weights)")
    s.add_argument("--prompt", help="prompt text (needs tokenizer.json in the model directory)")
    s.add_argument("--prompt-ids", help="prompt token ids, e.g. '0,17,42'")
    s.add_argument("--max-new-tokens", type=int, default=32)
    s.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    s.add_argument("--top-p", type=float, default=1.0)
    s.add_argument("--greedy", action="store_true", help="same as --temperature 0")
    s.add_argument("--seed", type=int, default=0, help="seed of the sampler and of random weights")
    s.add_argument("--device", default="cpu")
    s.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16", "fp64"])
    s.add_argument("--mtp", action="store_true", help="speculative decoding with the MTP block (batch 1)")
    s.add_argument("--fake-quant", dest="fake_quant", action=argparse.BooleanOptionalAction, default=None,
                   help="QAT fake-quant points (default: on for FP8/FP4 checkpoints, off otherwise)")
    s.add_argument("--quiet", action="store_true", help="no progress bar while loading")
    s.set_defaults(func=_cmd_generate)
    s = sub.add_parser("ops", help="print the op x backend table for this machine")
    s.add_argument("--chip", help="show the torch-npu op used per V4 op on an Ascend family: 950 | A3 | A2 | 310P")
    s.set_defaults(func=_cmd_ops)
    s = sub.add_parser("config", help="print a resolved model config (preset, YAML or config.json)")
    s.add_argument("model", help=f"preset ({', '.join(preset_names())}), YAML file, config.json or checkpoint dir")
    s.set_defaults(func=_cmd_config)
    from .numerics import compare as numerics_compare
    from .numerics import dump as numerics_dump

    s = sub.add_parser("dump", help="record per-layer tensors of a prefill (+ greedy decode steps) for compare")
    s.add_argument("--out", required=True, metavar="RUN", help="run directory to write (manifest + safetensors)")
    numerics_dump.add_arguments(s, default_model=DEFAULT_MODEL)
    s.set_defaults(func=_cmd_dump)
    s = sub.add_parser("compare", help="compare two dumps tensor by tensor; name the first that differs")
    numerics_compare.add_arguments(s, default_model=DEFAULT_MODEL)
    s.set_defaults(func=_cmd_compare)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except (ConfigError, ValueError, FileNotFoundError) as e:
        print(f"ascend-v4 {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
