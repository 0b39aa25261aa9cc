"""Measure a user's own image generator: any callable that makes images, under the CLI's protocol.

A callable is wrapped in a :class:`CallableGenerator` on a :class:`CallableBackbone` and measured by
the :class:`~un0_bench.harness.running.runner.Runner` like any registered model (warm-up, one counting pass,
idle windows around repeated metered windows, intervals, records in the output folder), so
``un0-bench report`` reads the folder. Phases of the user's code are marked with :func:`window`:
each marked block is metered in its own window, as a generator's phases are.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from un0_bench.harness.core.backbone import Backbone
from un0_bench.harness.core.generator import GenerationRequest, GenerationResult, Generator
from un0_bench.harness.errors import UserError
from un0_bench.harness.running.record import Record

#: The backbone kind (and spec) of records measured from a callable.
KIND = "callable"

#: The generator whose call is running in this context (``window`` marks its phases).
_running: contextvars.ContextVar[Generator | None] = contextvars.ContextVar("un0_bench_running", default=None)


def window(name: str) -> contextlib.AbstractContextManager[None]:
    """Meter a block of the user's code as the phase ``name`` of the generator being measured.

    ``with window("decode"): ...``. Outside a measurement it does nothing, so the user's code runs unchanged.
    """
    if not isinstance(name, str) or not name:
        raise UserError(f"window needs a non-empty phase name, got {name!r}")
    generator = _running.get()
    return contextlib.nullcontext() if generator is None else generator.phase(name)


def as_images(made: Any, expected: int, what: str) -> torch.Tensor:
    """What a callable returned, as float images ``(N, C, H, W)`` in [0, 1]; raises UserError when it is not.

    Accepted: a tensor ``(N, C, H, W)`` or ``(N, H, W)``, or a list of ``N`` images (tensors ``(C, H, W)``
    or ``(H, W)``, or PIL images), with ``N == expected``. Integer images are read as 0..255.
    """
    if made is None:
        raise UserError(f"{what} returned nothing (None); it must return its {expected} image(s)")
    if isinstance(made, (list, tuple)):
        if len(made) != expected:
            raise UserError(f"{what} returned {len(made)} image(s), expected images_per_call={expected}")
        try:
            import numpy as np

            parts = [p if isinstance(p, torch.Tensor) else torch.from_numpy(np.array(p)) for p in made]
            if parts and parts[0].dim() == 3 and not isinstance(made[0], torch.Tensor):  # PIL: (H, W, C)
                parts = [p.permute(2, 0, 1) for p in parts]
            made = torch.stack(parts)
        except (TypeError, RuntimeError, ValueError) as e:
            raise UserError(f"{what} returned a list that is not images of one shape: {e}") from None
    if not isinstance(made, torch.Tensor):
        raise UserError(f"{what} returned a {type(made).__name__}; expected a tensor (N, C, H, W) or a list of images")
    if made.dim() == 3:
        made = made.unsqueeze(1)
    if made.dim() != 4 or made.shape[0] != expected:
        raise UserError(f"{what} returned a tensor of shape {tuple(made.shape)}; expected ({expected}, C, H, W)")
    images = made.detach().cpu()
    return images.float() / 255.0 if not images.is_floating_point() else images.float()


class CallableGenerator(Generator):
    """A callable ``fn() -> images`` as a generator: each request of N images calls it N / images_per_call times.

    ``phases()`` are the :func:`window` names the callable marked in its first call (found by :meth:`probe`).
    """

    def __init__(self, fn: Callable[[], Any], images_per_call: int, name: str) -> None:
        self.fn, self.images_per_call, self.name = fn, images_per_call, name
        self._phases: tuple[str, ...] = ()

    def _call(self) -> torch.Tensor:
        token = _running.set(self)
        try:
            made = self.fn()
        finally:
            _running.reset(token)
        return as_images(made, self.images_per_call, self.name)

    def probe(self) -> torch.Tensor:
        """One call that checks the callable works and finds its phases; a failure is one UserError line."""
        seen: list[str] = []
        open_: list[str] = []

        def hook(kind: str, phase: str) -> None:
            if kind == "begin":
                if open_:
                    raise UserError(f"{self.name}: window {phase!r} opened inside window {open_[-1]!r}; windows "
                                    f"do not nest")
                open_.append(phase)
                if phase not in seen:
                    seen.append(phase)
            else:
                open_.pop()

        self.phase_hook = hook
        try:
            images = self._call()
        except UserError:
            raise
        except Exception as e:
            raise UserError(f"{self.name} raised {type(e).__name__}: {e}") from None
        finally:
            self.phase_hook = None
        self._phases = tuple(seen)
        return images

    def generate(self, request: GenerationRequest) -> GenerationResult:
        n = len(request.prompts)
        if n % self.images_per_call:
            raise UserError(f"{self.name} makes {self.images_per_call} image(s) a call; a request of {n} is not a "
                            f"multiple of it")
        images = torch.cat([self._call() for _ in range(n // self.images_per_call)])
        return GenerationResult(images=images, prompts=request.prompts)

    def describe(self) -> dict[str, Any]:
        fn = self.fn
        where = f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', type(fn).__name__)}"
        return {"callable": where, "images_per_call": self.images_per_call, "phases": list(self._phases)}

    def phases(self) -> tuple[str, ...]:
        return self._phases


class CallableBackbone(Backbone):
    """The backbone of a callable: prompts are empty (the callable takes none), quality is not judged."""

    kind = KIND

    def __init__(self, arg: str | None = None, **options: Any) -> None:
        self.name = KIND

    def check_prompt(self, prompt: str) -> None:
        """A callable takes no prompt: every prompt is accepted and ignored."""

    def default_prompts(self, n: int) -> list[str]:
        return [""] * n

    def describe(self) -> dict[str, Any]:
        return {"kind": KIND, "prompts": "none (the callable takes no arguments)"}


@dataclass(frozen=True)
class Measurement:
    """What :func:`measure` measured, per meter, in SI units (the records in ``out`` hold everything).

    Attributes:
        model: The name the records carry.
        out: The folder the records were written to (``un0-bench report OUT`` reads it).
        images_per_call: Images one call of the callable makes.
        duration_s_per_image: Wall time per image, and ``duration_ci95_s`` its interval.
        energy_j_per_image: Meter -> gross energy per image (``None``: the meter measures time only
            or was unavailable, see ``status``).
        energy_ci95_j: Meter -> ``[low, high]`` of the gross figure (``None``: no interval).
        energy_net_j_per_image: Meter -> energy per image net of idle (whole-device meters only).
        flops_per_image: Counted FLOPs per image (0 when the callable runs no torch operators).
        phase_energy_j: Phase -> meter -> energy of that phase in one call of ``images_per_call``
            images (``None``: the meter could not measure it); phases are :func:`window` blocks.
        phase_duration_s: Phase -> seconds in one call.
        status: Meter -> ``"ok"`` or the reason it could not measure.
        records: The records written, one per meter (``dict(record)`` is its JSON form).
    """

    model: str
    out: Path
    images_per_call: int
    duration_s_per_image: float | None
    duration_ci95_s: list[float] | None
    energy_j_per_image: dict[str, float | None]
    energy_ci95_j: dict[str, list[float] | None]
    energy_net_j_per_image: dict[str, float | None]
    flops_per_image: float | None
    phase_energy_j: dict[str, dict[str, float | None]]
    phase_duration_s: dict[str, float]
    status: dict[str, str]
    records: list[Record] = field(repr=False)

    @classmethod
    def from_records(cls, records: list[Record], out: Path, images_per_call: int) -> Measurement:
        first = records[0]
        phases = {p: v for p, v in (first.get("phases") or {}).items() if p != "other"}
        by = {r["meter"]: r for r in records}
        return cls(model=first["model"], out=out, images_per_call=images_per_call,
                   duration_s_per_image=first.get("duration_s_per_image"),
                   duration_ci95_s=first.get("duration_ci95_s"),
                   energy_j_per_image={m: r.get("energy_j_per_image") for m, r in by.items()},
                   energy_ci95_j={m: r.get("energy_ci95_j") for m, r in by.items()},
                   energy_net_j_per_image={m: r["energy_net_j_per_image"] for m, r in by.items()
                                           if "energy_net_j_per_image" in r},
                   flops_per_image=first.get("flops_per_image"),
                   phase_energy_j={p: dict(v["energy_j"]) for p, v in phases.items()},
                   phase_duration_s={p: v["duration_s"] for p, v in phases.items()},
                   status={m: r["status"] for m, r in by.items()}, records=records)


def measure(fn: Callable[[], Any], *, images_per_call: int, out: str | Path, name: str = "mine",
            meters: list[str] | str = "auto", calls: int = 1, meter_registry: Any = None,
            **options: Any) -> Measurement:
    """Measure ``fn`` (no arguments, returns ``images_per_call`` images) into the folder ``out``.

    Each metered request is ``calls`` calls of ``fn``; ``meter_registry`` replaces the registered meters.
    ``options`` are :class:`RunConfig` fields (``min_repeats``, ``min_duration_s``, ``warmup``,
    ``idle_s``, ``seed``, ``fresh``, ...). A model already in ``out`` under ``name`` is not measured
    again (as ``compare`` resumes): its records are returned. Bad input (a callable that raises or
    returns no images, a bad count) raises :class:`UserError` before any record is written.
    """
    if not callable(fn):
        raise UserError(f"measure needs a callable, got {type(fn).__name__}")
    for what, v in (("images_per_call", images_per_call), ("calls", calls)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise UserError(f"{what} must be a positive integer, got {v!r}")
    generator = CallableGenerator(fn, images_per_call, name)
    records = measure_generator(generator, CallableBackbone(), name=name, out=out, meters=meters,
                                images=images_per_call * calls, meter_registry=meter_registry,
                                before=generator.probe, **options)
    return Measurement.from_records(records, Path(out), images_per_call)


#: Run options (:meth:`RunConfig.of`) :func:`measure_generator` sets itself.
_SET_HERE = ("models", "backbone", "images", "batch_sizes", "reference", "out", "meters")


def measure_generator(generator: Generator, backbone: Backbone, *, name: str, out: str | Path,
                      meters: list[str] | str, images: int, meter_registry: Any = None,
                      before: Callable[[], Any] | None = None, **options: Any) -> list[Record]:
    """Measure one ready generator on ``backbone`` by the runner, as the model ``name``; return its records.

    ``before`` runs after every option is checked and before the runner writes anything (a probe
    call that refuses a broken generator). Records of ``name`` already in ``out`` are resumed.
    """
    from un0_bench.harness.core.spec import ModelSpec
    from un0_bench.harness.registry import METERS, Registry
    from un0_bench.harness.running.config import RunConfig, meters_list
    from un0_bench.harness.running.results import ResultStore
    from un0_bench.harness.running.runner import Runner

    spec = ModelSpec.parse(name)
    if spec.params or spec.name != name:
        raise UserError(f"name must be a plain model name (letters, digits, - and _), got {name!r}")
    given = sorted(set(options) & set(_SET_HERE))
    if given:
        raise UserError(f"measure sets {', '.join(given)} itself")
    options.setdefault("quality_samples", 0)
    try:
        config = RunConfig.of(models=[name], out=Path(out), backbone=backbone.kind,
                              meters=meters_list(meters) if isinstance(meters, str) else list(meters),
                              images=images, batch_sizes=[images], reference=name, **options)
    except TypeError as e:
        raise UserError(f"measure: {e}") from None
    generators, backbones = Registry("generator"), Registry("backbone")
    generators.register(name, lambda bb: generator, "the measured generator", kinds=(backbone.kind,))
    backbones.register(backbone.kind, lambda arg=None, **kw: backbone, "the measured generator's backbone")
    runner = Runner(config, generators=generators, backbones=backbones, meters=meter_registry or METERS)
    if before is not None:
        before()
    runner.run()
    stored = ResultStore(config.output.out).load()
    records = [r for r in stored if r["model"] == name and r["backbone"] == backbone.kind]
    failed = [r["status"] for r in records if r["status"].startswith("failed")]
    if failed or not records:
        raise UserError(f"{name}: {failed[0] if failed else 'no records written'}")
    return records
