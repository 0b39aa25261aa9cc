"""The measurement protocol: warm-up, a counting pass, idle power, metered windows and per-phase windows.

For one generator and request: a warm-up until steady; one counting pass (its own pass, so timed
windows are not slowed by counting); idle windows right before and after the cell's metered windows
for meters that see a whole device; metered windows in which every meter watches the same work,
each at least every meter's minimum window; and, for generators with phases (every denoiser step, un0's gate, a
pipeline's text encoder and VAE), one window per phase occurrence. Backbone-independent: it uses
only the :class:`~un0_bench.harness.core.generator.Generator` interface and the meters.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from un0_bench.harness.core.generator import GenerationRequest, Generator
from un0_bench.harness.counters.records import Counts, OpStat
from un0_bench.harness.measuring.hoststate import HostProbe
from un0_bench.harness.measuring.stats import CI_LEVEL, CI_METHOD, Interval, ratio_interval
from un0_bench.harness.meters.base import Meter, MeterUnavailable, Reading, sync_devices, unavailable


def count_ops(generator: Generator, request: GenerationRequest) -> Counts:
    """One counting pass over the whole request (FLOPs, bytes, dtype, module, role per op)."""
    from un0_bench.harness.counters.ops import OpCounter

    with OpCounter() as counter:
        generator.generate(request)
    return counter.counts(images=len(request.prompts))


Clock = Callable[[], float]


@dataclass(frozen=True)
class IdleWindow:
    """One idle window of one whole-device meter."""

    power_w: float
    duration_s: float
    energy_j: float


@dataclass(frozen=True)
class Idle:
    """Idle power of one meter around a cell: a window before it and one after, in the cell's thermal state.

    The idle power charged to the cell is their mean; half their difference (the drift across the
    cell) is its uncertainty. For a drift linear in time the mean is exact.
    """

    before: IdleWindow
    after: IdleWindow | None = None

    @property
    def power_w(self) -> float:
        return self.before.power_w if self.after is None else (self.before.power_w + self.after.power_w) / 2

    @property
    def uncertainty_w(self) -> float:
        return 0.0 if self.after is None else abs(self.after.power_w - self.before.power_w) / 2

    def fields(self) -> dict[str, Any]:
        return {"idle_power_w": self.power_w, "idle_power_before_w": self.before.power_w,
                "idle_power_after_w": None if self.after is None else self.after.power_w,
                "idle_uncertainty_w": self.uncertainty_w,
                "idle_window_s": [w.duration_s for w in (self.before, self.after) if w is not None]}


def idle_window(meters: Mapping[str, Meter], idle_s: float, *, clock: Clock = time.perf_counter,
                sleep: Callable[[float], None] = time.sleep) -> dict[str, IdleWindow]:
    """Idle power of every whole-device meter from one window, at least each meter's minimum window long.

    Meters that count the work (proxy, wall) have no idle, and are not opened.
    """
    whole = {n: m for n, m in meters.items() if m.sees_whole_device}
    if not whole or idle_s <= 0:
        return {}
    length_s = max([idle_s, *(m.min_window_s for m in whole.values())])
    started: list[str] = []
    out: dict[str, IdleWindow] = {}
    try:
        for name, m in whole.items():
            try:
                m.start()
                started.append(name)
            except MeterUnavailable:
                continue
        t0 = clock()
        while clock() - t0 < length_s:
            sleep(max(0.0, min(0.1, length_s - (clock() - t0))))
            for name in started:
                whole[name].poll()
    finally:
        sync_devices()
        for name in reversed(started):
            r = whole[name].stop()
            if r.ok and r.total_energy_j is not None and r.duration_s > 0:
                out[name] = IdleWindow(r.total_energy_j / r.duration_s, r.duration_s, r.total_energy_j)
    return out


def warm_up(generator: Generator, request: GenerationRequest, min_calls: int, max_s: float,
            tolerance: float, *, clock: Clock = time.perf_counter) -> dict[str, Any]:
    """Unmetered calls until the time per call is steady, at least ``min_calls``, bounded by ``max_s``.

    Steady: two consecutive calls within ``tolerance`` of each other (caches filled, allocator and
    clocks settled). The bound stops a device that never settles; the record says it was not steady.
    ``min_calls`` 0 means no warm-up at all.

    Returns:
        ``{"calls", "durations_s", "steady", "max_s", "tolerance"}`` for the record, plus ``"first"``,
        the result of the last call (not for the record).
    """
    durations: list[float] = []
    last = None
    steady = False
    t_start = clock()
    while min_calls > 0:
        t0 = clock()
        last = generator.generate(request)
        durations.append(clock() - t0)
        if len(durations) >= 2:
            a, b = durations[-2], durations[-1]
            steady = abs(a - b) <= tolerance * max(a, b)
        if len(durations) >= min_calls and (steady or clock() - t_start >= max_s):
            break
    return {"calls": len(durations), "durations_s": durations, "steady": steady, "max_s": max_s,
            "tolerance": tolerance, "first": last}


@dataclass
class Window:
    images: int
    readings: dict[str, Reading]
    duration_s: float = 0.0
    calls: int = 1
    host: dict[str, Any] = field(default_factory=dict)

    @property
    def device_shared(self) -> bool:
        """Something else used a device in this window: another CPU process, or a GPU process."""
        return bool(self.host.get("other_load")) or any(r.details.get("device_shared") for r in self.readings.values())

    def record(self) -> dict[str, Any]:
        """What the result record keeps of the window."""
        gpu_state = {k: v for r in self.readings.values() for k, v in (r.details.get("state") or {}).items()}
        return {"duration_s": self.duration_s, "images": self.images, "calls": self.calls, "host": self.host,
                **({"gpu_state": gpu_state} if gpu_state else {}), "device_shared": self.device_shared}


def metered_window(generator: Generator, request: GenerationRequest, meters: dict[str, Meter],
                   counts: Counts, min_window_s: float, *, clock: Clock = time.perf_counter,
                   host: HostProbe | None = None) -> Window:
    """One window in which every meter watches the same work.

    The generate call repeats until the window is at least ``min_window_s`` long (the longest minimum
    of the meters in it), counting the images of every call. Meters are started in order and stopped
    in reverse order after one synchronisation of every device, so none stops before the work ends.
    """
    started: list[Meter] = []
    readings: dict[str, Reading] = {}
    calls = 0
    before = host.times() if host is not None else None
    t0 = t1 = clock()
    try:
        for m in meters.values():
            try:
                m.start()
                started.append(m)
            except MeterUnavailable as e:
                # A meter that stops working mid-run is recorded with its reason, not as 0 J.
                readings[m.name] = unavailable(m.name, str(e))
        t0 = clock()
        while True:
            generator.generate(request)
            calls += 1
            for m in started:
                m.record_work(counts)
                m.poll()
            if clock() - t0 >= min_window_s:
                break
    finally:
        # Stop every started meter even if generation failed, so none is left running.
        sync_devices()
        t1 = clock()
        for m in reversed(started):
            readings[m.name] = m.stop()
    duration_s = t1 - t0
    state = host.window(before, host.times(), duration_s) if host is not None else {}
    return Window(images=calls * len(request.prompts), readings=readings, duration_s=duration_s, calls=calls,
                  host=state)


def ordered(cells: list[Any], order: str, seed: int) -> list[Any]:
    """The cells in the order they are measured: ``"given"``, or ``"shuffled"`` by a generator seeded with ``seed``.

    Shuffled, so the reference is not always first: a chip that warms over the run would otherwise
    bias every ratio against it the same way.
    """
    import random

    out = list(cells)
    if order == "shuffled":
        random.Random(seed).shuffle(out)
    elif order != "given":
        raise ValueError(f"unknown cell order {order!r}")
    return out


@dataclass
class CellWindows:
    """What the metered part of one cell measured: its windows and the idle around them."""

    windows: list[Window]
    idle: dict[str, Idle]
    min_window_s: float
    idle_added_s: float  # seconds spent in idle windows for this cell (the protocol's overhead)

    def fields(self) -> dict[str, Any]:
        """The record fields every meter's record of the cell shares."""
        return {"windows": [w.record() for w in self.windows], "window_min_s": self.min_window_s,
                "windows_device_shared": sum(1 for w in self.windows if w.device_shared),
                "idle_added_s": self.idle_added_s}


