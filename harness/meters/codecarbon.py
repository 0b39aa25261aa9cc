"""The codecarbon meter: energy and emissions from codecarbon's ``OfflineEmissionsTracker``.

This is the only module that imports codecarbon, and only inside :func:`_make_tracker` (tests replace
that factory with a fake). Facts about codecarbon 3.3.2 this meter relies on:

- Creating a tracker is cheap; the first ``start_task`` probes the hardware (about 1.5 s on a small
  VM), and codecarbon caches that probe per process, so later windows start and stop in about a
  millisecond. One tracker is therefore created on first use and reused for every window.
- ``stop_task`` returns an ``EmissionsData`` for the task alone: energies in kWh (``cpu_energy``,
  ``ram_energy``, ``gpu_energy``, ``energy_consumed``), ``emissions`` in kg CO2e, ``duration`` in s.
- With ``allow_multiple_runs=True`` (passed explicitly, so a user config cannot flip it) it writes no
  lock file; with False it writes ``<tempdir>/.codecarbon.lock`` and installs its own SIGINT/SIGTERM
  handlers, which would take Ctrl+C away from the runner.
- With no output methods it writes no ``emissions.csv``. Only the Intel Power Gadget and powermetrics
  backends (macOS/Windows) write log files, into ``output_dir``; that is a private temporary
  directory here, removed by :meth:`CodecarbonMeter.close`, never the working directory.
"""

from __future__ import annotations

import tempfile
from typing import Any

from un0_bench.harness.core.spec import Param
from un0_bench.harness.meters.base import Meter, MeterUnavailable, Reading, unavailable

#: Joules per kilowatt-hour (1000 W x 3600 s); codecarbon reports kWh, the harness keeps joules.
J_PER_KWH = 3.6e6

# codecarbon's CPU backends (``CPU._mode``) -> (source recorded in the result, is it an estimate?).
_CPU_SOURCES: dict[str, tuple[str, bool]] = {
    "intel_rapl": ("rapl", False),
    "windows_emi": ("rapl (windows energy meter interface)", False),
    "intel_power_gadget": ("intel power gadget", False),
    "cpu_load": ("tdp x cpu load estimate", True),
    "constant": ("tdp constant estimate", True),
}


def _make_tracker(*, country_iso_code: str, measure_power_secs: float, output_dir: str) -> Any:
    """Build codecarbon's ``OfflineEmissionsTracker`` (no network); the one place codecarbon is imported.

    Raises:
        ImportError: codecarbon is not installed.
        MeterUnavailable: the country code is not in codecarbon's energy-mix table (codecarbon
            itself only logs that and carries on with a wrong carbon intensity).
    """
    import logging

    from codecarbon import OfflineEmissionsTracker
    from codecarbon.input import DataSource

    # codecarbon resets its logger to INFO on import and logs before applying log_level; quiet it now.
    logging.getLogger("codecarbon").setLevel(logging.ERROR)
    if country_iso_code not in DataSource().get_global_energy_mix_data():
        raise MeterUnavailable(
            f"country_iso_code {country_iso_code!r} is not in codecarbon's energy-mix table "
            "(3-letter ISO 3166 codes such as 'USA', 'FRA', 'DEU')"
        )
    return OfflineEmissionsTracker(
        country_iso_code=country_iso_code,
        measure_power_secs=measure_power_secs,
        log_level="error",
        # Equivalent to save_to_file=False (and no API, logger or Prometheus output), without the
        # DeprecationWarning the save_to_* flags raise in codecarbon 3.
        output_methods=[],
        emissions_endpoint=None,
        output_dir=output_dir,
        allow_multiple_runs=True,
        # PUE is applied by reports/ at the "x PUE" boundary; a pue from ~/.codecarbon.config would
        # silently scale every joule here.
        pue=1.0,
        tracking_mode="machine",
        project_name="un0-bench",
    )


def domain_methods(sources: dict[str, str]) -> dict[str, str]:
    """The method per domain: CPU ``RAPL`` or ``TDP x load`` (``TDP constant``), RAM ``size model``, GPU ``NVML``."""
    methods: dict[str, str] = {}
    for domain, source in sources.items():
        if source.startswith("rapl"):
            methods[domain] = "RAPL"
        elif source.startswith("tdp x cpu load"):
            methods[domain] = "TDP x load"
        elif source.startswith("tdp constant"):
            methods[domain] = "TDP constant"
        elif source.startswith("ram size"):
            methods[domain] = "size model"
        elif source.startswith("user-set constant"):
            methods[domain] = "user-set constant"
        elif domain == "gpu":
            methods[domain] = source.upper()
        else:
            methods[domain] = source
    return methods


