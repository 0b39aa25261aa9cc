"""The nvml meter: NVIDIA GPU energy through NVML (``pynvml``, from the nvidia-ml-py package).

This is the only module that imports ``pynvml``, and it does so lazily through :func:`_pynvml`, so
importing the harness never touches the driver and tests patch that one function. NVML errors are
translated into reasons in one place, :func:`_translated`.
"""

from __future__ import annotations

import itertools
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from types import ModuleType
from typing import Any

from un0_bench.harness.meters.base import Meter, MeterUnavailable, Reading, unavailable

ENERGY_COUNTER = "energy-counter"
POWER_SAMPLING = "power-sampling"


def _pynvml() -> ModuleType:
    """Import and return ``pynvml``; the single import point, patched in tests."""
    import pynvml

    return pynvml


def _reason(nv: ModuleType, err: BaseException) -> str:
    """A human reason for an NVML error (the one place vendor errors become words)."""
    if isinstance(err, nv.NVMLError_LibraryNotFound):
        return "NVML library (libnvidia-ml.so.1) not found: no NVIDIA driver on this host"
    if isinstance(err, nv.NVMLError_DriverNotLoaded):
        return "the NVIDIA kernel driver is not loaded (check `nvidia-smi`)"
    if isinstance(err, nv.NVMLError_NoPermission):
        return "no permission to query the GPU through NVML"
    if isinstance(err, nv.NVMLError_GpuIsLost):
        return "the GPU fell off the bus or is otherwise inaccessible"
    if isinstance(err, (nv.NVMLError_NotSupported, nv.NVMLError_FunctionNotFound)):
        return "not supported by this GPU or driver"
    return f"NVML error: {err}"


@contextmanager
def _translated(nv: ModuleType, what: str) -> Iterator[None]:
    """Turn any NVML error raised inside the block into ``MeterUnavailable("<what>: <reason>")``."""
    try:
        yield
    except nv.NVMLError as err:
        raise MeterUnavailable(f"{what}: {_reason(nv, err)}") from err


def _sync_cuda() -> None:
    """Wait for queued CUDA work on every visible device, so counters are read after it ran.

    Only torch queues GPU work asynchronously in this project. If torch was never imported, or never
    initialised CUDA, nothing is queued, and checking ``sys.modules`` avoids paying for either.
    """
    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_initialized():
        return
    # All devices: CUDA and NVML may number GPUs differently (CUDA_VISIBLE_DEVICES, PCI order).
    for device in range(torch.cuda.device_count()):
        torch.cuda.synchronize(device)


def trapezoid_energy_mj(samples: list[tuple[float, float]]) -> float:
    """Energy in millijoules from ``(time_s, power_mw)`` samples, by the trapezoid rule."""
    return float(sum((p0 + p1) / 2 * (t1 - t0) for (t0, p0), (t1, p1) in itertools.pairwise(samples)))


@dataclass
class _Gpu:
    index: int  # NVML index
    handle: Any  # NVML device handle
    method: str  # ENERGY_COUNTER or POWER_SAMPLING

    @property
    def key(self) -> str:
        return f"gpu:{self.index}"


class _PowerSampler:
    """Background thread sampling ``nvmlDeviceGetPowerUsage`` (mW) for GPUs without an energy counter."""

    def __init__(self, nv: ModuleType, gpus: list[_Gpu], clock: Callable[[], float], interval_s: float):
        self._nv = nv
        self._gpus = gpus
        self._clock = clock
        self._interval_s = interval_s
        self.samples: dict[str, list[tuple[float, float]]] = {g.key: [] for g in gpus}
        self.error: BaseException | None = None
        # The lock keeps (time, power) pairs in time order when the thread and the caller both sample.
        self._lock = threading.Lock()
        self._halt = threading.Event()
        self._thread = threading.Thread(target=self._run, name="nvml-power-sampler", daemon=True)

    def sample(self, time_s: float | None = None) -> None:
        with self._lock:
            t_s = self._clock() if time_s is None else time_s
            for g in self._gpus:
                self.samples[g.key].append((t_s, float(self._nv.nvmlDeviceGetPowerUsage(g.handle))))

    def start(self, t0_s: float) -> None:
        # The first sample is pinned to the window's start time so the integral covers the window.
        self.sample(t0_s)
        self._thread.start()

    def halt(self) -> None:
        self._halt.set()
        if self._thread.is_alive():
            self._thread.join()

    def _run(self) -> None:
        while not self._halt.wait(self._interval_s):
            try:
                self.sample()
            except Exception as exc:  # reported by the meter at stop(); a thread must not die silently
                self.error = exc
                return