def measure_cell_windows(generator: Generator, request: GenerationRequest, meters: dict[str, Meter], counts: Counts, *,
                 min_repeats: int, max_repeats: int, min_duration_s: float, idle_s: float,
                 clock: Clock = time.perf_counter, sleep: Callable[[float], None] = time.sleep,
                 host: HostProbe | None = None) -> CellWindows:
    """Idle before, metered windows, idle after: the measured part of one cell.

    Windows repeat until both ``min_repeats`` and ``min_duration_s`` are reached (at most
    ``max_repeats``); each is at least the longest ``min_window_s`` of the meters. Idle windows are
    taken only for whole-device meters (a counting meter has no idle), right before and right after
    the windows, so they share the cell's thermal state.
    """
    whole = {n: m for n, m in meters.items() if m.sees_whole_device}
    min_window_s = max([m.min_window_s for m in meters.values()], default=0.0)
    t_idle = clock()
    before = idle_window(whole, idle_s, clock=clock, sleep=sleep)
    idle_added_s = clock() - t_idle
    windows: list[Window] = []
    t_start = clock()
    while len(windows) < max_repeats and (len(windows) < min_repeats or clock() - t_start < min_duration_s):
        windows.append(metered_window(generator, request, meters, counts, min_window_s, clock=clock, host=host))
    t_idle = clock()
    after = idle_window(whole, idle_s, clock=clock, sleep=sleep) if before else {}
    idle_added_s += clock() - t_idle
    idle = {n: Idle(w, after.get(n)) for n, w in before.items()}
    return CellWindows(windows=windows, idle=idle, min_window_s=min_window_s, idle_added_s=idle_added_s)


