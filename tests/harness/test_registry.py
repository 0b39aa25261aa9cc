import pytest

from un0_bench.harness.registry import GENERATORS, METERS, Registry, UnknownNameError


def test_lazy_entry_imports_only_when_chosen():
    reg = Registry("thing")
    reg.register("sqrt", "math:sqrt")
    reg.register("broken", "no_such_module_xyz:thing")
    assert reg.names() == ["broken", "sqrt"]  # listing imports nothing
    assert reg.get("sqrt")(9.0) == 3.0
    with pytest.raises(ModuleNotFoundError):
        reg.get("broken")


def test_duplicates_are_refused():
    reg = Registry("thing")
    reg.register("a", "math:sqrt")
    with pytest.raises(ValueError, match="already registered"):
        reg.register("a", "math:floor")


def test_unknown_name_suggests_and_lists():
    with pytest.raises(UnknownNameError) as e:
        GENERATORS.entry("sdd")
    msg = str(e.value)
    assert "Did you mean 'sd'" in msg and "Available:" in msg and "sd" in msg


def test_unknown_meter():
    with pytest.raises(UnknownNameError, match="Did you mean 'rapl'"):
        METERS.entry("rapel")


def test_builtin_meters_registered():
    assert {"wall", "proxy", "rapl", "nvml", "codecarbon"} <= set(METERS.names())


def test_entry_point_plugins_are_loaded(monkeypatch):
    from importlib import metadata

    ep = metadata.EntryPoint(name="my-gen", value="math:sqrt", group="un0_bench.generators")
    monkeypatch.setattr(metadata, "entry_points", lambda group: [ep] if group == "un0_bench.generators" else [])
    reg = Registry("generator", entry_point_group="un0_bench.generators")
    assert reg.get("my-gen")(4.0) == 2.0
