"""The Ray executor on a local 2-CPU cluster started here: same records, isolation, faults, resume.

Workers import this module (cloudpickle sends its classes by reference), so the generators and
meters below are module-level; each logs its builds to a file so a test counts attempts exactly.
"""

from __future__ import annotations

import dataclasses
import os
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from un0_bench.harness.core.generator import GenerationRequest, GenerationResult, Generator, image_noise
from un0_bench.harness.errors import UserError
from un0_bench.harness.meters.base import Meter, Reading
from un0_bench.harness.registry import Registry
from un0_bench.harness.running.results import ResultStore
from un0_bench.harness.running.runner import RunConfig, Runner, RunPlan

from tests.harness.test_runner import TinyBackbone

ray = pytest.importorskip("ray")
from un0_bench.harness.executors.ray import (  # noqa: E402
    DEVICE_RESOURCE,
    WEIGHTS_UNREADABLE,
    RayExecutor,
    differences,
    fingerprint,
    mixed_message,
    unreadable,
)


@pytest.fixture(scope="module")
def cluster():
    ray.init(num_cpus=2, include_dashboard=False, resources={DEVICE_RESOURCE: 1}, logging_level="WARNING")
    yield
    ray.shutdown()


class Sleepy(Generator):
    """Sleeps ``pause_s`` per call (so windows last long enough to overlap), then one (B, 16) @ (16, 16) matmul."""

    def __init__(self, pause_s: float, mode: str = "ok") -> None:
        self.pause_s, self.mode = pause_s, mode

    def generate(self, request: GenerationRequest) -> GenerationResult:
        if self.mode == "exit":
            os._exit(1)  # the worker process dies mid-cell, as an OOM kill would
        if self.mode == "raise":
            raise ValueError("the generator's own error")
        time.sleep(self.pause_s)
        z = image_noise(request.seed, 0, len(request.prompts), (16,))  # (B, 16)
        return GenerationResult(images=torch.sigmoid(z @ torch.eye(16)).reshape(-1, 1, 4, 4), prompts=request.prompts)

    def describe(self) -> dict[str, Any]:
        return {"technique": "sleepy", "mode": self.mode}


class DeviceClock(Meter):
    """A fake whole-device meter: 10 W of a shared device for as long as its window is open."""

    name = "device"
    sees_whole_device = True

    def _start(self) -> None:
        self._t0 = time.perf_counter()

    def _stop(self) -> Reading:
        d = time.perf_counter() - self._t0
        return Reading(meter=self.name, duration_s=d, energy_j={"package-0": 10.0 * d})


def _build(log: str, name: str, pause_s: float, mode: str = "ok"):
    def factory(backbone):
        with open(log, "a") as f:  # one line per build: per attempt of the cell
            f.write(name + "\n")
        return Sleepy(pause_s, mode)

    factory.params = {}
    return factory


def registries(log: Path, modes: dict[str, str] | None = None, pause_s: float = 0.05) -> dict[str, Registry]:
    gens = Registry("generator")
    for name in ("a", "b", "c", "d", "boom", "bad"):
        mode = (modes or {}).get(name, {"boom": "exit", "bad": "raise"}.get(name, "ok"))
        gens.register(name, _build(str(log), name, pause_s, mode))
    meters = Registry("meter")
    meters.register("wall", "un0_bench.harness.meters.wall:WallMeter")
    meters.register("proxy", "un0_bench.harness.meters.proxy:ProxyMeter")
    meters.register("device", DeviceClock)
    backbones = Registry("backbone")
    backbones.register("tiny", TinyBackbone)
    return {"generators": gens, "meters": meters, "backbones": backbones}


def tiny_config(out: Path, models: list[str], meters: list[str], **kw: Any) -> RunConfig:
    base = dict(models=models, out=out, backbone="tiny", meters=meters, images=2, batch_sizes=[2], min_repeats=3,
                max_repeats=3, min_duration_s=0.0, idle_s=0.0, quality_samples=0, reference=models[0])
    return RunConfig.of(**{**base, **kw})


