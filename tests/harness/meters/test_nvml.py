"""NVML meter with pynvml patched where it is used (autospec of the real module; no GPU here)."""

from __future__ import annotations

import itertools
import sys
import threading
import time
import types
from unittest import mock

import pynvml
import pytest
from un0_bench.harness.meters import nvml
from un0_bench.harness.meters.base import MeterUnavailable
from un0_bench.harness.meters.nvml import NvmlMeter, trapezoid_energy_mj


def fake_pynvml(gpu_count: int = 1) -> mock.MagicMock:
    """An autospec of the real pynvml whose error classes are the real ones (so ``except`` works)."""
    nv = mock.create_autospec(pynvml, instance=False)
    for name in dir(pynvml):
        if name.startswith("NVMLError"):
            setattr(nv, name, getattr(pynvml, name))
    nv.nvmlDeviceGetCount.return_value = gpu_count
    nv.nvmlDeviceGetHandleByIndex.side_effect = lambda i: f"handle-{i}"
    return nv


@pytest.fixture
def nv(monkeypatch: pytest.MonkeyPatch) -> mock.MagicMock:
    fake = fake_pynvml()
    monkeypatch.setattr(nvml, "_pynvml", lambda: fake)
    return fake


class FakeClock:
    def __init__(self, *times_s: float) -> None:
        self._times = iter(times_s)

    def __call__(self) -> float:
        return next(self._times)


def test_energy_counter_exact_and_synced_before_each_read(nv: mock.MagicMock) -> None:
    calls: list[str] = []
    counter_mj = iter([999_000, 1_000_000, 1_250_500])  # method check, start, stop

    def read_counter(handle: str) -> int:
        calls.append(f"read {handle}")
        return next(counter_mj)

    nv.nvmlDeviceGetTotalEnergyConsumption.side_effect = read_counter
    meter = NvmlMeter(sync=lambda: calls.append("sync"), clock=FakeClock(3.0, 5.0))
    assert meter.probe() == "ok"
    meter.start()
    reading = meter.stop()

    assert reading.ok
    # (1_250_500 - 1_000_000) mJ = 250_500 mJ = 250.5 J
    assert reading.energy_j == {"gpu:0": 250.5}
    assert reading.duration_s == 2.0  # 5.0 - 3.0
    assert reading.details["method"] == {"gpu:0": "energy-counter"}
    assert reading.details["window_too_short"] is False
    assert calls == ["read handle-0", "sync", "read handle-0", "sync", "read handle-0"]
    nv.nvmlInit.assert_called_once_with()
    meter.close()
    nv.nvmlShutdown.assert_called_once_with()


def test_selected_devices_only(monkeypatch: pytest.MonkeyPatch) -> None:
    nv = fake_pynvml(gpu_count=3)
    monkeypatch.setattr(nvml, "_pynvml", lambda: nv)
    counters = {"handle-0": iter([0, 0, 0]), "handle-2": iter([10, 5_000, 17_250])}
    nv.nvmlDeviceGetTotalEnergyConsumption.side_effect = lambda h: next(counters[h])
    meter = NvmlMeter(devices=[2], sync=lambda: None, clock=FakeClock(0.0, 1.0))
    meter.start()
    reading = meter.stop()
    # (17_250 - 5_000) mJ = 12.25 J; GPU 0 and 1 are not read at all.
    assert reading.energy_j == {"gpu:2": 12.25}
    nv.nvmlDeviceGetHandleByIndex.assert_called_once_with(2)


def test_missing_device_index_is_unavailable(nv: mock.MagicMock) -> None:
    meter = NvmlMeter(devices=[0, 4])
    assert meter.probe() == "unavailable: GPU index [4] requested, but NVML sees GPUs 0..0"
    nv.nvmlShutdown.assert_called_once_with()  # init balanced even when setup fails


