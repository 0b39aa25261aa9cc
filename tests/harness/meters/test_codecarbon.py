"""codecarbon meter: a fake tracker at the factory boundary, plus one real run on this host."""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from un0_bench.harness.meters import codecarbon as cc
from un0_bench.harness.meters.base import MeterUnavailable
from un0_bench.harness.meters.codecarbon import CodecarbonMeter, describe_sources


@dataclass
class FakeEmissionsData:
    """The fields of codecarbon's EmissionsData the meter reads (energies in kWh, emissions in kg)."""

    duration: float
    cpu_energy: float
    ram_energy: float
    gpu_energy: float
    energy_consumed: float
    emissions: float
    country_iso_code: str = "USA"


# Named like codecarbon's hardware classes: the meter classifies hardware by class name, as
# codecarbon's own hardware cache does.
class CPU:
    def __init__(self, mode: str, tdp: float = 85.0) -> None:
        self._mode = mode
        self._tdp = tdp


class RAM:
    _force_ram_power = None


class NvidiaGPUDevice:
    pass


class GPU:
    devices = SimpleNamespace(devices=[NvidiaGPUDevice()])


class FakeTracker:
    def __init__(self, results: list[FakeEmissionsData | None], hardware: list[Any]) -> None:
        self._results = iter(results)
        self._hardware = hardware
        self._conf = {"cpu_model": "Fake CPU 3000"}
        self._active_task: str | None = None
        self.tasks: list[str] = []

    def start_task(self, task_name: str) -> None:
        self.tasks.append(task_name)
        self._active_task = task_name

    def stop_task(self) -> FakeEmissionsData | None:
        self._active_task = None
        return next(self._results)


@pytest.fixture
def factory(monkeypatch: pytest.MonkeyPatch) -> Iterator[SimpleNamespace]:
    """Replace the tracker factory; set ``.tracker`` first, build meters with ``.meter()``, read ``.calls``."""
    box = SimpleNamespace(tracker=None, calls=[], meters=[])

    def make(**kwargs: Any) -> FakeTracker:
        box.calls.append(kwargs)
        return box.tracker

    def meter(**kwargs: Any) -> CodecarbonMeter:
        box.meters.append(CodecarbonMeter(**kwargs))
        return box.meters[-1]

    box.meter = meter
    monkeypatch.setattr(cc, "_make_tracker", make)
    yield box
    for m in box.meters:
        m.close()  # removes each meter's scratch directory


def test_exact_joules_from_kwh_and_tdp_estimate(factory: SimpleNamespace) -> None:
    factory.tracker = FakeTracker(
        results=[
            FakeEmissionsData(
                2.0, cpu_energy=0.001, ram_energy=2.5e-4, gpu_energy=0.0, energy_consumed=1.25e-3, emissions=4.5e-4
            ),
            FakeEmissionsData(
                0.5, cpu_energy=1.25e-4, ram_energy=5e-5, gpu_energy=0.0, energy_consumed=1.75e-4, emissions=6e-5
            ),
        ],
        hardware=[RAM(), CPU("cpu_load")],
    )
    meter = factory.meter(country_iso_code="FRA")
    meter.start()
    first = meter.stop()
    meter.start()
    second = meter.stop()

    assert first.ok
    # 1 kWh = 3.6e6 J: cpu 0.001 kWh x 3.6e6 = 3600 J; ram 2.5e-4 kWh x 3.6e6 = 900 J.
    # No GPU tracked, so no "gpu" key (never a silent 0 J).
    assert first.energy_j == {"cpu": 3600.0, "ram": 900.0}
    assert first.duration_s == 2.0
    assert first.details == {
        "emissions_kg": 4.5e-4,
        "source": "tdp x cpu load estimate",
        "sources": {"ram": "ram size power model estimate", "cpu": "tdp x cpu load estimate"},
        "methods": {"ram": "size model", "cpu": "TDP x load"},
        "estimate": True,
        "estimated_domains": ["cpu", "ram"],
        "tdp_w": 85.0,  # the TDP codecarbon multiplied by the load
        "country_iso_code": "USA",  # as codecarbon reported it in the data
        "cpu_model": "Fake CPU 3000",
        # No sensor: the joules are a model of time, and the reason names the TDP it assumed.
        "evidence": "time-based estimate",
        "evidence_reason": "no RAPL counter and no NVML GPU readable here: codecarbon's CPU joules are its assumed "
                           "TDP (85 W) x CPU load and its RAM joules a rule from the RAM's size, so they follow run "
                           "time, not work",
    }
    # cpu 1.25e-4 x 3.6e6 = 450 J; ram 5e-5 x 3.6e6 = 180 J
    assert second.energy_j == {"cpu": 450.0, "ram": 180.0}
    # One tracker for every window (its first start probes the hardware, which is slow).
    assert len(factory.calls) == 1
    assert factory.tracker.tasks == ["un0-bench-window-1", "un0-bench-window-2"]
    assert factory.calls[0]["country_iso_code"] == "FRA"
    assert factory.calls[0]["measure_power_secs"] == 1.0