def plan_of(cfg: RunConfig) -> RunPlan:
    """A plan of ``cfg`` as given, without pre-flight (what an executor's own checks see)."""
    return RunPlan(config=cfg, models=cfg.sweep.models, batch_sizes=cfg.protocol.batches(),
                   reference=cfg.sweep.reference, meter_specs=tuple((m, m) for m in cfg.sweep.meters), stacks=())


def builds(log: Path) -> list[str]:
    return log.read_text().split() if log.exists() else []


#: Fields that say where and when a cell ran, or how long it took; everything else must be equal.
WHERE_AND_WHEN = {"executor", "node", "host", "environment", "measured_at", "windows_span_s", "device_shared_with",
                  "duration_s_per_image", "duration_ci95_s", "meter_duration_s_per_image", "meter_details", "phases",
                  # the protocol's timing (issue 11): window lengths, host load, warm-up until steady
                  # (its call count, and so un0's cache hits, depend on the clock)
                  "window_s", "windows", "windows_device_shared", "idle_added_s", "warmup", "cache"}


def test_ray_records_equal_the_local_records(cluster, tmp_path):
    # The grid on the digits backbone (4 models: 4 cells), proxy and wall.
    models = ["sd:steps=2", "sd:steps=3", "un0", "sd-int8:steps=2"]

    def cfg(out):
        return RunConfig.of(models=list(models), out=out, meters=["proxy", "wall"], images=2, batch_sizes=[2],
                         min_repeats=2, max_repeats=2, min_duration_s=0.0, idle_s=0.0, quality_samples=0,
                         reference="sd:steps=2")

    Runner(cfg(tmp_path / "local")).run()
    Runner(cfg(tmp_path / "ray"), executor=RayExecutor()).run()
    local = {(r["model"], r["batch_size"], r["meter"]): r for r in ResultStore(tmp_path / "local").load()}
    remote = {(r["model"], r["batch_size"], r["meter"]): r for r in ResultStore(tmp_path / "ray").load()}
    assert len(local) == 8 and local.keys() == remote.keys()
    for key, mine in local.items():
        theirs = remote[key]
        assert mine.keys() == theirs.keys(), key  # same schema
        assert theirs["executor"] == "ray" and mine["executor"] == "local"
        assert theirs["node"] == ray.get_runtime_context().get_node_id() and theirs["device"] == "cpu"
        # Proxy joules and FLOPs bit-identical; every other figure and the configuration equal too.
        assert theirs["energy_j_per_image"] == mine["energy_j_per_image"]
        assert theirs["flops_per_image"] == mine["flops_per_image"] and theirs["flops_per_image"] > 0
        theirs_run = {**theirs["config"]["run"], "out": None}
        assert theirs_run == {**mine["config"]["run"], "out": None}
        same = {k for k in mine if k not in WHERE_AND_WHEN | {"config"}}
        assert {k: theirs[k] for k in same} == {k: mine[k] for k in same}, key
    # The driver wrote the sample grids (the workers wrote nothing) and they are the same images.
    for model in ("un0", "sd_steps_2-"):
        [grid] = [p for p in (tmp_path / "local" / "samples").iterdir() if p.name.startswith(model)]
        assert (tmp_path / "ray" / "samples" / grid.name).read_bytes() == grid.read_bytes()


def _overlaps(records: list[dict[str, Any]]) -> list[tuple[str, str]]:
    spans = {(r["model"], r["batch_size"]): (r["node"], *r["windows_span_s"]) for r in records}
    out = []
    for a, (node_a, from_a, to_a) in spans.items():
        for b, (node_b, from_b, to_b) in spans.items():
            if a < b and node_a == node_b and from_a < to_b and from_b < to_a:
                out.append((a, b))
    return out


