"""The ``ascend-v4`` command line: ``ops`` (op × backend table), ``config`` (show a resolved config)."""

from __future__ import annotations

import argparse
import json
import logging
import sys

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


def _cmd_ops(args: argparse.Namespace) -> int:
    print(ops_table())
    return 0


def _cmd_config(args: argparse.Namespace) -> int:
    cfg = load_config(args.model)
    print(json.dumps(cfg.to_dict(), indent=2))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ascend-v4", description="DeepSeek V4 on Ascend NPUs, with reference numerics.")
    p.add_argument("-v", "--verbose", action="store_true", help="log dispatch decisions and fallbacks")
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("ops", help="print the op x backend table for this machine")
    s.set_defaults(func=_cmd_ops)
    s = sub.add_parser("config", help="print a resolved model config (preset, YAML or config.json)")
    s.add_argument("model", help=f"preset ({', '.join(preset_names())}), YAML file, config.json or checkpoint dir")
    s.set_defaults(func=_cmd_config)
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