def test_window_too_short_flagged(nv: mock.MagicMock) -> None:
    nv.nvmlDeviceGetTotalEnergyConsumption.side_effect = [0, 100, 104]
    meter = NvmlMeter(sync=lambda: None, clock=FakeClock(1.0, 1.05))
    meter.start()
    reading = meter.stop()
    assert reading.details["window_too_short"] is True  # 0.05 s < min_window_s = 0.1 s
    assert reading.details["min_window_s"] == 0.1 == NvmlMeter.min_window_s
    assert reading.energy_j == {"gpu:0": 0.004}  # 4 mJ


def test_power_sampling_fallback_exact(nv: mock.MagicMock) -> None:
    nv.nvmlDeviceGetTotalEnergyConsumption.side_effect = pynvml.NVMLError_NotSupported()
    nv.nvmlDeviceGetPowerUsage.side_effect = [100_000, 100_000, 300_000]  # check, start, stop (mW)
    # A period longer than the window: only the start and stop samples exist, so the sum is exact.
    meter = NvmlMeter(sync=lambda: None, clock=FakeClock(10.0, 12.0), sample_interval_s=3600)
    meter.start()
    reading = meter.stop()
    # Trapezoid: (100_000 + 300_000) mW / 2 x 2.0 s = 400_000 mJ = 400 J
    assert reading.ok
    assert reading.energy_j == {"gpu:0": 400.0}
    assert reading.details["method"] == {"gpu:0": "power-sampling"}
    assert reading.details["power_samples"] == {"gpu:0": 2}


def test_power_sampling_thread_constant_power(nv: mock.MagicMock) -> None:
    nv.nvmlDeviceGetTotalEnergyConsumption.side_effect = pynvml.NVMLError_FunctionNotFound()
    nv.nvmlDeviceGetPowerUsage.return_value = 150_000  # 150 W
    # Every clock call advances 0.5 s, binary-exact, so the trapezoid sum has no rounding error
    # however many samples the thread takes.
    clock = itertools.count(0.0, 0.5).__next__
    meter = NvmlMeter(sync=lambda: None, clock=clock, sample_interval_s=0.002)
    meter.start()
    time.sleep(0.05)
    reading = meter.stop()
    assert reading.ok
    assert reading.details["power_samples"]["gpu:0"] >= 2
    # Constant power: energy = 150 W x duration, exactly.
    assert reading.energy_j["gpu:0"] == 150.0 * reading.duration_s
    assert reading.duration_s == 0.5 * (reading.details["power_samples"]["gpu:0"] - 1)
    assert not any(t.name == "nvml-power-sampler" for t in threading.enumerate())


def test_trapezoid_varying_power() -> None:
    samples = [(0.0, 100_000.0), (0.5, 200_000.0), (1.5, 200_000.0)]
    # (100_000 + 200_000) / 2 x 0.5 = 75_000; 200_000 x 1.0 = 200_000; total 275_000 mJ
    assert trapezoid_energy_mj(samples) == 275_000.0
    assert trapezoid_energy_mj(samples[:1]) == 0.0


def test_mixed_counter_and_sampling_gpus(monkeypatch: pytest.MonkeyPatch) -> None:
    nv = fake_pynvml(gpu_count=2)
    monkeypatch.setattr(nvml, "_pynvml", lambda: nv)
    counters = {"handle-0": iter([0, 2_000, 3_000])}

    def counter(handle: str) -> int:
        if handle == "handle-1":
            raise pynvml.NVMLError_NotSupported()
        return next(counters[handle])

    nv.nvmlDeviceGetTotalEnergyConsumption.side_effect = counter
    nv.nvmlDeviceGetPowerUsage.return_value = 50_000
    meter = NvmlMeter(sync=lambda: None, clock=FakeClock(0.0, 4.0), sample_interval_s=3600)
    meter.start()
    reading = meter.stop()
    # gpu:0 counter (3_000 - 2_000) mJ = 1 J; gpu:1 50 W x 4 s = 200 J
    assert reading.energy_j == {"gpu:0": 1.0, "gpu:1": 200.0}
    assert reading.details["method"] == {"gpu:0": "energy-counter", "gpu:1": "power-sampling"}