def test_whole_device_cells_never_share_a_node_and_shared_ones_do(cluster, tmp_path):
    log = tmp_path / "builds"
    regs = registries(log, pause_s=0.1)
    # Four cells with a whole-device meter on 2 CPUs: Ray could run two at once, the device resource must not.
    Runner(tiny_config(tmp_path / "whole", ["a", "b", "c", "d"], ["device", "wall"]), **regs,
           executor=RayExecutor()).run()
    whole = ResultStore(tmp_path / "whole").load()
    assert len(whole) == 8 and all(r["status"] == "ok" for r in whole)
    assert _overlaps(whole) == []
    assert all(r["device_shared_with"] == [] for r in whole)
    # Each window: 10 W x its own duration, so 10 J/s of window per image count: 10 x duration / 2 images.
    device = [r for r in whole if r["meter"] == "device"]
    assert all(r["energy_j_per_image"] == pytest.approx(10 * r["meter_duration_s_per_image"]) for r in device)
    # The same cells metered by wall alone may share: two run at once, and their records say with whom.
    Runner(tiny_config(tmp_path / "shared", ["a", "b", "c", "d"], ["wall"]), **regs, executor=RayExecutor()).run()
    shared = ResultStore(tmp_path / "shared").load()
    overlapping = _overlaps(shared)
    assert overlapping, "with 2 CPUs and shared cells, some windows ran side by side"
    by_cell = {(r["model"], r["batch_size"]): r for r in shared}
    for a, b in overlapping:
        assert f"{b[0]} (batch {b[1]})" in by_cell[a]["device_shared_with"]


def test_a_killed_worker_is_retried_then_recorded_failed_and_an_error_is_not_retried(cluster, tmp_path):
    log = tmp_path / "builds"
    cfg = tiny_config(tmp_path / "out", ["a", "boom", "bad", "b"], ["wall"])
    notes: list[str] = []
    runner = Runner(cfg, **registries(log), on_event=lambda k, i: notes.append(i["text"]) if k == "note" else None,
                    executor=RayExecutor(retries=2))
    runner.run()
    records = {r["model"]: r for r in ResultStore(cfg.output.out).load()}
    assert records["a"]["status"] == "ok" and records["b"]["status"] == "ok"  # the other cells completed
    # boom's worker exits on its first call: 1 try + 2 retries, then failed with the reason.
    assert builds(log).count("boom") == 3
    assert records["boom"]["status"].startswith("failed: worker lost 3 times (nodes ")
    assert "WorkerCrashedError" in records["boom"]["status"]
    assert sum("boom (batch 2): worker lost" in n for n in notes) == 2
    # bad raises in the generator: recorded at once, never retried.
    assert builds(log).count("bad") == 1
    assert records["bad"]["status"] == ("failed: error in the cell on node "
                                        f"{ray.get_runtime_context().get_node_id()[:12]}: ValueError: the "
                                        "generator's own error")
    # The report lists them; a rerun measures them again (a failed cell is not a finished one).
    from un0_bench.reports.tables import failed_cells

    failed = failed_cells(ResultStore(cfg.output.out).load())
    assert sorted((f["model"], f["meters"]) for f in failed) == [("bad", ["wall"]), ("boom", ["wall"])]
    assert [(m, bs) for m, bs, _ in Runner(cfg, **registries(log)).pending()] == [("boom", 2), ("bad", 2)]


