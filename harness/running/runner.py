"""Orchestration (the driver): run a :class:`~un0_bench.harness.running.config.RunConfig` into an output folder.

The runner's pre-flight (:func:`~un0_bench.harness.running.plan.preflight`) checks everything that can be
checked (names, stacks, meters, backbone) and freezes what the run measures; the runner checks the
output folder and the executor before the first cell, plans the pending cells (model x batch size,
in a seeded shuffled order) and hands them to an executor (:mod:`~un0_bench.harness.executors`:
local, or Ray), whose workbenches measure them (:mod:`~un0_bench.harness.running.cell`). It alone writes
the folder: it caches each model's quality, judges it against the reference's band and appends one
record per meter as soon as a cell is in.
The ledger is not computed here: reports compute it from the records.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from un0_bench.harness.core.generator import GenerationRequest, Generator
from un0_bench.harness.core.stack import Stack, build, resolve_checked
from un0_bench.harness.errors import UserError
from un0_bench.harness.measuring.hoststate import HostProbe
from un0_bench.harness.measuring.protocol import ordered
from un0_bench.harness.registry import BACKBONES, GENERATORS, METERS, TECHNIQUES, Registry
from un0_bench.harness.running.cell import BenchSpec, Cell, CellResult, slug
from un0_bench.harness.running.config import DEFAULT_BATCH_SIZE, RunConfig, flag_of
from un0_bench.harness.running.plan import RunPlan, load_backbone, make_meter, preflight, resolve_meters
from un0_bench.harness.running.record import Record, identity
from un0_bench.harness.running.results import QualityEntry, QualityStore, ResultStore, check_writable

if TYPE_CHECKING:
    from un0_bench.harness.executors import Executor

__all__ = ["RunConfig", "RunPlan", "Runner", "load_backbone", "make_meter", "resolve_meters", "slug"]


def _shown(value: Any) -> str:
    return "none" if value is None else json.dumps(value) if isinstance(value, (dict, list, str)) else str(value)


def _record_weights(record: Record) -> dict[str, str]:
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
    """Runs :class:`RunConfig` into an output folder, skipping finished cells.

    The configuration is read, never changed: what the run measures is its frozen :attr:`plan`.
    """

    def __init__(self, config: RunConfig, on_event: Callable[[str, dict[str, Any]], None] | None = None,
                 generators: Registry = GENERATORS, meters: Registry = METERS, backbones: Registry = BACKBONES,
                 techniques: Registry = TECHNIQUES, executor: Executor | None = None,
                 clock: Callable[[], float] | None = None, sleep: Callable[[float], None] | None = None,
                 host: HostProbe | None = None) -> None:
        from un0_bench.harness.executors import make_executor

        self.config = config
        # The protocol's clock, sleep and host probe: injectable so tests drive time and load.
        self.clock, self.sleep, self.host = clock, sleep, host
        self.generators, self.techniques = generators, techniques
        self.meters, self.backbones = meters, backbones
        self.on_event = on_event or (lambda kind, info: None)
        self.executor = executor or make_executor(config.executor)
        # Check everything that can be checked before any work starts: names, stacks, meters, the
        # backbone and its quality options (pre-flight), then the output folder and the executor.
        self.plan, self.backbone = preflight(config, generators, techniques, meters, backbones)
        self.notes: list[str] = []
        for text in self.plan.notes:
            self._note(text)
        out = config.output.out
        self.store, self.quality_store = ResultStore(out), QualityStore(out)
        self.quality_options = config.quality.options()
        self._quality_cache: dict[str, dict[str, Any]] | None = None
        check_writable(out)
        self.store.refuse_if_locked()
        if not config.output.fresh:
            self._check_folder()
        self.executor.check(self.bench_spec())

    @property
    def stacks(self) -> dict[str, Stack]:
        """Model -> its checked stack (the plan's)."""
        return dict(self.plan.stacks)

    @property
    def meter_names(self) -> list[str]:
        return list(self.plan.meter_names)

    def bench_spec(self) -> BenchSpec:
        """What a workbench is built from, here or on a worker."""
        return BenchSpec(self.plan, self.generators, self.techniques, self.meters, self.backbones, self.backbone,
                         clock=self.clock, sleep=self.sleep, host=self.host)

    def _check_folder(self) -> None:
        """Refuse a folder whose records were measured with another configuration (resume would mix them)."""
        plan, backbone = self.plan, self.config.sweep.backbone
        now = plan.measurement()
        defaults = RunConfig().flat()
        specs = dict(plan.meter_specs)
        differ: dict[str, Any] = {}
        weights_now = {s.canonical: s.weights() for _, s in plan.stacks}
        changed: dict[str, str] = {}
        for record in self.store.load():
            if record.backbone != backbone:
                continue  # another backbone's cells: a separate comparison in the same folder
            spec = record.get("meter_spec")
            if isinstance(spec, str) and record.meter in specs and "--meters" not in differ:
                if spec != specs[record.meter]:  # proxy:profile=A there, proxy:profile=B now
                    differ["--meters"] = (spec, specs[record.meter])
            canonical = self.canonical_of(record)
            if canonical in weights_now and record.model not in changed:
                old = _record_weights(record)
                for name in sorted(set(old) | set(weights_now[canonical])):
                    was, now_sha = old.get(name), weights_now[canonical].get(name)
                    if old and was != now_sha:  # records older than weights hashing carry none: no claim
                        changed[record.model] = f"{record.model}'s {name} {_sha(was)} there, {_sha(now_sha)} now"
                        break
            run = (record.config or {}).get("run")
            run = run if isinstance(run, dict) else {}
            for key, value in now.items():
                old = run.get(key, defaults[key])
                if old != value and key not in differ:
                    differ[key] = old
        if differ or changed:
            shown = {k: (_shown(v), _shown(now[k])) if k in now else v for k, v in differ.items()}
            listed = "; ".join([*(f"{flag_of(k) if k in now else k} {a} there, {b} now" for k, (a, b) in shown.items()),
                                *(f"weights: {text}" for text in changed.values())])
            raise UserError(f"{self.config.output.out} holds results measured with another configuration ({listed}); "
                            f"run with the folder's options to resume it, another --out, or --fresh to start it over")

    def _start_over(self) -> None:
        """``--fresh``: move the folder's earlier files aside (nothing is deleted)."""
        out = self.config.output.out
        earlier = [out / n for n in (self.store.path.name, self.quality_store.path.name, "samples")
                   if (out / n).exists()]
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

    def _resolve(self, text: str) -> Stack:
        """A checked stack whose weights files were opened (pre-flight) and named by their hashes."""
        return resolve_checked(text, self.backbone, self.generators, self.techniques)

    def make_generator(self, text: str) -> Generator:
        stack = self.plan.stack(text) or self._resolve(text)
        return build(stack, self.backbone, self.generators, self.techniques)

    def canonical_of(self, record: Record | dict[str, Any]) -> str:
        """A record's canonical model (version 1 records lack it: a model of this run gives its own)."""
        if isinstance(record.get("model_canonical"), str):
            return record.get("model_canonical")
        stack = self.plan.stack(record.get("model"))
        return stack.canonical if stack is not None else record.get("model")

    def pending(self) -> list[tuple[str, int, list[str]]]:
        # A cell is done when its canonical model was measured, under whichever name (sd or sd:steps=50).
        # A cell recorded as failed (its worker lost, on a cluster) is measured again.
        plan, backbone = self.plan, self.config.sweep.backbone
        done = self.store.finished(self.canonical_of)
        out = []
        for model in plan.models:
            stack = plan.stack(model)
            for bs in plan.batch_sizes:
                missing = [m for m in plan.meter_names if (stack.canonical, backbone, bs, m) not in done]
                if missing:
                    out.append((model, bs, missing))
        # Shuffled (seeded, recorded), not the reference first: a chip warming over the run would bias
        # every ratio the same way. The reference's quality is awaited by the records judged by it.
        return ordered(out, self.config.protocol.cell_order, self.config.protocol.seed)

    def run(self) -> list[Record]:
        """Measure every pending cell, holding the folder's lock (one writer at a time); the records written."""
        with self.store.lock():
            if self.config.output.fresh:
                self._start_over()
            return self._run()

    def _run(self) -> list[Record]:
        todo = self.pending()
        self.on_event("plan", {"cells": len(todo), "meters": self.meter_names})
        if not todo:
            return []
        cells = self.cells(todo)
        # A cell's records wait here while the quality they are judged by is still being measured elsewhere.
        self._judging = {c.model for c in cells if c.wants_quality}
        self._held: list[CellResult] = []
        written: list[Record] = []
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
        judged = self.config.quality.quality_samples > 0
        known = self._load_quality() if judged else {}
        asked: set[str] = set()
        out = []
        for model, bs, missing in todo:
            wants = judged and model not in known and model not in asked
            asked.update([model] if wants else [])
            out.append(Cell(model, bs, tuple(missing), wants_quality=wants, position=len(out), cells=len(todo)))
        return out

    def _finish(self, result: CellResult) -> list[Record]:
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
        if self.config.quality.quality_samples == 0:
            return False
        cache = self._load_quality()
        if model not in cache:
            return model in self._judging
        return self.plan.reference not in cache and self.plan.reference in self._judging

    def _write(self, result: CellResult) -> list[Record]:
        cell = result.cell
        if result.failed is not None:
            records = self.failed_records(cell, result.failed)
        else:
            grid = self.config.output.out / result.grid
            grid.parent.mkdir(parents=True, exist_ok=True)
            grid.write_bytes(result.grid_png)
            quality = self._load_quality().get(cell.model) if self.config.quality.quality_samples > 0 else None
            fields = self._quality_fields(cell.model, quality)
            records = [r.with_fields(**fields) for r in result.records]
        self.store.append(records)
        self.on_event("failed" if result.failed is not None else "done",
                      {"model": cell.model, "batch_size": cell.batch_size, "records": [r.to_json() for r in records]})
        return records

    def failed_records(self, cell: Cell, reason: str) -> list[Record]:
        """What a cell that could not be measured leaves in the folder: one record per meter, ``status`` failed."""
        plan = self.plan
        stack, run = plan.stack(cell.model), plan.run
        return [Record.failed_cell(identity(model=cell.model, canonical=stack.canonical, stack=stack.describe(),
                                            backbone=self.config.sweep.backbone, batch_size=cell.batch_size,
                                            images=self.config.protocol.images, meter=name,
                                            meter_spec=plan.meter_spec(name), run=run, executor=self.executor.name),
                                   reason)
                for name in cell.meter_names]

    # --- quality ------------------------------------------------------------------------------------
    def _load_quality(self) -> dict[str, dict[str, Any]]:
        if self._quality_cache is None:
            q = self.config.quality
            self._quality_cache = self.quality_store.figures(self.config.sweep.backbone, q.quality_samples,
                                                             q.quality_seeds)
        return self._quality_cache

    def _save_quality(self, model: str, q: dict[str, Any]) -> None:
        quality = self.config.quality
        self.quality_store.append([QualityEntry(model, self.config.sweep.backbone, quality.quality_samples,
                                                quality.quality_seeds, q)])
        self._load_quality()[model] = q

    def _quality(self, model: str) -> dict[str, Any] | None:
        """Quality of ``model`` by the backbone's evaluator, computed once per output folder (quality.jsonl).

        Cells judge their own model's quality; this measures here only what no cell judged (the
        reference, when all its cells were finished before and its figure is not in the folder).
        """
        protocol = self.config.protocol
        cache = self._load_quality()
        if model in cache:
            return cache[model]
        if self.config.quality.quality_samples == 0:
            return None
        generator = self.make_generator(model)
        measured = generator.generate(GenerationRequest(tuple(self.backbone.default_prompts(protocol.images)),
                                                        seed=protocol.seed,
                                                        batch_size=min(DEFAULT_BATCH_SIZE, protocol.images)))
        self.on_event("quality", {"model": model})
        q = self.backbone.evaluate_quality(generator, measured, self.quality_options)
        if q is None:
            return None
        self._save_quality(model, q)
        return q

    def _quality_fields(self, model: str, q: dict[str, Any] | None) -> dict[str, Any]:
        """The quality fields of ``model``'s records: its figure and whether it is within the reference's band."""
        quality, reference = self.config.quality, self.plan.reference
        if q is None:
            why = self.backbone.quality_missing_reason(self.quality_options)
            return {"quality": None, "quality_matched": None, "quality_note": f"not measured ({why})"}
        ref = self._quality(reference)
        band = {"reference": reference, "fid_ratio": quality.fid_ratio, "accuracy_drop": quality.accuracy_drop}
        if ref is None:
            return {"quality": q, "quality_matched": None, "quality_band": band,
                    "quality_note": f"reference {reference} has no quality figure in this folder"}
        matched, marginal = self.backbone.quality_band(q, ref, self.quality_options)
        return {"quality": q, "quality_matched": bool(matched), "quality_marginal": marginal, "quality_band": band}
