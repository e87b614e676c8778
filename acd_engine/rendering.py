"""Chat templates -> token ids: the only place a chat template is rendered.

A request is rendered once with a sentinel in the system-prompt slot; the text is split
there into a head and a tail that every branch shares token for token, and each branch
fills the slot with its own content (nothing, a manual prompt, or soft-prompt embeddings;
see :mod:`acd_engine.backends.torch.rows`). User text is data: text that spells a control token is kept
out of the template through a placeholder and tokenized as plain text, so no user can forge
a turn or reach the system slot.
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from acd_engine.config import check_text
from acd_engine.errors import MessagesError

__all__ = ["ROLES", "Messages", "Rendered", "Renderer", "normalise_messages", "template_kwargs"]

Messages = str | Sequence[dict[str, Any]]
ROLES = ("system", "user", "assistant", "tool")
# Markers placed in the rendered template text. A random part chosen per process means no
# user text can collide with them (a fixed marker typed by a user broke rendering).
_NONCE = secrets.token_hex(8)
_SENTINEL = f"@@ACD_SLOT_{_NONCE}@@"  # the system-prompt slot where branch prompts go
_PLACEHOLDER = f"@@ACD_TEXT_{_NONCE}_"  # + index + "@@": message text kept out of the template


@dataclass
class Rendered:
    """A request split around the system-prompt slot (token ids, shared by all branches).

    ``user_span`` is ``(start, stop)``: where the latest user message's own text lies in
    ``plain`` (None when there is no user message or it renders to no token). The safety
    gate reads the request there, in the context of the whole conversation, rather than
    averaging over a caller's system prompt, earlier turns and retrieved context.

    ``alone`` is the latest user message rendered by itself (same template arguments), when
    the conversation holds more than that: a request the gate flags is decoded on it
    (:func:`acd_engine.safety.gate.decoded_rendering`).
    """

    head: list[int]
    tail: list[int]
    plain: list[int] | None  # the template rendered untouched, for method 'plain'
    user_span: tuple[int, int] | None = None
    alone: Rendered | None = None


def _common_start(a: Sequence[int], b: Sequence[int]) -> int:
    """How many leading ids ``a`` and ``b`` share."""
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def _fold_into(messages: list[dict[str, str]], index: int, text: str) -> list[dict[str, str]]:
    """``messages`` with ``text`` (a system prompt) put at the start of message ``index``
    (a user message): where a template without a system role gets one."""
    out = [dict(m) for m in messages]
    own = out[index]["content"]
    out[index]["content"] = text + ("\n\n" + own if own else "")
    return out


def normalise_messages(messages: Messages) -> list[dict[str, str]]:
    """Checked copies of ``messages`` (a user string becomes one user turn)."""
    if isinstance(messages, str):
        messages = [{"role": "user", "content": messages}]
    if not isinstance(messages, Sequence) or len(messages) == 0:
        raise MessagesError(
            "messages must be a non-empty list of {'role', 'content'} dicts or a string, got "
            f"{messages!r}"
        )
    out: list[dict[str, str]] = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise MessagesError(
                f"messages[{i}] must be a dict with 'role' and 'content', got {m!r}"
            )
        if m["role"] not in ROLES:
            raise MessagesError(
                f"messages[{i}].role must be one of {', '.join(ROLES)}, got {m['role']!r}"
            )
        if not isinstance(m["content"], str):
            raise MessagesError(
                f"messages[{i}].content must be a string, got {type(m['content']).__name__}"
            )
        check_text(m["content"], f"messages[{i}].content", MessagesError)
        out.append({**m})
    return out


def template_kwargs(tools: Sequence[dict[str, Any]] | None) -> dict[str, Any]:
    """The chat template's extra arguments for a call's tools."""
    return {"tools": list(tools)} if tools else {}


def _control_pattern(tokenizer: Any, *, special_only: bool = False) -> re.Pattern[str] | None:
    """Matches any string the tokenizer turns into an added (control) token, longest first;
    with ``special_only``, only those of added tokens not marked special (Qwen 2.5's
    ``<tool_call>``, Phi-3's ``</s>``), which ``split_special_tokens`` leaves whole."""
    added = getattr(tokenizer, "added_tokens_decoder", None) or {}
    words = sorted(
        {
            t.content
            for t in added.values()
            if t.content and not (special_only and getattr(t, "special", True))
        },
        key=len,
        reverse=True,
    )
    return re.compile("|".join(map(re.escape, words))) if words else None


class Renderer:
    """Renders conversations with one tokenizer's chat template.

    Args:
        tokenizer: The model's tokenizer (with its chat template).
        model_name: For error messages.
    """

    def __init__(self, tokenizer: Any, model_name: str) -> None:
        self.tokenizer = tokenizer
        self.model_name = model_name
        self.control = _control_pattern(tokenizer)  # see encode_data
        self.unsplit = _control_pattern(tokenizer, special_only=True)
        self.constants: dict[str, list[int]] = {}  # see template_constant

    # ------------------------------------------------------------------ text -> ids
    def encode_template(self, text: str) -> list[int]:
        """Template text: control-token strings in it become control tokens."""
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def has_control(self, text: str) -> bool:
        """Whether ``text`` spells any control token."""
        return self.control is not None and self.control.search(text) is not None

    def encode_data(self, text: str) -> list[int]:
        """Token ids of user text as data: ``<|im_end|>`` typed by a user stays plain text.

        Text without any control-token string takes the ordinary path, so its tokens are the
        ones the model was trained on; only text that spells a control token is tokenized
        with special tokens split into ordinary pieces. An added token not marked special
        (Qwen 2.5's ``<tool_call>``) is not split that way, so its text is cut after its
        first character and each side encoded as data.
        """
        if not self.has_control(text):
            return self.encode_template(text)
        if self.unsplit is None:
            return self._split_special(text)
        ids: list[int] = []
        done = 0
        for match in self.unsplit.finditer(text):
            word = match.group()
            ids += self._split_special(text[done : match.start()])
            ids += self._split_special(word[:1]) + self.encode_data(word[1:])
            done = match.end()
        return ids + self._split_special(text[done:])

    def _split_special(self, text: str) -> list[int]:
        return list(
            self.tokenizer.encode(text, add_special_tokens=False, split_special_tokens=True)
        )

    def _protect(self, text: str, fills: dict[str, str]) -> str:
        """``text`` itself, or a placeholder (remembered in ``fills``) if it spells a control
        token, so the template renders around it and :meth:`_encode_rendered` encodes it as
        data."""
        if not self.has_control(text):
            return text
        key = f"{_PLACEHOLDER}{len(fills)}@@"
        fills[key] = text
        return key

    def _encode_rendered(self, text: str, fills: dict[str, str]) -> list[int]:
        """Template text with placeholders: the template's own parts as template text (its
        control tokens stay control tokens), each placeholder's user text as data."""
        if not fills:
            return self.encode_template(text)
        ids: list[int] = []
        for piece in re.split("(" + "|".join(map(re.escape, fills)) + ")", text):
            if piece in fills:
                ids += self.encode_data(fills[piece])
            elif piece:
                ids += self.encode_template(piece)
        return ids

    # ------------------------------------------------------------------ the template
    def _template(self, messages: list[dict[str, str]], **kwargs: Any) -> str:
        if not getattr(self.tokenizer, "chat_template", None):
            raise MessagesError(
                f"model {self.model_name} has no chat template; use a chat/instruct model"
            )
        text = self.tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True, **kwargs
        )
        return str(text)

    def _template_or_error(self, messages: list[dict[str, str]], kwargs: dict[str, Any]) -> str:
        """:meth:`_template`, with the template's own errors (role order, say) as input errors."""
        try:
            return self._template(messages, **kwargs)
        except MessagesError:
            raise
        except Exception as exc:  # jinja's TemplateError and whatever a template raises  # noqa: BLE001
            raise MessagesError(
                f"messages must be accepted by the chat template of {self.model_name}, got an "
                f"error from it: {exc}"
            ) from None

    def render(self, messages: Messages, **template_kwargs: Any) -> Rendered:
        """Render once; split around the system-prompt slot so every branch shares the rest.

        The slot is where the template puts a system message, and the user's own system
        message is kept there, after the branch prompt. A template that refuses a system
        role (Gemma's; Mistral's first instruct template) or drops it (Mistral v0.3's when
        the conversation does not end with a user turn) gets the slot, and the user's own
        system message, at the start of the first user message; ``plain`` then holds the
        user's system message there too, so every method reads the same conversation.
        Message text is data: text that spells a control token (``<|im_start|>system``) is
        rendered through a placeholder and tokenized as plain text, so no user can forge a
        turn.
        """
        msgs = normalise_messages(messages)
        fills: dict[str, str] = {}
        safe = [{**m, "content": self._protect(m["content"], fills)} for m in msgs]
        user_system = safe[0]["content"] if safe[0]["role"] == "system" else None
        rest = safe[1:] if user_system is not None else safe
        slot = _SENTINEL + ("\n\n" + user_system if user_system else "")
        error: Exception | None = None
        try:
            text = self._template([{"role": "system", "content": slot}, *rest], **template_kwargs)
        except MessagesError:
            raise
        except Exception as exc:  # jinja raises anything; a template without a system role  # noqa: BLE001
            error = exc
        fold = error is not None or _SENTINEL not in text  # refused, or dropped the message
        if fold:
            first = next((i for i, m in enumerate(rest) if m["role"] == "user"), None)
            if first is None:
                why = f"got an error from it: {error}" if error else "it dropped the system slot"
                raise MessagesError(
                    f"messages must be accepted by the chat template of {self.model_name}, {why}"
                ) from None
            text = self._template_or_error(_fold_into(rest, first, slot), template_kwargs)
        if text.count(_SENTINEL) != 1:
            raise MessagesError(
                "chat template dropped the system prompt slot; cannot place branches"
            )
        head, tail = text.split(_SENTINEL)
        plain = self._encode_rendered(self._plain_text(safe, fold, template_kwargs), fills)
        users = [m for m in msgs if m["role"] == "user"]
        alone = None
        if users and len(msgs) > 1:
            alone = self.render(
                [{"role": "user", "content": users[-1]["content"]}], **template_kwargs
            )
        return Rendered(
            self._encode_rendered(head, fills),
            self._encode_rendered(tail, fills),
            plain,
            self._user_span(safe, plain, fills, template_kwargs, fold),
            alone,
        )

    def _plain_text(
        self, safe: list[dict[str, str]], fold: bool, template_kwargs: dict[str, Any]
    ) -> str:
        """The template rendered on the conversation as sent; with ``fold`` (a template that
        has no place for a system message), the user's own system message goes to the start
        of the first user message, where the branch renderings put it."""
        if fold and safe[0]["role"] == "system":
            first = next(i for i, m in enumerate(safe) if m["role"] == "user")
            safe = _fold_into(safe[1:], first - 1, safe[0]["content"])
        return self._template_or_error(safe, template_kwargs)

    def _user_span(
        self,
        safe: list[dict[str, str]],
        plain: list[int],
        fills: dict[str, str],
        template_kwargs: dict[str, Any],
        fold: bool = False,
    ) -> tuple[int, int] | None:
        """Where the latest user message's text lies in ``plain``: the ids that differ from
        the same conversation rendered with that message emptied (their common start and
        end are the template and the other messages). Found from ids, not characters, so
        it holds for any template and tokenizer; a token merged across the boundary only
        moves the edge by one. With ``fold``, a system message folded into that message
        stays (only the message's own text is emptied), so the span never covers it."""
        last = next((i for i in range(len(safe) - 1, -1, -1) if safe[i]["role"] == "user"), None)
        if last is None:
            return None
        emptied = [dict(m) for m in safe]
        emptied[last]["content"] = ""
        other = self._encode_rendered(self._plain_text(emptied, fold, template_kwargs), fills)
        start = _common_start(plain, other)
        # the common end, never reaching back into the common start of either
        stop = len(plain) - _common_start(plain[start:][::-1], other[start:][::-1])
        return (start, stop) if stop > start else None

    def template_constant(
        self, part: Literal["tail", "plain"], template_kwargs: dict[str, Any]
    ) -> list[int]:
        """The template tokens every ``part`` starts with, when the chat opens with a user turn.

        ``tail``: what follows the system slot, ``<|im_end|>\\n<|im_start|>user\\n`` for
        ChatML. ``plain``: the untouched template's start, e.g. SmolLM2's default system
        prompt and the user header. Both are the same for every request without a system
        message of its own, so their KV is cached (with the branch prefix, or alone for
        method ``plain``) and prefill skips them. Found once by rendering two different
        one-word chats and keeping their common start. A request that does not start with
        exactly these ids (a system message of its own, or a tokenizer that merged the last
        one with the user's text) keeps its whole sequence.
        """
        if template_kwargs:  # tools change the template text; not worth a cache entry each
            return []
        if part not in self.constants:
            try:
                first, second = (getattr(self.render(w), part) or [] for w in ("Hi", "Why"))
            except MessagesError:  # a template that cannot place the slot: nothing shared
                first, second = [], []
            self.constants[part] = first[: _common_start(first, second)]
        return self.constants[part]
