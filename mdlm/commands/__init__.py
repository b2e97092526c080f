"""The ``mdlm`` subcommands (:mod:`mdlm.cli`), one module each with ``main(argv, prog) -> exit code``: parse the
config (``--preset``, ``a.b=value``), call the library, print what a user needs. ``pipelines/*.py`` wrap them."""
