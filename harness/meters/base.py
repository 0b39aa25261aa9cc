"""The meter interface: a measurement window with ``start()`` and ``stop() -> Reading``.

A meter that cannot measure on this host says so with a reason (``status = "unavailable: ..."``)
and never reports 0 J in place of a measurement.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import Any, ClassVar

from un0_bench.harness.core.spec import ModelSpec, Param, bind


class MeterUnavailable(RuntimeError):
    """Raised by a meter's ``start()`` when it cannot measure on this host; the message is the reason."""


@dataclass
class Reading:
    """What one measurement window saw.

    Attributes:
        meter: Name of the meter that produced the reading.
        duration_s: Length of the window in seconds (monotonic clock).
        energy_j: Energy per domain in joules, e.g. ``{"package-0": 12.5, "dram-0": 1.2}`` or
            ``{"gpu:0": 30.1}``. Empty for meters that measure only time.
        status: ``"ok"`` or ``"unavailable: <reason>"``.
        details: Meter-specific facts a report should show (e.g. codecarbon's energy source,
            emissions in kg, whether a figure is an estimate). JSON-serialisable.
    """

    meter: str
    duration_s: float
    energy_j: dict[str, float] = field(default_factory=dict)
    status: str = "ok"
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    @property
    def total_energy_j(self) -> float | None:
        """Sum over domains in joules; ``None`` when unavailable or when the meter measures no energy."""
        if not self.ok or not self.energy_j:
            return None
        return float(sum(self.energy_j.values()))


class Meter(abc.ABC):
    """A measurement window. Subclasses implement ``_start`` and ``_stop``.

    Use as ``meter.start(); ...; reading = meter.stop()`` or as a context manager, which stops in
    ``finally`` so an exception never leaves a meter running. ``probe()`` tells whether the meter
    works on this host without measuring anything long.
    """

    #: Registry name of the meter (``"rapl"``, ``"nvml"``, ...).
    name: str = "meter"
    #: True for meters that see a whole device (CPU package, GPU), so idle power must be measured
    #: and subtracted; False for meters that only count the work itself (wall, proxy).
    sees_whole_device: bool = False
    #: Shortest window whose figure means something, in seconds: a window repeats the work until it
    #: is at least this long (every meter watches the same window, so the longest minimum applies).
    #: Stated in every record. 0 for meters that count rather than sample (proxy, wall).
    min_window_s: float = 0.0
    #: Typed parameters of the meter spec (``nvml:devices=0+1,mig=whole``), parsed like model
    #: parameters; ``None``: the meter takes none.
    params: ClassVar[dict[str, Param] | None] = None

    @classmethod
    def from_spec(cls, text: str) -> Meter:
        """Build the meter from its spec, each parameter parsed to its declared type (bad ones: SpecError)."""
        spec = ModelSpec.parse(text)
        return cls(**bind(spec, cls.params or {}))

    def __init__(self) -> None:
        self._running = False
        self.reading: Reading | None = None

    def probe(self) -> str:
        """Return ``"ok"`` or ``"unavailable: <reason>"`` for this host. Must not raise.

        A meter supplies its own part, :meth:`_check`; an exception other than :class:`MeterUnavailable`
        becomes the reason :meth:`_probe_failure` words.
        """
        try:
            self._check()
        except MeterUnavailable as exc:
            return f"unavailable: {exc}"
        except Exception as exc:  # probe() must never raise
            return f"unavailable: {self._probe_failure(exc)}"
        return "ok"

    def _check(self) -> None:
        """Raise :class:`MeterUnavailable` with the reason if the meter cannot measure here (by default it can)."""

    def _probe_failure(self, exc: Exception) -> str:
        """The reason :meth:`probe` gives for an unexpected exception of :meth:`_check`."""
        return f"unexpected {self.name} failure: {exc!r}"

    def start(self) -> None:
        """Open a window. Raises :class:`MeterUnavailable` with the reason if the meter cannot run."""
        if self._running:
            raise RuntimeError(f"meter {self.name!r} is already running")
        self._start()
        self._running = True

    def stop(self) -> Reading:
        """Close the window and return what it saw."""
        if not self._running:
            raise RuntimeError(f"meter {self.name!r} was not started")
        self._running = False
        return self._stop()

    def poll(self) -> None:
        """Read the hardware now, inside an open window (the protocol calls it between repeats).

        Meters whose counters can wrap (RAPL) or that sample power (NVML without an energy counter)
        use it; the others ignore it.
        """

    def record_work(self, counts: Any) -> None:
        """Tell the meter what work ran in the open window (only the proxy meter uses this)."""

    def close(self) -> None:
        """Release resources held across windows (threads, library handles)."""

    @abc.abstractmethod
    def _start(self) -> None: ...

    @abc.abstractmethod
    def _stop(self) -> Reading: ...

    def __enter__(self) -> Meter:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        # Stop in finally-semantics: an exception inside the window must not leave the meter running.
        self.reading = self.stop()


def sync_devices() -> None:
    """Wait for queued work on every accelerator, so meters stop after the work rather than its queueing.

    Only torch queues GPU work asynchronously in this project. If torch was never imported, or never
    initialised CUDA, nothing is queued, and checking ``sys.modules`` avoids paying for either.
    """
    import sys

    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_initialized():
        return
    # Every device: CUDA and NVML may number GPUs differently (CUDA_VISIBLE_DEVICES, PCI order).
    for device in range(torch.cuda.device_count()):
        torch.cuda.synchronize(device)


def unavailable(meter: str, reason: str) -> Reading:
    """A reading that records why a meter could not measure (never a silent 0 J)."""
    return Reading(meter=meter, duration_s=0.0, status=f"unavailable: {reason}")
