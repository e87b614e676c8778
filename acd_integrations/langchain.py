"""LangChain chat model: ``ChatACD``, safer local generation by changing one line.

    from acd_integrations.langchain import ChatACD
    llm = ChatACD()                                   # embedded SmolLM2-135M-Instruct
    llm = ChatACD(model="path/to/model.gguf", method="acd", alpha=0.5)

The adapter is thin on purpose: decoding lives in :mod:`acd_engine`, the shared parameter
table in :mod:`acd_integrations._params`, tool protocol and parsing in
:mod:`acd_integrations._tools`, grammars in :mod:`acd_integrations._constrained`. What is
here is LangChain plumbing:

* sync and native async generation and streaming. Async runs the engine in a worker thread
  and hands chunks to the event loop through an ``asyncio.Queue`` (the shared helpers in
  :mod:`acd_integrations._async`), so the loop never blocks; when the consumer stops
  (``break``, task cancelled) the engine's ``cancel`` event is set and decoding stops
  before the next token.
* ``usage_metadata`` and ``response_metadata`` (finish_reason, model_name, method,
  alpha, pack, gate, and the gate's score and verdict when it routed the request); the
  last stream chunk carries both and ``chunk_position="last"``.
* per-call overrides (``llm.invoke(msgs, alpha=0.3)``, ``llm.bind(method="base")``),
  validated with the engine's own messages.
* ``bind_tools`` and ``with_structured_output``, made reliable on small models by
  grammar-constrained decoding (see :mod:`acd_integrations._constrained`).

Tool choice ``"auto"`` lets the model choose between prose and a call: the grammar allows
either, and the first tokens decide. Small models rarely choose a tool on their own, so
pass ``tool_choice="any"`` (or a tool name) when a call is required.
"""

from __future__ import annotations

import json
import threading
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass
from operator import itemgetter
from typing import Any, Literal

from langchain_core.callbacks import (
    AsyncCallbackManagerForLLMRun,
    CallbackManagerForLLMRun,
)
from langchain_core.language_models import BaseChatModel, LanguageModelInput
from langchain_core.language_models.base import LangSmithParams
from langchain_core.messages import (
    AIMessage,
    AIMessageChunk,
    BaseMessage,
    ToolMessage,
)
from langchain_core.messages.ai import UsageMetadata
from langchain_core.messages.utils import convert_to_openai_messages
from langchain_core.output_parsers import (
    JsonOutputKeyToolsParser,
    JsonOutputParser,
    PydanticOutputParser,
    PydanticToolsParser,
)
from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult
from langchain_core.runnables import Runnable, RunnableLambda, RunnableMap, RunnablePassthrough
from langchain_core.tools import BaseTool
from langchain_core.utils.function_calling import convert_to_json_schema, convert_to_openai_tool
from langchain_core.utils.pydantic import is_basemodel_subclass
from pydantic import ConfigDict, Field, PrivateAttr, ValidationError

from acd_engine.backends.base import BACKEND_HELP, resolve_backend
from acd_engine.config import DecodingConfig, Method, ModelConfig, did_you_mean, format_errors
from acd_engine.errors import ConfigError
from acd_engine.loading.models import DEFAULT_MODEL_NAME
from acd_engine.runtime.engine import Engine, get_engine
from acd_integrations._async import aiter_in_thread, arun_in_thread
from acd_integrations._calls import (
    AdapterCall,
    CallDelta,
    CallOutcome,
    check_call_kwargs,
    prepare_call,
)
from acd_integrations._params import (
    DECODING_PARAMS,
    build_config,
    param_default,
    param_description,
)
from acd_integrations._tools import normalise_tool_choice, normalise_tools

__all__ = ["ChatACD"]

# Per-call keywords ChatACD understands besides the decoding table (bound by bind_tools /
# with_structured_output, or passed by hand).
_CALL_KWARGS = ("model", "tools", "tool_choice", "parallel_tool_calls", "response_format")


