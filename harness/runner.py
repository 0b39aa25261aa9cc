"""Orchestration (the driver): run a :class:`~un0_bench.harness.config.RunConfig` into an output folder.

The runner checks everything that can be checked (names, stacks, meters, backbone, output folder)
before the first cell, plans the pending cells (model x batch size, in a seeded shuffled order) and hands
them to an executor (:mod:`~un0_bench.harness.executors`: local, or Ray), whose workbenches measure
them (:mod:`~un0_bench.harness.cell`). It alone writes the folder: it caches each model's quality,
judges it against the reference's band and appends one record per meter as soon as a cell is in.
The ledger is not computed here: reports compute it from the records.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from un0_bench.harness.cell import (
    BenchSpec,
    Cell,
    CellResult,
    load_backbone,
    make_meter,
    meter_specs,
    resolve_meters,
    save_grid,
    slug,
)
from un0_bench.harness.config import RunConfig
from un0_bench.harness.errors import UserError
from un0_bench.harness.generator import GenerationRequest, GenerationResult, Generator
from un0_bench.harness.hoststate import HostProbe
from un0_bench.harness.protocol import ordered
from un0_bench.harness.registry import BACKBONES, GENERATORS, METERS, TECHNIQUES, Registry
from un0_bench.harness.results import ResultStore, check_writable
from un0_bench.harness.stack import Stack, build, resolve_checked

if TYPE_CHECKING:
    from un0_bench.harness.executors import Executor

__all__ = ["RunConfig", "Runner", "load_backbone", "make_meter", "resolve_meters", "save_grid", "slug"]


def _shown(value: Any) -> str:
    return "none" if value is None else json.dumps(value) if isinstance(value, (dict, list, str)) else str(value)


def _record_weights(record: dict[str, Any]) -> dict[str, str]:
    """File name -> sha256 of the weights a record's model loaded (from its ``stack`` layers)."""
    out: dict[str, str] = {}
    for layer in record.get("stack") or []:
        weights = layer.get("weights") if isinstance(layer, dict) else None
        if isinstance(weights, dict):
            out.update({str(k): str(v) for k, v in weights.items()})
    return out


def _sha(digest: str | None) -> str:
    return f"sha256 {digest[:12]}" if digest else "not loaded"


