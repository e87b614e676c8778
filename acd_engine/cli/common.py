"""What every `acd` command shares: its common options, logging setup and error handling.

Kept apart from :mod:`acd_engine.cli.main` (which registers the commands) so that commands living
next to their jobs (``train``, ``gate``, ``bench``) use the same pieces without importing the
app. One rule for errors: what the user can fix (the package's own ``ACDError``, the
operating system's ``OSError``, non-Unicode text, pydantic validation) is ONE line
``error: <message>`` on stderr with exit code 2; anything else is a bug and keeps its
traceback.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable
from typing import Annotated, NoReturn, TypeVar

import typer
from pydantic import ValidationError

__all__ = [
    "USER_ERROR_EXIT",
    "BackendOpt",
    "ModelOpt",
    "PackOpt",
    "QuantizeOpt",
    "RequirePackOpt",
    "VerboseOpt",
    "echo_error",
    "fail",
    "run_command",
    "setup_logging",
    "user_error_types",
]

USER_ERROR_EXIT = 2
T = TypeVar("T")

ModelOpt = Annotated[
    str | None,
    typer.Option("--model", help="Local HF model dir or .gguf file (default: embedded SmolLM2)."),
]
QuantizeOpt = Annotated[
    str,
    typer.Option(
        "--quantize",
        help="none | int8 | int4: weight-only quantized linear layers (torchao, extra [quant]).",
    ),
]
PackOpt = Annotated[
    str | None, typer.Option("--pack", help="Prompt pack .safetensors for method acd.")
]
RequirePackOpt = Annotated[
    bool,
    typer.Option(
        "--require-pack",
        help="Refuse method acd when the model has no trained prompt pack, instead of "
        "warning and decoding on the manual prompts (= oid, no safety gate).",
    ),
]
VerboseOpt = Annotated[bool, typer.Option("--verbose", "-v", help="Log progress to stderr.")]
BackendOpt = Annotated[
    str,
    typer.Option(
        "--backend",
        help="auto | torch | llamacpp: what runs the model (llamacpp: llama.cpp on the .gguf "
        "file, CPU, extra [llamacpp]; auto is torch).",
    ),
]


def echo_error(message: object) -> int:
    """Print ``error: <message>`` as exactly one line on stderr; return the exit code, 2.

    The message is folded onto one line (scripts grep for it) and lone surrogates are shown
    as ``\\udcff`` escapes (an error about undecodable input must not itself fail to print).
    """
    text = " ".join(str(message).split()) or "unknown error"
    text = text.encode("utf-8", "backslashreplace").decode("utf-8")
    typer.echo(f"error: {text}", err=True)
    return USER_ERROR_EXIT


def fail(message: object) -> NoReturn:
    """:func:`echo_error`, then leave the command with exit code 2."""
    raise typer.Exit(echo_error(message))


def user_error_types() -> tuple[type[BaseException], ...]:
    """Exceptions that mean "the input or the machine is wrong", never "the code is wrong"."""
    from acd_engine.errors import ACDError

    return (ACDError, OSError, UnicodeError, ValidationError)


def run_command(fn: Callable[[], T]) -> T:
    """Call a command body, turning user errors into one stderr line and exit code 2.

    The app's group does the same for every command; this covers a command function called
    on its own (``typer.main.get_command`` of one command, or a test).
    """
    try:
        return fn()
    except user_error_types() as exc:
        fail(exc)


def setup_logging(verbose: bool) -> None:
    """INFO to stderr with ``--verbose``, else warnings only (and no transformers noise)."""
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    if not verbose:  # transformers' own progress bars and notices are noise here
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
