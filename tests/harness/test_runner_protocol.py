"""The runner's cell protocol on a fake device whose energy depends on time and load, with idle drift.

The device draws idle power that drifts linearly in time (10 W + 0.5 W/s x t), a background load
of 3 W that never stops, and whatever the generator's work adds while a call runs. Every clock is
the test's, so each figure is known by hand. Idle is measured right before and right after each
cell's windows, so with a linear drift the mean of the two is exactly the idle power during the
windows, and the net figure is exactly the work's energy.
"""

from __future__ import annotations

from typing import Any

import pytest
from un0_bench.harness.measuring.hoststate import CpuTimes, HostProbe
from un0_bench.harness.meters.base import Meter, Reading
from un0_bench.harness.registry import Registry
from un0_bench.harness.running.runner import RunConfig, Runner

from tests.conftest import MatmulGenerator
from tests.harness.meters.fake_nvml import TestClock
from tests.harness.test_runner import TinyBackbone

CALL_S = 0.25  # each generate call takes 0.25 s on the test clock
IDLE_W0, DRIFT_W_PER_S, BACKGROUND_W = 10.0, 0.5, 3.0


class Device:
    def __init__(self, clock: TestClock) -> None:
        self.clock = clock
        self.busy: list[tuple[float, float, float]] = []  # (from_s, to_s, watts) of the generator's work

    def energy_j(self) -> float:
        t = self.clock()
        base = (IDLE_W0 + BACKGROUND_W) * t + DRIFT_W_PER_S * t * t / 2
        return base + sum(w * max(0.0, min(t, t1) - t0) for t0, t1, w in self.busy)


class DeviceMeter(Meter):
    name = "dev"
    sees_whole_device = True
    min_window_s = 1.0

    def __init__(self, device: Device) -> None:
        super().__init__()
        self.device = device

    def _start(self) -> None:
        self.e0, self.t0 = self.device.energy_j(), self.device.clock()

    def _stop(self) -> Reading:
        return Reading(self.name, self.device.clock() - self.t0, {"package-0": self.device.energy_j() - self.e0})


class BusyGenerator(MatmulGenerator):
    """The matmul generator, taking ``CALL_S`` of the test clock at ``watts`` above idle per call."""

    def __init__(self, device: Device, watts: float) -> None:
        super().__init__()
        self.device, self.watts = device, watts

    def generate(self, request):
        t0 = self.device.clock()
        self.device.clock.advance(CALL_S)
        self.device.busy.append((t0, t0 + CALL_S, self.watts))
        return super().generate(request)


class BusyHost(HostProbe):
    """Another process uses half a core all the time."""

    def __init__(self, clock: TestClock) -> None:
        super().__init__()
        self.clock = clock

    def times(self) -> CpuTimes:
        return CpuTimes(busy_s=1.5 * self.clock(), own_s=self.clock())

    def window(self, before, after, duration_s) -> dict[str, Any]:
        state = super().window(before, after, duration_s)
        return {**state, "load_average": [0.5, 0.5, 0.5], "governors": None}


def run(tmp_path, watts: dict[str, float], **kw):
    clock = TestClock(0.0)
    device = Device(clock)
    gens = Registry("generator")
    for name, w in watts.items():
        def build(backbone, w=w):
            return BusyGenerator(device, w)
        build.params = {}
        gens.register(name, build)
    meters = Registry("meter")
    meters.register("dev", lambda: DeviceMeter(device))
    backbones = Registry("backbone")
    backbones.register("tiny", TinyBackbone)
    cfg = RunConfig.of(models=list(watts), out=tmp_path / "out", backbone="tiny", meters=["dev"], images=4,
                    batch_sizes=[2], min_repeats=3, max_repeats=3, min_duration_s=0.0, idle_s=0.5,
                    quality_samples=0, reference=next(iter(watts)), **kw)
    runner = Runner(cfg, generators=gens, meters=meters, backbones=backbones, clock=clock, sleep=clock.advance,
                    host=BusyHost(clock))
    return {r["model"]: r for r in runner.run()}


