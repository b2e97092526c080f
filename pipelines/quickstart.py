"""Train, evaluate, export and sample a CPU-sized MDLM in one process.

    python pipelines/quickstart.py                                # preset 'cpu'
    python pipelines/quickstart.py training.max_steps=100 model.kind=ar
    python pipelines/quickstart.py --preset path/to/config.yaml --output runs/my-model
"""

from __future__ import annotations

import sys

from mdlm.cli import config_parser, load_config_or_exit
from mdlm.output import setup_output
from mdlm.quickstart import run_quickstart


def main(argv: list[str] | None = None) -> int:
    parser = config_parser(__doc__, default_preset="cpu")
    parser.add_argument("--output", default="runs/quickstart/model", help="where to write the exported model")
    parser.add_argument("--prompt", action="append", help="prompt to continue (repeatable)")
    args = parser.parse_args(argv)
    setup_output(verbose=args.verbose)
    config = load_config_or_exit(args.preset, args.overrides)
    run_quickstart(config, args.output, prompts=tuple(args.prompt or ["ROMEO.\n"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
