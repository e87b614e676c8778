"""langchain-tests standard suites for ChatACD on the real default model (SmolLM2-135M).

Tool calling, tool choice, structured output and JSON mode are all switched on. Every
model built here resolves to the session's one default engine (``get_engine()`` is
process-wide), so the weights are loaded once for the whole test session.

Token budgets are per test (see ``_BUDGETS``): prose tests only need a few tokens to
prove the plumbing, while tool calls and JSON objects need room to finish.
"""

from __future__ import annotations

from typing import Any

import pytest
from langchain_core.language_models import BaseChatModel
from langchain_tests.integration_tests import ChatModelIntegrationTests
from langchain_tests.unit_tests import ChatModelUnitTests

from acd_integrations.langchain import ChatACD

pytestmark = pytest.mark.slow

PROSE_TOKENS = 8
_BUDGETS = {  # test name -> max_tokens
    "test_tool_calling": 40,
    "test_tool_calling_async": 40,
    "test_tool_calling_with_no_arguments": 40,
    "test_tool_choice": 40,
    "test_bind_runnables_as_tools": 40,
    "test_structured_few_shot_examples": 40,
    "test_agent_loop": 40,
    "test_unicode_tool_call_integration": 80,
    "test_structured_output": 80,
    "test_structured_output_async": 80,
    "test_structured_output_pydantic_2_v1": 80,
    "test_structured_output_optional_param": 80,
    "test_json_mode": 80,
}


class TestChatACDUnit(ChatModelUnitTests):
    @property
    def chat_model_class(self) -> type[ChatACD]:
        return ChatACD

    @property
    def standard_chat_model_params(self) -> dict[str, Any]:
        # A local model has no API key and nothing to retry over a network; ChatACD refuses
        # unknown settings (with a did-you-mean message) rather than silently ignoring them.
        params = super().standard_chat_model_params
        params.pop("api_key")
        params.pop("max_retries")
        return params

    @pytest.mark.xfail(
        reason="langchain-core's load(allowed_objects='all') only admits the classes in its "
        "own partner mapping, which a third-party model cannot join; dumpd() matches the "
        "snapshot, and load(..., valid_namespaces=['acd_integrations'], "
        "allowed_objects=[ChatACD]) round-trips (test_chat_acd.py::test_serialisation_round_trip)",
        raises=ValueError,
        strict=True,
    )
    def test_serdes(self, model: BaseChatModel, snapshot: Any) -> None:
        super().test_serdes(model, snapshot)


class TestChatACDIntegration(ChatModelIntegrationTests):
    _override_model: str | None = None

    @pytest.fixture(autouse=True)
    def _tiny_override(self, tiny_model_dir) -> None:
        # Per-call `model=` overrides load another local model: the tiny random one.
        type(self)._override_model = str(tiny_model_dir)

    @property
    def chat_model_class(self) -> type[ChatACD]:
        return ChatACD

    @property
    def chat_model_params(self) -> dict[str, Any]:
        # oid: the suite checks LangChain plumbing; the default (gated acd) sends benign prompts
        # to the plain model, whose JSON and tool arguments on this 135M model run past the
        # token budget more often (the gated default is covered in test_chat_acd.py)
        return {"max_tokens": PROSE_TOKENS, "method": "oid"}

    @property
    def supports_json_mode(self) -> bool:
        return True

    @property
    def supports_model_override(self) -> bool:
        return True

    @property
    def model_override_value(self) -> str | None:
        return self._override_model

    @pytest.fixture
    def model(self, request: Any) -> BaseChatModel:
        extra = getattr(request, "param", None) or {}
        budget = _BUDGETS.get(request.node.originalname, PROSE_TOKENS)
        return ChatACD(**{**self.chat_model_params, "max_tokens": budget, **extra})

    @pytest.mark.xfail(
        reason="SmolLM2-135M-Instruct does not choose a tool by itself under "
        "tool_choice='auto' (it answers the weather question in prose); forced tool "
        "choice works (test_tool_calling, test_tool_choice)",
        strict=False,
    )
    @pytest.mark.parametrize("model", [{}, {"output_version": "v1"}], indirect=True)
    def test_agent_loop(self, model: BaseChatModel) -> None:
        super().test_agent_loop(model)
