"""The OpenAI wire format the server speaks: request bodies, ACD fields, error bodies.

Request models accept unknown fields (``extra="allow"``) because OpenAI clients send
fields this server has no use for (``metadata``, ``service_tier``...); vLLM ignores and logs
them, and so does this server (:func:`ignored_fields`). Sampling fields that change the
answer are never among them: ``presence_penalty``, ``frequency_penalty`` and ``logit_bias``
are applied (:data:`OPENAI_SAMPLING_FIELDS`), ``n``, ``best_of`` and ``logprobs`` refused. Values are typed loosely
here on purpose: ranges are checked by ``DecodingConfig`` itself, so a bad ``alpha`` gets
the engine's own message (``alpha must be in [0, 1), got 1.5``), the same one the Python
API and both adapters give.

This module imports no web framework.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

__all__ = [
    "ACD_FIELDS",
    "OPENAI_SAMPLING_FIELDS",
    "ApiError",
    "ChatCompletionRequest",
    "CompletionRequest",
    "StreamOptions",
    "error_body",
    "ignored_fields",
]

#: Per-request decoding fields beyond OpenAI's, accepted at the top level or inside
#: ``extra_body`` (the ``openai`` SDK sends ``extra_body`` keys at the top level).
ACD_FIELDS: tuple[str, ...] = (
    "method",
    "alpha",
    "plausibility",
    "contrast_tokens",
    "repetition_penalty",
    "top_k",
    "positive_prompt",
    "negative_prompt",
    "gate",
    "gate_threshold",
    "gate_passed_method",
)


#: OpenAI's sampling fields beyond temperature and top_p that the engine applies as OpenAI
#: defines them (``DecodingConfig``): never accepted and then dropped.
OPENAI_SAMPLING_FIELDS: tuple[str, ...] = ("presence_penalty", "frequency_penalty", "logit_bias")


class ApiError(Exception):
    """An error answered in OpenAI's shape with an HTTP status.

    Attributes:
        status: HTTP status code (400, 401, 404, 429, 503...).
        message: Shown to the client as ``error.message``.
        type: OpenAI's error type (``invalid_request_error``...).
        param: The request field at fault, when one is.
        code: A machine-readable code (``model_not_found``...).
    """

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(
    message: str, type: str, param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    """``{"error": {"message", "type", "param", "code"}}``: what OpenAI clients parse."""
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


class StreamOptions(BaseModel):
    """``stream_options``: only ``include_usage`` has a meaning here."""

    model_config = ConfigDict(extra="allow")

    include_usage: bool = False


class _Common(BaseModel):
    """Fields chat and text completions share."""

    model_config = ConfigDict(extra="allow")

    model: str | None = Field(default=None, description="The served model id.")
    max_tokens: int | None = Field(default=None, description="Upper bound on new tokens.")
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    # Validated by DecodingConfig (its ranges and messages), as the ACD fields below are.
    presence_penalty: Any = None
    frequency_penalty: Any = None
    logit_bias: Any = None
    n: int | None = Field(default=None, description="Only 1 is supported.")
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = Field(default=None, description="Accepted; not used.")
    logprobs: Any = Field(default=None, description="Refused with 400 when asked for.")
    extra_body: dict[str, Any] | None = Field(
        default=None, description="ACD fields sent by clients that nest them (curl users)."
    )
    # ACD fields: validated by DecodingConfig, not here (one source of messages).
    method: Any = None
    alpha: Any = None
    plausibility: Any = None
    contrast_tokens: Any = None
    repetition_penalty: Any = None
    top_k: Any = None
    positive_prompt: Any = None
    negative_prompt: Any = None
    gate: Any = None
    gate_threshold: Any = None
    gate_passed_method: Any = None


class ChatCompletionRequest(_Common):
    """``POST /v1/chat/completions``."""

    messages: list[dict[str, Any]]
    max_completion_tokens: int | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    response_format: dict[str, Any] | None = None
    top_logprobs: int | None = None


class CompletionRequest(_Common):
    """``POST /v1/completions``: the prompt is answered as one user turn (see docs)."""

    prompt: str | list[str]
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None


def ignored_fields(request: BaseModel) -> list[str]:
    """The unknown fields of a request (ignored; the server logs them)."""
    return sorted((request.model_extra or {}).keys())
