"""The shared adapter parameter table: complete, validated, phrased in the adapter's names."""

from __future__ import annotations

import pytest

from acd_engine import ConfigError, DecodingConfig
from acd_integrations._params import (
    DECODING_PARAMS,
    ENGINE_PARAMS,
    PARAM_TO_FIELD,
    build_config,
    param_default,
    param_description,
    split_kwargs,
    to_config_kwargs,
)


def test_every_decoding_field_is_reachable_exactly_once():
    """Drift test: a new DecodingConfig field must get a row in the table."""
    fields = [p.field for p in DECODING_PARAMS]
    assert sorted(fields) == sorted(DecodingConfig.model_fields)
    assert len(set(fields)) == len(fields)
    assert len({p.name for p in DECODING_PARAMS}) == len(DECODING_PARAMS)
    assert not set(PARAM_TO_FIELD) & set(ENGINE_PARAMS)


def test_adapter_names_follow_the_ecosystem():
    assert PARAM_TO_FIELD["max_tokens"] == "max_new_tokens"
    assert "max_new_tokens" not in PARAM_TO_FIELD  # one name per knob


def test_defaults_and_descriptions_come_from_the_engine():
    for p in DECODING_PARAMS:
        default = DecodingConfig.model_fields[p.field].default
        shown = dict(default) if p.name == "logit_bias" else default
        assert param_default(p.name) == (list(shown) if isinstance(shown, tuple) else shown)
        assert param_description(p.name) == DecodingConfig.model_fields[p.field].description
    assert param_default("stop") == []
    assert param_default("logit_bias") == {}  # a mapping for adapters, pairs in the engine


def test_build_config_maps_and_validates():
    cfg = build_config({"max_tokens": 7, "alpha": 0.3, "stop": ["x"], "method": "oid"})
    assert (cfg.max_new_tokens, cfg.alpha, cfg.stop, cfg.method) == (7, 0.3, ("x",), "oid")
    assert build_config({"alpha": 0.1}, base=cfg).max_new_tokens == 7  # on top of base


def test_none_means_unset_except_where_none_is_a_value():
    assert to_config_kwargs({"temperature": None, "stop": None}) == {}
    assert to_config_kwargs({"seed": None, "contrast_tokens": None}) == {
        "seed": None,
        "contrast_tokens": None,
    }
    base = DecodingConfig(seed=3)
    assert build_config({"seed": None}, base=base).seed is None


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"max_tokens": 0}, "max_tokens must be >= 1, got 0"),
        ({"alpha": 1.5}, r"alpha must be in \[0, 1\), got 1.5"),
        ({"method": "acdd"}, "method must be one of"),
        (
            {"method": "custom"},
            "negative_prompt is required when method='custom'",
        ),
    ],
)
def test_errors_are_the_engines_with_adapter_names(values, message):
    with pytest.raises(ConfigError, match=message) as info:
        build_config(values, owner="ChatACD")
    assert "max_new_tokens" not in str(info.value)


def test_unknown_keyword_suggests_the_close_one():
    with pytest.raises(ConfigError, match="unknown ChatACD setting 'alpah'; did you mean 'alpha'"):
        build_config({"alpah": 0.2}, owner="ChatACD")


def test_split_kwargs_separates_decoding_from_framework_keywords():
    decoding, rest = split_kwargs({"alpha": 0.2, "tools": [], "max_tokens": 3})
    assert decoding == {"alpha": 0.2, "max_tokens": 3}
    assert rest == {"tools": []}


def test_langchain_adapter_exposes_every_table_row():
    pytest.importorskip("langchain_core")
    from acd_integrations.langchain import ChatACD

    for p in DECODING_PARAMS:
        assert p.name in ChatACD.model_fields, p.name
        assert ChatACD.model_fields[p.name].description == param_description(p.name)
    for name in ENGINE_PARAMS:
        assert name in ChatACD.model_fields
