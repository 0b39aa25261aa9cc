"""``un0-bench calibrate``'s fit: a fake meter driven by a known linear model gives back its coefficients."""

from __future__ import annotations

import itertools
import time

import pytest
from un0_bench.harness.meters.base import Meter, Reading
from un0_bench.harness.meters.proxy import load_profiles
from un0_bench.harness.projection.calibrate import WORKLOADS, Sample, Workload, fit_samples, profile_csv, run_workloads

E_FLOP_J, E_BYTE_J, STATIC_W = 3e-11, 2e-10, 12.5


class LinearMeter(Meter):
    """E = E_FLOP_J * F + E_BYTE_J * B + STATIC_W * t, from the work the window records and its (fake) clock."""

    name = "fake-linear"

    def __init__(self, clock, time_only=False):
        super().__init__()
        self.clock, self.time_only = clock, time_only
        self.work = None

    def record_work(self, counts):
        self.work = counts

    def _start(self):
        self.t0, self.work = self.clock(), None

    def _stop(self):
        t = self.clock() - self.t0
        f, b = self.work.flops(), self.work.bytes_moved()
        e = STATIC_W * t if self.time_only else E_FLOP_J * f + E_BYTE_J * b + STATIC_W * t
        return Reading(meter=self.name, duration_s=t, energy_j={"all": e})


def _clock():
    # Every call advances 1 ms: deterministic durations that do not depend on the machine.
    ticks = itertools.count()
    return lambda: next(ticks) * 1e-3


SMALL = (Workload("matmul-64", "matmul", 64), Workload("matmul-128", "matmul", 128),
         Workload("copy-64k", "copy", 1 << 16), Workload("add-32k", "add", 1 << 15))


def test_fit_on_a_fake_linear_meter_recovers_its_coefficients():
    clock = _clock()
    samples = run_workloads(LinearMeter(clock), SMALL, window_s=0.02, windows=2, clock=clock)
    assert len(samples) == 8
    # matmul-64 counts 2 * 64^3 = 524,288 FLOPs per call; copy counts none.
    mm = next(s for s in samples if s.workload == "matmul-64")
    assert mm.flops == 2 * 64**3 * mm.calls
    assert next(s for s in samples if s.workload == "copy-64k").flops == 0
    fit = fit_samples(samples)
    assert fit.e_flop_j == pytest.approx(E_FLOP_J, rel=1e-6)
    assert fit.e_byte_j == pytest.approx(E_BYTE_J, rel=1e-6)
    assert fit.static_w == pytest.approx(STATIC_W, rel=1e-6)
    assert fit.rel_residual < 1e-9 and not fit.proportional_to_time


def test_a_meter_proportional_to_time_is_revealed():
    clock = _clock()
    fit = fit_samples(run_workloads(LinearMeter(clock, time_only=True), SMALL, window_s=0.02, windows=2, clock=clock))
    assert fit.proportional_to_time and "proportional to time" in fit.finding
    assert fit.time_only_power_w == pytest.approx(STATIC_W, rel=1e-9)
    assert abs(fit.e_flop_j) < 1e-15 and abs(fit.e_byte_j) < 1e-15


def test_fitted_profile_is_a_proxy_profile(tmp_path):
    fit = fit_samples([Sample("a", 1, 1e9, 0, 1.0, 0.03 + 12.5), Sample("b", 1, 0, 1e8, 1.0, 0.02 + 12.5),
                       Sample("c", 1, 2e9, 1e8, 2.0, 0.06 + 0.02 + 25.0)])
    path = tmp_path / "host.csv"
    path.write_text(profile_csv(fit, "host-test", "test"))
    prof = load_profiles(path)["host-test"]
    # E = 3e-11 J/FLOP * F + 2e-10 J/B * B + 12.5 W * t, solved exactly by the three samples.
    assert prof.energy_per_flop_j("float32") == pytest.approx(3e-11, rel=1e-6)
    assert prof.energy_per_byte_j == pytest.approx(2e-10, rel=1e-6)
    assert prof.static_power_w == pytest.approx(12.5, rel=1e-6)
    assert prof.energy_per_flop_j("int64") == prof.energy_per_flop_j("float16") == prof.energy_per_flop_j("float32")


def test_the_fixed_workloads_mix_flops_and_bytes():
    kinds = {w.kind for w in WORKLOADS}
    assert kinds == {"matmul", "copy", "add"}


def test_codecarbon_on_this_host_is_revealed_proportional_to_time():
    """No RAPL here: codecarbon falls back to TDP x load x time, and the fit must show it.

    The load codecarbon multiplies by is the whole machine's, so another process busy while the
    windows run moves the estimate with it (once, on a host running three other test suites, FLOPs
    and bytes "explained" 17%). The probe of other processes' CPU time says when that happened.
    """
    from un0_bench.harness.measuring.hoststate import OTHER_CPU_SHARE_FLAG, HostProbe
    from un0_bench.harness.running.runner import make_meter

    meter = make_meter("codecarbon")
    if isinstance(meter, str):
        pytest.skip(f"codecarbon cannot measure here: {meter}")
    probe = HostProbe()
    try:
        # Its first window starts a helper process (CPU detection, about 1.2 CPU s here) that the probe
        # would count as another process: warm it up outside the probed span.
        meter.start()
        meter.stop()
        for _ in range(3):  # a shared host is busy now and then: up to three tries for a quiet span
            before, t0 = probe.times(), time.perf_counter()
            samples = run_workloads(meter, WORKLOADS, window_s=0.2, windows=1)
            state = probe.window(before, probe.times(), time.perf_counter() - t0)
            if not state["other_load"]:
                break
    finally:
        meter.close()
    if not all(s.details.get("estimate") for s in samples):
        pytest.skip("codecarbon measures this host (RAPL or NVML), it does not estimate")
    if state["other_load"]:
        pytest.skip(f"three tries, none quiet: other processes used {state['other_cpu_s']:.2f} CPU s in the last "
                    f"(more than {OTHER_CPU_SHARE_FLAG:.0%} of a core): codecarbon's machine-wide load moved with them")
    fit = fit_samples(samples)
    assert fit.proportional_to_time, fit.finding
