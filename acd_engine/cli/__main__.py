"""``python -m acd_engine.cli``: the ``acd`` command."""

from acd_engine.cli.main import main

main()