def _per_image(totals: list[float], images: list[int]) -> Interval:
    """Total over images; windows that all agree (a counting meter) give exactly their common figure."""
    per = [t / n for t, n in zip(totals, images, strict=True)]
    if all(v == per[0] for v in per):
        return Interval(per[0], per[0], per[0], 0.0, CI_LEVEL, len(per))
    return ratio_interval(totals, [float(n) for n in images])


def summarise(meter_name: str, windows: list[Window], idle: Idle | float | None,
              min_window_s: float | None = None) -> dict[str, Any]:
    """Per-image statistics of one meter over the windows.

    The per-image figure is total energy over total images (see :mod:`un0_bench.harness.measuring.stats`), its
    interval a t-interval on the windows at :data:`~un0_bench.harness.measuring.stats.CI_LEVEL`, labelled with its
    method.
    Net of idle: ``(energy - idle power x time) / images``; its uncertainty adds the gross interval's
    half-width and the idle's (drift x time per image). A net within that uncertainty of zero is
    *below the detection limit*: ``energy_net_below_detection_limit`` is True and the net figure is
    not a measurement of the work.
    """
    readings = [(w.images, w.readings[meter_name]) for w in windows]
    bad = [r.status for _, r in readings if not r.ok]
    if bad:
        return {"status": bad[0], "energy_j_per_image": None, "energy_ci95_j": None}
    images = [n for n, _ in readings]
    durations = [r.duration_s for _, r in readings]
    out: dict[str, Any] = {"status": "ok", "repeats": len(readings), "window_s": durations,
                           "min_window_s": min_window_s}
    out["meter_duration_s_per_image"] = _per_image(durations, images).estimate
    totals = [r.total_energy_j for _, r in readings]
    if all(t is not None for t in totals):
        gross = _per_image(totals, images)
        out["energy_j_per_image"], out["energy_ci95_j"] = gross.estimate, gross.as_list()
        out["energy_ci_level"], out["energy_ci_method"] = gross.level, CI_METHOD
        if gross.low is None:
            out["energy_ci_note"] = "one window: no interval"
        domains = sorted({d for _, r in readings for d in r.energy_j})
        out["energy_j_per_image_by_domain"] = {
            d: _per_image([r.energy_j.get(d, 0.0) for _, r in readings], images).estimate for d in domains
        }
        if isinstance(idle, (int, float)):
            idle = Idle(IdleWindow(float(idle), 0.0, 0.0))
        if idle is not None:
            net = _per_image([t - idle.power_w * d for t, d in zip(totals, durations, strict=True)], images)
            idle_term = idle.uncertainty_w * math.fsum(durations) / sum(images)
            half = (net.half_width or 0.0) + idle_term
            out["energy_net_j_per_image"] = net.estimate
            out["energy_net_ci95_j"] = [net.estimate - half, net.estimate + half]
            out["energy_net_detection_limit_j"] = half
            out["energy_net_below_detection_limit"] = net.estimate <= half
            out["energy_net_ci_method"] = ("gross interval half-width + idle uncertainty (half the before/after "
                                           "difference) x time per image, added linearly")
            out.update(idle.fields())
    else:
        # A meter that measures time only (wall) has no energy: null, not 0 J.
        out["energy_j_per_image"], out["energy_ci95_j"] = None, None
        out["note"] = "measures time only"
    out["meter_details"] = readings[-1][1].details
    return out


