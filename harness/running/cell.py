"""One cell measured where it runs: a model x backbone x batch size, all its meters, into records.

A :class:`Cell` names what to measure and a :class:`Workbench` measures it. Both are built from
picklable inputs (the run configuration, the model text, the batch size, the meter names, the
registries), so a worker on another node measures a cell exactly as the local executor does: build
the model on the backbone, warm up, count, meter repeated windows and per-phase windows
(:mod:`~un0_bench.harness.measuring.protocol`), and, for the one cell of a model that asks for it, judge its
quality. Records leave here without the quality band: the reference's quality may be measured on
another worker, so the driver (:class:`~un0_bench.harness.running.runner.Runner`) caches every quality figure
and derives ``quality_matched`` before it appends the records. Nothing here writes to the output
folder either: the sample grid travels back as PNG bytes, and the driver alone writes files.
"""

from __future__ import annotations

import io
import re
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from un0_bench.harness.core.backbone import Backbone
from un0_bench.harness.core.generator import GenerationRequest, GenerationResult
from un0_bench.harness.core.stack import build, resolve_checked
from un0_bench.harness.counters.records import Counts
from un0_bench.harness.measuring.hoststate import HostProbe
from un0_bench.harness.measuring.protocol import (
    count_ops,
    counts_fields,
    measure_cell_windows,
    measure_phases,
    summarise,
    uncounted_fields,
    warm_up,
)
from un0_bench.harness.measuring.stats import ratio_interval
from un0_bench.harness.meters.base import Meter
from un0_bench.harness.meters.proxy import DEFAULT_PROFILE
from un0_bench.harness.registry import BACKBONES, GENERATORS, METERS, TECHNIQUES, Registry
from un0_bench.harness.running.plan import RunPlan, load_backbone, make_meter
from un0_bench.harness.running.record import Record, identity

#: Longest file-name stem derived from a spec (file systems allow 255 bytes a name).
MAX_SLUG = 80


def slug(text: str) -> str:
    """A file-name stem for a spec: bounded and unique (specs that differ never share a stem).

    A spec that is already a safe, short name is its own stem; any other gets a digest of the spec.
    """
    import hashlib

    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_.") or "model"
    if safe == text and len(text) <= MAX_SLUG:
        return text
    digest = hashlib.sha256(text.encode()).hexdigest()[:12]
    return f"{safe[:MAX_SLUG - 13]}-{digest}"


def grid_png(images: torch.Tensor, per_row: int = 10, scale: int = 4) -> bytes:
    """Up to two rows of images ``(N, C, H, W)`` in [0, 1] as the bytes of one PNG (nearest upscaling)."""
    from PIL import Image

    imgs = images[: 2 * per_row].float().clamp(0, 1)
    n, c, h, w = imgs.shape
    rows = (n + per_row - 1) // per_row
    grid = torch.ones(c, rows * (h + 1) + 1, per_row * (w + 1) + 1)
    for i in range(n):
        r, k = divmod(i, per_row)
        grid[:, 1 + r * (h + 1) : 1 + r * (h + 1) + h, 1 + k * (w + 1) : 1 + k * (w + 1) + w] = imgs[i]
    arr = (grid * 255).round().byte().permute(1, 2, 0).numpy()
    img = Image.fromarray(arr[:, :, 0] if c == 1 else arr)
    img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    buffer = io.BytesIO()
    img.save(buffer, format="PNG")
    return buffer.getvalue()


# --- what a worker measures -------------------------------------------------------------------------
@dataclass(frozen=True)
class Cell:
    """One cell of a sweep: a model (as written) at one batch size, for the meters still missing in the folder.

    Attributes:
        model: The model spec as the run names it (``"sd:steps=10"``).
        batch_size: Images per generate batch.
        meter_names: The cell's meters that have no record yet.
        wants_quality: Judge the model's quality here (the driver asks one cell per model, and only
            when the folder has no figure for it).
        position: The cell's place in the run's order (recorded, with ``cells``, as ``cell_order``).
    """

    model: str
    batch_size: int
    meter_names: tuple[str, ...]
    wants_quality: bool = False
    position: int | None = None  # in the run's (seeded, shuffled) order of cells
    cells: int | None = None  # cells in the run

    @property
    def label(self) -> str:
        return f"{self.model} (batch {self.batch_size})"


