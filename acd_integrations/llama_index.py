"""LlamaIndex adapter: ``ACDLLM``, a function-calling LLM backed by the shared ACD engine.

``Settings.llm = ACDLLM()`` puts safer decoding under any query engine, chat engine or
agent. The adapter is thin: it converts messages, maps keyword arguments through the one
parameter table both adapters share (:mod:`acd_integrations._params`), and hands tool
calling to :mod:`acd_integrations._tools` (prompt protocol, parsing) and
:mod:`acd_integrations._constrained` (grammar-constrained decoding after the contrast).

Every path (``chat``, ``complete``, their streaming and async forms) runs the same engine
call on the same rendered messages, so they return the same text for the same input.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import AsyncGenerator, Callable, Generator, Sequence
from typing import TYPE_CHECKING, Any

from llama_index.core.base.llms.types import (
    ChatMessage,
    ChatResponse,
    ChatResponseAsyncGen,
    ChatResponseGen,
    CompletionResponse,
    CompletionResponseAsyncGen,
    CompletionResponseGen,
    LLMMetadata,
    MessageRole,
    TextBlock,
    ToolCallBlock,
)
from llama_index.core.llms.callbacks import llm_chat_callback, llm_completion_callback
from llama_index.core.llms.function_calling import FunctionCallingLLM
from llama_index.core.llms.llm import ToolSelection
from pydantic import Field, PrivateAttr

from acd_engine.backends.base import BACKEND_HELP
from acd_engine.config import DecodingConfig, ModelConfig
from acd_engine.errors import ConfigError
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
    PARAM_TO_FIELD,
    build_config,
    param_default,
    param_description,
)
from acd_integrations._tools import normalise_tools

if TYPE_CHECKING:
    from llama_index.core.tools.types import BaseTool

__all__ = ["ACDLLM"]

logger = logging.getLogger(__name__)

# Keywords LlamaIndex itself passes to chat/complete; they are not decoding settings.
_FRAMEWORK_KWARGS = frozenset(
    {"formatted", "tools", "tool_choice", "allow_parallel_tool_calls", "tool_required", "verbose"}
)


def _d(name: str) -> Any:
    """Field default and description straight from the shared parameter table."""
    return Field(default=param_default(name), description=param_description(name))


def _to_openai(message: ChatMessage) -> dict[str, Any]:
    """LlamaIndex ``ChatMessage`` -> OpenAI-style dict for :func:`prepare_messages`."""
    role = message.role.value if isinstance(message.role, MessageRole) else str(message.role)
    role = {"chatbot": "assistant", "model": "assistant", "function": "tool"}.get(role, role)
    out: dict[str, Any] = {"role": role, "content": message.content or ""}
    calls: list[dict[str, Any]] = []
    for block in message.blocks:
        if isinstance(block, ToolCallBlock):
            calls.append(
                {
                    "id": block.tool_call_id,
                    "function": {"name": block.tool_name, "arguments": block.tool_kwargs},
                }
            )
    if not calls:
        for call in message.additional_kwargs.get("tool_calls") or []:
            calls.append(call if isinstance(call, dict) else call.model_dump())
    if calls:
        out["tool_calls"] = calls
    if role == "tool":
        out["tool_call_id"] = message.additional_kwargs.get("tool_call_id")
        out["name"] = message.additional_kwargs.get("name")
    return out


class ACDLLM(FunctionCallingLLM):
    """A local chat model with Adversarial Contrastive Decoding, for LlamaIndex.

    Example::

        from llama_index.core import Settings
        from acd_integrations.llama_index import ACDLLM

        Settings.llm = ACDLLM()                  # embedded SmolLM2-135M-Instruct, offline
        Settings.llm = ACDLLM(model="path/to/model-or.gguf", method="acd", alpha=0.5)

    Per-call keyword arguments (``llm.chat(messages, alpha=0.3)``) override the fields and
    are validated by the engine; many ``ACDLLM`` objects share one loaded model.
    """

    model: str | None = Field(
        default=None,
        description="Local HF model directory or .gguf file; None = embedded default model.",
    )
    device: str = Field(default="auto", description="'auto', 'cpu', 'cuda' or 'mps'.")
    dtype: str = Field(default="auto", description="'auto', 'float32', 'bfloat16', 'float16'.")
    quantize: str = Field(
        default="none",
        description=ModelConfig.model_fields["quantize"].description,
    )
    pack: str | None = Field(
        default=None, description="Prompt pack .safetensors for method 'acd' (default: shipped)."
    )
    require_pack: bool = Field(
        default=False,
        description="Refuse a call whose method needs a trained prompt pack (acd) when the "
        "model has none, instead of warning once and decoding on the manual prompts "
        "(then acd equals oid, with no safety gate).",
    )
    backend: str = Field(default="auto", description=BACKEND_HELP)
    method: str = _d("method")
    alpha: float = _d("alpha")
    max_tokens: int = _d("max_tokens")
    temperature: float = _d("temperature")
    top_p: float = _d("top_p")
    top_k: int = _d("top_k")
    repetition_penalty: float = _d("repetition_penalty")
    presence_penalty: float = _d("presence_penalty")
    frequency_penalty: float = _d("frequency_penalty")
    logit_bias: dict[int, float] = _d("logit_bias")
    seed: int | None = _d("seed")
    stop: list[str] = _d("stop")
    plausibility: float = _d("plausibility")
    contrast_tokens: int | None = _d("contrast_tokens")
    gate: bool = _d("gate")
    gate_threshold: float | None = _d("gate_threshold")
    gate_passed_method: str = _d("gate_passed_method")
    positive_prompt: str | None = _d("positive_prompt")
    negative_prompt: str | None = _d("negative_prompt")
    tool_chaining: bool = Field(
        default=False,
        description=(
            "After a tool result, let the model call tools again (tool_choice 'auto'). Off by "
            "default: small models otherwise call the same tool in a loop; with it off the "
            "turn after a tool result is answered in text."
        ),
    )

    _engine: Engine = PrivateAttr()
    _base: DecodingConfig = PrivateAttr()

    def __init__(self, **data: Any) -> None:
        super().__init__(**data)
        self._base = build_config(self._decoding_values(), owner="ACDLLM")
        self._engine = get_engine(
            self.model,
            device=self.device,
            dtype=self.dtype,
            quantize=self.quantize,
            pack=self.pack,
            require_pack=self.require_pack,
            backend=self.backend,
        )

    def _decoding_values(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in PARAM_TO_FIELD}

    @classmethod
    def class_name(cls) -> str:
        return "ACDLLM"

    @property
    def engine(self) -> Engine:
        """The shared engine (one per model/device/dtype/pack in the process)."""
        return self._engine

    @property
    def tokenizer(self) -> Callable[[str], list[int]]:
        """The engine's tokenizer as LlamaIndex's tokenizer hook: ``text -> token ids``.

        LlamaIndex's default (``Settings.tokenizer``, and the ``tokenizer_fn`` of memory
        buffers) is tiktoken, which fetches its encodings from the network. Offline, set
        ``Settings.tokenizer = llm.tokenizer`` or pass ``tokenizer_fn=llm.tokenizer``.
        """
        return self._engine.encode_data

    def count_tokens(self, messages: Sequence[ChatMessage], **kwargs: Any) -> int:
        """The prompt tokens ``chat(messages, **kwargs)`` would use (its ``prompt_tokens``)."""
        return self._request(messages, kwargs).count_tokens()

    @property
    def metadata(self) -> LLMMetadata:
        return LLMMetadata(
            context_window=self._engine.context_window,
            num_output=self.max_tokens,
            is_chat_model=True,
            is_function_calling_model=True,
            model_name=self._engine.model_name,
        )

    # ------------------------------------------------------------------ preparation
    def _request(self, messages: Sequence[ChatMessage], kwargs: dict[str, Any]) -> AdapterCall:
        decoding, rest = check_call_kwargs(kwargs, _FRAMEWORK_KWARGS, "ACDLLM")
        choice = rest.get("tool_choice")
        if rest.get("tool_required") and choice in (None, "auto"):
            choice = "required"
        return prepare_call(
            self._engine,
            [_to_openai(m) for m in messages],
            base=self._base,
            decoding=decoding,
            owner="ACDLLM",
            tools=list(rest.get("tools") or []),
            tool_choice=choice,
            parallel_tool_calls=bool(rest.get("allow_parallel_tool_calls")),
            answer_after_tool_result=not self.tool_chaining,
        )

    def _response(self, outcome: CallOutcome) -> ChatResponse:
        """The final message: text, parsed tool calls, usage, finish reason; ``raw`` adds
        the method, alpha, pack and gate (``none (manual prompts)`` / ``none`` without a
        trained pack) and the gate's verdict."""
        blocks: list[Any] = [
            ToolCallBlock(tool_call_id=c.id, tool_name=c.name, tool_kwargs=c.arguments)
            for c in outcome.tool_calls
        ]
        tool_calls = [
            {"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
            for c in outcome.tool_calls
        ]
        if outcome.invalid_tool_calls:
            logger.warning("invalid tool calls: %s", [c.error for c in outcome.invalid_tool_calls])
        usage = {
            "prompt_tokens": outcome.usage.prompt_tokens,
            "completion_tokens": outcome.usage.completion_tokens,
            "total_tokens": outcome.usage.total_tokens,
        }
        extra: dict[str, Any] = {**usage}
        if tool_calls:
            extra["tool_calls"] = tool_calls
        message = ChatMessage(
            role=MessageRole.ASSISTANT,
            blocks=[TextBlock(text=outcome.text), *blocks],
            additional_kwargs=extra,
        )
        raw = {
            "usage": usage,
            "finish_reason": outcome.finish_reason,
            "model": self._engine.model_name,
            **outcome.metadata,
        }
        return ChatResponse(message=message, raw=raw, additional_kwargs=dict(usage))

    def _generate(self, req: AdapterCall, cancel: threading.Event | None = None) -> ChatResponse:
        # Engine.generate (not a drained stream): concurrent calls then share forwards.
        return self._response(req.generate(cancel))

    def _stream(
        self, req: AdapterCall, cancel: threading.Event | None
    ) -> Generator[ChatResponse, None, None]:
        text = ""
        for event in req.stream(cancel):
            if isinstance(event, CallDelta):
                text += event.text
                yield ChatResponse(
                    message=ChatMessage(role=MessageRole.ASSISTANT, content=text),
                    delta=event.text,
                )
            else:
                final = self._response(event)
                final.delta = ""
                yield final

    @staticmethod
    def _prompt_messages(prompt: str) -> list[ChatMessage]:
        return [ChatMessage(role=MessageRole.USER, content=prompt)]

    @staticmethod
    def _as_completion(resp: ChatResponse) -> CompletionResponse:
        return CompletionResponse(
            text=resp.message.content or "",
            delta=resp.delta,
            raw=resp.raw,
            additional_kwargs=resp.additional_kwargs,
        )

    # ------------------------------------------------------------------ sync API
    @llm_chat_callback()
    def chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponse:
        return self._generate(self._request(messages, kwargs))

    @llm_completion_callback()
    def complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponse:
        req = self._request(self._prompt_messages(prompt), kwargs)
        return self._as_completion(self._generate(req))

    @llm_chat_callback()
    def stream_chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponseGen:
        req = self._request(messages, kwargs)
        return self._stream(req, None)

    @llm_completion_callback()
    def stream_complete(
        self, prompt: str, formatted: bool = False, **kwargs: Any
    ) -> CompletionResponseGen:
        req = self._request(self._prompt_messages(prompt), kwargs)

        def gen() -> CompletionResponseGen:
            for resp in self._stream(req, None):
                yield self._as_completion(resp)

        return gen()

    # ------------------------------------------------------------------ async API
    @llm_chat_callback()
    async def achat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponse:
        req = self._request(messages, kwargs)
        return await arun_in_thread(lambda cancel: self._generate(req, cancel))

    @llm_completion_callback()
    async def acomplete(
        self, prompt: str, formatted: bool = False, **kwargs: Any
    ) -> CompletionResponse:
        req = self._request(self._prompt_messages(prompt), kwargs)
        resp = await arun_in_thread(lambda cancel: self._generate(req, cancel))
        return self._as_completion(resp)

    @llm_chat_callback()
    async def astream_chat(
        self, messages: Sequence[ChatMessage], **kwargs: Any
    ) -> ChatResponseAsyncGen:
        req = self._request(messages, kwargs)

        async def gen() -> AsyncGenerator[ChatResponse, None]:
            stream = aiter_in_thread(lambda cancel: self._stream(req, cancel))
            async for resp in stream:
                yield resp

        return gen()

    @llm_completion_callback()
    async def astream_complete(
        self, prompt: str, formatted: bool = False, **kwargs: Any
    ) -> CompletionResponseAsyncGen:
        req = self._request(self._prompt_messages(prompt), kwargs)

        async def gen() -> AsyncGenerator[CompletionResponse, None]:
            stream = aiter_in_thread(lambda cancel: self._stream(req, cancel))
            async for resp in stream:
                yield self._as_completion(resp)

        return gen()

    # ------------------------------------------------------------------ function calling
    def _prepare_chat_with_tools(
        self,
        tools: Sequence[BaseTool],
        user_msg: str | ChatMessage | None = None,
        chat_history: list[ChatMessage] | None = None,
        verbose: bool = False,
        allow_parallel_tool_calls: bool = False,
        tool_required: bool = False,
        **kwargs: Any,
    ) -> dict[str, Any]:
        """Turn LlamaIndex tools into specs; the grammar is built per call in ``chat``."""
        specs = normalise_tools(
            [
                {
                    "name": t.metadata.get_name(),
                    "description": t.metadata.description,
                    "parameters": t.metadata.get_parameters_dict(),
                }
                for t in tools
            ]
        )
        messages = list(chat_history or [])
        if isinstance(user_msg, str):
            user_msg = ChatMessage(role=MessageRole.USER, content=user_msg)
        if user_msg is not None:
            messages.append(user_msg)
        if kwargs.get("tool_choice") is None and tool_required:
            kwargs["tool_choice"] = "required"
        return {
            "messages": messages,
            "tools": specs,
            "allow_parallel_tool_calls": allow_parallel_tool_calls,
            **kwargs,
        }

    def get_tool_calls_from_response(
        self, response: ChatResponse, error_on_no_tool_call: bool = True, **kwargs: Any
    ) -> list[ToolSelection]:
        selections = [
            ToolSelection(
                tool_id=block.tool_call_id or "",
                tool_name=block.tool_name,
                tool_kwargs=block.tool_kwargs if isinstance(block.tool_kwargs, dict) else {},
            )
            for block in response.message.blocks
            if isinstance(block, ToolCallBlock)
        ]
        if not selections and error_on_no_tool_call:
            raise ValueError(
                "response must contain a tool call, got none; pass tool_required=True (or "
                "tool_choice='required') to force one"
            )
        return selections


def _check_params() -> None:
    """Fail at import if the class and the shared table ever drift apart."""
    missing = [name for name in PARAM_TO_FIELD if name not in ACDLLM.model_fields]
    if missing:
        raise ConfigError(f"ACDLLM must expose every shared parameter, missing {missing}")


_check_params()
