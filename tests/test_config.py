from dataclasses import dataclass, field

import pytest

from easyref.config import flatten, from_dict, to_dict
from easyref.errors import UserError
from easyref.model import CheckpointConfig, ModelConfig


@dataclass(kw_only=True)
class Inner:
    rate: float = 1.0
    names: list[str] = field(default_factory=list)


@dataclass(kw_only=True)
class Outer:
    steps: int = 1
    inner: Inner = field(default_factory=Inner)
    mode: str | None = None


def test_from_dict_fills_nested_dataclasses_and_coerces_ints_to_floats():
    cfg = from_dict(Outer, {"steps": 3, "inner": {"rate": 2, "names": ["a"]}})
    assert cfg.steps == 3 and cfg.inner.rate == 2.0 and isinstance(cfg.inner.rate, float)
    assert cfg.inner.names == ["a"] and cfg.mode is None


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"stepz": 1}, "params.unknown key(s) stepz"),
        ({"steps": "3"}, "params.steps: expected an integer, got '3'"),
        ({"steps": True}, "params.steps: expected an integer"),
        ({"inner": {"rate": "fast"}}, "params.inner.rate: expected a number"),
        ({"inner": {"names": "a"}}, "params.inner.names: expected a list"),
    ],
)
def test_from_dict_names_the_key_path_of_bad_values(data, message):
    with pytest.raises(UserError) as err:
        from_dict(Outer, data, where="params")
    assert message.replace("params.unknown", "params: unknown") in str(err.value)


def test_model_config_validation_reaches_the_user():
    with pytest.raises(UserError, match="insertion_layer must be negative"):
        from_dict(ModelConfig, {"insertion_layer": 2}, where="model")
    with pytest.raises(UserError, match="placeholder"):
        from_dict(ModelConfig, {"instruction": "no caption here"}, where="model")


def test_round_trip_and_flatten():
    record = CheckpointConfig(model=ModelConfig(num_tokens=32), parts=["adapter"])
    again = from_dict(CheckpointConfig, to_dict(record))
    assert again == record
    flat = flatten(to_dict(record))
    assert flat["model.num_tokens"] == 32 and flat["parts"] == ["adapter"]
