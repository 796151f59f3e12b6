"""Benchmark of the reference path (CPU, or CUDA with --device cuda): prefill tokens/s, peak memory,
decode ms/token.

    python bench/bench_model.py                       # small preset, 1K/4K/16K contexts
    python bench/bench_model.py --sizes 1024 --preset tiny --decode-steps 8

Each context length runs in its own subprocess so the peak resident memory (ru_maxrss) belongs
to that length alone.  Weights are random (seeded); only speed and memory are measured.  The
table is printed last.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import time


def run_one(preset: str, n: int, decode_steps: int, dtype: str, chunk: int, device: str = "cpu") -> dict:
    import torch

    import ascend_v4

    model = ascend_v4.load_model(preset, dtype=dtype, device=device)
    cuda = device.startswith("cuda")
    model.prefill_chunk = chunk
    ids = torch.randint(0, model.config.vocab_size, (1, n), generator=torch.Generator().manual_seed(0)).to(device)
    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    cache = model.new_cache(1, n + decode_steps)
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    with torch.no_grad():
        if cuda:  # warm-up: kernel loading and allocator growth stay out of the numbers
            model(ids[:, :256], cache=model.new_cache(1, 256), last_only=True)
            torch.cuda.reset_peak_memory_stats()
        sync()
        t0 = time.perf_counter()
        logits = model(ids, cache=cache, last_only=True)
        sync()
        prefill_s = time.perf_counter() - t0
        tok = logits.argmax(-1, keepdim=True)
        t1 = time.perf_counter()
        for _ in range(decode_steps):
            tok = model(tok, cache=cache, last_only=True).argmax(-1, keepdim=True)
        sync()
        decode_s = time.perf_counter() - t1
    peak = torch.cuda.max_memory_allocated() if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"tokens": n, "prefill_s": prefill_s, "prefill_tok_s": n / prefill_s,
            "decode_ms": 1000 * decode_s / max(decode_steps, 1), "peak_rss_mib": peak / 2**20,
            "model_rss_mib": base_rss / 2**20, "cache_mib": cache.nbytes() / 2**20,
            "threads": torch.get_num_threads(), "device": device}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="small")
    p.add_argument("--sizes", default="1024,4096,16384")
    p.add_argument("--decode-steps", type=int, default=16)
    p.add_argument("--dtype", default="fp32")
    p.add_argument("--chunk", type=int, default=2048, help="prefill chunk (tokens)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (peak memory: RSS on CPU, allocator peak on CUDA)")
    p.add_argument("--one", type=int, help=argparse.SUPPRESS)
    p.add_argument("--json", help="also write the rows to this JSON file")
    args = p.parse_args()
    if args.one is not None:
        print(json.dumps(run_one(args.preset, args.one, args.decode_steps, args.dtype, args.chunk, args.device)))
        return
    rows = []
    for n in [int(s) for s in args.sizes.split(",")]:
        cmd = [sys.executable, __file__, "--one", str(n), "--preset", args.preset, "--decode-steps",
               str(args.decode_steps), "--dtype", args.dtype, "--chunk", str(args.chunk), "--device", args.device]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            err = (proc.stderr.strip().splitlines() or ["failed"])[-1]
            rows.append({"tokens": n, "error": err[:160]})
        else:
            rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        print(f"done {n} tokens", file=sys.stderr, flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"preset": args.preset, "dtype": args.dtype, "machine": platform.processor() or platform.machine(),
                       "rows": rows}, f, indent=2)
    print(f"\npreset {args.preset}, dtype {args.dtype}, prefill chunk {args.chunk}, device {args.device}, "
          f"{next((r['threads'] for r in rows if 'threads' in r), '?')} threads, {platform.machine()}")
    mem = "peak RSS MiB" if args.device == "cpu" else "peak GPU MiB"
    print(f"{'context':>8} {'prefill s':>10} {'prefill tok/s':>14} {'decode ms/tok':>14} {mem:>13} "
          f"{'cache MiB':>10}")
    for r in rows:
        if "error" in r:
            print(f"{r['tokens']:>8} error: {r['error']}")
            continue
        print(f"{r['tokens']:>8} {r['prefill_s']:>10.2f} {r['prefill_tok_s']:>14.1f} {r['decode_ms']:>14.1f} "
              f"{r['peak_rss_mib']:>13.0f} {r['cache_mib']:>10.1f}")


if __name__ == "__main__":
    main()
