"""The nvml meter: NVIDIA GPU energy through NVML (``pynvml``, from the nvidia-ml-py package).

This is the only module that imports ``pynvml``, and it does so lazily through :func:`_pynvml`, so
importing the harness never touches the driver and tests patch that one function. NVML errors are
translated into reasons in one place, :func:`_translated`.
"""

from __future__ import annotations

import itertools
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from types import ModuleType
from typing import Any

from un0_bench.harness.core.spec import Param
from un0_bench.harness.meters.base import Meter, MeterUnavailable, Reading, sync_devices, unavailable

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
    """Wait for queued CUDA work on every visible device (:func:`~un0_bench.harness.meters.base.sync_devices`)."""
    sync_devices()


def trapezoid_energy_mj(samples: list[tuple[float, float]]) -> float:
    """Energy in millijoules from ``(time_s, power_mw)`` samples, by the trapezoid rule."""
    return float(sum((p0 + p1) / 2 * (t1 - t0) for (t0, p0), (t1, p1) in itertools.pairwise(samples)))


#: NVML's clock-event ("throttle") reason bits, named as the record shows them.
_THROTTLE_BITS = {
    0x1: "gpu_idle", 0x2: "applications_clocks_setting", 0x4: "sw_power_cap", 0x8: "hw_slowdown",
    0x10: "sync_boost", 0x20: "sw_thermal_slowdown", 0x40: "hw_thermal_slowdown", 0x80: "hw_power_brake_slowdown",
    0x100: "display_clock_setting", 0x200: "board_limit", 0x400: "reliability",
}


def throttle_names(mask: int) -> list[str]:
    """Names of the clock-event reasons set in ``mask`` (unknown bits as hex)."""
    names = [name for bit, name in _THROTTLE_BITS.items() if mask & bit]
    rest = mask & ~sum(_THROTTLE_BITS)
    return names + ([hex(rest)] if rest else [])


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _norm_uuid(uuid: str) -> str:
    """``GPU-8f2c...`` and torch's bare ``8f2c...`` compare equal (case-insensitive)."""
    u = uuid.strip().lower()
    return u[4:] if u.startswith("gpu-") else u


def _torch_cuda_uuids() -> list[str] | None:
    """UUIDs of the CUDA devices torch sees, in CUDA order; ``None`` if torch has no CUDA here.

    Asking torch is the only way to know CUDA's own order (``CUDA_DEVICE_ORDER`` defaults to
    FASTEST_FIRST, while NVML numbers GPUs in PCI bus order). Only if torch is already imported.
    """
    torch = sys.modules.get("torch")
    if torch is None:
        return None
    try:
        if not torch.cuda.is_available():
            return None
        return [str(torch.cuda.get_device_properties(i).uuid) for i in range(torch.cuda.device_count())]
    except Exception:  # an old torch without .uuid, a broken driver: fall back on CUDA_VISIBLE_DEVICES
        return None


@dataclass
class _Gpu:
    """One measured physical GPU and the facts every reading carries about it."""

    handle: Any  # NVML handle of the physical GPU (the parent of a MIG slice)
    method: str  # ENERGY_COUNTER or POWER_SAMPLING
    uuid: str  # of the physical GPU
    facts: dict[str, Any]  # uuid, nvml_index, cuda_index, pci_bus_id, name, driver, power_limit_w, mig_mode ...

    @property
    def key(self) -> str:
        return f"gpu:{self.uuid}"