def test_driver_interrupt_keeps_finished_cells_and_resume_measures_none_twice(cluster, tmp_path):
    log = tmp_path / "builds"
    cfg = tiny_config(tmp_path / "out", ["a", "b", "c", "d"], ["wall", "proxy"], batch_sizes=[1, 2])

    def interrupt(kind: str, info: dict[str, Any]) -> None:
        if kind == "done":
            raise KeyboardInterrupt  # Ctrl-C at the driver, right after the first cell was written

    with pytest.raises(KeyboardInterrupt):
        Runner(cfg, **registries(log), on_event=interrupt, executor=RayExecutor()).run()
    kept = ResultStore(cfg.output.out).load()
    assert len(kept) == 2  # the finished cell's two records
    first = (kept[0]["model"], kept[0]["batch_size"])
    assert not (cfg.output.out / ".lock").exists()
    before = len(builds(log))
    Runner(cfg, **registries(log), executor=RayExecutor()).run()
    records = ResultStore(cfg.output.out).load()
    keys = [(r["model"], r["batch_size"], r["meter"]) for r in records]
    assert len(keys) == 16 and len(set(keys)) == 16  # every cell once, none twice
    assert len(builds(log)) - before == 7  # the finished cell was not measured again
    assert first not in [(r["model"], r["batch_size"]) for r in records[2:]]


def test_a_weights_file_no_node_can_open_is_named_even_when_all_nodes_agree(tmp_path):
    """Every node lacks un0's file: the fingerprints agree, yet the sweep must not start."""
    import shutil

    from un0_bench.backbones.digits import WEIGHTS_DIR
    from un0_bench.harness.running.cell import BenchSpec

    weights = tmp_path / "w"
    shutil.copytree(WEIGHTS_DIR, weights)
    (weights / "un0.safetensors").unlink()
    cfg = RunConfig.of(models=["sd:steps=1", "un0"], out=tmp_path / "o", meters=["proxy"], reference="sd:steps=1",
                    backbone_options={"weights_dir": weights})
    print_ = fingerprint(BenchSpec(plan_of(cfg)))
    assert print_["weights"]["teacher.safetensors"] and f"un0 {WEIGHTS_UNREADABLE}" in print_["weights"]
    prints = {"n1" * 8: print_, "n2" * 8: dict(print_)}
    assert differences(prints) == {}
    problems = unreadable(prints)
    assert len(problems) == 2 and problems[0].startswith("node n1n1n1n1n1n1: ") and "un0.safetensors" in problems[0]


def test_nodes_that_differ_are_refused_with_the_differences():
    prints = {"n1" * 8: {"un0-bench": "0.1.0", "git_commit": "abc", "weights": {"t.safetensors": "11", "u": "22"},
                         "host": "gpu-a"},
              "n2" * 8: {"un0-bench": "0.1.0", "git_commit": "def", "weights": {"t.safetensors": "99", "u": "22"},
                         "host": "gpu-b"}}
    mixed = differences(prints)
    assert mixed == {"git_commit": {"n1" * 8: "abc", "n2" * 8: "def"},
                     "weights": {"n1" * 8: {"t.safetensors": "11"}, "n2" * 8: {"t.safetensors": "99"}}}
    message = mixed_message(prints, mixed)
    assert "node n1n1n1n1n1n1 (gpu-a) abc" in message and "--allow-mixed" in message
    assert differences({"n1": prints["n1" * 8], "n2": dict(prints["n1" * 8], host="other")}) == {}


def test_the_cluster_check_passes_on_one_node(cluster, tmp_path):
    executor = RayExecutor()
    Runner(tiny_config(tmp_path / "out", ["a"], ["wall"]), **registries(tmp_path / "log"), executor=executor)
    assert executor.mixed == {} and len(executor.prints) == 1
    [print_] = executor.prints.values()
    assert print_["un0-bench"] == "0.1.0" and print_["weights"] == {}  # the tiny backbone loads no weights


def test_without_ray_the_executor_says_how_to_install_it(monkeypatch, tmp_path):
    import sys

    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    with pytest.raises(UserError, match=r"pip install 'un0-bench\[ray\]'"):
        Runner(tiny_config(tmp_path / "out", ["a"], ["wall"]), **registries(tmp_path / "log"),
               executor=RayExecutor("127.0.0.1:1"))
    assert not (tmp_path / "out").exists()


