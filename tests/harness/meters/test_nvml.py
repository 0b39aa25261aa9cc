"""NVML meter against a fake NVML host (tests/harness/meters/fake_nvml.py): a 100 ms staircase
counter driven by the test's clock, 1 s-averaged power, several GPUs with UUIDs, a shuffled
CUDA_VISIBLE_DEVICES and MIG. pynvml is patched where it is used (autospec of the real module).
"""

from __future__ import annotations

import sys
import types
from unittest import mock

import pynvml
import pytest
from un0_bench.harness.errors import SpecError
from un0_bench.harness.meters import nvml
from un0_bench.harness.meters.base import MeterUnavailable
from un0_bench.harness.meters.nvml import NvmlMeter, throttle_names, trapezoid_energy_mj

from tests.harness.meters.fake_nvml import FakeGpu, FakeNvmlHost, Power, TestClock, four_gpus


def host(monkeypatch: pytest.MonkeyPatch, gpus: list[FakeGpu] | None = None) -> FakeNvmlHost:
    h = FakeNvmlHost(gpus if gpus is not None else four_gpus()[:1], TestClock(0.0))
    nv = h.module()
    h.nv = nv
    monkeypatch.setattr(nvml, "_pynvml", lambda: nv)
    return h


@pytest.fixture
def nv(monkeypatch: pytest.MonkeyPatch) -> mock.MagicMock:
    """The fake pynvml of a one-GPU host."""
    return host(monkeypatch).nv


def meter(h: FakeNvmlHost, env: dict[str, str] | None = None, **kw) -> NvmlMeter:
    kw.setdefault("sync", lambda: None)
    return NvmlMeter(clock=h.clock, environ=env if env is not None else {}, cuda_uuids=lambda: None, **kw)


def window(h: FakeNvmlHost, m: NvmlMeter, start_s: float, stop_s: float):
    h.clock.t_s = start_s
    m.start()
    h.clock.t_s = stop_s
    return m.stop()


def test_staircase_counter_reads_the_last_step_exactly(monkeypatch: pytest.MonkeyPatch) -> None:
    h = host(monkeypatch, [FakeGpu("GPU-aaaa", "00000000:07:00.0", Power([(0.0, 250.0)]))])
    m = meter(h)
    assert m.probe() == "ok"
    # 0.15 s -> 2.08 s: the counter shows the steps at 0.1 s (25 J) and 2.0 s (500 J): 475 J, while
    # 250 W x 1.93 s = 482.5 J really flowed; the error (7.5 J) is under one step (250 W x 0.1 s).
    r = window(h, m, 0.15, 2.08)
    assert r.ok and r.energy_j == {"gpu:GPU-aaaa": 475.0}
    assert abs(475.0 - 250.0 * (2.08 - 0.15)) < 250.0 * 0.1
    assert r.duration_s == pytest.approx(1.93)
    assert r.details["min_window_s"] == 2.0 == NvmlMeter.min_window_s
    assert r.details["window_too_short"] is True  # 1.93 s < 2 s


def test_a_window_inside_one_counter_step_is_not_a_measurement(monkeypatch: pytest.MonkeyPatch) -> None:
    h = host(monkeypatch)
    m = meter(h)
    r = window(h, m, 1.01, 1.07)  # 60 ms, between two 100 ms steps: the counter did not move
    assert not r.ok and r.energy_j == {} and r.total_energy_j is None
    assert "did not advance in 0.06 s" in r.status and "no measurement" in r.status


def test_shuffled_cuda_visible_devices_measures_exactly_the_mapped_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    gpus = four_gpus()  # 100, 200, 300, 400 W in NVML order
    h = host(monkeypatch, gpus)
    # CUDA device 0 is NVML GPU 3 (by index), CUDA 1 is NVML GPU 1 (by UUID prefix, as CUDA accepts).
    env = {"CUDA_VISIBLE_DEVICES": f"3,{gpus[1].uuid[:9]}", "CUDA_DEVICE_ORDER": "PCI_BUS_ID"}
    m = meter(h, env, devices=["0"])
    r = window(h, m, 0.0, 2.0)
    key = f"gpu:{gpus[3].uuid}"
    assert r.energy_j == {key: 800.0}  # 400 W x 2 s, and no other GPU's joules
    facts = r.details["devices"][key]
    assert (facts["cuda_index"], facts["nvml_index"], facts["pci_bus_id"]) == (0, 3, "00000000:0A:00.0")
    assert facts["name"] == "NVIDIA A100-SXM4-80GB" and facts["driver"] == "550.54.15"
    assert facts["power_limit_w"] == 400.0 and facts["mig_mode"] == "disabled"
    assert set(h.counter_reads) == {gpus[3].uuid}  # the other three GPUs are never read

    m1 = meter(h, env, devices=["1"])
    r1 = window(h, m1, 0.0, 2.0)
    assert r1.energy_j == {f"gpu:{gpus[1].uuid}": 400.0}  # 200 W x 2 s
    assert r1.details["devices"][f"gpu:{gpus[1].uuid}"]["mapped_by"].startswith("CUDA_VISIBLE_DEVICES UUID")


