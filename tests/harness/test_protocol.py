"""Windows, idle around a cell, warm-up, honest intervals and host state, on fakes with known numbers."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from un0_bench.harness.measuring.hoststate import HostProbe
from un0_bench.harness.measuring.protocol import (
    Idle,
    IdleWindow,
    Window,
    idle_window,
    metered_window,
    summarise,
    warm_up,
)
from un0_bench.harness.measuring.stats import mean_interval, ratio_interval
from un0_bench.harness.meters.base import Meter, Reading

from tests.harness.meters.fake_nvml import TestClock


class LogMeter(Meter):
    """A whole-device meter drawing ``watts`` on the test clock; logs its starts and stops."""

    sees_whole_device = True

    def __init__(self, name: str, clock: TestClock, log: list[str], watts: float = 10.0, min_window_s: float = 0.0):
        super().__init__()
        self.name, self.clock, self.log, self.watts, self.min_window_s = name, clock, log, watts, min_window_s

    def _start(self) -> None:
        self.log.append(f"start {self.name}")
        self.t0 = self.clock()

    def _stop(self) -> Reading:
        self.log.append(f"stop {self.name}")
        d = self.clock() - self.t0
        return Reading(self.name, d, {"package-0": self.watts * d})


class SlowGenerator:
    """Each call takes ``seconds`` on the test clock (a cold first call takes ``first_s``)."""

    def __init__(self, clock: TestClock, seconds: list[float]) -> None:
        self.clock, self.seconds, self.calls = clock, list(seconds), 0

    def generate(self, request):
        self.clock.advance(self.seconds[min(self.calls, len(self.seconds) - 1)])
        self.calls += 1
        return self.calls


class Request:
    prompts = ("1", "2")


def windows_of(energies_j: list[float], images: list[int], seconds: list[float]) -> list[Window]:
    return [Window(images=n, readings={"m": Reading("m", s, {"package-0": e})}, duration_s=s)
            for e, n, s in zip(energies_j, images, seconds, strict=True)]


def test_t_interval_on_three_windows_by_hand() -> None:
    # Per-image 2, 3, 4: mean 3, sample sd 1, se 1/sqrt(3); t(0.975, 2 dof) = 4.3027 -> half 2.4841.
    iv = mean_interval([2.0, 3.0, 4.0])
    assert iv.estimate == 3.0 and iv.windows == 3 and iv.level == 0.95
    assert iv.half_width == pytest.approx(4.302652729749462 / math.sqrt(3), rel=1e-12)
    # A bootstrap would have said [2, 4] (min, max) and called it 95%; the t-interval is wider.
    assert iv.low < 2.0 and iv.high > 4.0
    assert mean_interval([5.0]).as_list() is None  # one window: no interval


def test_per_image_figure_is_total_energy_over_total_images() -> None:
    # Windows of 2, 2 and 8 images (a window repeats the work until long enough): 10, 10, 32 J.
    # Total 52 J / 12 images = 4.333 J/image; the median of per-window figures (5, 5, 4) would say 5.
    iv = ratio_interval([10.0, 10.0, 32.0], [2.0, 2.0, 8.0])
    assert iv.estimate == 52.0 / 12.0
    rec = summarise("m", windows_of([10.0, 10.0, 32.0], [2, 2, 8], [1.0, 1.0, 4.0]), None)
    assert rec["energy_j_per_image"] == 52.0 / 12.0
    assert rec["energy_ci_level"] == 0.95 and "Student t" in rec["energy_ci_method"]
    assert rec["window_s"] == [1.0, 1.0, 4.0]


def test_net_carries_the_idle_uncertainty_and_says_below_detection_limit() -> None:
    # Three windows of 2 s and 4 images: 22, 22, 22 J. Idle 10 W before, 12 W after: 11 W +- 1 W.
    wins = windows_of([22.0, 22.0, 22.0], [4, 4, 4], [2.0, 2.0, 2.0])
    idle = Idle(IdleWindow(10.0, 1.0, 10.0), IdleWindow(12.0, 1.0, 12.0))
    rec = summarise("m", wins, idle)
    # net = (22 - 11 x 2) / 4 = 0 J/image; uncertainty 0 (identical windows) + 1 W x 6 s / 12 images = 0.5 J.
    assert rec["energy_net_j_per_image"] == 0.0
    assert rec["energy_net_detection_limit_j"] == 0.5
    assert rec["energy_net_below_detection_limit"] is True
    assert (rec["idle_power_w"], rec["idle_uncertainty_w"]) == (11.0, 1.0)
    # 40 J windows: net (40 - 22) / 4 = 4.5 J/image, well above 0.5 J: a measurement.
    rec2 = summarise("m", windows_of([40.0] * 3, [4] * 3, [2.0] * 3), idle)
    assert rec2["energy_net_j_per_image"] == 4.5 and rec2["energy_net_below_detection_limit"] is False
    assert rec2["energy_net_ci95_j"] == [4.0, 5.0]


def test_window_repeats_until_the_minimum_and_stops_in_reverse_after_one_sync(monkeypatch) -> None:
    import un0_bench.harness.measuring.protocol as protocol

    clock, log = TestClock(), []
    monkeypatch.setattr(protocol, "sync_devices", lambda: log.append("sync"))
    meters = {"a": LogMeter("a", clock, log), "b": LogMeter("b", clock, log)}
    gen = SlowGenerator(clock, [0.3])
    w = metered_window(gen, Request(), meters, counts=None, min_window_s=1.0, clock=clock)
    # 0.3 s calls until >= 1 s: 4 calls, 8 images, 1.2 s.
    assert (w.calls, w.images) == (4, 8) and w.duration_s == pytest.approx(1.2)
    assert log == ["start a", "start b", "sync", "stop b", "stop a"]
    assert w.readings["a"].energy_j["package-0"] == pytest.approx(12.0)  # 10 W x 1.2 s


def test_idle_window_lasts_at_least_each_meters_minimum(monkeypatch) -> None:
    clock, log = TestClock(), []
    meters = {"a": LogMeter("a", clock, log, watts=7.0, min_window_s=2.0)}
    idle = idle_window(meters, 0.5, clock=clock, sleep=clock.advance)
    assert idle["a"].duration_s == pytest.approx(2.0) and idle["a"].power_w == pytest.approx(7.0)


def test_warm_up_runs_until_two_calls_agree_with_a_bound() -> None:
    clock = TestClock()
    # Cold 3 s, then 1.5, 1.02, 1.0: steady at the fourth call (1.02 vs 1.0 within 5%).
    w = warm_up(SlowGenerator(clock, [3.0, 1.5, 1.02, 1.0]), Request(), min_calls=1, max_s=60.0, tolerance=0.05,
                clock=clock)
    assert w["calls"] == 4 and w["steady"] is True
    # A device that never settles is stopped by the bound, and the record says it was not steady.
    w = warm_up(SlowGenerator(clock, [1.0, 2.0, 1.0, 2.0, 1.0, 2.0]), Request(), min_calls=1, max_s=4.0, tolerance=0.05,
                clock=clock)
    assert w["calls"] == 3 and w["steady"] is False  # 1 + 2 + 1 = 4 s reached the bound
    assert warm_up(SlowGenerator(clock, [1.0]), Request(), min_calls=0, max_s=9.0, tolerance=0.05,
                   clock=clock)["calls"] == 0


def fake_proc(root: Path, busy: int, own: int, load: str = "1.50 0.75 0.25 2/97 123", children: int = 0) -> None:
    (root / "4242").mkdir(parents=True, exist_ok=True)
    # cpu user nice system idle iowait irq softirq steal: busy = all but idle (5th) and iowait (6th)
    (root / "stat").write_text(f"cpu  {busy} 0 0 99999 777 0 0 0 0 0\ncpu0 1 2 3 4\n")
    # ... utime stime cutime cstime: this process's ticks, then its waited-for children's
    (root / "4242" / "stat").write_text(f"4242 (python (x)) R 1 2 3 4 5 6 7 8 9 10 {own} 0 {children} 0\n")
    (root / "loadavg").write_text(load + "\n")


def test_host_state_flags_other_processes_cpu_time(tmp_path: Path) -> None:
    proc, sys_root = tmp_path / "proc", tmp_path / "sys"
    gov = sys_root / "devices/system/cpu/cpu0/cpufreq"
    gov.mkdir(parents=True)
    (gov / "scaling_governor").write_text("performance\n")
    probe = HostProbe(proc, sys_root, pid=4242)
    probe.hz = 100.0
    fake_proc(proc, busy=1000, own=100)
    before = probe.times()
    fake_proc(proc, busy=1250, own=200)  # 250 ticks busy in all, 100 of them ours: 1.5 CPU s others'
    state = probe.window(before, probe.times(), duration_s=2.0)
    assert state["other_cpu_s"] == 1.5 and state["other_load"] is True  # > 10% of a core over 2 s
    assert state["load_average"] == [1.5, 0.75, 0.25] and state["governors"] == ["performance"]
    quiet = probe.window(probe.times(), probe.times(), duration_s=2.0)
    assert quiet["other_cpu_s"] == 0.0 and quiet["other_load"] is False
    assert HostProbe(tmp_path / "none", tmp_path / "none").times() is None  # not Linux: no figure
    # A child this process waited for (the command `un0-bench run -- CMD` measures) is its own work:
    # 250 ticks busy, 100 ours and 150 our child's, so nobody else's.
    fake_proc(proc, busy=1000, own=100)
    before = probe.times()
    fake_proc(proc, busy=1250, own=200, children=150)
    assert probe.window(before, probe.times(), duration_s=2.0)["other_cpu_s"] == 0.0
    # A child that ran mostly before the window, reaped in it: 400 ticks of ours against 250 on the host,
    # so what the others used is unknown, not 0 (and not flagged as if known).
    fake_proc(proc, busy=1250, own=200, children=300)
    unknown = probe.window(before, probe.times(), duration_s=2.0)
    assert unknown["other_cpu_s"] is None and unknown["other_load"] is False