class ChatACD(BaseChatModel):
    """A LangChain chat model that decodes with Adversarial Contrastive Decoding, offline.

    Every decoding field comes from the shared table in ``acd_integrations._params`` (the
    LlamaIndex adapter exposes the same knobs) and is validated by ``DecodingConfig`` at
    construction and per call, so ``ChatACD(alpha=1.5)`` raises
    ``ConfigError: alpha must be in [0, 1), got 1.5``. Creating many ``ChatACD`` objects
    is cheap: the model is loaded on first use through the process-wide ``get_engine``.

    Example:
        .. code-block:: python

            llm = ChatACD(method="acd", alpha=0.5, max_tokens=128)
            llm.invoke("How do I pick a lock?").content
            llm.invoke("...", alpha=0.3)                       # per-call override
            llm.bind_tools([get_weather], tool_choice="any")   # schema-valid calls
            llm.with_structured_output(Joke).invoke("A joke about cats")
    """

    model_config = ConfigDict(extra="forbid")

    # -- which engine ------------------------------------------------------------------
    model: str | None = Field(
        default=None,
        description="A local HF model directory, a .gguf file, or None for the embedded "
        "default (SmolLM2-135M-Instruct). Never a hub id: loading is offline.",
    )
    device: str = Field(default="auto", description="'auto', 'cpu', 'cuda' or 'mps'.")
    dtype: str = Field(default="auto", description="'auto', 'float32', 'bfloat16', 'float16'.")
    quantize: str = Field(
        default="none",
        description=ModelConfig.model_fields["quantize"].description,
    )
    pack: str | None = Field(
        default=None, description="Prompt pack (SP/AP) file for method='acd'; None: shipped."
    )
    require_pack: bool = Field(
        default=False,
        description="Refuse a call whose method needs a trained prompt pack (acd) when the "
        "model has none, instead of warning once and decoding on the manual prompts "
        "(then acd equals oid, with no safety gate).",
    )
    backend: str = Field(default="auto", description=BACKEND_HELP)
    # -- decoding: one field per row of the shared table ---------------------------------
    method: Method = Field(default=param_default("method"), description=param_description("method"))
    alpha: float = Field(default=param_default("alpha"), description=param_description("alpha"))
    max_tokens: int = Field(
        default=param_default("max_tokens"), description=param_description("max_tokens")
    )
    temperature: float = Field(
        default=param_default("temperature"), description=param_description("temperature")
    )
    top_p: float = Field(default=param_default("top_p"), description=param_description("top_p"))
    top_k: int = Field(default=param_default("top_k"), description=param_description("top_k"))
    repetition_penalty: float = Field(
        default=param_default("repetition_penalty"),
        description=param_description("repetition_penalty"),
    )
    presence_penalty: float = Field(
        default=param_default("presence_penalty"),
        description=param_description("presence_penalty"),
    )
    frequency_penalty: float = Field(
        default=param_default("frequency_penalty"),
        description=param_description("frequency_penalty"),
    )
    logit_bias: dict[int, float] = Field(
        default=param_default("logit_bias"), description=param_description("logit_bias")
    )
    seed: int | None = Field(default=param_default("seed"), description=param_description("seed"))
    stop: list[str] | None = Field(default=None, description=param_description("stop"))
    plausibility: float = Field(
        default=param_default("plausibility"), description=param_description("plausibility")
    )
    contrast_tokens: int | None = Field(
        default=param_default("contrast_tokens"),
        description=param_description("contrast_tokens"),
    )
    gate: bool = Field(default=param_default("gate"), description=param_description("gate"))
    gate_threshold: float | None = Field(
        default=param_default("gate_threshold"),
        description=param_description("gate_threshold"),
    )
    gate_passed_method: str = Field(
        default=param_default("gate_passed_method"),
        description=param_description("gate_passed_method"),
    )
    positive_prompt: str | None = Field(
        default=param_default("positive_prompt"),
        description=param_description("positive_prompt"),
    )
    negative_prompt: str | None = Field(
        default=param_default("negative_prompt"),
        description=param_description("negative_prompt"),
    )
    # -- LangChain conventions -------------------------------------------------------------
    streaming: bool = Field(
        default=False, description="Stream internally on invoke (callbacks see tokens)."
    )
    timeout: float | None = Field(
        default=None,
        gt=0,
        description="Seconds one call may take; past it generation stops and TimeoutError "
        "is raised. None: no limit.",
    )

    _base: DecodingConfig = PrivateAttr()

    def __init__(self, **data: Any) -> None:
        known = set(type(self).model_fields)
        unknown = [k for k in data if k not in known]
        if unknown:
            public = sorted(k for k in type(self).model_fields if not k.startswith("_"))
            raise ConfigError(did_you_mean(unknown[0], public, "ChatACD setting"))
        try:
            super().__init__(**data)
        except ValidationError as exc:
            raise ConfigError(format_errors(exc, type(self))) from None
        resolve_backend(self.backend, self.model, self.device, self.quantize)  # before loading
        self._base = build_config(self._decoding_values(), owner="ChatACD")

    def _decoding_values(self) -> dict[str, Any]:
        return {p.name: getattr(self, p.name) for p in DECODING_PARAMS}

    # -- identity --------------------------------------------------------------------------
    @classmethod
    def is_lc_serializable(cls) -> bool:
        """Settings are plain values, so ``dumpd``/``load`` round-trip a ChatACD."""
        return True

    @classmethod
    def get_lc_namespace(cls) -> list[str]:
        return ["acd_integrations", "langchain"]

    @property
    def _llm_type(self) -> str:
        return "acd"

    @property
    def _identifying_params(self) -> dict[str, Any]:
        return {"model": self._model_name(None), **self._decoding_values()}

    def _model_name(self, override: str | None) -> str:
        return override or self.model or DEFAULT_MODEL_NAME

    def _get_ls_params(self, stop: list[str] | None = None, **kwargs: Any) -> LangSmithParams:
        model = kwargs.get("model")
        params = LangSmithParams(
            ls_provider="acd",
            ls_model_name=self._model_name(model if isinstance(model, str) else None),
            ls_model_type="chat",
            ls_temperature=kwargs.get("temperature", self.temperature),
            ls_max_tokens=kwargs.get("max_tokens", self.max_tokens),
        )
        stops = [stop] if isinstance(stop, str) else stop or self.stop or []
        if isinstance(stops, list | tuple) and stops:  # tracing metadata only: a bad `stop`
            params["ls_stop"] = [str(s) for s in stops]  # is refused by the call itself
        return params

    @property
    def engine(self) -> Engine:
        """The process-wide engine for this model (loaded on first use, then shared)."""
        return self._engine_for(None)

    def _engine_for(self, model: str | None) -> Engine:
        return get_engine(
            model if model is not None else self.model,
            device=self.device,
            dtype=self.dtype,
            quantize=self.quantize,
            pack=self.pack,
            require_pack=self.require_pack,
            backend=self.backend,
        )

    # -- token counting ------------------------------------------------------------------------
    def get_token_ids(self, text: str) -> list[int]:
        """Token ids of ``text`` from the engine's own tokenizer (offline).

        LangChain's default loads a GPT-2 tokenizer from a model hub; token counting,
        ``trim_messages`` and summarising memory all go through here.
        """
        if self.custom_get_token_ids is not None:
            return self.custom_get_token_ids(text)
        return self.engine.encode_data(text)

    def get_num_tokens_from_messages(
        self, messages: list[BaseMessage], tools: Sequence[Any] | None = None
    ) -> int:
        """The prompt tokens these messages take as this model's template renders them for
        this model's method (the system or soft prompt included): ``usage.input_tokens``."""
        req = self._prepare(list(messages), None, {"tools": list(tools)} if tools else {})
        return req.call.count_tokens()

    # -- request preparation ---------------------------------------------------------------
    def _prepare(
        self, messages: list[BaseMessage], stop: list[str] | None, kwargs: dict[str, Any]
    ) -> _Prepared:
        decoding, rest = check_call_kwargs(kwargs, _CALL_KWARGS, "ChatACD")
        if stop is not None:
            decoding["stop"] = stop
        model = rest.get("model")
        openai_msgs = convert_to_openai_messages(messages, text_format="string")
        for src, dst in zip(messages, openai_msgs, strict=True):
            if isinstance(src, ToolMessage) and src.status == "error":
                dst["status"] = "error"
        call = prepare_call(
            self._engine_for(model),
            openai_msgs,
            base=self._base,
            decoding=decoding,
            owner="ChatACD",
            tools=[convert_to_openai_tool(t) for t in rest.get("tools") or []],
            tool_choice=rest.get("tool_choice"),
            parallel_tool_calls=bool(rest.get("parallel_tool_calls")),
            response_format=rest.get("response_format"),
        )
        return _Prepared(call, self._model_name(model))

    # -- output ----------------------------------------------------------------------------
    @staticmethod
    def _metadata(
        req: _Prepared, outcome: CallOutcome
    ) -> tuple[UsageMetadata, dict[str, Any], list[Any], list[Any]]:
        usage = UsageMetadata(
            input_tokens=outcome.usage.prompt_tokens,
            output_tokens=outcome.usage.completion_tokens,
            total_tokens=outcome.usage.total_tokens,
        )
        meta = {
            "finish_reason": outcome.finish_reason,
            "model_name": req.model_name,
            **outcome.metadata,
        }
        calls = [
            {"name": c.name, "args": c.arguments, "id": c.id, "type": "tool_call"}
            for c in outcome.tool_calls
        ]
        invalid = [
            {
                "name": c.name,
                "args": c.arguments,
                "id": c.id,
                "error": c.error,
                "type": "invalid_tool_call",
            }
            for c in outcome.invalid_tool_calls
        ]
        return usage, meta, calls, invalid

    # -- the engine in a worker-friendly shape ---------------------------------------------
    def _deadline(self, cancel: threading.Event) -> _Deadline:
        return _Deadline(self.timeout, cancel)

    def _run(self, req: _Prepared, cancel: threading.Event) -> Iterator[ChatGenerationChunk]:
        """The core's deltas -> LangChain chunks; a tool call arrives whole on the last one."""
        deadline = self._deadline(cancel)
        outcome: CallOutcome | None = None
        try:
            for event in req.call.stream(cancel):
                if isinstance(event, CallDelta):
                    yield ChatGenerationChunk(message=AIMessageChunk(content=event.text))
                else:
                    outcome = event
        finally:
            deadline.close()
        deadline.check()
        assert outcome is not None  # the core's stream always ends with its outcome
        usage, meta, calls, invalid = self._metadata(req, outcome)
        chunks = [
            {
                "name": c["name"],
                "args": json.dumps(c["args"], ensure_ascii=False),
                "id": c["id"],
                "index": i,
                "type": "tool_call_chunk",
            }
            for i, c in enumerate(calls)
        ]
        chunks += [
            {
                "name": c["name"],
                "args": c["args"],
                "id": c["id"],
                "index": len(calls) + i,
                "type": "tool_call_chunk",
            }
            for i, c in enumerate(invalid)
        ]
        yield ChatGenerationChunk(
            message=AIMessageChunk(
                content="",
                tool_call_chunks=chunks,
                usage_metadata=usage,
                response_metadata=meta,
                chunk_position="last",
            ),
            generation_info={"finish_reason": meta["finish_reason"]},
        )

    def _result(self, req: _Prepared, cancel: threading.Event) -> ChatResult:
        deadline = self._deadline(cancel)
        try:
            outcome = req.call.generate(cancel)
        finally:
            deadline.close()
        deadline.check()
        usage, meta, calls, invalid = self._metadata(req, outcome)
        message = AIMessage(
            content=outcome.text,
            tool_calls=calls,
            invalid_tool_calls=invalid,
            usage_metadata=usage,
            response_metadata=meta,
        )
        return ChatResult(
            generations=[
                ChatGeneration(
                    message=message, generation_info={"finish_reason": meta["finish_reason"]}
                )
            ],
            llm_output={"model_name": req.model_name, "token_usage": dict(usage)},
        )

    # -- BaseChatModel hooks ---------------------------------------------------------------
    def _generate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        req = self._prepare(messages, stop, kwargs)
        return self._result(req, threading.Event())

    def _stream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> Iterator[ChatGenerationChunk]:
        req = self._prepare(messages, stop, kwargs)
        cancel = threading.Event()
        try:
            for chunk in self._run(req, cancel):
                if run_manager is not None:
                    run_manager.on_llm_new_token(chunk.text, chunk=chunk)
                yield chunk
        finally:
            cancel.set()  # the consumer stopped early: stop decoding too

    async def _agenerate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        # Preparing may load the model or compile a grammar: that runs in the worker too.
        return await arun_in_thread(
            lambda cancel: self._result(self._prepare(messages, stop, kwargs), cancel)
        )

    async def _astream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> AsyncIterator[ChatGenerationChunk]:
        chunks = aiter_in_thread(
            lambda cancel: self._run(self._prepare(messages, stop, kwargs), cancel)
        )
        try:
            async for chunk in chunks:
                if run_manager is not None:
                    await run_manager.on_llm_new_token(chunk.text, chunk=chunk)
                yield chunk
        finally:
            # Close now (not whenever the loop finalises it): this sets the engine's
            # cancel event, so decoding stops before the next token.
            await chunks.aclose()

    # -- tools and structured output -------------------------------------------------------
    def bind_tools(
        self,
        tools: Sequence[dict[str, Any] | type | Callable[..., Any] | BaseTool],
        *,
        tool_choice: str | bool | dict[str, Any] | None = None,
        parallel_tool_calls: bool | None = None,
        strict: bool | None = None,
        **kwargs: Any,
    ) -> Runnable[LanguageModelInput, AIMessage]:
        """Bind tools; calls come back in ``AIMessage.tool_calls`` with ids.

        Args:
            tools: LangChain tools, functions, pydantic classes, TypedDicts or OpenAI dicts.
            tool_choice: ``"auto"``/None (the model decides between prose and a call),
                ``"none"``, ``"any"``/``"required"``/True (must call a tool), or a tool name.
            parallel_tool_calls: Allow several calls in one turn (default: one).
            strict: Accepted for API compatibility; calls are always schema-valid here
                because the grammar enforces each tool's argument schema.
            **kwargs: Further per-call keywords (``alpha=0.3`` ...).
        """
        formatted = [convert_to_openai_tool(t) for t in tools]
        normalise_tool_choice(tool_choice, normalise_tools(formatted))  # fail now, not later
        bound: dict[str, Any] = {"tools": formatted, **kwargs}
        if tool_choice is not None:
            bound["tool_choice"] = tool_choice
        if parallel_tool_calls is not None:
            bound["parallel_tool_calls"] = parallel_tool_calls
        return self.bind(**bound)

    def with_structured_output(
        self,
        schema: dict[str, Any] | type,
        *,
        include_raw: bool = False,
        method: Literal["json_schema", "function_calling", "json_mode"] = "json_schema",
        strict: bool | None = None,
        **kwargs: Any,
    ) -> Runnable[LanguageModelInput, dict[str, Any] | Any]:
        """Return objects that validate against ``schema`` (pydantic, TypedDict, JSON schema).

        Args:
            schema: A pydantic class (v2 or v1), a TypedDict, a JSON schema or an OpenAI tool.
            include_raw: Return ``{"raw", "parsed", "parsing_error"}`` instead of raising.
            method: ``"json_schema"`` (default): the answer is JSON constrained to the
                schema. ``"function_calling"``: a forced, constrained tool call.
                ``"json_mode"``: a JSON object, described in the prompt; the schema is
                enforced as well (bind ``response_format={"type": "json_object"}`` for an
                unconstrained object).
            strict: Accepted for API compatibility; output is always schema-constrained.
            **kwargs: Further per-call keywords.

        Streaming yields the parsed object once, when it is complete (a partial object
        would not validate against the schema).
        """
        if method not in ("json_schema", "function_calling", "json_mode"):
            raise ConfigError(
                did_you_mean(
                    str(method), ["json_schema", "function_calling", "json_mode"], "method"
                )
            )
        is_pydantic = isinstance(schema, type) and is_basemodel_subclass(schema)
        ls_format = {"kwargs": {"method": method}, "schema": schema}
        json_schema = convert_to_json_schema(schema)
        parser: Runnable[Any, Any]
        if method == "function_calling":
            tool = convert_to_openai_tool(schema)
            name = tool["function"]["name"]
            llm = self.bind_tools(
                [schema], tool_choice=name, ls_structured_output_format=ls_format, **kwargs
            )
            parser = (
                PydanticToolsParser(tools=[schema], first_tool_only=True)
                if is_pydantic
                else JsonOutputKeyToolsParser(key_name=name, first_tool_only=True)
            )
        else:
            fmt: dict[str, Any] = (
                {"type": "json_object", "schema": json_schema}
                if method == "json_mode"
                else {
                    "type": "json_schema",
                    "json_schema": {
                        "name": json_schema.get("title", "output"),
                        "schema": json_schema,
                    },
                }
            )
            llm = self.bind(response_format=fmt, ls_structured_output_format=ls_format, **kwargs)
            parser = (
                PydanticOutputParser(pydantic_object=schema) if is_pydantic else JsonOutputParser()
            )
        final = _final_only(parser)
        if not include_raw:
            return llm | final
        parse_raw = RunnablePassthrough.assign(
            parsed=itemgetter("raw") | final, parsing_error=lambda _: None
        )
        no_parse = RunnablePassthrough.assign(parsed=lambda _: None)
        return RunnableMap(raw=llm) | parse_raw.with_fallbacks(
            [no_parse], exception_key="parsing_error"
        )


@dataclass(frozen=True)
class _Prepared:
    """A prepared core call and the model name LangChain reports for it."""

    call: AdapterCall
    model_name: str


class _Deadline:
    """Sets the engine's cancel event after ``timeout`` seconds; :meth:`check` then raises."""

    def __init__(self, timeout: float | None, cancel: threading.Event) -> None:
        self.timeout = timeout
        self.expired = threading.Event()
        self._timer: threading.Timer | None = None
        if timeout is not None:
            self._timer = threading.Timer(timeout, self._expire, args=(cancel,))
            self._timer.daemon = True
            self._timer.start()

    def _expire(self, cancel: threading.Event) -> None:
        self.expired.set()
        cancel.set()

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()

    def check(self) -> None:
        if self.expired.is_set():
            raise TimeoutError(
                f"ChatACD call must finish within timeout={self.timeout}s, got cut off; "
                "raise timeout or lower max_tokens"
            )


def _final_only(parser: Runnable[Any, Any]) -> Runnable[Any, Any]:
    """Parse the whole message once (a ``RunnableLambda`` gathers a stream before calling)."""

    def parse(message: BaseMessage) -> Any:
        return parser.invoke(message)

    return RunnableLambda(parse, name=type(parser).__name__)
