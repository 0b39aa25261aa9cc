import pytest
from un0_bench.harness.errors import UserError
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


# --- entries that declare the backbone kinds they support -------------------------------------------
def test_kinds_limit_an_entry_to_some_backbones():
    reg = Registry("thing")
    reg.register("a", "math:sqrt", kinds=("digits",))
    reg.register("any", "math:sqrt")
    a = reg.entry("a")
    assert a.supports("digits") and not a.supports("diffusers")
    assert a.why_not("diffusers") == "it is available on digits only"
    assert not a.is_alias("digits")
    assert reg.entry("any").supports("digits") and reg.entry("any").supports("whatever")
    assert reg.get("a", "digits")(9.0) == 3.0
    with pytest.raises(UserError, match="a is not available on diffusers backbones: it is available on digits only"):
        reg.get("a", "diffusers")
    assert reg.get("a")(4.0) == 2.0  # no kind: the single target


def test_a_target_per_kind_is_chosen_by_kind():
    from un0_bench.harness.errors import UserError

    reg = Registry("thing")
    reg.register("b", {"digits": "math:sqrt", "other": "math:floor"})
    b = reg.entry("b")
    assert b.supports("digits") and b.supports("other") and not b.supports("diffusers")
    assert reg.get("b", "digits")(9.0) == 3.0 and reg.get("b", "other")(2.5) == 2
    assert b.why_not("diffusers") == "it is available on digits, other only"
    with pytest.raises(UserError, match="b is not available on diffusers backbones: it is available on digits"):
        reg.get("b", "diffusers")


def test_unsupported_kinds_carry_their_reason():
    reg = Registry("thing")
    reg.register("c", "math:sqrt", unsupported={"diffusers": "needs a training run on the pipeline's data"})
    c = reg.entry("c")
    assert c.supports("digits") and not c.supports("diffusers")  # kinds=None: every kind but the unsupported
    assert c.why_not("diffusers") == "needs a training run on the pipeline's data"
    # The reason wins over a target that would otherwise serve the kind.
    reg.register("c2", {"diffusers": "math:sqrt"}, unsupported={"diffusers": "switched off"})
    assert not reg.entry("c2").supports("diffusers") and reg.entry("c2").why_not("diffusers") == "switched off"


def test_alias_stands_for_a_stack_on_some_kinds():
    reg = Registry("thing")
    reg.register("d", None, "an alias only", alias={"digits": "sd+int8:scales=static"})
    d = reg.entry("d")
    assert d.supports("digits") and d.is_alias("digits") and d.alias["digits"] == "sd+int8:scales=static"
    assert not d.supports("diffusers") and not d.is_alias("diffusers")
    assert d.why_not("diffusers") == "it is available on digits only"
    with pytest.raises(ValueError, match="d is an alias and has no target of its own"):
        reg.get("d", "digits")
    # A target on one kind and an alias on another (un0: a trained generator on digits, a stack on pipelines).
    reg.register("u", {"digits": "math:sqrt"}, alias={"diffusers": "sd+contextual"})
    u = reg.entry("u")
    assert u.supports("digits") and not u.is_alias("digits") and reg.get("u", "digits")(4.0) == 2.0
    assert u.supports("diffusers") and u.is_alias("diffusers")
    assert u.why_not("tiny") == "it is available on diffusers, digits only"


def test_register_refuses_entries_without_target_or_alias_and_bad_lazy_targets():
    reg = Registry("thing")
    with pytest.raises(ValueError, match="give a target, an alias, or both"):
        reg.register("e", None)
    with pytest.raises(ValueError, match="lazy target must be 'module:attr'"):
        reg.register("f", {"digits": "math.sqrt"})
    with pytest.raises(ValueError, match="lazy target must be 'module:attr'"):
        reg.register("g", "math.sqrt")
    assert reg.names() == []


def test_builtin_generators_declare_their_kinds():
    assert GENERATORS.entry("sd-int8").alias == {"digits": "sd+int8:scales=static", "diffusers": "sd+int8",
                                                 "arch": "sd+int8"}
    un0, osc = GENERATORS.entry("un0"), GENERATORS.entry("un0-osc")
    assert un0.supports("digits") and not un0.is_alias("digits") and un0.alias == {"diffusers": "sd+contextual"}
    assert osc.supports("digits") and not osc.supports("diffusers")
    assert "pretrained pipeline" in osc.why_not("diffusers")
    assert osc.supports("arch") and not un0.supports("arch") and "no weights" in un0.why_not("arch")
    assert "sd" in GENERATORS and "int8" not in GENERATORS  # techniques live in their own registry


# --- typed registries, and meters and backbones from entry points ---------------------------------------------
def _from_entry_points(monkeypatch, registry, **values):
    """A fresh registry configured as ``registry`` (kind, base, group), whose group offers ``values``."""
    from importlib import metadata

    group = registry.entry_point_group
    eps = [metadata.EntryPoint(name=n, value=v, group=group) for n, v in values.items()]
    monkeypatch.setattr(metadata, "entry_points", lambda group: eps if group == registry.entry_point_group else [])
    return Registry(registry.kind, registry.base, entry_point_group=group)


def test_meters_and_backbones_come_from_entry_points_and_are_checked(monkeypatch):
    from un0_bench.backbones.digits import DigitsBackbone
    from un0_bench.harness.meters.wall import WallMeter
    from un0_bench.harness.registry import BACKBONES, EntryTypeError

    meters = _from_entry_points(monkeypatch, METERS, **{"my-meter": "un0_bench.harness.meters.wall:WallMeter",
                                                        "bad-meter": "math:sqrt"})
    assert meters.entry_point_group == "un0_bench.meters"
    assert meters.get("my-meter") is WallMeter
    with pytest.raises(EntryTypeError) as e:
        meters.get("bad-meter")
    assert str(e.value) == ("meter 'bad-meter' (math:sqrt) is <built-in function sqrt>, not a subclass of "
                            "un0_bench.harness.meters.base:Meter")
    backbones = _from_entry_points(monkeypatch, BACKBONES, **{"my-bb": "un0_bench.backbones.digits:DigitsBackbone",
                                                              "a-meter": "un0_bench.harness.meters.wall:WallMeter"})
    assert backbones.entry_point_group == "un0_bench.backbones"
    assert backbones.get("my-bb") is DigitsBackbone
    wanted = "backbone 'a-meter' .* not a subclass of un0_bench.harness.core.backbone:"
    with pytest.raises(EntryTypeError, match=wanted):
        backbones.get("a-meter")


def test_objects_are_checked_at_registration():
    from un0_bench.harness.meters.wall import WallMeter
    from un0_bench.harness.registry import EntryTypeError

    typed = Registry("meter", "un0_bench.harness.meters.base:Meter")
    typed.register("wall", WallMeter)
    assert typed.get("wall") is WallMeter
    with pytest.raises(EntryTypeError, match=r"^meter 'clock' is <class 'int'>, not a subclass of "):
        typed.register("clock", int)
    assert typed.names() == ["wall"]
