"""The garak red-team recipe for ``acd serve``: config, benign control, summary.

Not part of the installed ``acd`` package (``pyproject.toml`` packages only ``acd_engine`` and
``acd_integrations``): it is a recipe run from a checkout by ``scripts/redteam.sh``. Its
modules use the standard library only (``control`` also the engine's refusal judge), so the
recipe's own logic runs in the project's venv and is tested without garak installed.
"""
