"""The measurement protocol: build each generator, count its ops once, then meter repeated runs.

For each model and batch size: warm up; run one counting pass (its own pass, so timed windows are
not slowed by counting); measure idle power once per run for meters that see a whole device; then
repeat metered windows until both a minimum count and a minimum duration are reached. Every meter
watches the same windows. One record per meter is appended as soon as the cell is finished.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from un0_bench.backbones.base import Backbone
from un0_bench.harness.counters.records import Counts
from un0_bench.harness.errors import UserError
from un0_bench.harness.generator import GenerationRequest, GenerationResult, Generator
from un0_bench.harness.ledger import find_reference, ledger
from un0_bench.harness.meters.base import Meter, MeterUnavailable, Reading, unavailable
from un0_bench.harness.registry import BACKBONES, GENERATORS, METERS, PIPELINE_GENERATORS, Registry
from un0_bench.harness.results import ResultStore, check_writable
from un0_bench.harness.spec import ModelSpec, bind
from un0_bench.harness.stats import median_ci95

#: Batch size of the single cell measured when none is given (capped at the images per window).
DEFAULT_BATCH_SIZE = 16


@dataclass
class RunConfig:
    """What to measure and how hard.

    Attributes:
        models: Model specs as written (``"sd"``, ``"sd:steps=10"``).
        backbone: Backbone spec (``"digits"`` or ``"diffusers:PATH"``).
        meters: Meter specs, or ``["auto"]`` for every registered meter (unavailable ones are
            recorded with their reason).
        images: Images per metered window (one generate call over that many prompts).
        batch_sizes: Batch sizes to measure; each is its own cell. ``None``: one cell at
            ``min(16, images)``. A batch larger than ``images`` is refused: a window never fills it.
        seed: Seed of image 0; image ``i`` uses ``seed + i``.
        min_repeats: Windows to measure at least.
        min_duration_s: Total metered time to reach at least.
        max_repeats: Hard cap on windows.
        warmup: Unmetered generate calls before counting and measuring.
        idle_s: Length of the idle-power window for whole-device meters (0 disables it).
        quality_samples: Images per model for FID/KID/accuracy (0: quality not measured).
        quality_seeds: Disjoint draws of ``quality_samples`` images each (digits): with 2 or more,
            FID is their mean, its spread is recorded and a verdict within that noise is marginal.
        reference: Model whose quality sets the band (and whose energy the ledger compares to).
        fid_ratio: Quality-matched needs FID <= ``fid_ratio`` x the reference's FID ...
        accuracy_drop: ... and accuracy at most this much (a fraction) below the reference's.
        pue: Power usage effectiveness for the ledger's facility boundary.
        lifetime_images: Images a model serves over its life (amortises its training energy).
        backbone_options: Keyword options for the backbone (diffusers: ``device``, ``dtype``,
            ``prompts_file``).
        clip: Local CLIP model folder for quality on pipeline backbones (``None``: not measured).
    """

    models: list[str]
    out: Path
    backbone: str = "digits"
    meters: list[str] = field(default_factory=lambda: ["auto"])
    images: int = 16
    batch_sizes: list[int] | None = None
    seed: int = 0
    min_repeats: int = 3
    min_duration_s: float = 2.0
    max_repeats: int = 100
    warmup: int = 1
    idle_s: float = 2.0
    quality_samples: int = 1000
    quality_seeds: int = 1
    reference: str = "sd"
    pue: float = 1.56
    lifetime_images: int = 1_000_000
    backbone_options: dict[str, Any] = field(default_factory=dict)
    clip: str | None = None
    fid_ratio: float = 1.25
    accuracy_drop: float = 0.03

    def validate(self) -> None:
        for name in ("images", "min_repeats", "max_repeats"):
            if getattr(self, name) < 1:
                raise UserError(f"--{name.replace('_', '-')} must be a positive integer, got {getattr(self, name)}")
        if self.batch_sizes is None:
            self.batch_sizes = [min(DEFAULT_BATCH_SIZE, self.images)]
        if any(b < 1 for b in self.batch_sizes) or not self.batch_sizes:
            raise UserError(f"--batch-size must be positive integers, got {self.batch_sizes}")
        too_big = [b for b in self.batch_sizes if b > self.images]
        if too_big:
            raise UserError(f"--batch-size {','.join(map(str, too_big))} is larger than --images {self.images}: a "
                            f"window generates --images images, so it would never fill that batch (and the record "
                            f"would name a batch size that never ran); raise --images or lower --batch-size")
        if self.pue < 1 or self.lifetime_images < 1:
            raise UserError("--pue must be >= 1 and --lifetime-images positive")
        if self.quality_samples < 0 or not self.fid_ratio >= 1 or not 0 <= self.accuracy_drop <= 1:
            raise UserError("--quality-samples must be >= 0, --fid-ratio >= 1, --accuracy-drop in [0, 1]")
        if self.quality_seeds < 1:
            raise UserError(f"--quality-seeds must be a positive integer, got {self.quality_seeds}")
        if self.quality_seeds > 1 and not self.backbone.startswith("digits"):
            raise UserError("--quality-seeds applies to the digits backbone (FID draws); pipelines are scored by "
                            "CLIP on the measured images")
        if self.warmup < 0 or self.min_duration_s < 0 or self.idle_s < 0:
            raise UserError("--warmup, --min-duration and --idle must not be negative")
        if self.min_repeats > self.max_repeats:
            raise UserError("--min-repeats must not exceed --max-repeats")
        if not self.models:
            raise UserError("no models given")


# --- building things from names -------------------------------------------------------------------
def load_backbone(text: str, registry: Registry = BACKBONES, **options: Any) -> Backbone:
    name, _, arg = text.partition(":")
    return registry.get(name)(arg or None, **options)


def generators_for(backbone_text: str, default: Registry = GENERATORS) -> Registry:
    """The generator registry of a backbone kind: pipelines have their own versions of the techniques."""
    return PIPELINE_GENERATORS if backbone_text.partition(":")[0] == "diffusers" else default


def generator_factory(
    spec: ModelSpec, registry: Registry = GENERATORS
) -> tuple[Callable[..., Generator], dict[str, Any]]:
    """The factory for ``spec`` and its validated parameters (raises on unknown names or bad values)."""
    if registry is PIPELINE_GENERATORS and spec.name not in registry:
        from un0_bench.baselines.pipeline_techniques import NOT_SUPPORTED

        if spec.name in NOT_SUPPORTED:
            raise UserError(f"{spec.name} is not available on diffusers backbones: {NOT_SUPPORTED[spec.name]}")
    factory = registry.get(spec.name)
    return factory, bind(spec, getattr(factory, "params", {}))


def make_generator(spec_text: str, backbone: Backbone, registry: Registry = GENERATORS) -> Generator:
    spec = ModelSpec.parse(spec_text)
    factory, params = generator_factory(spec, registry)
    gen = factory(backbone, **params)
    gen.spec = spec.text
    return gen


def resolve_meters(names: list[str], registry: Registry = METERS) -> list[str]:
    """Expand ``auto`` and check every meter name before any work starts."""
    out: list[str] = []
    for text in names:
        if text == "auto":
            out.extend(n for n in registry.names() if n not in out)
            continue
        registry.entry(ModelSpec.parse(text).name)  # raises "did you mean"
        if text not in out:
            out.append(text)
    return out


def make_meter(text: str, registry: Registry = METERS) -> Meter | str:
    """A ready meter, or the reason it cannot measure here (``"unavailable: ..."``)."""
    spec = ModelSpec.parse(text)
    try:
        meter = registry.get(spec.name)(**dict(spec.params))
    except TypeError as e:
        raise UserError(f"meter {text!r}: {e}") from None
    except Exception as e:  # a meter whose construction fails is unavailable, with the reason
        return f"unavailable: {type(e).__name__}: {e}"
    status = meter.probe()
    return meter if status == "ok" else status


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_")


# --- the protocol ----------------------------------------------------------------------------------
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
        "uncounted_ops": counts.uncounted_ops(),
    }
    return {prefix + k: v for k, v in fields.items()}


def save_grid(images: torch.Tensor, path: Path, per_row: int = 10, scale: int = 4) -> None:
    """Save up to two rows of images ``(N, C, H, W)`` in [0, 1] as one PNG (nearest upscaling)."""
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
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)


class Runner:
    """Runs :class:`RunConfig` into an output folder, skipping finished cells."""

    def __init__(self, config: RunConfig, on_event: Callable[[str, dict[str, Any]], None] | None = None,
                 generators: Registry = GENERATORS, meters: Registry = METERS, backbones: Registry = BACKBONES) -> None:
        config.validate()
        self.config = config
        self.generators = generators_for(config.backbone, generators)
        self.meters, self.backbones = meters, backbones
        self.store = ResultStore(config.out)
        self.on_event = on_event or (lambda kind, info: None)
        # Check everything that can be checked before any work starts.
        self.meter_names = resolve_meters(config.meters, meters)
        self.specs = [ModelSpec.parse(m) for m in config.models]
        for spec in self.specs:
            generator_factory(spec, self.generators)
        if config.quality_samples:
            generator_factory(ModelSpec.parse(config.reference), self.generators)
        self._quality_cache: dict[str, dict[str, Any]] | None = None
        backbones.entry(config.backbone.partition(":")[0])
        check_writable(config.out)

    def pending(self) -> list[tuple[ModelSpec, int, list[str]]]:
        done = self.store.done()
        out = []
        # The reference goes first, so every later record can carry its factor vs the reference.
        specs = sorted(self.specs, key=lambda sp: sp.text != self.config.reference)
        for spec in specs:
            for bs in self.config.batch_sizes:
                missing = [m for m in self.meter_names
                           if (spec.text, self.config.backbone, bs, m) not in done]
                if missing:
                    out.append((spec, bs, missing))
        return out

    def run(self) -> list[dict[str, Any]]:
        from un0_bench.harness.environment import environment

        cfg = self.config
        todo = self.pending()
        self.on_event("plan", {"cells": len(todo), "meters": self.meter_names})
        if not todo:
            return []
        backbone = load_backbone(cfg.backbone, self.backbones, **cfg.backbone_options)
        env = environment()
        meters: dict[str, Meter] = {}
        unavailable: dict[str, str] = {}
        for name in self.meter_names:
            m = make_meter(name, self.meters)
            if isinstance(m, str):
                unavailable[name] = m
            else:
                meters[name] = m
        written: list[dict[str, Any]] = []
        try:
            idle = measure_idle(meters, cfg.idle_s)
            for spec, bs, missing in todo:
                self.on_event("cell", {"model": spec.text, "batch_size": bs})
                records = self._measure(spec, bs, missing, backbone, meters, unavailable, idle, env)
                self.store.append(records)
                written.extend(records)
                self.on_event("done", {"model": spec.text, "batch_size": bs, "records": records})
        finally:
            for m in meters.values():
                m.close()
        return written

    def _measure(self, spec: ModelSpec, bs: int, meter_names: list[str], backbone: Backbone,
                 meters: dict[str, Meter], unavailable: dict[str, str], idle: dict[str, float],
                 env: dict[str, Any]) -> list[dict[str, Any]]:
        cfg = self.config
        generator = make_generator(spec.text, backbone, self.generators)
        request = GenerationRequest(tuple(backbone.default_prompts(cfg.images)), seed=cfg.seed, batch_size=bs)
        profile = getattr(meters.get("proxy"), "profile", None)
        profile_name = profile.name if profile is not None else "horowitz-45nm"
        extra: dict[str, Any] = {}
        caches = generator.cache_stats() is not None
        if caches:
            # Cold: the first use of each prompt pays for the gate and the gather; count it apart.
            generator.reset_cache()
            extra.update(counts_fields(count_ops(generator, request), profile_name, prefix="cold_"))
        first: GenerationResult | None = None
        for _ in range(cfg.warmup):
            first = generator.generate(request)
        counts = count_ops(generator, request)  # warm: what every later call costs
        if first is None:
            first = generator.generate(request)
        grid = Path("samples") / f"{slug(spec.text)}.png"
        save_grid(first.images, cfg.out / grid)
        if caches:
            extra["cache"] = generator.cache_stats()
        if hasattr(generator, "analog_projection"):
            extra["projected"] = generator.analog_projection(counts)

        active = {n: meters[n] for n in meter_names if n in meters}
        min_window = max([getattr(m, "min_window_s", 0.0) for m in active.values()], default=0.0)
        windows: list[Window] = []
        t_start = time.perf_counter()
        while len(windows) < cfg.max_repeats and (
            len(windows) < cfg.min_repeats or time.perf_counter() - t_start < cfg.min_duration_s
        ):
            windows.append(metered_window(generator, request, active, counts, min_window))
        if generator.phases():
            from un0_bench.baselines.pipeline_techniques import measure_phases

            # Each phase (text encoder, each denoising step, VAE decode, gate) in its own meter window.
            extra["phases"] = measure_phases(generator, request, active)
        wall = [w.readings["wall"].duration_s / w.images for w in windows if "wall" in w.readings]
        if not wall:
            wall = [next(iter(w.readings.values())).duration_s / w.images for w in windows if w.readings]
        duration_s, duration_ci = median_ci95(wall) if wall else (None, None)
        describe = generator.describe()
        derivation = generator.derivation()
        common = {
            "model": spec.text,
            "backbone": cfg.backbone,
            "batch_size": bs,
            "images": cfg.images,
            "duration_s_per_image": duration_s,
            "duration_ci95_s": duration_ci,
            **counts_fields(counts, profile_name),
            **extra,
            "config": {"generator": describe, "run": {k: (str(v) if isinstance(v, Path) else v)
                                                       for k, v in asdict(cfg).items()}},
            "environment": env,
            "derivation_energy": (derivation or {}).get("energy"),
            "derivation_command": (derivation or {}).get("command"),
            "sample_grid": str(grid),
            **self._quality_fields(spec.text, backbone, generator, first),
            "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        records = []
        earlier = self.store.load()
        for name in meter_names:
            if name in unavailable:
                rec = {"status": unavailable[name], "energy_j_per_image": None, "energy_ci95_j": None}
            else:
                rec = summarise(name, windows, idle.get(name))
            record = {**common, "meter": name, **rec}
            ref = record if spec.text == cfg.reference else find_reference(earlier, record, cfg.reference)
            record["ledger"] = ledger(record, ref, pue=cfg.pue, lifetime_images=cfg.lifetime_images)
            records.append(record)
        return records

    # --- quality ------------------------------------------------------------------------------------
    def _quality_file(self) -> Path:
        return self.config.out / "quality.jsonl"

    def _load_quality(self) -> dict[str, dict[str, Any]]:
        import json

        cfg = self.config
        if self._quality_cache is None:
            self._quality_cache = {}
            if self._quality_file().exists():
                for line in self._quality_file().read_text().splitlines():
                    try:
                        q = json.loads(line)
                    except json.JSONDecodeError:
                        continue  # a torn last line from an interrupted run
                    if (q.get("backbone") == cfg.backbone and q.get("samples_requested") == cfg.quality_samples
                            and q.get("seeds_requested", 1) == cfg.quality_seeds):
                        self._quality_cache[q["model"]] = q["quality"]
        return self._quality_cache

    def _quality(self, model: str, backbone: Backbone, generator: Generator | None = None,
                 first: GenerationResult | None = None) -> dict[str, Any] | None:
        """Quality of ``model``, computed once per output folder and kept in quality.jsonl.

        Digits: FID, KID and accuracy over ``quality_samples`` images. Pipelines: CLIP score of the
        measured images with the local CLIP model given by ``clip`` (never downloaded).
        """
        import json
        import os

        cfg = self.config
        cache = self._load_quality()
        if model in cache:
            return cache[model]
        if cfg.quality_samples == 0:
            return None
        if backbone.kind == "digits":
            from un0_bench.harness.quality import evaluate_generator_seeds

            self.on_event("quality", {"model": model})
            gen = generator or make_generator(model, backbone, self.generators)
            q = evaluate_generator_seeds(gen, n=cfg.quality_samples, seeds=cfg.quality_seeds)
        elif backbone.kind == "diffusers" and cfg.clip and first is not None:
            from un0_bench.backbones.pipeline import clip_quality

            q = clip_quality(first.images, first.prompts, cfg.clip)
        else:
            return None
        with self._quality_file().open("a") as f:
            f.write(json.dumps({"model": model, "backbone": cfg.backbone, "samples_requested": cfg.quality_samples,
                                "seeds_requested": cfg.quality_seeds, "quality": q}, sort_keys=True) + "\n")
            f.flush()
            os.fsync(f.fileno())
        cache[model] = q
        return q

    def _quality_fields(self, model: str, backbone: Backbone, generator: Generator,
                        first: GenerationResult) -> dict[str, Any]:
        cfg = self.config
        q = self._quality(model, backbone, generator, first)
        if q is None:
            if cfg.quality_samples == 0:
                why = "--quality-samples 0"
            elif backbone.kind == "diffusers":
                why = "no --clip model given: energy is not quality-matched"
            else:
                why = f"no evaluator for backbone {backbone.kind}"
            return {"quality": None, "quality_matched": None, "quality_note": f"not measured ({why})"}
        from un0_bench.harness.quality import QualityBand

        ref = self._quality(cfg.reference, backbone)
        band = {"reference": cfg.reference, "fid_ratio": cfg.fid_ratio, "accuracy_drop": cfg.accuracy_drop}
        if ref is None:
            return {"quality": q, "quality_matched": None, "quality_band": band,
                    "quality_note": f"reference {cfg.reference} has no quality figure in this folder"}
        if "clip_score" in q:
            # NB: pipelines have no FID here; matched means a CLIP score at most accuracy_drop (relative)
            # below the reference's.
            matched = q["clip_score"] >= (1 - cfg.accuracy_drop) * ref["clip_score"]
            marginal = None
        else:
            quality_band = QualityBand(cfg.fid_ratio, cfg.accuracy_drop)
            matched, marginal = quality_band.matched(q, ref), quality_band.marginal(q, ref)
        return {"quality": q, "quality_matched": bool(matched), "quality_marginal": marginal, "quality_band": band}