#: Methods that measure; every other method is an estimate.
MEASURED_METHODS = ("RAPL", "NVML", "AMDSMI", "AMDSMI+NVML", "powermetrics", "raspberry pi pmic")


def evidence_of(methods: dict[str, str], tdp_w: float | None = None) -> tuple[str, str]:
    """The class of evidence a reading is (``measured`` or ``time-based estimate``) and why, from its methods.

    Measured when a sensor gave every figure but RAM's (codecarbon's RAM figure is always a size rule:
    constant power, which the idle subtraction removes). Otherwise the joules are a model of time (TDP x
    load, a constant), so a faster model looks cheaper in proportion to its time, not its work. The
    class names are the reports' (``reports/claims.py``).
    """
    sensed = [m for d, m in sorted(methods.items()) if m in MEASURED_METHODS]
    modelled = {d: m for d, m in sorted(methods.items()) if m not in MEASURED_METHODS}
    if sensed and set(modelled) <= {"ram"}:
        return "measured", (f"codecarbon read {' and '.join(sensed)}; only its RAM figure is a size rule "
                            "(constant power, removed net of idle)")
    tdp = f" ({tdp_w:g} W)" if tdp_w is not None else ""
    if not sensed:
        what = "no RAPL counter and no NVML GPU readable here"
    else:
        what = f"it read {' and '.join(sensed)} but no CPU counter (no RAPL)"
    return "time-based estimate", (f"{what}: codecarbon's CPU joules are its assumed TDP{tdp} x CPU load and its "
                                   "RAM joules a rule from the RAM's size, so they follow run time, not work")


def describe_sources(hardware: list[Any]) -> tuple[dict[str, str], bool]:
    """Say where codecarbon's figures come from, from its hardware objects.

    Returns:
        ``({"cpu": ..., "ram": ..., "gpu": ...}, cpu_is_estimate)``; a domain codecarbon does not
        track is absent. ``cpu_is_estimate`` is True unless the CPU figure is a measured counter.
    """
    # NB: codecarbon has no public API for its energy source; ``tracker._hardware`` is private. Its
    # own hardware cache classifies these objects by class name too (safe across module reloads).
    sources: dict[str, str] = {}
    cpu_estimate = True
    for hw in hardware:
        kind = type(hw).__name__
        if kind == "CPU":
            mode = str(getattr(hw, "_mode", "unknown"))
            source, cpu_estimate = _CPU_SOURCES.get(mode, (f"unknown codecarbon cpu mode {mode!r}", True))
            sources["cpu"] = source
        elif kind == "RAM":
            forced = getattr(hw, "_force_ram_power", None)
            sources["ram"] = (
                f"user-set constant {forced} W estimate" if forced is not None else "ram size power model estimate"
            )
        elif kind == "GPU":
            devices = getattr(getattr(hw, "devices", None), "devices", [])
            vendors = {"amdsmi" if type(d).__name__.startswith("AMD") else "nvml" for d in devices}
            sources["gpu"] = "+".join(sorted(vendors)) or "nvml"
        elif kind in ("AppleSiliconChip", "Raspberry"):
            part = str(getattr(hw, "chip_part", "cpu")).lower()
            sources[part] = "powermetrics" if kind == "AppleSiliconChip" else "raspberry pi pmic"
            if part == "cpu":
                cpu_estimate = False
    return sources, cpu_estimate