def test_rapl_and_nvml_measure_but_the_ram_model_makes_the_total_an_estimate(factory: SimpleNamespace) -> None:
    factory.tracker = FakeTracker(
        results=[
            FakeEmissionsData(
                1.0, cpu_energy=2.5e-4, ram_energy=5e-5, gpu_energy=1.25e-4, energy_consumed=4.25e-4, emissions=1e-4
            )
        ],
        hardware=[RAM(), CPU("intel_rapl"), GPU()],
    )
    meter = factory.meter()
    meter.start()
    reading = meter.stop()
    # cpu 900 J, ram 180 J, gpu 1.25e-4 x 3.6e6 = 450 J
    assert reading.energy_j == {"cpu": 900.0, "ram": 180.0, "gpu": 450.0}
    assert reading.details["source"] == "rapl"
    assert reading.details["sources"]["gpu"] == "nvml"
    assert reading.details["methods"] == {"ram": "size model", "cpu": "RAPL", "gpu": "NVML"}
    # CPU and GPU are measured, but 180 J of the 1530 J total is codecarbon's RAM size model.
    assert reading.details["estimated_domains"] == ["ram"]
    assert reading.details["estimate"] is True
    # ... yet it is measured evidence: the RAM rule is constant power, which the idle subtraction removes.
    assert reading.details["evidence"] == "measured"
    assert reading.details["evidence_reason"].startswith("codecarbon read RAPL and NVML; only its RAM figure")
    assert "every GPU" in reading.details["gpu_note"]


@pytest.mark.parametrize(
    ("mode", "source", "estimate"),
    [
        ("intel_rapl", "rapl", False),
        ("windows_emi", "rapl (windows energy meter interface)", False),
        ("cpu_load", "tdp x cpu load estimate", True),
        ("constant", "tdp constant estimate", True),
        ("brand_new_mode", "unknown codecarbon cpu mode 'brand_new_mode'", True),
    ],
)
def test_cpu_source_mapping(mode: str, source: str, estimate: bool) -> None:
    assert describe_sources([CPU(mode)]) == ({"cpu": source}, estimate)


def test_scratch_dir_is_private_and_removed(factory: SimpleNamespace) -> None:
    factory.tracker = FakeTracker(results=[], hardware=[])
    meter = factory.meter()
    assert meter.probe() == "ok"
    scratch = Path(factory.calls[0]["output_dir"])
    assert scratch.is_dir() and scratch.name.startswith("un0-bench-codecarbon-")
    assert scratch.resolve() != Path.cwd().resolve()
    meter.close()
    assert not scratch.exists()


def test_close_stops_an_open_task(factory: SimpleNamespace) -> None:
    factory.tracker = FakeTracker(results=[None], hardware=[])
    meter = factory.meter()
    meter.start()
    meter.close()
    assert factory.tracker._active_task is None


def test_codecarbon_not_installed(monkeypatch: pytest.MonkeyPatch) -> None:
    def missing(**_: Any) -> None:
        raise ImportError("No module named 'codecarbon'")

    monkeypatch.setattr(cc, "_make_tracker", missing)
    meter = CodecarbonMeter()
    assert meter.probe() == "unavailable: codecarbon is not installed (No module named 'codecarbon')"
    with pytest.raises(MeterUnavailable, match="not installed"):
        meter.start()


def test_tracker_creation_failure(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(**_: Any) -> None:
        raise OSError("Folder '/x' doesn't exist !")

    monkeypatch.setattr(cc, "_make_tracker", broken)
    status = CodecarbonMeter().probe()
    assert status == ("unavailable: codecarbon could not create a tracker: OSError(\"Folder '/x' doesn't exist !\")")


def test_start_task_failure_and_silent_non_start(factory: SimpleNamespace) -> None:
    tracker = FakeTracker(results=[], hardware=[])
    factory.tracker = tracker

    def raises(task_name: str) -> None:
        raise RuntimeError("psutil exploded")

    tracker.start_task = raises
    with pytest.raises(MeterUnavailable, match="start_task failed: RuntimeError"):
        factory.meter().start()

    tracker.start_task = lambda task_name: None  # logs an error and returns without starting
    with pytest.raises(MeterUnavailable, match="did not start the task"):
        factory.meter().start()


def test_stop_without_data_is_unavailable(factory: SimpleNamespace) -> None:
    factory.tracker = FakeTracker(results=[None], hardware=[CPU("cpu_load")])
    meter = factory.meter()
    meter.start()
    reading = meter.stop()
    assert reading.status == "unavailable: codecarbon stop_task returned no data (task was not running)"
    assert reading.total_energy_j is None


def test_unknown_country_is_unavailable() -> None:
    # Real codecarbon: it would only log the unknown code and use a wrong intensity.
    status = CodecarbonMeter(country_iso_code="XXX").probe()
    assert status.startswith("unavailable: country_iso_code 'XXX' is not in codecarbon's energy-mix table")


def test_real_run_on_this_host(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    lock = Path(tempfile.gettempdir()) / ".codecarbon.lock"
    lock_existed = lock.exists()
    meter = CodecarbonMeter()
    try:
        assert meter.probe() == "ok"
        meter.start()
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < 1.0:  # busy loop: one core at 100%
            pass
        reading = meter.stop()
    finally:
        meter.close()

    assert reading.ok, reading.status
    assert reading.energy_j["cpu"] > 0
    assert reading.energy_j["ram"] > 0
    assert 1.0 <= reading.duration_s < 5.0
    assert reading.details["emissions_kg"] > 0
    assert reading.details["country_iso_code"] == "USA"
    rapl_readable = any(os.access(p, os.R_OK) for p in Path("/sys/class/powercap").glob("intel-rapl:*/energy_uj"))
    if not rapl_readable:  # this host: no RAPL, so codecarbon falls back on a TDP-based estimate
        assert reading.details["estimate"] is True
        assert reading.details["source"] in ("tdp x cpu load estimate", "tdp constant estimate")
        assert reading.details["evidence"] == "time-based estimate"  # and the reports say so, with this reason
        assert "no RAPL" in reading.details["evidence_reason"]
    assert sorted(os.listdir(tmp_path)) == []  # nothing written into the working directory
    assert lock.exists() == lock_existed  # no lock file left behind
