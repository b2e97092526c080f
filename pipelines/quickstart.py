"""Train, evaluate, export and sample a CPU-sized MDLM in one process.

    python pipelines/quickstart.py                                # preset 'cpu'
    python pipelines/quickstart.py training.max_steps=100 model.kind=ar
    python pipelines/quickstart.py --preset path/to/config.yaml --output runs/my-model
"""

from __future__ import annotations

import argparse
import sys

from mdlm.config import ConfigError, load_config, preset_names
from mdlm.quickstart import run_quickstart


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("overrides", nargs="*", help="config overrides a.b=value")
    parser.add_argument("--preset", default="cpu", help=f"preset name ({', '.join(preset_names())}) or YAML path")
    parser.add_argument("--output", default="runs/quickstart/model", help="where to write the exported model")
    parser.add_argument("--prompt", action="append", help="prompt to continue (repeatable)")
    args = parser.parse_args(argv)
    try:
        config = load_config(args.preset, args.overrides)
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 2
    run_quickstart(config, args.output, prompts=tuple(args.prompt or ["ROMEO.\n"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
