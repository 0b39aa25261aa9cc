import pytest
from un0_bench.harness.core.spec import ModelSpec, Param, bind
from un0_bench.harness.errors import SpecError

SCHEMA = {"steps": Param(int, 50, low=1, high=1000), "keep": Param(float, 0.1, low=0, high=1, low_open=True)}


def test_parse_name_and_params():
    s = ModelSpec.parse("un0:keep=0.01,steps=2")
    assert (s.name, s.params, s.text) == ("un0", (("keep", "0.01"), ("steps", "2")), "un0:keep=0.01,steps=2")
    assert bind(s, SCHEMA) == {"steps": 2, "keep": 0.01}


def test_defaults_fill_in():
    assert bind(ModelSpec.parse("sd"), SCHEMA) == {"steps": 50, "keep": 0.1}


@pytest.mark.parametrize(
    "text, message",
    [
        ("sd:steps=0", "steps must be an integer >= 1 and <= 1000"),
        ("sd:steps=x", "steps must be an integer"),
        ("un0:keep=0", "keep must be a number > 0 and <= 1"),
        ("un0:keep=1.5", "out of range"),
        ("un0:keep=nan", "keep must be a number"),
        ("sd:stpes=3", "unknown parameter 'stpes'"),
    ],
)
def test_bad_values_name_the_valid_range(text, message):
    with pytest.raises(SpecError, match=message):
        bind(ModelSpec.parse(text), SCHEMA)


@pytest.mark.parametrize("text", ["", ":steps=1", "sd:steps", "sd:steps=1,steps=2", "sd:=3"])
def test_malformed_specs_are_refused(text):
    with pytest.raises(SpecError):
        ModelSpec.parse(text)


def test_choices_are_checked_and_listed():
    schema = {"scales": Param(str, "dynamic", choices=("static", "dynamic"))}
    assert bind(ModelSpec.parse("int8:scales=static"), schema) == {"scales": "static"}
    assert bind(ModelSpec.parse("int8"), schema) == {"scales": "dynamic"}
    with pytest.raises(SpecError, match=r"int8:scales=fast: scales='fast' is not valid; scales must be one of static, "
                                        r"dynamic"):
        bind(ModelSpec.parse("int8:scales=fast"), schema)
