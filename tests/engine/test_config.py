"""Validation: every bad setting fails with `<field> must be <rule>, got <value>`."""

from __future__ import annotations

import pytest

from acd_engine import ConfigError, DecodingConfig


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"alpha": 1.5}, "alpha must be in [0, 1), got 1.5"),
        ({"alpha": -0.1}, "alpha must be in [0, 1), got -0.1"),
        ({"plausibility": 1.0}, "plausibility must be in [0, 1), got 1.0"),
        ({"max_new_tokens": 0}, "max_new_tokens must be >= 1, got 0"),
        ({"temperature": -1}, "temperature must be >= 0.0, got -1"),
        ({"top_p": 0}, "top_p must be > 0.0, got 0"),
        ({"top_p": 1.5}, "top_p must be <= 1.0, got 1.5"),
        ({"top_k": -3}, "top_k must be >= 0, got -3"),
        ({"repetition_penalty": 0}, "repetition_penalty must be in [0.01, 100.0], got 0"),
        ({"repetition_penalty": 1e-300}, "repetition_penalty must be in [0.01, 100.0], got 1e-300"),
        (
            {"repetition_penalty": 1e9},
            "repetition_penalty must be in [0.01, 100.0], got 1000000000.0",
        ),
        (
            {"repetition_penalty": float("nan")},
            "repetition_penalty must be a finite number, got nan",
        ),
        ({"temperature": 1e-300}, "temperature must be 0 (greedy) or in [0.01, 100.0], got 1e-300"),
        ({"temperature": float("inf")}, "temperature must be a finite number, got inf"),
        ({"temperature": 101}, "temperature must be <= 100.0, got 101"),
        ({"top_p": float("nan")}, "top_p must be a finite number, got nan"),
        ({"alpha": float("nan")}, "alpha must be a finite number, got nan"),
        ({"seed": -1}, "seed must be >= 0, got -1"),
        ({"seed": 2**64}, "seed must be <= 18446744073709551615, got 18446744073709551616"),
        ({"max_new_tokens": 2**40}, "max_new_tokens must be <= 2147483647, got 1099511627776"),
        ({"top_k": 2**40}, "top_k must be <= 2147483647, got 1099511627776"),
        ({"contrast_tokens": 2**40}, "contrast_tokens must be <= 2147483647"),
        (
            {"stop": ["ok", "a\udcff"]},
            "stop must be valid Unicode text (no lone surrogates or undecodable bytes), got "
            "'\\udcff' at position 1 of stop[1]",
        ),
        (
            {"method": "custom", "negative_prompt": "\ud800x"},
            "negative_prompt must be valid Unicode text (no lone surrogates or undecodable "
            "bytes), got '\\ud800' at position 0",
        ),
        ({"contrast_tokens": -1}, "contrast_tokens must be >= 0, got -1"),
        ({"stop": ["ok", ""]}, "stop must not contain empty strings"),
        (
            {"method": "rose"},
            "method must be one of 'plain', 'base', 'nid', 'oid', 'acd' or 'custom', got 'rose'",
        ),
        ({"max_new_tokens": "many"}, "max_new_tokens must be a valid integer"),
    ],
)
def test_bad_values_name_field_rule_and_value(kwargs, message):
    with pytest.raises(ConfigError) as info:
        DecodingConfig(**kwargs)
    assert message in str(info.value)
    assert isinstance(info.value, ValueError)  # callers catching ValueError keep working


def test_unknown_field_suggests_the_right_one():
    with pytest.raises(
        ConfigError, match=r"unknown DecodingConfig setting 'alpah'; did you mean 'alpha'\?"
    ):
        DecodingConfig(alpah=0.3)


def test_custom_needs_negative_prompt_and_others_refuse_prompts():
    with pytest.raises(ConfigError, match="negative_prompt is required when method='custom'"):
        DecodingConfig(method="custom")
    with pytest.raises(ConfigError, match="only used with method='custom', got method='acd'"):
        DecodingConfig(method="acd", negative_prompt="be evil")
    cfg = DecodingConfig(method="custom", negative_prompt="be evil")
    assert cfg.is_contrastive and cfg.positive_prompt is None


