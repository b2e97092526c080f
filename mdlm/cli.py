"""What every ``pipelines/`` script shares: ``a.b=value`` overrides, ``--preset``, config errors -> exit 2."""

from __future__ import annotations

import argparse
import sys

from mdlm.config import Config, ConfigError, load_config, preset_names


def config_parser(doc: str | None, default_preset: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("overrides", nargs="*", help="config overrides a.b=value")
    parser.add_argument("--preset", default=default_preset,
                        help=f"preset name ({', '.join(preset_names())}) or YAML path")
    return parser


def load_config_or_exit(preset: str, overrides: list[str]) -> Config:
    """The validated config, or the message on stderr and exit code 2."""
    try:
        return load_config(preset, overrides)
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