@dataclass
class CellResult:
    """What a worker sends back to the driver, which alone writes files.

    Attributes:
        cell: The cell measured.
        records: One record per meter, without the quality fields (the driver adds them).
        quality: The model's quality figure when this cell judged it, else ``None``.
        grid: The sample grid's path inside the output folder.
        grid_png: The sample grid's PNG bytes.
        failed: Why the cell could not be measured (``None``: it was); a failed cell has no records.
    """

    cell: Cell
    records: list[Record]
    quality: dict[str, Any] | None = None
    grid: str = ""
    grid_png: bytes = b""
    failed: str | None = None


@dataclass
class Placement:
    """Where cells run, as every record states it (``executor``, ``node``, ``host``, ``device``).

    ``shared_with`` is asked at the end of a cell's windows: the other cells that ran on the same
    node while they were open (the local executor runs one cell at a time: none).
    """

    executor: str = "local"
    node: str = "local"
    host: str = field(default_factory=socket.gethostname)
    device: str | None = None
    begin: Callable[[Cell], None] = field(default=lambda cell: None, repr=False)
    shared_with: Callable[[Cell], list[str]] = field(default=lambda cell: [], repr=False)


@dataclass
class BenchSpec:
    """The picklable inputs a worker builds its :class:`Workbench` from.

    ``backbone`` is the driver's own, already loaded, for a workbench in the driver's process; it is
    not pickled (a worker elsewhere loads its own from the plan's backbone spec).
    """

    plan: RunPlan
    generators: Registry = GENERATORS
    techniques: Registry = TECHNIQUES
    meters: Registry = METERS
    backbones: Registry = BACKBONES
    backbone: Backbone | None = None
    #: The clock, sleep and host probe of the protocol (tests drive them; ``None``: the real ones).
    clock: Callable[[], float] | None = None
    sleep: Callable[[float], None] | None = None
    host: HostProbe | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "backbone": None}