class Runner:
    """Runs :class:`RunConfig` into an output folder, skipping finished cells."""

    def __init__(self, config: RunConfig, on_event: Callable[[str, dict[str, Any]], None] | None = None,
                 generators: Registry = GENERATORS, meters: Registry = METERS, backbones: Registry = BACKBONES,
                 techniques: Registry = TECHNIQUES, executor: Executor | None = None,
                 clock: Callable[[], float] | None = None, sleep: Callable[[float], None] | None = None,
                 host: HostProbe | None = None) -> None:
        from un0_bench.harness.executors.local import LocalExecutor

        config.validate()
        self.config = config
        # The protocol's clock, sleep and host probe: injectable so tests drive time and load.
        self.clock, self.sleep, self.host = clock, sleep, host
        self.generators, self.techniques = generators, techniques
        self.meters, self.backbones = meters, backbones
        self.store = ResultStore(config.out)
        self.on_event = on_event or (lambda kind, info: None)
        self.executor = executor or LocalExecutor()
        # Check everything that can be checked before any work starts: names, stacks, meters,
        # the backbone and its quality options, the output folder.
        self.meter_specs = meter_specs(config.meters, meters)
        self.meter_names = list(self.meter_specs)
        backbones.entry(config.backbone.partition(":")[0])
        self.backbone = load_backbone(config.backbone, backbones, **config.backbone_options)
        why = self.backbone.unmeasurable()
        if why is not None:
            raise UserError(f"--backbone {config.backbone}: {why}")
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
        self.executor.check(self.bench_spec())

    def bench_spec(self) -> BenchSpec:
        """What a workbench is built from, here or on a worker."""
        return BenchSpec(self.config, self.generators, self.techniques, self.meters, self.backbones, self.backbone,
                         clock=self.clock, sleep=self.sleep, host=self.host)

    def _check_folder(self) -> None:
        """Refuse a folder whose records were measured with another configuration (resume would mix them)."""
        from dataclasses import MISSING, fields

        from un0_bench.harness.config import flag_of

        cfg = self.config
        now = cfg.measurement()
        defaults = {f.name: (f.default_factory() if f.default_factory is not MISSING else f.default)
                    for f in fields(RunConfig)}
        differ: dict[str, Any] = {}
        weights_now = {s.canonical: s.weights() for s in self.stacks.values()}
        changed: dict[str, str] = {}
        for record in self.store.load():
            if record["backbone"] != cfg.backbone:
                continue  # another backbone's cells: a separate comparison in the same folder
            spec = record.get("meter_spec")
            if isinstance(spec, str) and record["meter"] in self.meter_specs and "--meters" not in differ:
                if spec != self.meter_specs[record["meter"]]:  # proxy:profile=A there, proxy:profile=B now
                    differ["--meters"] = (spec, self.meter_specs[record["meter"]])
            canonical = self.canonical_of(record)
            if canonical in weights_now and record.get("model") not in changed:
                old = _record_weights(record)
                for name in sorted(set(old) | set(weights_now[canonical])):
                    was, now_sha = old.get(name), weights_now[canonical].get(name)
                    if old and was != now_sha:  # records older than weights hashing carry none: no claim
                        changed[record["model"]] = (f"{record['model']}'s {name} {_sha(was)} there, "
                                                    f"{_sha(now_sha)} now")
                        break
            run = (record.get("config") or {}).get("run")
            run = run if isinstance(run, dict) else {}
            for key, value in now.items():
                old = run.get(key, defaults[key])
                if old != value and key not in differ:
                    differ[key] = old
        if differ or changed:
            shown = {k: (_shown(v), _shown(now[k])) if k in now else v for k, v in differ.items()}
            listed = "; ".join([*(f"{flag_of(k) if k in now else k} {a} there, {b} now" for k, (a, b) in shown.items()),
                                *(f"weights: {text}" for text in changed.values())])
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
        """A checked stack whose weights files were opened (pre-flight) and named by their hashes."""
        return resolve_checked(text, self.backbone, self.generators, self.techniques)

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
        # A cell recorded as failed (its worker lost, on a cluster) is measured again.
        done = {(self.canonical_of(r), r["backbone"], int(r["batch_size"]), r["meter"]) for r in self.store.load()
                if not r["status"].startswith("failed")}
        out = []
        for model in self.config.models:
            for bs in self.config.batch_sizes:
                canonical = self.stacks[model].canonical
                missing = [m for m in self.meter_names if (canonical, self.config.backbone, bs, m) not in done]
                if missing:
                    out.append((model, bs, missing))
        # Shuffled (seeded, recorded), not the reference first: a chip warming over the run would bias
        # every ratio the same way. The reference's quality is awaited by the records judged by it.
        return ordered(out, self.config.cell_order, self.config.seed)

    def run(self) -> list[dict[str, Any]]:
        """Measure every pending cell, holding the folder's lock (one writer at a time)."""
        with self.store.lock():
            if self.config.fresh:
                self._start_over()
            return self._run()

    def _run(self) -> list[dict[str, Any]]:
        todo = self.pending()
        self.on_event("plan", {"cells": len(todo), "meters": self.meter_names})
        if not todo:
            return []
        cells = self.cells(todo)
        # A cell's records wait here while the quality they are judged by is still being measured elsewhere.
        self._judging = {c.model for c in cells if c.wants_quality}
        self._held: list[CellResult] = []
        written: list[dict[str, Any]] = []
        try:
            self.executor.run(self.bench_spec(), cells, lambda result: written.extend(self._finish(result)),
                              self.on_event)
        except BaseException:
            # Interrupted: a cell still waiting for the reference's quality is not written without its band
            # (its own quality is in quality.jsonl already, so resuming measures only its energy again).
            if self._held:
                self._note(f"interrupted: {len(self._held)} measured cell(s) waited for the reference's quality "
                           f"and are measured again on resume: {', '.join(h.cell.label for h in self._held)}")
            raise
        finally:
            self._judging = set()
        # What still waits (the reference's quality cell failed) is judged by what the folder has.
        for result in self._held:
            written.extend(self._write(result))
        self._held = []
        return written

    def cells(self, todo: list[tuple[str, int, list[str]]]) -> list[Cell]:
        """The pending cells; the first of each model without a quality figure in the folder judges its quality."""
        known = self._load_quality() if self.config.quality_samples > 0 else {}
        asked: set[str] = set()
        out = []
        for model, bs, missing in todo:
            wants = self.config.quality_samples > 0 and model not in known and model not in asked
            asked.update([model] if wants else [])
            out.append(Cell(model, bs, tuple(missing), wants_quality=wants, position=len(out), cells=len(todo)))
        return out

    def _finish(self, result: CellResult) -> list[dict[str, Any]]:
        """Take one cell's result: cache its quality, then write it and every held one whose quality is known."""
        model = result.cell.model
        if result.cell.wants_quality:
            self._judging.discard(model)
            if result.quality is not None:
                self._save_quality(model, result.quality)
        if result.failed is None and self._waits(model):
            self._held.append(result)
            return []
        written = self._write(result)
        for held in list(self._held):
            if not self._waits(held.cell.model):
                self._held.remove(held)
                written.extend(self._write(held))
        return written

    def _waits(self, model: str) -> bool:
        """Whether ``model``'s records wait for a quality figure still being measured (its own or the reference's)."""
        if self.config.quality_samples == 0:
            return False
        cache = self._load_quality()
        if model not in cache:
            return model in self._judging
        return self.config.reference not in cache and self.config.reference in self._judging

    def _write(self, result: CellResult) -> list[dict[str, Any]]:
        cell = result.cell
        if result.failed is not None:
            records = self.failed_records(cell, result.failed)
        else:
            grid = self.config.out / result.grid
            grid.parent.mkdir(parents=True, exist_ok=True)
            grid.write_bytes(result.grid_png)
            quality = self._load_quality().get(cell.model) if self.config.quality_samples > 0 else None
            fields = self._quality_fields(cell.model, quality)
            records = [{**r, **fields} for r in result.records]
        self.store.append(records)
        self.on_event("failed" if result.failed is not None else "done",
                      {"model": cell.model, "batch_size": cell.batch_size, "records": records})
        return records

    def failed_records(self, cell: Cell, reason: str) -> list[dict[str, Any]]:
        """What a cell that could not be measured leaves in the folder: one record per meter, ``status`` failed."""
        from dataclasses import asdict

        stack = self.stacks[cell.model]
        run = {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(self.config).items()}
        return [{"model": cell.model, "model_canonical": stack.canonical, "stack": stack.describe(),
                 "backbone": self.config.backbone, "batch_size": cell.batch_size, "images": self.config.images,
                 "meter": name, "meter_spec": self.meter_specs[name], "status": f"failed: {reason}",
                 "energy_j_per_image": None, "energy_ci95_j": None,
                 "flops_per_image": None, "bytes_per_image": None, "duration_s_per_image": None,
                 "uncounted_ops": None, "config": {"run": run}, "environment": None,
                 "executor": self.executor.name, "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
                for name in cell.meter_names]

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

    def _save_quality(self, model: str, q: dict[str, Any]) -> None:
        cfg = self.config
        with self._quality_file().open("a") as f:
            f.write(json.dumps({"model": model, "backbone": cfg.backbone, "samples_requested": cfg.quality_samples,
                                "seeds_requested": cfg.quality_seeds, "quality": q}, sort_keys=True,
                               allow_nan=False) + "\n")
            f.flush()
            os.fsync(f.fileno())
        self._load_quality()[model] = q

    def _quality(self, model: str, generator: Generator | None = None,
                 measured: GenerationResult | None = None) -> dict[str, Any] | None:
        """Quality of ``model`` by the backbone's evaluator, computed once per output folder (quality.jsonl).

        Cells judge their own model's quality; this measures here only what no cell judged (the
        reference, when all its cells were finished before and its figure is not in the folder).
        """
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
        self._save_quality(model, q)
        return q

    def _quality_fields(self, model: str, q: dict[str, Any] | None) -> dict[str, Any]:
        """The quality fields of ``model``'s records: its figure and whether it is within the reference's band."""
        cfg = self.config
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