@dataclass
class _Visible:
    """One CUDA device this process can see, resolved to NVML."""

    cuda_index: int | None  # CUDA ordinal (torch.device("cuda", i)); None for a device named by UUID only
    handle: Any  # NVML handle (a MIG device handle for a MIG slice)
    uuid: str  # as NVML spells it: GPU-... or MIG-...
    how: str  # how the mapping was made, for the record


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
    """Energy of exactly the NVIDIA GPUs this run uses, in joules, domain keys ``gpu:<UUID>``.

    Attribution: each CUDA device (torch's ``cuda:i``, after ``CUDA_VISIBLE_DEVICES`` reordered and
    hid devices) is mapped to its NVML handle by UUID, never by index: NVML numbers GPUs in PCI bus
    order and sees every GPU of the node, CUDA numbers only the visible ones, fastest first by
    default. The UUIDs come from torch when it has CUDA; otherwise from ``CUDA_VISIBLE_DEVICES``
    (UUIDs, unique UUID prefixes, MIG UUIDs or NVML indices; an index is read in PCI order, which
    the record says). Each reading carries, per GPU, its UUID, PCI bus id, name, driver, power
    limit, MIG mode and how it was mapped, and the state at the window's end: temperature, SM clock,
    power limit, clock-event (throttle) reasons and other processes on the device.

    MIG: NVML's energy counter belongs to the physical GPU, shared with every slice. A MIG slice
    (or a GPU in MIG mode) is refused with that reason unless ``mig="whole"``, which measures the
    whole physical GPU and marks the reading ``shared_physical_gpu``.

    Windows: the counter steps about every 100 ms, so a window's quantisation error is up to one
    step (0.1 s x power) and windows shorter than :attr:`min_window_s` (default 2 s: under 5%) are
    not trusted. A counter that did not advance is never a measurement: the reading is unavailable.
    GPUs without the counter fall back to sampling ``nvmlDeviceGetPowerUsage`` (milliwatts; a 1 s
    average on Ampere and newer) in a background thread, integrated by the trapezoid rule.

    Args:
        devices: CUDA devices to measure: CUDA indices (``"0"``) or NVML UUIDs (``"GPU-8f2c..."``,
            ``"MIG-..."``); ``None`` measures every CUDA device this process can see.
        mig: ``"refuse"`` (default) or ``"whole"`` (measure the physical GPU, marked shared).
        min_window_s: Shortest trusted window in seconds (stated in every record).
        sync: Called before each read to wait for queued GPU work. Default: synchronise every CUDA
            device if torch has initialised CUDA, else nothing.
        clock: Monotonic clock in seconds; injectable so tests get exact durations.
        sample_interval_s: Period of the power-sampling fallback.
        environ: Environment read for ``CUDA_VISIBLE_DEVICES``/``CUDA_DEVICE_ORDER`` (tests pass a dict).
        cuda_uuids: Returns the UUIDs torch sees in CUDA order, or ``None``; injectable for tests.
    """

    name = "nvml"
    sees_whole_device = True
    #: Default shortest trusted window: 20 counter steps, so one step of quantisation is under 5%.
    min_window_s: float = 2.0
    params = {
        "devices": Param(list, None, "CUDA indices or NVML UUIDs joined by + (default: every visible CUDA device)"),
        "mig": Param(str, "refuse", "MIG slices: refuse, or measure the whole physical GPU",
                     choices=("refuse", "whole")),
        "min_window_s": Param(float, 2.0, "shortest trusted window in seconds", low=0.0, low_open=True),
    }

    def __init__(
        self,
        devices: list[int | str] | None = None,
        mig: str = "refuse",
        min_window_s: float = 2.0,
        sync: Callable[[], None] | None = None,
        clock: Callable[[], float] = time.perf_counter,
        sample_interval_s: float = 0.02,
        environ: Mapping[str, str] | None = None,
        cuda_uuids: Callable[[], list[str] | None] | None = None,
    ) -> None:
        super().__init__()
        if mig not in ("refuse", "whole"):
            raise ValueError(f"mig must be 'refuse' or 'whole', got {mig!r}")
        self.devices = [str(d) for d in devices] if devices is not None else None
        self.mig = mig
        self.min_window_s = float(min_window_s)
        self._sync = sync if sync is not None else _sync_cuda
        self._clock = clock
        self.sample_interval_s = sample_interval_s
        self._environ = environ if environ is not None else os.environ
        self._cuda_uuids = cuda_uuids
        self._nv: ModuleType | None = None  # set while NVML is initialised
        self._gpus: list[_Gpu] = []
        self._notes: list[str] = []
        self._start_mj: dict[str, int] = {}
        self._t0_s = 0.0
        self._sampler: _PowerSampler | None = None

    # -- attribution ----------------------------------------------------------------------------

    def _all_uuids(self, nv: ModuleType, count: int) -> list[tuple[int, Any, str]]:
        out = []
        for i in range(count):
            with _translated(nv, f"NVML GPU {i}"):
                handle = nv.nvmlDeviceGetHandleByIndex(i)
                out.append((i, handle, _text(nv.nvmlDeviceGetUUID(handle))))
        return out

    def _by_uuid(self, nv: ModuleType, uuid: str, every: list[tuple[int, Any, str]]) -> tuple[Any, str] | None:
        """NVML handle and full UUID for a UUID or unique UUID prefix (as CUDA accepts); MIG UUIDs too."""
        if uuid.strip().upper().startswith("MIG-"):
            try:
                handle = nv.nvmlDeviceGetHandleByUUID(uuid.strip())
            except nv.NVMLError:
                return None
            return handle, uuid.strip()
        want = _norm_uuid(uuid)
        hits = [(h, u) for _, h, u in every if _norm_uuid(u).startswith(want)]
        return hits[0] if len(hits) == 1 else None

    def _visible(self, nv: ModuleType, every: list[tuple[int, Any, str]]) -> list[_Visible]:
        """The CUDA devices of this process in CUDA order, each mapped to NVML by UUID."""
        torch_uuids = (self._cuda_uuids or _torch_cuda_uuids)()
        if torch_uuids is not None:
            out = []
            for i, uuid in enumerate(torch_uuids):
                hit = self._by_uuid(nv, uuid, every)
                if hit is None:
                    raise MeterUnavailable(f"CUDA device {i} (UUID {uuid}) is not among the GPUs NVML sees")
                out.append(_Visible(i, hit[0], hit[1], "torch UUID"))
            return out
        env = self._environ.get("CUDA_VISIBLE_DEVICES")
        pci_order = self._environ.get("CUDA_DEVICE_ORDER") == "PCI_BUS_ID"
        if env is None:
            if len(every) > 1 and not pci_order:
                self._notes.append("CUDA order assumed to be PCI bus order (torch has no CUDA here and "
                                   "CUDA_DEVICE_ORDER is not PCI_BUS_ID)")
            return [_Visible(i, h, u, "every GPU (CUDA_VISIBLE_DEVICES unset)") for i, h, u in every]
        out = []
        for item in (t.strip() for t in env.split(",")):
            if item.lstrip("-").isdigit():
                n = int(item)
                if not 0 <= n < len(every):
                    break  # CUDA stops at the first invalid entry: later ones are hidden too
                if not pci_order and len(every) > 1:
                    self._notes.append(f"CUDA_VISIBLE_DEVICES index {n} read as NVML index {n} (PCI bus order); "
                                       "set CUDA_DEVICE_ORDER=PCI_BUS_ID or use UUIDs to be sure")
                _, handle, uuid = every[n]
                out.append(_Visible(len(out), handle, uuid, f"CUDA_VISIBLE_DEVICES index {n}"))
                continue
            hit = self._by_uuid(nv, item, every)
            if hit is None:
                break
            out.append(_Visible(len(out), hit[0], hit[1], f"CUDA_VISIBLE_DEVICES UUID {item}"))
        return out

    def _requested(self, nv: ModuleType, every: list[tuple[int, Any, str]]) -> list[_Visible]:
        visible = self._visible(nv, every)
        if not visible:
            raise MeterUnavailable("no CUDA device is visible to this process (CUDA_VISIBLE_DEVICES hides them all)")
        if self.devices is None:
            return visible
        out = []
        for d in self.devices:
            if d.isdigit():
                i = int(d)
                if i >= len(visible):
                    raise MeterUnavailable(f"CUDA device {i} requested, but this process sees CUDA devices "
                                           f"0..{len(visible) - 1}")
                out.append(visible[i])
                continue
            hit = self._by_uuid(nv, d, every)
            if hit is None:
                raise MeterUnavailable(f"no GPU with UUID {d!r} (or it is not a unique prefix)")
            cuda = next((v.cuda_index for v in visible if _norm_uuid(v.uuid) == _norm_uuid(hit[1])), None)
            out.append(_Visible(cuda, hit[0], hit[1], "UUID given"))
        return out

    def _physical(self, nv: ModuleType, v: _Visible, every: list[tuple[int, Any, str]]) -> tuple[Any, str, bool]:
        """``(handle, uuid, shared)`` of the physical GPU behind ``v``; refuses MIG unless ``mig="whole"``."""
        handle, uuid, shared = v.handle, v.uuid, False
        if uuid.upper().startswith("MIG-"):
            with _translated(nv, f"MIG device {uuid}"):
                handle = nv.nvmlDeviceGetDeviceHandleFromMigDeviceHandle(v.handle)
                uuid = _text(nv.nvmlDeviceGetUUID(handle))
            shared = True
        else:
            try:
                current, _pending = nv.nvmlDeviceGetMigMode(handle)
                shared = current == nv.NVML_DEVICE_MIG_ENABLE
            except nv.NVMLError:
                pass  # pre-Ampere GPUs have no MIG mode
        if shared and self.mig == "refuse":
            raise MeterUnavailable(
                f"{v.uuid} is a MIG slice (or its GPU is in MIG mode): NVML's energy counter belongs to the physical "
                f"GPU {uuid}, shared with every slice, so no energy reading of the slice exists; use nvml:mig=whole "
                f"to measure the whole GPU, marked 'shared physical GPU'")
        return handle, uuid, shared

    def _facts(self, nv: ModuleType, handle: Any, uuid: str, every: list[tuple[int, Any, str]],
               v: _Visible, shared: bool) -> dict[str, Any]:
        facts: dict[str, Any] = {
            "uuid": uuid,
            "nvml_index": next((i for i, _, u in every if u == uuid), None),
            "cuda_index": v.cuda_index,
            "visible_as": v.uuid,
            "mapped_by": v.how,
            "shared_physical_gpu": shared,
        }
        with _translated(nv, f"GPU {uuid}"):
            facts["name"] = _text(nv.nvmlDeviceGetName(handle))
            facts["pci_bus_id"] = _text(nv.nvmlDeviceGetPciInfo(handle).busId)
            facts["driver"] = _text(nv.nvmlSystemGetDriverVersion())
        try:
            facts["power_limit_w"] = nv.nvmlDeviceGetEnforcedPowerLimit(handle) / 1000
        except nv.NVMLError:
            facts["power_limit_w"] = None
        try:
            current, _pending = nv.nvmlDeviceGetMigMode(handle)
            facts["mig_mode"] = "enabled" if current == nv.NVML_DEVICE_MIG_ENABLE else "disabled"
        except nv.NVMLError:
            facts["mig_mode"] = "not supported"
        return facts

    # -- library lifetime -----------------------------------------------------------------------

    def _init(self) -> ModuleType:
        """Initialise NVML once and map the run's devices. Raises MeterUnavailable with the reason."""
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
            self._notes = []
            every = self._all_uuids(nv, count)
            gpus: list[_Gpu] = []
            for v in self._requested(nv, every):
                handle, uuid, shared = self._physical(nv, v, every)
                if any(g.uuid == uuid for g in gpus):
                    continue  # two slices of one GPU: its counter is read once
                facts = self._facts(nv, handle, uuid, every, v, shared)
                gpus.append(_Gpu(handle=handle, method=self._method(nv, uuid, handle), uuid=uuid, facts=facts))
        except BaseException:
            # nvmlInit is reference-counted: balance it on the way out, or the library stays loaded.
            self._shutdown(nv)
            raise
        self._nv, self._gpus = nv, gpus
        return nv

    @staticmethod
    def _method(nv: ModuleType, uuid: str, handle: Any) -> str:
        with _translated(nv, f"GPU {uuid} has neither an energy counter nor a power reading"):
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

    def _check(self) -> None:
        """Initialise NVML and find the GPUs; keeps NVML initialised for later windows."""
        self._init()

    def _probe_failure(self, exc: Exception) -> str:
        return f"unexpected NVML failure: {exc!r}"

    # -- the window -----------------------------------------------------------------------------

    def _read_counters_mj(self, nv: ModuleType) -> dict[str, int]:
        with _translated(nv, "cannot read the GPU energy counter"):
            return {
                g.key: nv.nvmlDeviceGetTotalEnergyConsumption(g.handle)
                for g in self._gpus
                if g.method == ENERGY_COUNTER
            }

    def _state(self, nv: ModuleType, g: _Gpu) -> dict[str, Any]:
        """The GPU's state now: temperature, SM clock, power limit, throttle reasons, other processes."""
        state: dict[str, Any] = {}
        reads: list[tuple[str, Callable[[], Any]]] = [
            ("temperature_c", lambda: nv.nvmlDeviceGetTemperature(g.handle, nv.NVML_TEMPERATURE_GPU)),
            ("sm_clock_mhz", lambda: nv.nvmlDeviceGetClockInfo(g.handle, nv.NVML_CLOCK_SM)),
            ("power_limit_w", lambda: nv.nvmlDeviceGetEnforcedPowerLimit(g.handle) / 1000),
            ("throttle_reasons", lambda: throttle_names(int(nv.nvmlDeviceGetCurrentClocksThrottleReasons(g.handle)))),
        ]
        for key, read in reads:
            try:
                state[key] = read()
            except nv.NVMLError as err:
                state[key] = None
                state.setdefault("unreadable", {})[key] = _reason(nv, err)
        try:
            pids = {int(p.pid) for p in nv.nvmlDeviceGetComputeRunningProcesses(g.handle)}
            # NB: inside a container NVML reports host PIDs, so this process may show as "other" too.
            state["other_processes"] = sorted(pids - {os.getpid()})
        except nv.NVMLError as err:
            state["other_processes"] = None
            state.setdefault("unreadable", {})["other_processes"] = _reason(nv, err)
        return state

    def poll(self) -> None:
        """Take a power sample now (GPUs without an energy counter); the counter needs no polling."""
        if self._running and self._sampler is not None and self._nv is not None:
            with _translated(self._nv, "cannot read GPU power"):
                self._sampler.sample()

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
                problem = ("went backwards (driver reloaded?)" if delta_mj < 0 else
                           f"did not advance in {duration_s:.3g} s (it steps about every 100 ms): no measurement"
                           if delta_mj == 0 else None)
                if problem:
                    reading = unavailable(self.name, f"{g.key} energy counter {problem}")
                    reading.duration_s = duration_s
                    return reading
                energy_j[g.key] = delta_mj / 1000
            else:
                # NB: power readings are themselves averages over the driver's sampling period (tens
                # of ms on older GPUs, 1 s on Ampere and newer), so edges of short windows are smeared.
                energy_j[g.key] = trapezoid_energy_mj(sampler.samples[g.key]) / 1000

        state = {g.key: self._state(nv, g) for g in self._gpus}
        details: dict[str, Any] = {
            "method": {g.key: g.method for g in self._gpus},
            "devices": {g.key: dict(g.facts) for g in self._gpus},
            "state": state,
            "device_shared": any(bool(s.get("other_processes")) for s in state.values()),
            "shared_physical_gpu": any(g.facts["shared_physical_gpu"] for g in self._gpus),
            "window_too_short": duration_s < self.min_window_s,
            "min_window_s": self.min_window_s,
        }
        if self._notes:
            details["attribution_notes"] = list(self._notes)
        if sampler is not None:
            details["power_samples"] = {key: len(s) for key, s in sampler.samples.items()}
            details["sample_interval_s"] = self.sample_interval_s
            details["power_averaging_note"] = ("nvmlDeviceGetPowerUsage is a 1 s average on Ampere and newer: "
                                               "the first and last second of a window are smeared")
        return Reading(meter=self.name, duration_s=duration_s, energy_j=energy_j, details=details)