class NvmlMeter(Meter):
    """Energy per NVIDIA GPU in joules, domain keys ``gpu:<NVML index>``.

    Each GPU is read with ``nvmlDeviceGetTotalEnergyConsumption`` (a millijoule counter, Volta and
    newer). GPUs without it fall back to sampling ``nvmlDeviceGetPowerUsage`` (milliwatts) in a
    background thread and integrating by the trapezoid rule; ``details["method"]`` says which.

    The energy counter updates about every 100 ms, so a window shorter than :attr:`min_window_s`
    cannot be trusted: the runner repeats such workloads inside one window until it is long enough
    (that loop belongs to the runner, not the meter). A reading from a window that was still too
    short has ``details["window_too_short"] = True``.

    The device is synchronised before every read, so the counter is read after the queued work ran
    rather than when the CPU finished queueing it.

    Args:
        devices: NVML indices to measure; ``None`` measures every GPU.
        sync: Called before each read to wait for queued GPU work. Default: synchronise every CUDA
            device if torch has initialised CUDA, else nothing.
        clock: Monotonic clock in seconds; injectable so tests get exact durations.
        sample_interval_s: Period of the power-sampling fallback.
    """

    name = "nvml"
    sees_whole_device = True
    #: Shortest window the energy counter resolves (it updates about every 100 ms).
    min_window_s: float = 0.1

    def __init__(
        self,
        devices: list[int] | None = None,
        sync: Callable[[], None] | None = None,
        clock: Callable[[], float] = time.perf_counter,
        sample_interval_s: float = 0.02,
    ) -> None:
        super().__init__()
        self.devices = list(devices) if devices is not None else None
        self._sync = sync if sync is not None else _sync_cuda
        self._clock = clock
        self.sample_interval_s = sample_interval_s
        self._nv: ModuleType | None = None  # set while NVML is initialised
        self._gpus: list[_Gpu] = []
        self._start_mj: dict[str, int] = {}
        self._t0_s = 0.0
        self._sampler: _PowerSampler | None = None

    # -- library lifetime -----------------------------------------------------------------------

    def _init(self) -> ModuleType:
        """Initialise NVML once and choose each GPU's method. Raises MeterUnavailable with the reason."""
        if self._nv is not None:
            return self._nv
        try:
            nv = _pynvml()
        except ImportError as exc:
            raise MeterUnavailable("nvidia-ml-py (module pynvml) is not installed") from exc
        with _translated(nv, "cannot initialise NVML"):
            nv.nvmlInit()
        try:
            with _translated(nv, "cannot enumerate GPUs"):
                count = nv.nvmlDeviceGetCount()
            if count == 0:
                raise MeterUnavailable("NVML found no GPUs")
            indices = self.devices if self.devices is not None else list(range(count))
            missing = [i for i in indices if not 0 <= i < count]
            if missing:
                raise MeterUnavailable(f"GPU index {missing} requested, but NVML sees GPUs 0..{count - 1}")
            gpus = []
            for i in indices:
                with _translated(nv, f"GPU {i}"):
                    handle = nv.nvmlDeviceGetHandleByIndex(i)
                gpus.append(_Gpu(index=i, handle=handle, method=self._method(nv, i, handle)))
        except BaseException:
            # nvmlInit is reference-counted: balance it on the way out, or the library stays loaded.
            self._shutdown(nv)
            raise
        self._nv, self._gpus = nv, gpus
        return nv

    @staticmethod
    def _method(nv: ModuleType, index: int, handle: Any) -> str:
        with _translated(nv, f"GPU {index} has neither an energy counter nor a power reading"):
            try:
                nv.nvmlDeviceGetTotalEnergyConsumption(handle)
                return ENERGY_COUNTER
            except (nv.NVMLError_NotSupported, nv.NVMLError_FunctionNotFound):
                pass  # pre-Volta GPU, or a driver too old for the call: sample power instead
            nv.nvmlDeviceGetPowerUsage(handle)
            return POWER_SAMPLING

    @staticmethod
    def _shutdown(nv: ModuleType) -> None:
        try:
            nv.nvmlShutdown()
        except nv.NVMLError:
            pass  # nothing useful to do while releasing

    def close(self) -> None:
        """Stop any sampler thread and release NVML (``nvmlShutdown``)."""
        if self._sampler is not None:
            self._sampler.halt()
            self._sampler = None
        if self._nv is not None:
            self._shutdown(self._nv)
            self._nv, self._gpus = None, []

    def probe(self) -> str:
        """Return ``"ok"`` or ``"unavailable: <reason>"``. Keeps NVML initialised for later windows."""
        try:
            self._init()
        except MeterUnavailable as exc:
            return f"unavailable: {exc}"
        except Exception as exc:  # probe() must never raise
            return f"unavailable: unexpected NVML failure: {exc!r}"
        return "ok"

    # -- the window -----------------------------------------------------------------------------

    def _read_counters_mj(self, nv: ModuleType) -> dict[str, int]:
        with _translated(nv, "cannot read the GPU energy counter"):
            return {
                g.key: nv.nvmlDeviceGetTotalEnergyConsumption(g.handle)
                for g in self._gpus
                if g.method == ENERGY_COUNTER
            }

    def _start(self) -> None:
        nv = self._init()
        self._sync()
        self._start_mj = self._read_counters_mj(nv)
        self._t0_s = self._clock()
        sampled = [g for g in self._gpus if g.method == POWER_SAMPLING]
        if sampled:
            sampler = _PowerSampler(nv, sampled, self._clock, self.sample_interval_s)
            with _translated(nv, "cannot read GPU power"):
                sampler.start(self._t0_s)
            self._sampler = sampler

    def _stop(self) -> Reading:
        nv = self._nv
        assert nv is not None  # _start initialised it
        self._sync()
        sampler, self._sampler = self._sampler, None
        if sampler is not None:
            sampler.halt()  # before taking the end time, so no thread sample lands after it
        try:
            end_mj = self._read_counters_mj(nv)
            t1_s = self._clock()
            if sampler is not None:
                if sampler.error is not None:
                    raise MeterUnavailable(f"power sampling failed: {_reason(nv, sampler.error)}")
                with _translated(nv, "cannot read GPU power"):
                    sampler.sample(t1_s)  # the last sample is pinned to the window's end time
        except MeterUnavailable as exc:
            reading = unavailable(self.name, str(exc))
            reading.duration_s = self._clock() - self._t0_s
            return reading

        duration_s = t1_s - self._t0_s
        energy_j: dict[str, float] = {}
        for g in self._gpus:
            if g.method == ENERGY_COUNTER:
                # NB: the counter is a uint64 in mJ (wraps after ~5e8 years at 1 kW), so no wrap
                # handling; it restarts only when the driver reloads, which shows as a negative delta.
                delta_mj = end_mj[g.key] - self._start_mj[g.key]
                if delta_mj < 0:
                    reading = unavailable(self.name, f"{g.key} energy counter went backwards (driver reloaded?)")
                    reading.duration_s = duration_s
                    return reading
                energy_j[g.key] = delta_mj / 1000
            else:
                # NB: power readings are themselves averages over the driver's sampling period (tens
                # of ms on older GPUs, 1 s on Ampere and newer), so edges of short windows are smeared.
                energy_j[g.key] = trapezoid_energy_mj(sampler.samples[g.key]) / 1000

        details: dict[str, Any] = {
            "method": {g.key: g.method for g in self._gpus},
            "window_too_short": duration_s < self.min_window_s,
            "min_window_s": self.min_window_s,
        }
        if sampler is not None:
            details["power_samples"] = {key: len(s) for key, s in sampler.samples.items()}
            details["sample_interval_s"] = self.sample_interval_s
        return Reading(meter=self.name, duration_s=duration_s, energy_j=energy_j, details=details)
