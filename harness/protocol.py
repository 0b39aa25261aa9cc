"""The measurement protocol: a counting pass, idle power, metered windows and per-phase windows.

For one generator and request: one counting pass (its own pass, so timed windows are not slowed by
counting); idle power for meters that see a whole device; metered windows in which every meter
watches the same work; and, for generators with phases (every denoiser step, un0's gate, a
pipeline's text encoder and VAE), one window per phase occurrence. Backbone-independent: it uses
only the :class:`~un0_bench.harness.generator.Generator` interface and the meters.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from un0_bench.harness.counters.records import Counts, OpStat
from un0_bench.harness.generator import GenerationRequest, Generator
from un0_bench.harness.meters.base import Meter, MeterUnavailable, Reading, unavailable
from un0_bench.harness.stats import median_ci95


def count_ops(generator: Generator, request: GenerationRequest) -> Counts:
    """One counting pass over the whole request (FLOPs, bytes, dtype, module, role per op)."""
    from un0_bench.harness.counters.ops import OpCounter

    with OpCounter() as counter:
        generator.generate(request)
    return counter.counts(images=len(request.prompts))


def measure_idle(meters: dict[str, Meter], idle_s: float) -> dict[str, float]:
    """Idle power in watts for each whole-device meter, from one window of ``idle_s`` seconds."""
    idle: dict[str, float] = {}
    whole = {n: m for n, m in meters.items() if m.sees_whole_device}
    if not whole or idle_s <= 0:
        return idle
    started = []
    try:
        for name, m in whole.items():
            try:
                m.start()
                started.append(name)
            except MeterUnavailable:
                continue
        time.sleep(idle_s)
    finally:
        for name in started:
            r = whole[name].stop()
            if r.ok and r.total_energy_j is not None and r.duration_s > 0:
                idle[name] = r.total_energy_j / r.duration_s
    return idle


@dataclass
class Window:
    images: int
    readings: dict[str, Reading]


def metered_window(generator: Generator, request: GenerationRequest, meters: dict[str, Meter],
                   counts: Counts, min_window_s: float) -> Window:
    """One window in which every meter watches the same work.

    A window shorter than a meter's update period (NVML's energy counter: about 100 ms) repeats
    the generate call until it is long enough, and counts the images of every call.
    """
    started: list[Meter] = []
    readings: dict[str, Reading] = {}
    calls = 0
    try:
        for m in meters.values():
            try:
                m.start()
                started.append(m)
            except MeterUnavailable as e:
                # A meter that stops working mid-run is recorded with its reason, not as 0 J.
                readings[m.name] = unavailable(m.name, str(e))
        t0 = time.perf_counter()
        while True:
            generator.generate(request)
            calls += 1
            for m in started:
                m.record_work(counts)
            if time.perf_counter() - t0 >= min_window_s:
                break
    finally:
        # Stop every started meter even if generation failed, so none is left running.
        for m in started:
            readings[m.name] = m.stop()
    return Window(images=calls * len(request.prompts), readings=readings)


def summarise(meter_name: str, windows: list[Window], idle_w: float | None) -> dict[str, Any]:
    """Per-image statistics of one meter over the windows."""
    readings = [(w.images, w.readings[meter_name]) for w in windows]
    bad = [r.status for _, r in readings if not r.ok]
    if bad:
        return {"status": bad[0], "energy_j_per_image": None, "energy_ci95_j": None}
    per_image = [r.total_energy_j / n for n, r in readings if r.total_energy_j is not None]
    out: dict[str, Any] = {"status": "ok", "repeats": len(readings)}
    durations = [r.duration_s / n for n, r in readings]
    out["meter_duration_s_per_image"], _ = median_ci95(durations)
    if per_image:
        out["energy_j_per_image"], out["energy_ci95_j"] = median_ci95(per_image)
        domains = sorted({d for _, r in readings for d in r.energy_j})
        out["energy_j_per_image_by_domain"] = {
            d: median_ci95([r.energy_j.get(d, 0.0) / n for n, r in readings])[0] for d in domains
        }
        if idle_w is not None:
            net = [(r.total_energy_j - idle_w * r.duration_s) / n for n, r in readings]
            out["energy_net_j_per_image"], out["energy_net_ci95_j"] = median_ci95(net)
            out["idle_power_w"] = idle_w
    else:
        # A meter that measures time only (wall) has no energy: null, not 0 J.
        out["energy_j_per_image"], out["energy_ci95_j"] = None, None
        out["note"] = "measures time only"
    out["meter_details"] = readings[-1][1].details
    return out


def counts_fields(counts: Counts, profile: str, prefix: str = "") -> dict[str, Any]:
    """Per-image figures of a counting pass (``prefix`` names a second pass, e.g. ``"cold_"``)."""
    from un0_bench.harness.meters.proxy import proxy_energy

    n = counts.images
    b = proxy_energy(counts, profile)
    fields = {
        "proxy_profile": profile,
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
    return {prefix + k: v for k, v in fields.items()}


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


def _diff(after: dict[_Key, tuple], before: dict[_Key, tuple]) -> list[OpStat]:
    out = []
    for key, (calls, flops, br, bw, counted) in after.items():
        c0, f0, r0, w0, _ = before.get(key, (0, 0, 0, 0, True))
        if calls > c0:
            out.append(OpStat(*key, calls=calls - c0, flops=flops - f0, bytes_read=br - r0, bytes_written=bw - w0,
                              counted=counted))
    return out


def count_phase_occurrences(generator: Generator, request: GenerationRequest, root: Any = None
                            ) -> tuple[Counts, list[tuple[str, list[OpStat]]]]:
    """One counting pass over ``generate(request)``, with the counts of every phase occurrence.

    The counter is snapshotted at each ``begin`` and ``end`` the generator emits, so each occurrence
    (one text-encoder call, one denoiser call, one VAE decode) gets the ops that ran inside it.

    Args:
        generator: Any generator; one without phases gives an empty occurrence list.
        request: What to generate.
        root: A module whose ``named_modules()`` names the ops' module paths (see
            :class:`~harness.counters.ops.OpCounter`); ``None``: modules are named by their class.

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

    Two passes over the same request: a counting pass (:class:`~harness.counters.ops.OpCounter`,
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
    outside = _diff({(s.op, s.dtype, s.role, s.module): (s.calls, s.flops, s.bytes_read, s.bytes_written, s.counted)
                     for s in total.stats}, {k: (*v, True) for k, v in inside.items()})
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