class Workbench:
    """The backbone and the meters of one worker, and the measurement of a cell on them.

    ``open()`` makes the meters; ``measure(cell)`` measures one cell, with idle windows right before
    and after its metered windows (whole-device meters only); ``close()`` releases the meters.
    """

    def __init__(self, spec: BenchSpec, environment: dict[str, Any] | None = None,
                 placement: Placement | None = None,
                 on_event: Callable[[str, dict[str, Any]], None] | None = None) -> None:
        sweep = spec.plan.config.sweep
        self.spec = spec
        self.plan = spec.plan
        self.generators, self.techniques = spec.generators, spec.techniques
        self.meter_registry = spec.meters
        self.backbone = spec.backbone or load_backbone(sweep.backbone, spec.backbones, **sweep.backbone_options)
        self.quality_options = spec.plan.config.quality.options()
        self.meter_names = list(spec.plan.meter_names)
        self.env = environment
        self.placement = placement or Placement()
        if self.placement.device is None:
            self.placement.device = str(sweep.backbone_options.get("device") or "cpu")
        self.on_event = on_event or (lambda kind, info: None)
        self.meters: dict[str, Meter] = {}
        self.unavailable: dict[str, str] = {}
        self.idle_around_cells = True
        self.clock = spec.clock or time.perf_counter
        self.sleep = spec.sleep or time.sleep
        self.host = spec.host or HostProbe()

    def open(self, idle: bool = True) -> None:
        """Make the meters (an unavailable one keeps its reason); ``idle``: measure idle around every cell."""
        from un0_bench.harness.measuring.environment import environment

        if self.env is None:
            self.env = environment()
        for name in self.meter_names:
            m = make_meter(self.plan.meter_spec(name), self.meter_registry)
            if isinstance(m, str):
                self.unavailable[name] = m
            else:
                self.meters[name] = m
        self.idle_around_cells = idle

    def close(self) -> None:
        for m in self.meters.values():
            m.close()

    def measure(self, cell: Cell) -> CellResult:
        plan, protocol = self.plan, self.plan.config.protocol
        backbone = self.backbone
        model, bs, meter_names, meters = cell.model, cell.batch_size, list(cell.meter_names), self.meters
        unavailable, env = self.unavailable, self.env
        stack = resolve_checked(model, backbone, self.generators, self.techniques)
        generator = build(stack, backbone, self.generators, self.techniques)
        request = GenerationRequest(tuple(backbone.default_prompts(protocol.images)), seed=protocol.seed, batch_size=bs)
        profile = getattr(meters.get("proxy"), "profile", None)
        profile_name = profile.name if profile is not None else DEFAULT_PROFILE
        extra: dict[str, Any] = {}
        caches = generator.cache_stats() is not None
        if caches:
            # Cold: the first use of each prompt pays for the gate and the gather; count it apart.
            generator.reset_cache()
            extra.update(counts_fields(count_ops(generator, request), profile_name, prefix="cold_"))
        # Warm up until two calls agree (bounded), so no window measures a cold cache or a cold chip.
        warmup = warm_up(generator, request, protocol.warmup, protocol.warmup_max_s, protocol.warmup_tolerance,
                         clock=self.clock)
        first: GenerationResult | None = warmup.pop("first")
        if generator.uncounted_reason is None:
            counts = count_ops(generator, request)  # warm: what every later call costs
            counted = counts_fields(counts, profile_name)
        else:  # the work runs where no counter sees it: null figures with the reason, never 0
            counts, counted = Counts(images=len(request.prompts), stats=[]), uncounted_fields(
                generator.uncounted_reason, profile_name)
        if first is None:
            first = generator.generate(request)
        grid = Path("samples") / f"{slug(model)}.png"
        png = grid_png(first.images)
        if caches:
            extra["cache"] = generator.cache_stats()
        if hasattr(generator, "analog_projection"):
            extra["projected"] = generator.analog_projection(counts)

        active = {n: meters[n] for n in meter_names if n in meters}
        self.placement.begin(cell)
        span_from = time.time()  # wall-clock (epoch) span of every metered window: comparable across cells
        # Idle before, windows (each at least every meter's minimum), idle after: one thermal state.
        measured = measure_cell_windows(generator, request, active, counts, min_repeats=protocol.min_repeats,
                                        max_repeats=protocol.max_repeats, min_duration_s=protocol.min_duration_s,
                                        idle_s=protocol.idle_s if self.idle_around_cells else 0.0, clock=self.clock,
                                        sleep=self.sleep, host=self.host)
        windows = measured.windows
        if generator.phases():
            # Each phase (text encoder, each denoising step, VAE decode, gate) in its own meter window.
            extra["phases"] = measure_phases(generator, request, active)
        span_to = time.time()
        shared_with = self.placement.shared_with(cell)
        timed = [w for w in windows if "wall" in w.readings] or [w for w in windows if w.readings]
        wall = [(w.readings["wall"] if "wall" in w.readings else next(iter(w.readings.values()))).duration_s
                for w in timed]
        duration = ratio_interval(wall, [float(w.images) for w in timed]) if timed else None
        duration_s, duration_ci = (duration.estimate, duration.as_list()) if duration else (None, None)
        derivation = generator.derivation()
        quality = None
        if cell.wants_quality and plan.config.quality.quality_samples > 0:
            self.on_event("quality", {"model": model})
            quality = backbone.evaluate_quality(generator, first, self.quality_options)
        measured_fields = {
            "duration_s_per_image": duration_s,
            "duration_ci95_s": duration_ci,
            **counted,
            **measured.fields(),
            "warmup": warmup,
            "cell_order": {"order": protocol.cell_order, "seed": protocol.seed, "position": cell.position,
                           "of": cell.cells},
            **extra,
            "environment": env,
            "node": self.placement.node,
            "host": self.placement.host,
            "device": self.placement.device,
            "windows_span_s": [span_from, span_to],
            "device_shared_with": shared_with,
            "derivation_energy": (derivation or {}).get("energy"),
            "derivation_command": (derivation or {}).get("command"),
            "sample_grid": str(grid),
        }
        records, run, described = [], plan.run, generator.describe()
        for name in meter_names:
            if name in unavailable:
                rec = {"status": unavailable[name], "energy_j_per_image": None, "energy_ci95_j": None}
            else:
                rec = summarise(name, windows, measured.idle.get(name), min_window_s=meters[name].min_window_s)
            about = identity(model=model, canonical=stack.canonical, stack=stack.describe(),
                             backbone=plan.config.sweep.backbone, batch_size=bs, images=protocol.images, meter=name,
                             meter_spec=plan.meter_spec(name), run=run, executor=self.placement.executor,
                             generator=described)
            records.append(Record.measured(about, {**measured_fields, **rec}))
        return CellResult(cell, records, quality=quality, grid=str(grid), grid_png=png)

