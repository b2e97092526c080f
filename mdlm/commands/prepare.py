"""Prepare a corpus for training: Ray Data reads, splits by document, tokenizes and packs it into parquet.

    mdlm prepare                                   # the default corpus, BPE of 1,024 tokens
    mdlm prepare data.source='corpus/*.jsonl' data.tokenizer=gpt2 data.block_size=1024
    mdlm prepare --preset lm1b-small data.source=hf:lm1b data.output_dir=data/lm1b
    mdlm prepare --force                           # re-prepare even if up to date (or data.force=true)
    mdlm prepare --verbose                         # also Ray Data's own progress and logs

(``python pipelines/prepare_data.py ...`` is the same command.)
Writes data.output_dir: train/, validation/, test/ parquet files, tokenizer.json and manifest.json.
"""

from __future__ import annotations

import signal
import sys
import time

from mdlm.cli import config_parser, load_config_or_exit
from mdlm.config import ConfigError
from mdlm.data.manifest import ManifestError
from mdlm.data.pipeline import prepare_dataset
from mdlm.data.sources import DataError
from mdlm.output import setup_output


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    parser = config_parser(__doc__, default_preset="cpu", prog=prog)
    parser.add_argument("--force", action="store_true", help="re-prepare even if the output is up to date")
    args = parser.parse_args(argv)
    setup_output(verbose=args.verbose)
    config = load_config_or_exit(args.preset, args.overrides)
    # A plain kill (SIGTERM) unwinds like Ctrl-C, so the temporary output directory is removed.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    start = time.perf_counter()
    try:
        manifest = prepare_dataset(config.data, force=args.force or config.data.force)
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 2
    except (DataError, ManifestError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    seconds = time.perf_counter() - start
    tokens = sum(info.tokens for info in manifest.splits.values())
    state = "up to date" if manifest.reused else f"written in {seconds:.1f} s ({tokens / seconds:,.0f} tokens/s)"
    print(f"{manifest.root}: {state}, fingerprint {manifest.fingerprint}")
    print(f"  tokenizer {manifest.tokenizer}: {manifest.vocab_size:,} tokens, [MASK]={manifest.mask_token_id}, "
          f"BOS={manifest.bos_token_id}, EOS={manifest.eos_token_id}, PAD={manifest.pad_token_id}")
    for name, info in manifest.splits.items():
        print(f"  {name:<10} {info.documents:>8,} documents -> {info.rows:>9,} rows x {manifest.block_size} "
              f"({manifest.packing}) = {info.tokens:>12,} tokens in {len(info.files)} file(s)")
    return 0

