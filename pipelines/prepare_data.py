"""``mdlm prepare`` as a script, e.g. for ``ray job submit -- python pipelines/prepare_data.py``
(``python pipelines/prepare_data.py --help`` shows its settings)."""

import sys

from mdlm.commands.prepare import main

if __name__ == "__main__":
    sys.exit(main(prog="prepare_data.py"))
