"""A fake NVML host as unkind as the hardware, patched in where pynvml is used.

- The energy counter is a staircase: it steps every 100 ms (``STEP_S``), driven by the test's clock,
  so a window reads the energy at the last step before each end, never the exact integral.
- ``nvmlDeviceGetPowerUsage`` is the average over the last second (``AVERAGE_S``), as on Ampere.
- Several GPUs with UUIDs and PCI bus ids, numbered by NVML in PCI order; MIG-enabled GPUs have
  slices with their own ``MIG-`` UUIDs whose counter is the parent's.
- The module object is an autospec of the real pynvml, with its real error classes and constants.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from types import SimpleNamespace
from unittest import mock

import pynvml

STEP_S = 0.1
AVERAGE_S = 1.0


class TestClock:
    """A monotonic clock the test moves by hand."""

    __test__ = False  # not a pytest class

    def __init__(self, t_s: float = 0.0) -> None:
        self.t_s = t_s

    def __call__(self) -> float:
        return self.t_s

    def advance(self, dt_s: float) -> None:
        self.t_s += dt_s


@dataclass
class Power:
    """Piecewise-constant power: ``[(from_s, watts), ...]`` in time order, starting at 0 s."""

    steps: list[tuple[float, float]]

    def energy_j(self, t_s: float) -> float:
        """Exact energy from 0 to ``t_s``."""
        total = 0.0
        for i, (t0, w) in enumerate(self.steps):
            t1 = self.steps[i + 1][0] if i + 1 < len(self.steps) else math.inf
            if t_s <= t0:
                break
            total += w * (min(t_s, t1) - t0)
        return total


@dataclass
class FakeGpu:
    uuid: str
    pci_bus_id: str
    power: Power = field(default_factory=lambda: Power([(0.0, 100.0)]))
    name: str = "NVIDIA A100-SXM4-80GB"
    counter: bool = True  # False: pre-Volta, no energy counter
    mig_slices: tuple[str, ...] = ()  # MIG UUIDs; non-empty means MIG mode is enabled
    temperature_c: int = 45
    sm_clock_mhz: int = 1410
    power_limit_w: float = 400.0
    throttle_mask: int = 0
    pids: tuple[int, ...] = ()


class FakeNvmlHost:
    """GPUs in NVML (PCI) order and the clock that drives their counters."""

    def __init__(self, gpus: list[FakeGpu], clock: TestClock, driver: str = "550.54.15") -> None:
        self.gpus = gpus
        self.clock = clock
        self.driver = driver
        self.counter_reads: list[str] = []  # UUIDs whose energy counter was read, in order

    def counter_mj(self, gpu: FakeGpu) -> int:
        stepped_s = math.floor(self.clock() / STEP_S + 1e-9) * STEP_S
        return round(gpu.power.energy_j(stepped_s) * 1000)

    def power_mw(self, gpu: FakeGpu) -> int:
        t = self.clock()
        t0 = max(0.0, t - AVERAGE_S)
        if t == t0:
            return round(gpu.power.steps[0][1] * 1000)
        return round((gpu.power.energy_j(t) - gpu.power.energy_j(t0)) / (t - t0) * 1000)

    def _gpu(self, handle: tuple) -> FakeGpu:
        if handle[0] != "gpu":
            raise pynvml.NVMLError_InvalidArgument()
        return self.gpus[handle[1]]

    def module(self) -> mock.MagicMock:
        nv = mock.create_autospec(pynvml, instance=False)
        for name in dir(pynvml):
            value = getattr(pynvml, name)
            if name.startswith("NVMLError") or (name.isupper() and isinstance(value, int)):
                setattr(nv, name, value)
        nv.nvmlDeviceGetCount.side_effect = lambda: len(self.gpus)
        nv.nvmlDeviceGetHandleByIndex.side_effect = lambda i: ("gpu", i)

        def uuid(handle: tuple) -> str:
            if handle[0] == "mig":
                return self.gpus[handle[1]].mig_slices[handle[2]]
            return self._gpu(handle).uuid

        def by_uuid(text: str) -> tuple:
            for i, g in enumerate(self.gpus):
                if g.uuid == text:
                    return ("gpu", i)
                if text in g.mig_slices:
                    return ("mig", i, g.mig_slices.index(text))
            raise pynvml.NVMLError_NotFound()

        def energy(handle: tuple) -> int:
            g = self._gpu(handle)
            if not g.counter:
                raise pynvml.NVMLError_NotSupported()
            self.counter_reads.append(g.uuid)
            return self.counter_mj(g)

        def mig_mode(handle: tuple) -> tuple[int, int]:
            on = bool(self._gpu(handle).mig_slices)
            return (1, 1) if on else (0, 0)

        nv.nvmlDeviceGetUUID.side_effect = uuid
        nv.nvmlDeviceGetHandleByUUID.side_effect = by_uuid
        nv.nvmlDeviceGetDeviceHandleFromMigDeviceHandle.side_effect = lambda h: ("gpu", h[1])
        nv.nvmlDeviceGetMigMode.side_effect = mig_mode
        nv.nvmlDeviceGetName.side_effect = lambda h: self._gpu(h).name
        nv.nvmlDeviceGetPciInfo.side_effect = lambda h: SimpleNamespace(busId=self._gpu(h).pci_bus_id.encode())
        nv.nvmlSystemGetDriverVersion.side_effect = lambda: self.driver
        nv.nvmlDeviceGetEnforcedPowerLimit.side_effect = lambda h: round(self._gpu(h).power_limit_w * 1000)
        nv.nvmlDeviceGetTotalEnergyConsumption.side_effect = energy
        nv.nvmlDeviceGetPowerUsage.side_effect = lambda h: self.power_mw(self._gpu(h))
        nv.nvmlDeviceGetTemperature.side_effect = lambda h, sensor: self._gpu(h).temperature_c
        nv.nvmlDeviceGetClockInfo.side_effect = lambda h, kind: self._gpu(h).sm_clock_mhz
        nv.nvmlDeviceGetCurrentClocksThrottleReasons.side_effect = lambda h: self._gpu(h).throttle_mask
        nv.nvmlDeviceGetComputeRunningProcesses.side_effect = (
            lambda h: [SimpleNamespace(pid=p, usedGpuMemory=0) for p in self._gpu(h).pids])
        return nv


def four_gpus() -> list[FakeGpu]:
    """Four GPUs drawing 100, 200, 300 and 400 W, in NVML (PCI) order."""
    return [FakeGpu(uuid=f"GPU-{c * 8}-0000-0000-0000-{i:012d}", pci_bus_id=f"00000000:{0x07 + i:02X}:00.0",
                    power=Power([(0.0, 100.0 * (i + 1))]))
            for i, c in enumerate("abcd")]
