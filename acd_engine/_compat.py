"""One place for differences between the transformers releases we support (>=5,<6).

transformers renamed the KV-cache argument and output field ``past_key_values`` to
``cache`` during 5.x and removes the old name in 5.40; earlier 5.x releases only know
the old one. Every forward the engine makes goes through these two helpers, so neither
release warns or breaks.
"""

from __future__ import annotations

import inspect
from typing import Any

__all__ = ["cache_arg", "output_cache"]


_NAMES: dict[type, str] = {}  # model class -> its KV-cache keyword


def cache_arg(model: Any, cache: Any) -> dict[str, Any]:
    """``{name: cache}`` with the KV-cache keyword ``model.forward`` takes."""
    kind = type(model)
    if kind not in _NAMES:
        params = inspect.signature(kind.forward).parameters  # follows functools.wraps
        _NAMES[kind] = "cache" if "cache" in params else "past_key_values"
    return {_NAMES[kind]: cache}


def output_cache(output: Any) -> Any:
    """The KV cache a forward returned, under either field name."""
    cache = getattr(output, "cache", None)
    return cache if cache is not None else output.past_key_values