def test_net_of_drifting_idle_is_the_work_and_tiny_work_is_below_detection_limit(tmp_path):
    recs = run(tmp_path, {"big": 20.0, "tiny": 0.01})
    big, tiny = recs["big"], recs["tiny"]
    # Windows are 1 s (the meter's minimum): 4 calls of 4 images. Net = 20 W x 0.25 s / 4 images.
    assert big["window_s"] == pytest.approx([1.0, 1.0, 1.0])
    assert [w["images"] for w in big["windows"]] == [16, 16, 16]
    assert big["energy_net_j_per_image"] == pytest.approx(1.25, rel=1e-9)
    # Idle windows last the meter's 1 s minimum, not --idle 0.5 s; they are 4 s apart (1 s idle + 3 s of
    # windows), so the drift gives before/after powers 2 W apart: uncertainty 1 W.
    assert big["idle_window_s"] == pytest.approx([1.0, 1.0])
    assert big["idle_power_after_w"] - big["idle_power_before_w"] == pytest.approx(2.0)
    assert big["idle_uncertainty_w"] == pytest.approx(1.0)
    # Gross = net + the idle and background power charged over the windows' time.
    assert big["energy_j_per_image"] == pytest.approx(1.25 + big["idle_power_w"] * 3.0 / 48, rel=1e-9)
    lo, hi = big["energy_net_ci95_j"]
    assert lo < 1.25 < hi and big["energy_net_below_detection_limit"] is False
    # Its uncertainty: idle 1 W x 3 s / 48 images = 0.0625 J, plus the t half-width of the windows'
    # nets, which differ because the drift moves 0.5 W between window midpoints 1 s apart:
    # deviations -1/32, 0, +1/32 J/image; sd 1/32; t(0.975, 2) x sd / sqrt(3) = 0.0776 J.
    assert big["energy_net_detection_limit_j"] == pytest.approx(0.0625 + 4.302652729749462 / 32 / 3 ** 0.5)
    # 0.01 W of work: 0.000625 J/image, lost in the idle's uncertainty.
    assert tiny["energy_net_j_per_image"] == pytest.approx(0.000625, rel=1e-6)
    assert tiny["energy_net_below_detection_limit"] is True
    # Every window saw another process's half core: flagged.
    assert big["windows_device_shared"] == 3 and all(w["device_shared"] for w in big["windows"])
    assert big["windows"][0]["host"]["other_cpu_s"] == pytest.approx(0.5)
    assert big["window_min_s"] == 1.0 and big["min_window_s"] == 1.0


def test_cell_order_is_seeded_recorded_and_not_always_the_reference_first(tmp_path):
    models = {f"m{i}": 20.0 for i in range(6)}
    first = run(tmp_path / "a", models, seed=0)
    order = sorted(first, key=lambda m: first[m]["cell_order"]["position"])
    assert sorted(order) == sorted(models) and order != list(models)  # shuffled
    assert first["m0"]["cell_order"]["order"] == "shuffled" and first["m0"]["cell_order"]["seed"] == 0
    again = run(tmp_path / "b", models, seed=0)
    assert sorted(again, key=lambda m: again[m]["cell_order"]["position"]) == order  # seeded: reproducible
    given = run(tmp_path / "c", models, seed=0, cell_order="given")
    assert sorted(given, key=lambda m: given[m]["cell_order"]["position"]) == list(models)


def test_warm_up_is_recorded(tmp_path):
    rec = run(tmp_path, {"big": 20.0}, warmup=1)["big"]
    # Every call takes exactly 0.25 s, so the second call agrees with the first: steady after 2 calls.
    assert rec["warmup"] == {"calls": 2, "durations_s": [0.25, 0.25], "steady": True, "max_s": 3.0,
                             "tolerance": 0.1}