def test_compare_executor_ray_on_the_command_line(cluster, tmp_path, capsys):
    from un0_bench.cli import main

    out = tmp_path / "out"
    argv = ["compare", "--models", "un0", "--reference", "un0", "--meters", "proxy,wall", "--images", "2",
            "--quality-samples", "0", "--min-duration", "0", "--min-repeats", "1", "--idle", "0", "--no-report",
            "--out", str(out)]
    assert main([*argv, "--executor", "ray"]) == 0
    records = ResultStore(out).load()
    assert [(r["meter"], r["executor"], r["status"]) for r in records] == [("proxy", "ray", "ok"),
                                                                            ("wall", "ray", "ok")]
    assert "un0" in capsys.readouterr().out
    # The cluster options belong to the Ray executor; the local one refuses them in one line.
    assert main([*argv, "--allow-mixed"]) == 2
    assert "--allow-mixed applies to --executor ray only" in capsys.readouterr().err
    assert main([*argv, "--executor", "slurm"]) == 2
    assert "unknown executor 'slurm'" in capsys.readouterr().err


def test_quality_is_judged_once_per_model_by_a_worker_and_the_driver_applies_the_band(cluster, tmp_path):
    from tests.harness.test_runner_quality import _config, _registries

    # Two batch sizes per model: only one cell of each judges its quality (3 lines in quality.jsonl),
    # and whichever finishes first, the band comes from the reference's figure, as in a local run.
    local = _config(tmp_path / "local", ["far", "close", "ref"], batch_sizes=[1, 2], out=tmp_path / "local")
    remote = _config(tmp_path / "ray", ["far", "close", "ref"], batch_sizes=[1, 2], out=tmp_path / "ray")
    Runner(local, **_registries()).run()
    Runner(remote, **_registries(), executor=RayExecutor()).run()
    assert len((tmp_path / "ray" / "quality.jsonl").read_text().splitlines()) == 3

    def verdicts(out):
        return sorted((r["model"], r["batch_size"], r["quality"]["clip_score"], r["quality_matched"])
                      for r in ResultStore(out).load())

    assert verdicts(tmp_path / "ray") == verdicts(tmp_path / "local")
    assert verdicts(tmp_path / "ray") == [("close", 1, 79.0, True), ("close", 2, 79.0, True), ("far", 1, 70.0, False),
                                          ("far", 2, 70.0, False), ("ref", 1, 80.0, True), ("ref", 2, 80.0, True)]


def test_tasks_ask_for_what_they_use(tmp_path):
    from un0_bench.harness.running.cell import BenchSpec, Cell

    regs = registries(tmp_path / "log")
    spec = BenchSpec(plan_of(tiny_config(tmp_path / "out", ["a"], ["device", "wall"])), regs["generators"],
                     meters=regs["meters"], backbones=regs["backbones"])
    executor = RayExecutor(cpus_per_cell=2)
    # A whole-device meter takes the node's whole device unit; proxy and wall take a share of it.
    assert executor.resources(spec, Cell("a", 2, ("device", "wall"))) == {
        "num_cpus": 2, "num_gpus": 0, "resources": {DEVICE_RESOURCE: 1.0}}
    assert executor.resources(spec, Cell("a", 2, ("proxy", "wall"))) == {
        "num_cpus": 2, "num_gpus": 0, "resources": {DEVICE_RESOURCE: 0.01}}
    # A CUDA cell asks for one GPU (Ray gives it alone) and no CPUs.
    cuda = tiny_config(tmp_path / "out", ["a"], ["device", "wall"], backbone_options={"device": "cuda:0"})
    spec = dataclasses.replace(spec, plan=plan_of(cuda))
    assert executor.resources(spec, Cell("a", 2, ("wall",))) == {
        "num_cpus": 0, "num_gpus": 1, "resources": {DEVICE_RESOURCE: 0.01}}
