"""``mdlm serve`` as a script, e.g. for ``ray job submit -- python pipelines/serve.py``
(``python pipelines/serve.py --help`` shows its settings)."""

import sys

from mdlm.commands.serve import main

if __name__ == "__main__":
    sys.exit(main(prog="serve.py"))
