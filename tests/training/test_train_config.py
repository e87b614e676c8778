"""TrainConfig validation messages follow the package style."""

from __future__ import annotations

import pytest

from acd_engine.errors import ConfigError
from acd_engine.training.config import TrainConfig


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("lr", -1, "lr must be > 0, got -1"),
        ("lr", float("inf"), "lr must be a finite number, got inf"),
        ("grad_clip", float("nan"), "grad_clip must be a finite number, got nan"),
        ("epochs", 0, "epochs must be >= 1, got 0"),
        ("val_alpha", 1.5, "val_alpha must be in [0, 1), got 1.5"),
        ("init", "random", "init must be one of 'manual' or 'short', got 'random'"),
    ],
)
def test_bad_values_name_the_field_and_the_rule(field, value, message):
    with pytest.raises(ConfigError) as info:
        TrainConfig(**{field: value})
    assert message in str(info.value)


def test_unknown_setting_suggests_the_close_one():
    with pytest.raises(ConfigError, match="did you mean 'epochs'"):
        TrainConfig(epoch=3)


def test_sources_accept_a_comma_string_and_refuse_repeats():
    assert TrainConfig(sources="safe,none").sources == ("safe", "none")
    with pytest.raises(ConfigError, match="distinct"):
        TrainConfig(sources=["safe", "safe"])
