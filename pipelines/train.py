"""``mdlm train`` as a script, e.g. for ``ray job submit -- python pipelines/train.py``
(``python pipelines/train.py --help`` shows its settings)."""

import sys

from mdlm.commands.train import main

if __name__ == "__main__":
    sys.exit(main(prog="train.py"))
