"""One table of adapter parameters, shared by the LangChain and LlamaIndex adapters.

Framework adapters speak their ecosystem's vocabulary (``max_tokens``, ``stop``) while the
engine speaks :class:`~acd_engine.DecodingConfig`'s (``max_new_tokens``). Keeping the
mapping in one table means both adapters expose the same knobs with the same defaults and
descriptions, a drift test can prove every ``DecodingConfig`` field is reachable, and a
bad value fails with the engine's own validation message, phrased with the name the user
actually typed (``max_tokens must be >= 1, got 0``).

This module imports no framework, so any adapter can build on it.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from acd_engine.config import DecodingConfig, did_you_mean
from acd_engine.errors import ConfigError
from acd_engine.safety.gate import applied_alpha

__all__ = [
    "DECODING_PARAMS",
    "ENGINE_PARAMS",
    "MAPPING_PARAMS",
    "PARAM_TO_FIELD",
    "Param",
    "build_config",
    "param_default",
    "param_description",
    "result_metadata",
    "split_kwargs",
    "to_config_kwargs",
]


@dataclass(frozen=True)
class Param:
    """One adapter keyword and the ``DecodingConfig`` field it sets.

    Attributes:
        name: The keyword adapters expose (``max_tokens``).
        field: The ``DecodingConfig`` field it maps to (``max_new_tokens``).
    """

    name: str
    field: str


# The table. Adapter names follow the OpenAI / LangChain / LlamaIndex convention where one
# exists (max_tokens); every other name is the engine's own.
DECODING_PARAMS: tuple[Param, ...] = (
    Param("method", "method"),
    Param("alpha", "alpha"),
    Param("max_tokens", "max_new_tokens"),
    Param("temperature", "temperature"),
    Param("top_p", "top_p"),
    Param("top_k", "top_k"),
    Param("repetition_penalty", "repetition_penalty"),
    Param("presence_penalty", "presence_penalty"),
    Param("frequency_penalty", "frequency_penalty"),
    Param("logit_bias", "logit_bias"),
    Param("seed", "seed"),
    Param("stop", "stop"),
    Param("plausibility", "plausibility"),
    Param("contrast_tokens", "contrast_tokens"),
    Param("gate", "gate"),
    Param("gate_threshold", "gate_threshold"),
    Param("gate_passed_method", "gate_passed_method"),
    Param("positive_prompt", "positive_prompt"),
    Param("negative_prompt", "negative_prompt"),
)

#: Keywords that pick the engine (``get_engine``'s arguments) rather than a decoding field.
ENGINE_PARAMS: tuple[str, ...] = (
    "model",
    "device",
    "dtype",
    "quantize",
    "pack",
    "require_pack",
    "backend",
)

#: Keywords adapters take as a mapping (OpenAI's ``logit_bias``: token id -> bias), which
#: ``DecodingConfig`` keeps as sorted pairs so that it stays hashable.
MAPPING_PARAMS: tuple[str, ...] = ("logit_bias",)

#: Adapter keyword -> ``DecodingConfig`` field.
PARAM_TO_FIELD: dict[str, str] = {p.name: p.field for p in DECODING_PARAMS}
_FIELD_TO_PARAM: dict[str, str] = {p.field: p.name for p in DECODING_PARAMS}


def param_default(name: str) -> Any:
    """The engine's default for adapter keyword ``name`` (``stop`` as a list,
    ``logit_bias`` as a dict).

    Adapters use it as their field default, so ``ChatACD().alpha`` shows the value the
    engine will actually apply instead of an opaque ``None``.
    """
    default = DecodingConfig.model_fields[PARAM_TO_FIELD[name]].default
    if name in MAPPING_PARAMS:
        return dict(default)
    return list(default) if isinstance(default, tuple) else default


def param_description(name: str) -> str:
    """The ``DecodingConfig`` description of adapter keyword ``name`` (one source of docs)."""
    return DecodingConfig.model_fields[PARAM_TO_FIELD[name]].description or ""


def _rename_fields(message: str) -> str:
    """Phrase an engine validation message with the adapter's keyword names."""
    for field, name in _FIELD_TO_PARAM.items():
        if field != name:
            message = re.sub(rf"\b{re.escape(field)}\b", name, message)
    return message


def to_config_kwargs(values: Mapping[str, Any], *, owner: str = "adapter") -> dict[str, Any]:
    """Map adapter keywords to ``DecodingConfig`` fields.

    ``None`` means "not set here" and is dropped, except for the fields whose ``None`` is a
    real value (``seed``, ``contrast_tokens``, the custom prompts), which are kept only when
    present in ``values``.

    Args:
        values: Adapter keywords, e.g. ``{"max_tokens": 32, "alpha": 0.3}``.
        owner: Name used in the unknown-keyword message (``ChatACD``).

    Raises:
        ConfigError: ``unknown ChatACD setting 'alpah'; did you mean 'alpha'? ...``.
    """
    out: dict[str, Any] = {}
    for name, value in values.items():
        field = PARAM_TO_FIELD.get(name)
        if field is None:
            raise ConfigError(did_you_mean(name, list(PARAM_TO_FIELD), f"{owner} setting"))
        if value is None and DecodingConfig.model_fields[field].default is not None:
            continue
        out[field] = value
    return out


def build_config(
    values: Mapping[str, Any],
    *,
    base: DecodingConfig | None = None,
    owner: str = "adapter",
) -> DecodingConfig:
    """A validated ``DecodingConfig`` from adapter keywords, on top of ``base``.

    Validation is ``DecodingConfig``'s own, so messages match the engine's; field names in
    them are translated back to the adapter's (``max_tokens must be >= 1, got 0``).

    Raises:
        ConfigError: A value is out of range or a keyword is unknown.
    """
    kwargs = to_config_kwargs(values, owner=owner)
    try:
        if base is None:
            return DecodingConfig(**kwargs)
        return base.replace(**kwargs)
    except ConfigError as exc:
        raise ConfigError(_rename_fields(str(exc))) from None


def split_kwargs(kwargs: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Split per-call keywords into (decoding keywords, everything else).

    Adapters receive framework keywords (callbacks, tools, ...) mixed with per-call decoding
    overrides (``alpha=0.3``); this separates the two without knowing the framework.
    """
    decoding = {k: v for k, v in kwargs.items() if k in PARAM_TO_FIELD}
    rest = {k: v for k, v in kwargs.items() if k not in PARAM_TO_FIELD}
    return decoding, rest


def result_metadata(
    config: DecodingConfig,
    gate_score: float | None,
    gate_flagged: bool | None,
    report: Mapping[str, str],
) -> dict[str, Any]:
    """What every front end reports about how an answer was decoded: the method, the alpha
    actually applied (0 when the safety gate passed the request to its single branch), the
    pack and gate it decoded with and the backend that ran it (``report``, the engine's
    ``pack_report``: ``none (manual prompts)`` / ``none`` when the model has no trained
    pack; ``torch`` or ``llamacpp``) and the gate's score and verdict when the request was
    gated."""
    meta: dict[str, Any] = {
        "method": config.method,
        "alpha": applied_alpha(config, gate_flagged),
        "pack": report["pack"],
        "gate": report["gate"],
        "backend": report["backend"],
    }
    if gate_score is not None:
        meta["gate_score"] = gate_score
        meta["gate_flagged"] = gate_flagged
    return meta