def counts_fields(counts: Counts, profile: str, prefix: str = "") -> dict[str, Any]:
    """Per-image figures of a counting pass (``prefix`` names a second pass, e.g. ``"cold_"``)."""
    from un0_bench.harness.meters.proxy import DRAM_PROFILE, MEMORY_CAVEAT, get_profile, proxy_energy

    n = counts.images
    prof = get_profile(profile)
    b = proxy_energy(counts, prof)
    fields = {
        "proxy_profile": profile,
        "proxy_memory_level": prof.memory_level,
        "proxy_memory_caveat": MEMORY_CAVEAT,
        "proxy_j_per_image_by_part": {"compute": b.compute_j / n, "gating": b.gating_j / n,
                                      "memory": b.memory_j / n, "gating_memory": b.gating_memory_j / n},
        "flops_per_image": counts.flops() / n,
        "bytes_per_image": counts.bytes_moved() / n,
        "gating_flops_per_image": counts.flops("gating") / n,
        "gating_bytes_per_image": counts.bytes_moved("gating") / n,
        "flops_per_image_by_dtype": {k: v / n for k, v in sorted(counts.flops_by_dtype().items())},
        "proxy_j_per_image_by_module": {group: proxy_energy(part, profile).total_j / n
                                        for group, part in module_groups(counts).items()},
        "uncounted_ops": counts.uncounted_ops(),
    }
    if prof.memory_level != "DRAM":
        # The same counted work with every byte priced as a DRAM access: the other side of the memory model.
        d = proxy_energy(counts, DRAM_PROFILE)
        fields["proxy_dram_profile"] = DRAM_PROFILE
        fields["proxy_dram_j_per_image_by_part"] = {"compute": d.compute_j / n, "gating": d.gating_j / n,
                                                    "memory": d.memory_j / n, "gating_memory": d.gating_memory_j / n}
    return {prefix + k: v for k, v in fields.items()}


def uncounted_fields(reason: str, profile: str) -> dict[str, Any]:
    """The keys of :func:`counts_fields` for work no counter saw: null figures and the reason."""
    fields = {k: None for k in counts_fields(Counts(images=1, stats=[]), profile)}
    fields.update(proxy_profile=None, counts_missing_reason=reason)
    return fields


#: Module-path parts that name a layer group: ``UNet2DModel.down_blocks.0`` (class, blocks, index).
MODULE_GROUP_DEPTH = 3