class CodecarbonMeter(Meter):
    """Energy (CPU, RAM, GPU) and emissions as codecarbon estimates them, offline.

    ``energy_j`` has ``cpu`` and ``ram``, plus ``gpu`` when codecarbon tracks a GPU (an untracked
    GPU is absent, not 0 J). ``details`` records ``emissions_kg``, ``source`` (how the CPU figure was
    obtained: RAPL or a TDP-based estimate), ``sources`` and ``methods`` per domain (CPU ``RAPL`` or
    ``TDP x load``; RAM ``size model``; GPU ``NVML``), ``tdp_w`` (the TDP codecarbon assumed for the
    CPU), ``estimate`` (True when any part of the total was estimated: the RAM figure always is),
    ``estimated_domains``, ``country_iso_code``, and ``evidence`` with ``evidence_reason`` (the class
    of evidence the reading is: :func:`evidence_of`).

    Args:
        country_iso_code: 3-letter ISO code of the grid for the emissions factor.
        measure_power_secs: codecarbon's periodic measurement interval; short, as windows are short.
    """

    name = "codecarbon"
    sees_whole_device = True
    #: codecarbon samples power every ``measure_power_secs``: a window spans at least one sample.
    min_window_s: float = 1.0
    params = {
        "country_iso_code": Param(str, "USA", "3-letter ISO code of the grid"),
        "measure_power_secs": Param(float, 1.0, "codecarbon's power-sampling interval (s)", low=0.0, low_open=True),
    }

    def __init__(self, country_iso_code: str = "USA", measure_power_secs: float = 1.0) -> None:
        super().__init__()
        self.country_iso_code = country_iso_code
        self.measure_power_secs = measure_power_secs
        self.min_window_s = float(measure_power_secs)
        self._tracker: Any = None
        self._scratch: tempfile.TemporaryDirectory[str] | None = None
        self._windows = 0

    def _ensure_tracker(self) -> Any:
        if self._tracker is not None:
            return self._tracker
        # A TemporaryDirectory also removes itself at garbage collection or exit if close() is missed.
        scratch = tempfile.TemporaryDirectory(prefix="un0-bench-codecarbon-")
        try:
            tracker = _make_tracker(
                country_iso_code=self.country_iso_code,
                measure_power_secs=self.measure_power_secs,
                output_dir=scratch.name,
            )
        except ImportError as exc:
            scratch.cleanup()
            raise MeterUnavailable(f"codecarbon is not installed ({exc})") from exc
        except MeterUnavailable:
            scratch.cleanup()
            raise
        except Exception as exc:
            scratch.cleanup()
            raise MeterUnavailable(f"codecarbon could not create a tracker: {exc!r}") from exc
        self._tracker, self._scratch = tracker, scratch
        return tracker

    def _check(self) -> None:
        """Whether codecarbon can build a tracker here (it always has a fallback estimate)."""
        self._ensure_tracker()

    def _start(self) -> None:
        tracker = self._ensure_tracker()
        self._windows += 1
        try:
            tracker.start_task(f"un0-bench-window-{self._windows}")
        except Exception as exc:
            raise MeterUnavailable(f"codecarbon start_task failed: {exc!r}") from exc
        # start_task logs and returns without starting when its emissions engine fails to load.
        if getattr(tracker, "_active_task", "unknown") is None:
            raise MeterUnavailable("codecarbon did not start the task (its emissions engine failed to load)")

    def _stop(self) -> Reading:
        tracker = self._tracker
        try:
            data = tracker.stop_task()
        except Exception as exc:
            return unavailable(self.name, f"codecarbon stop_task failed: {exc!r}")
        if data is None:
            return unavailable(self.name, "codecarbon stop_task returned no data (task was not running)")

        hardware = list(getattr(tracker, "_hardware", []))
        sources, cpu_estimate = describe_sources(hardware)
        methods = domain_methods(sources)
        # The kWh -> J conversion happens here, at the vendor boundary; everything inside is joules.
        energy_j = {
            "cpu": data.cpu_energy * J_PER_KWH,
            "ram": data.ram_energy * J_PER_KWH,
        }
        if "gpu" in sources:
            energy_j["gpu"] = data.gpu_energy * J_PER_KWH
        estimated = sorted(d for d, m in methods.items() if m not in MEASURED_METHODS and d in energy_j)
        details: dict[str, Any] = {
            "emissions_kg": data.emissions,
            "source": sources.get("cpu", "none"),
            "sources": sources,
            "methods": methods,
            # True when any part of the total is estimated: codecarbon's RAM figure always is (a model of
            # power from the RAM's size), whatever measures the CPU.
            "estimate": bool(estimated) or cpu_estimate,
            "estimated_domains": estimated,
            "country_iso_code": data.country_iso_code or self.country_iso_code,
        }
        tdp_w = next((getattr(hw, "_tdp", None) for hw in hardware if type(hw).__name__ == "CPU"), None)
        if tdp_w is not None:
            details["tdp_w"] = float(tdp_w)
        details["evidence"], details["evidence_reason"] = evidence_of(methods, details.get("tdp_w"))
        if "gpu" in sources:
            details["gpu_note"] = "codecarbon reads every GPU it sees, not only the devices of this run"
        cpu_model = getattr(tracker, "_conf", {}).get("cpu_model")
        if cpu_model:
            details["cpu_model"] = cpu_model
        return Reading(meter=self.name, duration_s=float(data.duration), energy_j=energy_j, details=details)

    def close(self) -> None:
        """Stop a task left open, drop the tracker and remove its scratch directory."""
        tracker, self._tracker = self._tracker, None
        if tracker is not None and getattr(tracker, "_active_task", None):
            try:
                tracker.stop_task()  # stops codecarbon's 1 s power-monitor thread
            except Exception:
                pass  # releasing; nothing to report to
        if self._scratch is not None:
            self._scratch.cleanup()
            self._scratch = None