def test_default_measures_the_visible_devices_not_every_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    gpus = four_gpus()
    h = host(monkeypatch, gpus)
    m = meter(h, {"CUDA_VISIBLE_DEVICES": "2,0", "CUDA_DEVICE_ORDER": "PCI_BUS_ID"})
    r = window(h, m, 0.0, 3.0)
    # 300 W x 3 s + 100 W x 3 s; GPUs 1 and 3 (600 W together) are not counted.
    assert r.energy_j == {f"gpu:{gpus[2].uuid}": 900.0, f"gpu:{gpus[0].uuid}": 300.0}
    # An index read without CUDA_DEVICE_ORDER=PCI_BUS_ID is an assumption, and the record says so.
    r2 = window(h, meter(h, {"CUDA_VISIBLE_DEVICES": "2"}), 0.0, 3.0)
    assert "PCI bus order" in r2.details["attribution_notes"][0]
    # CUDA stops at the first invalid entry: "1,7,0" shows GPU 1 only.
    r3 = window(h, meter(h, {"CUDA_VISIBLE_DEVICES": "1,7,0", "CUDA_DEVICE_ORDER": "PCI_BUS_ID"}), 0.0, 1.0)
    assert list(r3.energy_j) == [f"gpu:{gpus[1].uuid}"]


def test_torch_uuids_map_cuda_devices_whatever_the_order(monkeypatch: pytest.MonkeyPatch) -> None:
    gpus = four_gpus()
    h = host(monkeypatch, gpus)
    # torch spells UUIDs without the GPU- prefix; CUDA's fastest-first order is not NVML's.
    bare = [gpus[2].uuid[4:], gpus[0].uuid[4:]]
    m = NvmlMeter(devices=["1"], clock=h.clock, sync=lambda: None, environ={}, cuda_uuids=lambda: bare)
    r = window(h, m, 0.0, 2.0)
    assert r.energy_j == {f"gpu:{gpus[0].uuid}": 200.0}
    assert r.details["devices"][f"gpu:{gpus[0].uuid}"]["mapped_by"] == "torch UUID"


def test_a_device_the_process_cannot_see_is_unavailable(monkeypatch: pytest.MonkeyPatch) -> None:
    h = host(monkeypatch, four_gpus())
    m = meter(h, {"CUDA_VISIBLE_DEVICES": "1", "CUDA_DEVICE_ORDER": "PCI_BUS_ID"}, devices=["1"])
    assert m.probe() == "unavailable: CUDA device 1 requested, but this process sees CUDA devices 0..0"
    h.nv.nvmlShutdown.assert_called_once_with()  # init balanced even when setup fails
    assert meter(h, {"CUDA_VISIBLE_DEVICES": "-1"}).probe() == (
        "unavailable: no CUDA device is visible to this process (CUDA_VISIBLE_DEVICES hides them all)")


def test_mig_slice_is_refused_or_measured_whole_and_marked_shared(monkeypatch: pytest.MonkeyPatch) -> None:
    gpus = four_gpus()[:2]
    gpus[0].mig_slices = ("MIG-1111-aaaa", "MIG-2222-bbbb")
    h = host(monkeypatch, gpus)
    env = {"CUDA_VISIBLE_DEVICES": "MIG-2222-bbbb"}
    status = meter(h, env).probe()
    assert status.startswith("unavailable: MIG-2222-bbbb is a MIG slice")
    assert f"belongs to the physical GPU {gpus[0].uuid}" in status and "nvml:mig=whole" in status

    r = window(h, meter(h, env, mig="whole"), 0.0, 2.0)
    key = f"gpu:{gpus[0].uuid}"
    assert r.energy_j == {key: 200.0}  # the whole GPU's 100 W, every slice included
    assert r.details["shared_physical_gpu"] is True
    assert r.details["devices"][key]["mig_mode"] == "enabled"
    assert r.details["devices"][key]["visible_as"] == "MIG-2222-bbbb"
    # Two slices of one GPU: its counter is read once, not twice.
    both = window(h, meter(h, {"CUDA_VISIBLE_DEVICES": "MIG-1111-aaaa,MIG-2222-bbbb"}, mig="whole"), 0.0, 2.0)
    assert both.energy_j == {key: 200.0}


def test_window_state_and_other_processes_flag_a_shared_device(monkeypatch: pytest.MonkeyPatch) -> None:
    gpu = FakeGpu("GPU-aaaa", "00000000:07:00.0", temperature_c=83, sm_clock_mhz=1095, power_limit_w=300,
                  throttle_mask=0x4 | 0x40, pids=(4242,))
    h = host(monkeypatch, [gpu])
    r = window(h, meter(h), 0.0, 2.0)
    state = r.details["state"]["gpu:GPU-aaaa"]
    assert state == {"temperature_c": 83, "sm_clock_mhz": 1095, "power_limit_w": 300.0,
                     "throttle_reasons": ["sw_power_cap", "hw_thermal_slowdown"], "other_processes": [4242]}
    assert r.details["device_shared"] is True
    assert throttle_names(0x1 | 0x800) == ["gpu_idle", "0x800"]


