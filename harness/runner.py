"""Orchestration: run a :class:`~un0_bench.harness.config.RunConfig` into an output folder, cell by cell.

For each model (a stack) and batch size: build it on the backbone, warm up, count, meter repeated
windows and per-phase windows (:mod:`~un0_bench.harness.protocol`), judge quality through the
backbone's evaluator and band rule, and append one record per meter as soon as the cell is done.
Everything that can be checked (names, stacks, meters, backbone, output folder) is checked before
the first cell. The ledger is not computed here: reports compute it from the records.
"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from un0_bench.harness.backbone import Backbone
from un0_bench.harness.config import RunConfig
from un0_bench.harness.errors import UserError
from un0_bench.harness.generator import GenerationRequest, GenerationResult, Generator
from un0_bench.harness.meters.base import Meter
from un0_bench.harness.protocol import (
    Window,
    count_ops,
    counts_fields,
    measure_idle,
    measure_phases,
    metered_window,
    summarise,
)
from un0_bench.harness.registry import BACKBONES, GENERATORS, METERS, TECHNIQUES, Registry
from un0_bench.harness.results import ResultStore, check_writable
from un0_bench.harness.spec import ModelSpec
from un0_bench.harness.stack import Stack, build, resolve
from un0_bench.harness.stats import ratio_interval

__all__ = ["RunConfig", "Runner", "load_backbone", "make_meter", "resolve_meters"]


# --- building things from names -------------------------------------------------------------------
def load_backbone(text: str, registry: Registry = BACKBONES, **options: Any) -> Backbone:
    name, _, arg = text.partition(":")
    return registry.get(name)(arg or None, **options)


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


def _shown(value: Any) -> str:
    return "none" if value is None else json.dumps(value) if isinstance(value, (dict, list, str)) else str(value)


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
                 generators: Registry = GENERATORS, meters: Registry = METERS, backbones: Registry = BACKBONES,
                 techniques: Registry = TECHNIQUES) -> None:
        config.validate()
        self.config = config
        self.generators, self.techniques = generators, techniques
        self.meters, self.backbones = meters, backbones
        self.store = ResultStore(config.out)
        self.on_event = on_event or (lambda kind, info: None)
        # Check everything that can be checked before any work starts: names, stacks, meters,
        # the backbone and its quality options, the output folder.
        self.meter_names = resolve_meters(config.meters, meters)
        backbones.entry(config.backbone.partition(":")[0])
        self.backbone = load_backbone(config.backbone, backbones, **config.backbone_options)
        self.quality_options = config.quality_options()
        self.backbone.check_quality_options(self.quality_options)
        self.notes: list[str] = []
        self.stacks = {m: self._resolve(m) for m in config.models}
        self._measure_each_cell_once()
        self._include_reference()
        self._quality_cache: dict[str, dict[str, Any]] | None = None
        check_writable(config.out)
        self.store.refuse_if_locked()
        if not config.fresh:
            self._check_folder()

    def _check_folder(self) -> None:
        """Refuse a folder whose records were measured with another configuration (resume would mix them)."""
        from dataclasses import MISSING, fields

        from un0_bench.harness.config import flag_of

        cfg = self.config
        now = cfg.measurement()
        defaults = {f.name: (f.default_factory() if f.default_factory is not MISSING else f.default)
                    for f in fields(RunConfig)}
        differ: dict[str, Any] = {}
        for record in self.store.load():
            if record["backbone"] != cfg.backbone:
                continue  # another backbone's cells: a separate comparison in the same folder
            run = (record.get("config") or {}).get("run")
            run = run if isinstance(run, dict) else {}
            for key, value in now.items():
                old = run.get(key, defaults[key])
                if old != value and key not in differ:
                    differ[key] = old
        if differ:
            listed = "; ".join(f"{flag_of(k)} {_shown(v)} there, {_shown(now[k])} now" for k, v in differ.items())
            raise UserError(f"{cfg.out} holds results measured with another configuration ({listed}); run with "
                            f"the folder's options to resume it, another --out, or --fresh to start it over")

    def _start_over(self) -> None:
        """``--fresh``: move the folder's earlier files aside (nothing is deleted)."""
        out = self.config.out
        earlier = [out / n for n in ("results.jsonl", "quality.jsonl", "samples") if (out / n).exists()]
        if not earlier:
            return
        aside = out / time.strftime("replaced-%Y%m%d-%H%M%S", time.gmtime())
        n = 1
        while aside.exists():
            aside = aside.with_name(aside.name.split("~")[0] + f"~{n}")
            n += 1
        aside.mkdir()
        for path in earlier:
            path.rename(aside / path.name)
        self._quality_cache = None
        self._note(f"--fresh: moved the folder's earlier {', '.join(p.name for p in earlier)} to {aside}")

    def _note(self, text: str) -> None:
        self.notes.append(text)
        self.on_event("note", {"text": text})

    def _measure_each_cell_once(self) -> None:
        """A model given twice (``sd,sd``; ``sd,sd:steps=50``: one canonical stack) is measured once, saying so.

        So is a batch size given twice.
        """
        cfg = self.config
        first: dict[str, str] = {}
        for model in list(cfg.models):
            canonical = self.stacks[model].canonical
            if canonical not in first:
                first[canonical] = model
                continue
            same = first[canonical]
            if model == same:
                self._note(f"--models gives {model} twice: measured once")
            else:
                self._note(f"--models {model} is the same model as {same} ({canonical}): measured once, as {same}")
                del self.stacks[model]
        cfg.models = list(first.values())
        batches = list(dict.fromkeys(cfg.batch_sizes or []))
        if len(batches) < len(cfg.batch_sizes or []):
            twice = sorted({b for b in cfg.batch_sizes if cfg.batch_sizes.count(b) > 1})
            self._note(f"--batch-size gives {', '.join(map(str, twice))} more than once: each measured once")
            cfg.batch_sizes = batches

    def _include_reference(self) -> None:
        """The reference is checked like a model name, and is measured in the run.

        Its energy is 1x and its quality sets the band: one not among the models is added to them, saying so.
        """
        cfg = self.config
        ref = self._resolve(cfg.reference)  # unknown names: "did you mean"
        same = [m for m, s in self.stacks.items() if s.canonical == ref.canonical]
        if cfg.reference in self.stacks:
            return
        if same:
            self._note(f"--reference {cfg.reference} is {same[0]} of --models (the same model); using {same[0]}")
            cfg.reference = same[0]
            return
        self._note(f"--reference {cfg.reference} is not among --models: added to the run (its energy is 1x and "
                   f"its quality sets the band)")
        cfg.models = [*cfg.models, cfg.reference]
        self.stacks[cfg.reference] = ref

    def _resolve(self, text: str) -> Stack:
        return resolve(text, self.backbone, self.generators, self.techniques)

    def make_generator(self, text: str) -> Generator:
        stack = self.stacks.get(text) or self._resolve(text)
        return build(stack, self.backbone, self.generators, self.techniques)

    def canonical_of(self, record: dict[str, Any]) -> str:
        """A record's canonical model (version 1 records lack it: a model of this run gives its own)."""
        if isinstance(record.get("model_canonical"), str):
            return record["model_canonical"]
        stack = self.stacks.get(record["model"])
        return stack.canonical if stack is not None else record["model"]

    def pending(self) -> list[tuple[str, int, list[str]]]:
        # A cell is done when its canonical model was measured, under whichever name (sd or sd:steps=50).
        done = {(self.canonical_of(r), r["backbone"], int(r["batch_size"]), r["meter"]) for r in self.store.load()}
        out = []
        # The reference goes first, so its quality is known when later cells are judged.
        models = sorted(self.config.models, key=lambda m: m != self.config.reference)
        for model in models:
            for bs in self.config.batch_sizes:
                canonical = self.stacks[model].canonical
                missing = [m for m in self.meter_names if (canonical, self.config.backbone, bs, m) not in done]
                if missing:
                    out.append((model, bs, missing))
        return out

    def run(self) -> list[dict[str, Any]]:
        """Measure every pending cell, holding the folder's lock (one writer at a time)."""
        with self.store.lock():
            if self.config.fresh:
                self._start_over()
            return self._run()

    def _run(self) -> list[dict[str, Any]]:
        from un0_bench.harness.environment import environment

        cfg = self.config
        todo = self.pending()
        self.on_event("plan", {"cells": len(todo), "meters": self.meter_names})
        if not todo:
            return []
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
            for model, bs, missing in todo:
                self.on_event("cell", {"model": model, "batch_size": bs})
                records = self._measure(model, bs, missing, meters, unavailable, idle, env)
                self.store.append(records)
                written.extend(records)
                self.on_event("done", {"model": model, "batch_size": bs, "records": records})
        finally:
            for m in meters.values():
                m.close()
        return written

    def _measure(self, model: str, bs: int, meter_names: list[str], meters: dict[str, Meter],
                 unavailable: dict[str, str], idle: dict[str, float], env: dict[str, Any]) -> list[dict[str, Any]]:
        cfg = self.config
        backbone = self.backbone
        stack = self.stacks[model]
        generator = self.make_generator(model)
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
        grid = Path("samples") / f"{slug(model)}.png"
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
            # Each phase (text encoder, each denoising step, VAE decode, gate) in its own meter window.
            extra["phases"] = measure_phases(generator, request, active)
        timed = [w for w in windows if "wall" in w.readings] or [w for w in windows if w.readings]
        wall = [(w.readings["wall"] if "wall" in w.readings else next(iter(w.readings.values()))).duration_s
                for w in timed]
        duration = ratio_interval(wall, [float(w.images) for w in timed]) if timed else None
        duration_s, duration_ci = (duration.estimate, duration.as_list()) if duration else (None, None)
        derivation = generator.derivation()
        common = {
            "model": model,
            "model_canonical": stack.canonical,
            "stack": stack.describe(),
            "backbone": cfg.backbone,
            "batch_size": bs,
            "images": cfg.images,
            "duration_s_per_image": duration_s,
            "duration_ci95_s": duration_ci,
            **counts_fields(counts, profile_name),
            **extra,
            "config": {"generator": generator.describe(), "run": {k: (str(v) if isinstance(v, Path) else v)
                                                                  for k, v in asdict(cfg).items()}},
            "environment": env,
            "derivation_energy": (derivation or {}).get("energy"),
            "derivation_command": (derivation or {}).get("command"),
            "sample_grid": str(grid),
            **self._quality_fields(model, generator, first),
            "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        records = []
        for name in meter_names:
            if name in unavailable:
                rec = {"status": unavailable[name], "energy_j_per_image": None, "energy_ci95_j": None}
            else:
                rec = summarise(name, windows, idle.get(name))
            records.append({**common, "meter": name, **rec})
        return records

    # --- quality ------------------------------------------------------------------------------------
    def _quality_file(self) -> Path:
        return self.config.out / "quality.jsonl"

    def _load_quality(self) -> dict[str, dict[str, Any]]:
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

    def _quality(self, model: str, generator: Generator | None = None,
                 measured: GenerationResult | None = None) -> dict[str, Any] | None:
        """Quality of ``model`` by the backbone's evaluator, computed once per output folder (quality.jsonl)."""
        cfg = self.config
        cache = self._load_quality()
        if model in cache:
            return cache[model]
        if cfg.quality_samples == 0:
            return None
        if generator is None or measured is None:
            generator = self.make_generator(model)
            measured = generator.generate(GenerationRequest(tuple(self.backbone.default_prompts(cfg.images)),
                                                            seed=cfg.seed, batch_size=min(16, cfg.images)))
        self.on_event("quality", {"model": model})
        q = self.backbone.evaluate_quality(generator, measured, self.quality_options)
        if q is None:
            return None
        with self._quality_file().open("a") as f:
            f.write(json.dumps({"model": model, "backbone": cfg.backbone, "samples_requested": cfg.quality_samples,
                                "seeds_requested": cfg.quality_seeds, "quality": q}, sort_keys=True,
                               allow_nan=False) + "\n")
            f.flush()
            os.fsync(f.fileno())
        cache[model] = q
        return q

    def _quality_fields(self, model: str, generator: Generator, measured: GenerationResult) -> dict[str, Any]:
        cfg = self.config
        q = self._quality(model, generator, measured)
        if q is None:
            why = self.backbone.quality_missing_reason(self.quality_options)
            return {"quality": None, "quality_matched": None, "quality_note": f"not measured ({why})"}
        ref = self._quality(cfg.reference)
        band = {"reference": cfg.reference, "fid_ratio": cfg.fid_ratio, "accuracy_drop": cfg.accuracy_drop}
        if ref is None:
            return {"quality": q, "quality_matched": None, "quality_band": band,
                    "quality_note": f"reference {cfg.reference} has no quality figure in this folder"}
        matched, marginal = self.backbone.quality_band(q, ref, self.quality_options)
        return {"quality": q, "quality_matched": bool(matched), "quality_marginal": marginal, "quality_band": band}
