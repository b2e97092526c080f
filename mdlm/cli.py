"""The ``mdlm`` command and what every entry point shares: ``--preset``, ``a.b=value`` overrides, ``--verbose``,
config errors -> exit 2.

    mdlm prepare [--preset cpu] [a.b=value ...]        # corpus -> prepared parquet   (pipelines/prepare_data.py)
    mdlm train [--preset cpu-ray] [a.b=value ...]      # Ray Train + MLflow           (pipelines/train.py)
    mdlm evaluate [eval.x=value ...]                   # NELBO, zero-shot, gen-ppl     (pipelines/evaluate.py)
    mdlm generate [generate.x=value sampling.x=value]  # samples from a trained model  (pipelines/generate.py)
    mdlm serve [serve.x=value ...]                     # Ray Serve HTTP + OpenAI API   (pipelines/serve.py)

Each subcommand is a module of :mod:`mdlm.commands` with ``main(argv, prog)``; ``pipelines/*.py`` call the same
``main`` (for ``ray job submit -- python pipelines/train.py``).
"""

from __future__ import annotations

import argparse
import importlib
import sys

from mdlm.config import Config, ConfigError, load_config, preset_names

COMMANDS = {"prepare": "corpus -> tokenized, packed parquet (Ray Data)",
            "train": "train on Ray Train with FSDP2, tracked in MLflow, exported and registered",
            "evaluate": "test NELBO, zero-shot NELBO and generative perplexity on Ray",
            "generate": "print samples of a trained model",
            "serve": "serve a trained model over HTTP on Ray Serve (JSON, streaming, OpenAI API, page)"}


def add_verbose_flag(parser: argparse.ArgumentParser) -> None:
    """``--verbose``: the libraries' own output too (see :mod:`mdlm.output`)."""
    parser.add_argument("--verbose", action="store_true",
                        help="also print Ray's, Ray Data's and MLflow's own output (by default it stays in their "
                             "log files, e.g. /tmp/ray/session_latest/logs)")


def config_parser(doc: str | None, default_preset: str, prog: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("overrides", nargs="*", help="config overrides a.b=value")
    parser.add_argument("--preset", default=default_preset,
                        help=f"preset name ({', '.join(preset_names())}) or YAML path (default: %(default)s)")
    add_verbose_flag(parser)
    return parser


def load_config_or_exit(preset: str, overrides: list[str]) -> Config:
    """The validated config, or the message on stderr and exit code 2."""
    try:
        return load_config(preset, overrides)
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


def main(argv: list[str] | None = None) -> int:
    """``mdlm COMMAND [--preset P] [a.b=value ...]``."""
    argv = sys.argv[1:] if argv is None else argv
    usage = "usage: mdlm {" + ",".join(COMMANDS) + "} [--preset NAME|FILE] [a.b=value ...] [--verbose]"
    if not argv or argv[0] in ("-h", "--help"):
        print(f"{usage}\n\ncommands:\n" + "\n".join(f"  {n:<9} {h}" for n, h in COMMANDS.items())
              + "\n\n`mdlm COMMAND --help` shows a command's options and examples.")
        return 0 if argv else 2
    if argv[0] not in COMMANDS:
        print(f"{usage}\nmdlm: unknown command {argv[0]!r}; choose one of {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    command = importlib.import_module(f"mdlm.commands.{argv[0]}")
    return command.main(argv[1:], prog=f"mdlm {argv[0]}")


if __name__ == "__main__":
    sys.exit(main())
