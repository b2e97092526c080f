"""``mdlm generate`` as a script, e.g. for ``ray job submit -- python pipelines/generate.py``
(``python pipelines/generate.py --help`` shows its settings)."""

import sys

from mdlm.commands.generate import main

if __name__ == "__main__":
    sys.exit(main(prog="generate.py"))