def test_sampling_error_gives_unavailable_reading(nv: mock.MagicMock) -> None:
    nv.nvmlDeviceGetTotalEnergyConsumption.side_effect = pynvml.NVMLError_NotSupported()
    nv.nvmlDeviceGetPowerUsage.side_effect = [80_000, 80_000, pynvml.NVMLError_GpuIsLost()]
    meter = NvmlMeter(sync=lambda: None, clock=FakeClock(0.0, 1.0, 1.0), sample_interval_s=3600)
    meter.start()
    reading = meter.stop()
    assert reading.status == (
        "unavailable: cannot read GPU power: the GPU fell off the bus or is otherwise inaccessible"
    )
    assert reading.energy_j == {}


def test_counter_going_backwards_is_unavailable(nv: mock.MagicMock) -> None:
    nv.nvmlDeviceGetTotalEnergyConsumption.side_effect = [5_000, 5_000, 10]
    meter = NvmlMeter(sync=lambda: None, clock=FakeClock(0.0, 1.0))
    meter.start()
    reading = meter.stop()
    assert reading.status == "unavailable: gpu:0 energy counter went backwards (driver reloaded?)"


def test_library_not_found(nv: mock.MagicMock) -> None:
    nv.nvmlInit.side_effect = pynvml.NVMLError_LibraryNotFound()
    meter = NvmlMeter()
    assert meter.probe() == (
        "unavailable: cannot initialise NVML: NVML library (libnvidia-ml.so.1) not found: no NVIDIA driver on this host"
    )
    with pytest.raises(MeterUnavailable, match="libnvidia-ml"):
        meter.start()
    nv.nvmlShutdown.assert_not_called()  # init never succeeded, nothing to balance


def test_no_gpus(nv: mock.MagicMock) -> None:
    nv.nvmlDeviceGetCount.return_value = 0
    assert NvmlMeter().probe() == "unavailable: NVML found no GPUs"
    nv.nvmlShutdown.assert_called_once_with()


def test_no_counter_and_no_power(nv: mock.MagicMock) -> None:
    nv.nvmlDeviceGetTotalEnergyConsumption.side_effect = pynvml.NVMLError_NotSupported()
    nv.nvmlDeviceGetPowerUsage.side_effect = pynvml.NVMLError_NotSupported()
    assert NvmlMeter().probe() == (
        "unavailable: GPU 0 has neither an energy counter nor a power reading: not supported by this GPU or driver"
    )


def test_pynvml_not_installed(monkeypatch: pytest.MonkeyPatch) -> None:
    def missing() -> None:
        raise ImportError("No module named 'pynvml'")

    monkeypatch.setattr(nvml, "_pynvml", missing)
    assert NvmlMeter().probe() == "unavailable: nvidia-ml-py (module pynvml) is not installed"


def test_default_sync_synchronises_every_initialised_cuda_device(monkeypatch: pytest.MonkeyPatch) -> None:
    synced: list[int] = []
    cuda = types.SimpleNamespace(is_initialized=lambda: True, device_count=lambda: 2, synchronize=synced.append)
    monkeypatch.setitem(sys.modules, "torch", types.SimpleNamespace(cuda=cuda))
    nvml._sync_cuda()
    assert synced == [0, 1]

    cuda.is_initialized = lambda: False  # CUDA never used: nothing queued, nothing to wait for
    nvml._sync_cuda()
    assert synced == [0, 1]


def test_real_pynvml_on_this_host() -> None:
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:
        pass
    else:
        pynvml.nvmlShutdown()
        pytest.skip("this host has a working NVML; the test is for hosts without one")
    meter = NvmlMeter()  # default construction, unpatched module
    status = meter.probe()
    assert status.startswith("unavailable: ")
    assert "NVML" in status
    with pytest.raises(MeterUnavailable):
        meter.start()
    meter.close()
