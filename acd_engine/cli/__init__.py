"""The ``acd`` command line: ``main`` registers the commands (entry point
``acd_engine.cli.main:main``), ``common`` holds what every command shares (one-line
errors, logging set-up, common options), ``train`` and ``gate`` are ``acd train`` and
``acd gate``, and ``bench`` is ``acd bench``.

The top of the import graph: nothing in the package imports it.
"""
