"""The AR baseline's KV cache: wall time of ``ARModel.sample`` with the cache against full recomputation per
token (``use_cache=False``), same model, seed and tokens (checked), measured in one run and printed as ratios.

    python bench/bench_ar_cache.py [--length 128] [--batch 1 8] [--repeats 3] [--threads 2]
                                   [--size cpu] [--device cpu|cuda] [--out bench/results/ar-cache-....json]

Random weights in the ``--size`` shape (wall time does not depend on the weights). Without the cache, token n
costs a forward pass over n positions (quadratic in the length overall); with it, over one position that
attends to the n cached keys and values.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mdlm.config import model_config_for
from mdlm.modeling import ARModel

RESULTS = Path(__file__).resolve().parent / "results"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_sample(model: ARModel, device: torch.device, batch: int, length: int, use_cache: bool
                ) -> tuple[float, float, torch.Tensor]:
    """Wall time, this process's CPU time (less sensitive to other load on shared cores) and the tokens."""
    sync(device)
    start, cpu_start = time.perf_counter(), time.process_time()
    out = model.sample(batch, length, seed=0, use_cache=use_cache)
    sync(device)
    return time.perf_counter() - start, time.process_time() - cpu_start, out.tokens


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--length", type=int, default=128, help="total tokens per sequence (BOS included)")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per cell; the median is reported")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    parser.add_argument("--size", default="cpu", choices=["cpu", "tiny", "small", "medium"], help="model shape")
    parser.add_argument("--vocab", type=int, default=1024)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--out", type=Path, help="JSON results file (default bench/results/ar-cache-...json)")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no GPU visible")
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    config = model_config_for(args.size, kind="ar", vocab_size=args.vocab, mask_token_id=None, bos_token_id=0,
                              max_seq_len=args.length, dropout=0.0)
    model = ARModel(config).to(device).eval()
    with torch.no_grad():  # random, non-zero output weights, so that the draws are not uniform
        model.backbone.final.linear.weight.normal_(0.0, 0.02)
    model.sample(min(args.batch), 8, seed=0)  # warm-up outside the timed runs
    params = sum(p.numel() for p in model.parameters())
    info = {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "device": str(device)}
    if hasattr(os, "getloadavg"):
        info["loadavg_at_start"] = [round(x, 2) for x in os.getloadavg()]
    print(f"AR model: {params / 1e6:.2f}M parameters ({args.size} shape, random weights), length {args.length}, "
          f"{device}, {args.threads} torch threads; median of {args.repeats}")
    rows = []
    for batch in args.batch:
        runs: dict[bool, list[float]] = {True: [], False: []}
        cpu: dict[bool, list[float]] = {True: [], False: []}
        tokens: dict[bool, torch.Tensor] = {}
        for _ in range(args.repeats):
            for use_cache in (False, True):  # alternate, so that load from other processes hits both
                seconds, cpu_seconds, tokens[use_cache] = time_sample(model, device, batch, args.length, use_cache)
                runs[use_cache].append(seconds)
                cpu[use_cache].append(cpu_seconds)
        same = bool(torch.equal(tokens[True], tokens[False]))
        plain, cached = statistics.median(runs[False]), statistics.median(runs[True])
        speedup_min = min(runs[False]) / min(runs[True])
        speedup_cpu = statistics.median(cpu[False]) / statistics.median(cpu[True])
        rows.append({"batch": batch, "uncached_s": plain, "cached_s": cached, "speedup": plain / cached,
                     "speedup_min": speedup_min, "speedup_cpu_time": speedup_cpu, "same_tokens": same,
                     "runs_s": {"uncached": [round(t, 4) for t in runs[False]],
                                "cached": [round(t, 4) for t in runs[True]]},
                     "cpu_s": {"uncached": [round(t, 4) for t in cpu[False]],
                               "cached": [round(t, 4) for t in cpu[True]]}})
        print(f"batch {batch:>3}: uncached {plain:7.3f} s, cached {cached:7.3f} s, speedup {plain / cached:5.2f}x "
              f"(of the fastest runs {speedup_min:5.2f}x, of CPU time {speedup_cpu:5.2f}x), same tokens: {same}")
        if not same:
            raise SystemExit("the cached and uncached samplers drew different tokens")
    record = {"benchmark": "ar_cache", "date": dt.date.today().isoformat(), "machine": info,
              "model": {"size": args.size, "parameters": params, "vocab_size": args.vocab},
              "length": args.length, "repeats": args.repeats, "rows": rows}
    out = args.out or RESULTS / (f"ar-cache-{args.device}{args.threads if args.device == 'cpu' else ''}-"
                                 f"{record['date']}-L{args.length}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=1))
    print(f"results written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