def test_power_sampling_of_one_second_averages_smears_a_step(monkeypatch: pytest.MonkeyPatch) -> None:
    # No energy counter; power steps from 100 W to 300 W at 10 s. NVML's power reading is the mean of
    # the last second, so it ramps from 100 to 300 W over 10..11 s. Polled every 0.1 s over 10..30 s:
    # trapezoid = (100 + 300) / 2 x 1 s + 300 W x 19 s = 5900 J, while 6000 J flowed; the smear is
    # half the averaging period x the step (0.5 s x 200 W = 100 J), and the reading says why.
    gpu = FakeGpu("GPU-aaaa", "00000000:07:00.0", Power([(0.0, 100.0), (10.0, 300.0)]), counter=False)
    h = host(monkeypatch, [gpu])
    m = meter(h, sample_interval_s=3600)  # the thread never fires; the test polls on its clock
    h.clock.t_s = 10.0
    m.start()
    for i in range(1, 201):
        h.clock.t_s = 10.0 + i / 10
        m.poll()
    r = m.stop()
    assert r.ok and r.details["method"] == {"gpu:GPU-aaaa": "power-sampling"}
    assert r.energy_j["gpu:GPU-aaaa"] == pytest.approx(5900.0, abs=1e-6)
    assert 6000.0 - r.energy_j["gpu:GPU-aaaa"] == pytest.approx(0.5 * 200.0, abs=1e-6)
    assert "1 s average" in r.details["power_averaging_note"]
    m.close()


def test_meter_parameters_are_typed_like_model_parameters() -> None:
    m = NvmlMeter.from_spec("nvml:devices=0+GPU-8f2c,mig=whole,min_window_s=5")
    assert m.devices == ["0", "GPU-8f2c"] and m.mig == "whole" and m.min_window_s == 5.0
    assert NvmlMeter.from_spec("nvml:devices=0").devices == ["0"]
    with pytest.raises(SpecError, match="mig must be one of refuse, whole"):
        NvmlMeter.from_spec("nvml:mig=slice")
    with pytest.raises(SpecError, match="unknown parameter 'device'"):
        NvmlMeter.from_spec("nvml:device=0")
    with pytest.raises(SpecError, match="min_window_s must be a number > 0"):
        NvmlMeter.from_spec("nvml:min_window_s=0")


def test_trapezoid_varying_power() -> None:
    samples = [(0.0, 100_000.0), (0.5, 200_000.0), (1.5, 200_000.0)]
    # (100_000 + 200_000) / 2 x 0.5 = 75_000; 200_000 x 1.0 = 200_000; total 275_000 mJ
    assert trapezoid_energy_mj(samples) == 275_000.0
    assert trapezoid_energy_mj(samples[:1]) == 0.0


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
    nv.nvmlDeviceGetCount.side_effect = lambda: 0
    assert NvmlMeter().probe() == "unavailable: NVML found no GPUs"
    nv.nvmlShutdown.assert_called_once_with()


def test_no_counter_and_no_power(nv: mock.MagicMock) -> None:
    nv.nvmlDeviceGetTotalEnergyConsumption.side_effect = pynvml.NVMLError_NotSupported()
    nv.nvmlDeviceGetPowerUsage.side_effect = pynvml.NVMLError_NotSupported()
    assert NvmlMeter(environ={}, cuda_uuids=lambda: None).probe() == (
        "unavailable: GPU GPU-aaaaaaaa-0000-0000-0000-000000000000 has neither an energy counter nor a power "
        "reading: not supported by this GPU or driver"
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


def test_nvml_devices_from_the_command_line_is_typed_not_unavailable(monkeypatch: pytest.MonkeyPatch) -> None:
    from un0_bench.harness.registry import Registry
    from un0_bench.harness.running.cell import make_meter
    from un0_bench.harness.running.config import meters_list

    gpus = four_gpus()
    host(monkeypatch, gpus)
    monkeypatch.setattr(nvml, "_torch_cuda_uuids", lambda: None)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", f"{gpus[2].uuid},{gpus[0].uuid}")
    registry = Registry("meter")
    registry.register("nvml", NvmlMeter)
    specs = meters_list("nvml:devices=1,mig=whole,proxy")
    assert specs == ["nvml:devices=1,mig=whole", "proxy"]
    m = make_meter(specs[0], registry)
    assert isinstance(m, NvmlMeter) and m.devices == ["1"] and m.mig == "whole"
    assert [g.uuid for g in m._gpus] == [gpus[0].uuid]  # CUDA device 1 is NVML GPU 0 here
    with pytest.raises(SpecError, match="mig must be one of refuse, whole"):
        make_meter("nvml:mig=slice", registry)
    m.close()
