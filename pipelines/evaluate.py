"""``mdlm evaluate`` as a script, e.g. for ``ray job submit -- python pipelines/evaluate.py``
(``python pipelines/evaluate.py --help`` shows its settings)."""

import sys

from mdlm.commands.evaluate import main

if __name__ == "__main__":
    sys.exit(main(prog="evaluate.py"))