def module_groups(counts: Counts, depth: int = MODULE_GROUP_DEPTH) -> dict[str, Counts]:
    """The counted ops split by layer group: the first ``depth`` parts of each op's module path.

    Ops run outside any module (the sampler's update, image post-processing) form the group
    ``"(outside modules)"``. Groups are sorted by name.
    """
    groups: dict[str, list[OpStat]] = {}
    for s in counts.stats:
        group = ".".join(s.module.split(".")[:depth]) if s.module else "(outside modules)"
        groups.setdefault(group, []).append(s)
    return {g: Counts(images=counts.images, stats=stats) for g, stats in sorted(groups.items())}



# --- per-phase windows ----------------------------------------------------------------------------

_Key = tuple[str, str, str, str]


def count_phase_occurrences(generator: Generator, request: GenerationRequest, root: Any = None
                            ) -> tuple[Counts, list[tuple[str, list[OpStat]]]]:
    """One counting pass over ``generate(request)``, with the counts of every phase occurrence.

    The counter is snapshotted at each ``begin`` and ``end`` the generator emits, so each occurrence
    (one text-encoder call, one denoiser call, one VAE decode) gets the ops that ran inside it.

    Args:
        generator: Any generator; one without phases gives an empty occurrence list.
        request: What to generate.
        root: A module whose ``named_modules()`` names the ops' module paths (see
            :class:`~un0_bench.harness.counters.ops.OpCounter`); ``None``: modules are named by their class.

    Returns:
        ``(total counts of the whole request, [(phase, ops of that occurrence), ...] in order)``.
    """
    from un0_bench.harness.counters.ops import OpCounter

    occurrences: list[tuple[str, list[OpStat]]] = []
    with OpCounter(root=root) as counter:
        opened: dict[str, dict[_Key, tuple]] = {}

        def count_hook(kind: str, phase: str) -> None:
            if kind == "begin":
                opened[phase] = counter.snapshot()
            else:
                occurrences.append((phase, OpCounter.since(opened.pop(phase), counter.snapshot())))

        generator.phase_hook = count_hook
        try:
            generator.generate(request)
        finally:
            generator.phase_hook = None
        total = counter.counts(images=len(request.prompts))
    return total, occurrences