def test_replace_validates_and_copies():
    cfg = DecodingConfig()
    assert cfg.replace(alpha=0.3).alpha == 0.3
    assert cfg.alpha == 0.5  # frozen original untouched
    with pytest.raises(ConfigError, match=r"alpha must be in \[0, 1\), got 2"):
        cfg.replace(alpha=2)


def test_stop_accepts_a_single_string_and_effective_alpha():
    assert DecodingConfig(stop="###").stop == ("###",)
    assert DecodingConfig(method="base", alpha=0.4).effective_alpha == 0.0
    assert DecodingConfig(method="oid", alpha=0.4).effective_alpha == 0.4


def test_every_field_is_documented():
    for name, field in DecodingConfig.model_fields.items():
        assert field.description and len(field.description) > 20, name


@pytest.mark.parametrize(
    "kwargs",
    [
        {"temperature": 0.01, "seed": 0},
        {"temperature": 100.0, "seed": 2**64 - 1},
        {"repetition_penalty": 0.01},
        {"repetition_penalty": 100.0},
        {"top_k": 2**31 - 1, "temperature": 1.0},
    ],
)
def test_edge_values_that_are_allowed_decode_without_nan(tiny_engine, kwargs):
    """The ends of every numeric range give a real answer: no NaN, no empty 'stop'."""
    result = tiny_engine.generate("hello", method="oid", max_new_tokens=3, **kwargs)
    assert len(result.token_ids) == 3 and result.finish_reason == "length"


def _settings_classes() -> list[type]:
    """Every Settings subclass the package defines (their modules imported first)."""
    import acd_engine.backends.torch.kernels
    import acd_engine.cli.bench
    import acd_engine.eval.runner
    import acd_engine.training.config
    import acd_engine.training.gate_fit  # noqa: F401
    from acd_engine.config import Settings

    found, todo = [], [Settings]
    while todo:
        for sub in todo.pop().__subclasses__():
            found.append(sub)
            todo.append(sub)
    return found


def _float_fields() -> list[tuple[type, str, str]]:
    """(class, field, shape) for every float-valued setting; shape is ``"scalar"``,
    ``"tuple"`` (a tuple of floats) or ``"pairs"`` (token id -> float, as logit_bias)."""
    out = []
    for cls in _settings_classes():
        for name, field in cls.model_fields.items():
            kind = str(field.annotation)
            if kind.startswith("tuple[float"):
                out.append((cls, name, "tuple"))
            elif kind.startswith("tuple[tuple[int, float]"):
                out.append((cls, name, "pairs"))
            elif "float" in kind and "Literal" not in kind:
                out.append((cls, name, "scalar"))
    return out


def _holding(shape: str, value: float) -> object:
    """A value of a field of ``shape`` that holds ``value`` where its floats go."""
    return {"tuple": (value,), "pairs": {0: value}, "scalar": value}[shape]


def test_the_float_settings_are_found():
    names = {(cls.__name__, name) for cls, name, _ in _float_fields()}
    assert {("TrainConfig", "lr"), ("GateFitConfig", "l2"), ("EvalOptions", "alphas")} <= names
    assert ("DecodingConfig", "gate_threshold") in names and len(names) >= 20
    assert ("DecodingConfig", "logit_bias") in names


@pytest.mark.parametrize("bad", [float("inf"), float("-inf"), float("nan")])
def test_no_float_setting_takes_nan_or_infinity(bad):
    """One rule on the shared base: a range check such as ``lr > 0`` lets ``inf`` through,
    and it then fails after a model loaded (NaN losses); every float setting refuses it."""
    for cls, name, shape in _float_fields():
        with pytest.raises(ConfigError) as info:
            cls(**{name: _holding(shape, bad)})
        # a pairs field names the bad value with its token (its range check refuses it)
        want = (
            f"got {bad} for token 0" if shape == "pairs" else f"must be a finite number, got {bad}"
        )
        assert want in str(info.value), (cls, name)
