"""The per-axis run configuration and the frozen plan pre-flight makes of it."""

from __future__ import annotations

import copy
import dataclasses

import pytest
from un0_bench.harness.errors import UserError
from un0_bench.harness.running.config import ExecutorConfig, ProtocolConfig, RunConfig, axis_fields
from un0_bench.harness.running.results import ResultStore
from un0_bench.harness.running.runner import Runner

from tests.harness.test_runner import config, registries


def test_the_runner_never_changes_its_configuration(tmp_path):
    """Frozen axes: an assignment raises; a run that de-duplicates and adds the reference leaves the config as given."""
    cfg = config(tmp_path, ["mm", "mm"], meters=["wall"], batch_sizes=[2, 2], reference="mm2")
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.sweep.models = ("mm2",)  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.protocol = ProtocolConfig()  # type: ignore[misc]
    given = copy.deepcopy(cfg)
    built: list[str] = []
    runner = Runner(cfg, **registries(built))
    runner.run()
    assert cfg == given and cfg.sweep.models == ("mm", "mm") and cfg.protocol.batch_sizes == (2, 2)
    # What the run measured is the plan's: each model and batch once, the reference added.
    plan = runner.plan
    assert (plan.models, plan.batch_sizes, plan.reference) == (("mm", "mm2"), (2,), "mm2")
    with pytest.raises(dataclasses.FrozenInstanceError):
        plan.models = ()  # type: ignore[misc]
    # Records carry the resolved run configuration, flat as before (the executor is not part of it).
    assert len({str(r["config"]["run"]) for r in ResultStore(tmp_path / "out").load()}) == 1  # every record's
    stored = ResultStore(tmp_path / "out").load()[0]["config"]["run"]
    assert stored["models"] == ["mm", "mm2"] and stored["batch_sizes"] == [2] and stored["reference"] == "mm2"
    assert "executor" not in stored and stored["images"] == 4 and stored["out"] == str(tmp_path / "out")
    assert sorted(built) == ["mm", "mm2"]


def test_every_option_belongs_to_one_axis_with_its_help():
    names = [f.name for _, f in axis_fields()]
    assert len(names) == len(set(names))  # RunConfig.of routes each name to one axis
    assert all(f.metadata["help"] for axis, f in axis_fields() if f.metadata.get("cli", True)
               and f.name != "backbone_options")
    cfg = RunConfig.of(models=["sd"], images=4, pue=1.1, retries=0, executor="ray")
    assert (cfg.protocol.images, cfg.ledger.pue, cfg.executor.retries, cfg.sweep.models) == (4, 1.1, 0, ("sd",))
    with pytest.raises(TypeError, match="unknown run option 'imgaes'"):
        RunConfig.of(imgaes=4)


@pytest.mark.parametrize(("options", "message"), [
    ({"allow_mixed": True}, "--allow-mixed applies to --executor ray only"),
    ({"retries": 5}, "--retries applies to --executor ray only"),
    ({"cell_cpus": 2}, "--cell-cpus applies to --executor ray only"),
])
def test_the_executor_axis_refuses_ray_options_without_ray(options, message):
    with pytest.raises(UserError, match=f"^{message}$"):
        ExecutorConfig(**options).validate()
    ExecutorConfig(executor="ray:10.0.0.1:6379", **options).validate()  # accepted with ray


@pytest.mark.parametrize("options, message", [
    ({"models": "sd"}, "--models must be a list of strings, got 'sd'"),  # not the models "s" and "d"
    ({"models": ["sd"], "meters": "proxy"}, "--meters must be a list of strings, got 'proxy'"),
    ({"models": ["sd"], "images": 4, "batch_sizes": [2.5]}, "--batch-size must be a list of integers, got (2.5,)"),
    ({"models": ["sd"], "images": 4, "batch_sizes": [True]}, "--batch-size must be a list of integers, got (True,)"),
])
def test_a_config_built_in_code_is_checked_like_the_cli(tmp_path, options, message):
    with pytest.raises(UserError) as e:
        RunConfig.of(out=tmp_path / "out", **options).validate()
    assert str(e.value) == message