def measure_phases(generator: Generator, request: GenerationRequest,
                   meters: Mapping[str, Meter] | Sequence[Meter], *, cold: bool = False) -> dict[str, dict[str, Any]]:
    """Energy, time and counted work of each phase of one ``generate(request)``.

    Two passes over the same request: a counting pass (:class:`~un0_bench.harness.counters.ops.OpCounter`,
    snapshotted at every phase boundary, so each phase occurrence has its own counts) and a metered
    pass, in which every meter opens a window at each ``begin`` and closes it at the matching
    ``end``; the proxy meter is handed that occurrence's counts before it closes. Windows of one
    phase are summed.

    Args:
        generator: A generator with :meth:`~Generator.phases` (it calls its ``phase_hook``).
        request: What to generate.
        meters: Ready meters, by name or as a list.
        cold: Empty the generator's cache before each pass, so un0's gate does its full work.

    Returns:
        ``{phase: {"calls", "duration_s", "energy_j": {meter: J or None}, "status": {meter: ...},
        "flops", "bytes", "gating_flops", "below_resolution": [meters]}}`` for every phase in
        ``generator.phases()``, plus ``"other"``: work outside any phase (sampler arithmetic,
        image post-processing), counted but not windowed, so only the proxy prices it. A phase that
        did not run in this request (un0's gate on a warm cache) has ``calls`` 0.
    """
    from un0_bench.harness.counters.ops import OpCounter
    from un0_bench.harness.meters.proxy import ProxyMeter, proxy_energy

    meters = dict(meters) if isinstance(meters, Mapping) else {m.name: m for m in meters}
    phases = generator.phases()
    if not phases:
        raise ValueError("the generator has no phases to measure")
    images = len(request.prompts)

    # 1. Counting pass.
    if cold:
        generator.reset_cache()
    total, occurrences = count_phase_occurrences(generator, request)

    # 2. Metered pass: one window per phase occurrence.
    if cold:
        generator.reset_cache()
    result: dict[str, dict[str, Any]] = {
        p: {"calls": 0, "duration_s": 0.0, "energy_j": {n: 0.0 for n in meters}, "status": {n: "ok" for n in meters},
            "flops": 0, "bytes": 0, "gating_flops": 0, "below_resolution": []}
        for p in phases
    }
    state: dict[str, Any] = {"index": 0, "t0": 0.0, "started": []}

    def meter_hook(kind: str, phase: str) -> None:
        if kind == "begin":
            state["started"] = []
            for name, m in meters.items():
                try:
                    m.start()
                    state["started"].append(name)
                except MeterUnavailable as e:
                    result[phase]["status"][name] = f"unavailable: {e}"
                    result[phase]["energy_j"][name] = None
            state["t0"] = time.perf_counter()
            return
        sync_devices()  # the phase's queued GPU work ends before any meter stops
        duration_s = time.perf_counter() - state["t0"]
        i = state["index"]
        if i >= len(occurrences) or occurrences[i][0] != phase:
            for name in state["started"]:
                meters[name].stop()
            raise RuntimeError(f"phase {phase!r} ran out of the order of the counting pass; "
                               "the generator is not deterministic in its phases")
        stats = occurrences[i][1]
        state["index"] = i + 1
        readings: dict[str, Reading] = {}
        for name in state["started"]:
            meters[name].record_work(Counts(images=images, stats=stats))
        for name in reversed(state["started"]):
            readings[name] = meters[name].stop()
        r = result[phase]
        r["calls"] += 1
        r["duration_s"] += duration_s
        for name, reading in readings.items():
            if not reading.ok:
                r["status"][name], r["energy_j"][name] = reading.status, None
            elif r["energy_j"][name] is not None:
                e = reading.total_energy_j
                r["energy_j"][name] = None if e is None else r["energy_j"][name] + e
            if duration_s < getattr(meters[name], "min_window_s", 0.0) and name not in r["below_resolution"]:
                r["below_resolution"].append(name)

    generator.phase_hook = meter_hook
    t0 = time.perf_counter()
    try:
        generator.generate(request)
    finally:
        generator.phase_hook = None
    total_s = time.perf_counter() - t0
    if state["index"] != len(occurrences):
        raise RuntimeError("the metered pass ran fewer phases than the counting pass")

    # Counted work per phase, and what ran outside every phase.
    inside: dict[_Key, list[int]] = {}
    for phase, stats in occurrences:
        r = result[phase]
        for s in stats:
            r["flops"] += s.flops
            r["bytes"] += s.bytes_read + s.bytes_written
            r["gating_flops"] += s.flops if s.role == "gating" else 0
            acc = inside.setdefault((s.op, s.dtype, s.role, s.module), [0, 0, 0, 0])
            for j, v in enumerate((s.calls, s.flops, s.bytes_read, s.bytes_written)):
                acc[j] += v
    outside = OpCounter.since({k: (*v, True) for k, v in inside.items()},
                              {(s.op, s.dtype, s.role, s.module): (s.calls, s.flops, s.bytes_read, s.bytes_written,
                                                                   s.counted) for s in total.stats})
    other_counts = Counts(images=images, stats=outside)
    proxies = {n: m for n, m in meters.items() if isinstance(m, ProxyMeter)}
    result["other"] = {
        "calls": 1,
        "duration_s": max(0.0, total_s - sum(result[p]["duration_s"] for p in phases)),
        "energy_j": {n: (proxy_energy(other_counts, proxies[n].profile).total_j if n in proxies else None)
                     for n in meters},
        "status": {n: ("ok" if n in proxies else "not windowed: between phases") for n in meters},
        "flops": other_counts.flops(),
        "bytes": other_counts.bytes_moved(),
        "gating_flops": other_counts.flops("gating"),
        "below_resolution": [],
    }
    return result
