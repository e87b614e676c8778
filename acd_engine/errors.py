"""The few exception types users catch.

All of them subclass ``ValueError`` or ``RuntimeError`` so callers that already catch the
built-ins keep working; the subclasses exist so adapters can tell "your input was wrong"
(show it to the user) from "the machine is missing something" (show the fix command).
"""

from __future__ import annotations

__all__ = [
    "ACDError",
    "ConfigError",
    "DownloadError",
    "MessagesError",
    "ModelNotFoundError",
    "PromptPackError",
    "PromptTooLongError",
]


class ACDError(Exception):
    """Base class of every error this package raises on purpose."""


class ConfigError(ACDError, ValueError):
    """A setting is out of range or unknown; the message names the field and the fix."""


class DownloadError(ACDError, RuntimeError):
    """A benchmark file could not be downloaded, or did not match the checksum the package
    holds for it; the message names the set and the URL, and nothing half-done was kept."""


class MessagesError(ACDError, ValueError):
    """The chat messages are malformed (empty list, unknown role, non-string content)."""


class PromptTooLongError(MessagesError):
    """The rendered prompt plus the requested new tokens do not fit the model's context."""


class ModelNotFoundError(ACDError, FileNotFoundError):
    """The model path does not exist, or the default model's package is not installed."""


class PromptPackError(ACDError, ValueError):
    """A prompt pack is malformed or was made for another model."""
