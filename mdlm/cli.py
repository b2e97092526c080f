"""What every ``pipelines/`` script shares: ``a.b=value`` overrides, ``--preset``, ``--verbose``, config errors ->
exit 2."""

from __future__ import annotations

import argparse
import sys

from mdlm.config import Config, ConfigError, load_config, preset_names


def add_verbose_flag(parser: argparse.ArgumentParser) -> None:
    """``--verbose``: the libraries' own output too (see :mod:`mdlm.output`)."""
    parser.add_argument("--verbose", action="store_true",
                        help="also print Ray's, Ray Data's and MLflow's own output (by default it stays in their "
                             "log files, e.g. /tmp/ray/session_latest/logs)")


def config_parser(doc: str | None, default_preset: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("overrides", nargs="*", help="config overrides a.b=value")
    parser.add_argument("--preset", default=default_preset,
                        help=f"preset name ({', '.join(preset_names())}) or YAML path")
    add_verbose_flag(parser)
    return parser


def load_config_or_exit(preset: str, overrides: list[str]) -> Config:
    """The validated config, or the message on stderr and exit code 2."""
    try:
        return load_config(preset, overrides)
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
