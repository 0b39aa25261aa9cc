"""The run configuration: the one home of every default of a run and of its help text.

A :class:`RunConfig` composes one frozen config per axis of a run, each with its fields' help and one
validator: :class:`SweepConfig` (what is compared), :class:`ProtocolConfig` (how each cell is
measured), :class:`QualityConfig`, :class:`LedgerConfig`, :class:`OutputConfig` and
:class:`ExecutorConfig` (where cells run). The CLI builds ``un0-bench compare``'s options from their
fields (each field's ``option`` metadata gives its flag, parser and help); the runner's pre-flight
(:mod:`~un0_bench.harness.running.plan`) turns a config into the frozen plan every later stage reads, and the
ledger and the reports read their defaults from here.
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Callable, Iterator
from dataclasses import MISSING, Field, dataclass, field, fields
from pathlib import Path
from typing import Any

from un0_bench.harness.core.backbone import QualityOptions
from un0_bench.harness.errors import UserError


# --- parsers of option values (the CLI's ``type=``) ---------------------------------------------
def _number(text: str, kind: type, ok: Callable[[Any], bool], what: str) -> Any:
    try:
        v = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
    if not ok(v):
        raise argparse.ArgumentTypeError(f"expected {what}, got {text}")
    return v


def positive_int(text: str) -> int:
    return _number(text, int, lambda v: v >= 1, "a positive integer")


def non_negative_int(text: str) -> int:
    return _number(text, int, lambda v: v >= 0, "a non-negative integer")


#: Seeds are at most this (numpy and torch generators both take them; image i uses seed + i).
MAX_SEED = 2**32 - 1


def seed_int(text: str) -> int:
    return _number(text, int, lambda v: 0 <= v <= MAX_SEED, f"an integer from 0 to {MAX_SEED}")


def non_negative(text: str) -> float:
    return _number(text, float, lambda v: v >= 0 and math.isfinite(v), "a finite non-negative number")


def finite(text: str) -> float:
    return _number(text, float, math.isfinite, "a finite number")


def _choice(text: str, choices: tuple[str, ...]) -> str:
    if text not in choices:
        raise argparse.ArgumentTypeError(f"expected one of {', '.join(choices)}, got {text!r}")
    return text


def path_arg(text: str) -> Path:
    """A path option: an empty one (``--out ""``) would silently mean the current folder."""
    if not text.strip():
        raise argparse.ArgumentTypeError("expected a path, got an empty one")
    return Path(text)


def csv(kind: Callable[[str], Any]) -> Callable[[str], list[Any]]:
    def parse(text: str) -> list[Any]:
        items = [t.strip() for t in text.split(",") if t.strip()]
        if not items:
            raise argparse.ArgumentTypeError("expected a comma-separated list")
        try:
            return [kind(t) for t in items]
        except ValueError:
            raise argparse.ArgumentTypeError(f"bad value in {text!r}") from None

    return parse


def models_list(text: str, what: str = "models") -> list[str]:
    """Comma-separated model specs.

    A spec's own parameters also use commas (un0-osc:n=1024,steps=32): an item with '=' and no ':'
    continues the previous spec (and its last layer: sd+cached:interval=2,x=1).
    """
    out: list[str] = []
    for item in (t.strip() for t in text.split(",")):
        if not item:
            continue
        if "=" in item and ":" not in item and "+" not in item and out:
            out[-1] += "," + item
        else:
            out.append(item)
    if not out:
        raise argparse.ArgumentTypeError(f"expected a comma-separated list of {what}")
    return out


def meters_list(text: str) -> list[str]:
    """Comma-separated meter specs, parameters joined as in models (``nvml:devices=0+1,mig=whole,proxy``)."""
    return models_list(text, "meters")


def option(default: Any = None, help: str = "", parse: Callable[[str], Any] | None = None, flag: str | None = None,
           factory: Callable[[], Any] | None = None, cli: bool = True) -> Any:
    """A config field with its CLI option: ``flag`` (default ``--field-name``), parser, help."""
    meta = {"help": help, "parse": parse, "flag": flag, "cli": cli}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


#: Industry-average PUE reported by the Uptime Institute for 2024.
DEFAULT_PUE = 1.56
#: Images a model serves over its life, for the amortised-training boundary.
DEFAULT_LIFETIME_IMAGES = 1_000_000
#: Grid carbon intensity for gCO2e figures (codecarbon's world average), used by reports only.
DEFAULT_GRID_GCO2_PER_KWH = 475.0
#: Default quality band: FID at most this multiple of the reference's ...
DEFAULT_FID_RATIO = 1.25
#: ... and accuracy at most this much (a fraction) below the reference's.
DEFAULT_ACCURACY_DROP = 0.03
#: Images per model for quality (FID needs many: its bias shrinks with n).
DEFAULT_QUALITY_SAMPLES = 1000


#: Batch size of the single cell measured when none is given (capped at the images per window).
DEFAULT_BATCH_SIZE = 16


#: Where cells run (``un0-bench compare --executor``): ``local``, ``ray`` or ``ray:ADDRESS`` (see
#: :class:`ExecutorConfig`).
DEFAULT_EXECUTOR = "local"
#: On a cluster: times a cell whose worker died (OOM, node lost) is tried again before it is recorded as failed.
DEFAULT_CELL_RETRIES = 2
#: On a cluster: CPU threads a CPU cell asks for (and torch uses).
DEFAULT_CELL_CPUS = 1


#: Run options that shape a measurement (resume is keyed by them as well as by the cell);
#: ``pue``, ``lifetime_images`` and the like only shape the ledger, which reports compute.
MEASUREMENT_FIELDS = ("backbone_options", "images", "seed", "min_repeats", "min_duration_s", "max_repeats", "warmup",
                      "warmup_max_s", "warmup_tolerance", "idle_s", "quality_samples", "quality_seeds", "reference",
                      "fid_ratio", "accuracy_drop", "clip")

#: Orders in which a run measures its cells.
CELL_ORDERS = ("shuffled", "given")



def _flag(f: Field) -> str:
    return f.metadata.get("flag") or "--" + f.name.replace("_", "-")


def default_of(f: Field) -> Any:
    """A config field's default."""
    return f.default_factory() if f.default_factory is not MISSING else f.default


class _Axis:
    """What every axis shares: typed fields, kept as given.

    Its numbers must be real numbers of their kind (a config built in code skips the CLI's parsers),
    and lists given to it are kept as tuples (a frozen config holds nothing that changes).
    """

    def __post_init__(self) -> None:
        for f in fields(self):  # type: ignore[arg-type]
            if isinstance(getattr(self, f.name), list):
                object.__setattr__(self, f.name, tuple(getattr(self, f.name)))

    def _check_kinds(self) -> None:
        for f in fields(self):  # type: ignore[arg-type]
            v = getattr(self, f.name)
            if f.type in ("int", int) and (not isinstance(v, int) or isinstance(v, bool)):
                raise UserError(f"{_flag(f)} must be an integer, got {v!r}")
            if f.type in ("float", float) and (isinstance(v, bool) or not isinstance(v, (int, float))
                                                 or not math.isfinite(v)):
                raise UserError(f"{_flag(f)} must be a finite number, got {v!r}")
            if str(f.type).startswith("tuple[") and v is not None:
                # NB: a string is a sequence too: "sd" would be read as the models "s" and "d".
                item = str(f.type)[len("tuple["):].split(",")[0]
                kind = {"str": str, "int": int}.get(item, object)
                if isinstance(v, str) or not isinstance(v, tuple) or \
                        any(not isinstance(x, kind) or isinstance(x, bool) for x in v):
                    raise UserError(f"{_flag(f)} must be a list of {'strings' if kind is str else 'integers'}, "
                                    f"got {v!r}")

    def validate(self) -> None:
        self._check_kinds()


@dataclass(frozen=True)
class SweepConfig(_Axis):
    """What is compared.

    Attributes:
        models: Model specs as written (``"sd"``, ``"sd:steps=10"``).
        reference: Model whose quality sets the band (and whose energy the ledger compares to).
        backbone: Backbone spec (``"digits"`` or ``"diffusers:PATH"``).
        backbone_options: Keyword options for the backbone (diffusers: ``device``, ``dtype``,
            ``prompts_file``).
        meters: Meter specs, or ``["auto"]`` for every registered meter (unavailable ones are
            recorded with their reason).
    """

    models: tuple[str, ...] | None = option(None, "comma-separated model specs or stacks, e.g. "
                                                  "sd,sd:steps=10,sd-distilled+int8", models_list)
    reference: str = option("sd", "model whose quality sets the band and whose energy is 1x")
    backbone: str = option("digits", "digits or diffusers:PATH")
    backbone_options: dict[str, Any] = option(factory=dict, cli=False)
    meters: tuple[str, ...] = option(help="comma-separated meters, or auto; meter parameters as in models "
                                          "(nvml:devices=0+1,mig=whole)", parse=meters_list, factory=lambda: ("auto",))

    def validate(self) -> None:
        self._check_kinds()
        if not self.models:
            raise UserError("no models given")


@dataclass(frozen=True)
class ProtocolConfig(_Axis):
    """How each cell is measured, and how hard.

    Attributes:
        images: Images per metered window (one generate call over that many prompts).
        batch_sizes: Batch sizes to measure; each is its own cell. ``None``: one cell at
            ``min(16, images)``. A batch larger than ``images`` is refused: a window never fills it.
        seed: Seed of image 0; image ``i`` uses ``seed + i``.
        min_repeats: Windows to measure at least.
        min_duration_s: Total metered time to reach at least.
        max_repeats: Hard cap on windows.
        warmup: Unmetered generate calls before counting and measuring, at least; more until steady.
        warmup_max_s: Bound on the warm-up in seconds.
        warmup_tolerance: Steady: two consecutive calls within this fraction of each other.
        idle_s: Length of each idle-power window, before and after every cell, for whole-device
            meters (0 disables them).
        cell_order: ``"shuffled"`` (seeded by ``seed``, recorded) or ``"given"``.
    """

    images: int = option(16, "images per metered window", positive_int)
    batch_sizes: tuple[int, ...] | None = option(None, "one or more batch sizes, each at most --images (default: 16, "
                                                       "or --images if fewer)", csv(positive_int), flag="--batch-size")
    seed: int = option(0, "seed of image 0; image i uses seed + i", seed_int)
    min_repeats: int = option(3, "metered windows at least", positive_int)
    min_duration_s: float = option(2.0, "seconds of metered time at least", non_negative, flag="--min-duration")
    max_repeats: int = option(100, "metered windows at most", positive_int)
    warmup: int = option(1, "unmetered calls before measuring at least; more until two consecutive calls agree "
                            "within --warmup-tolerance, up to --warmup-max seconds (0: no warm-up)", non_negative_int)
    warmup_max_s: float = option(3.0, "seconds of warm-up at most (raise it on a GPU host: a chip takes minutes to "
                                      "reach its steady temperature)", non_negative, flag="--warmup-max")
    warmup_tolerance: float = option(0.1, "warm-up is steady when two consecutive calls differ by at most this "
                                          "fraction", non_negative)
    idle_s: float = option(1.0, "seconds of each idle window, before and after every cell (whole-device meters only; "
                                "at least the meter's minimum window)", non_negative, flag="--idle")
    cell_order: str = option("shuffled", "order of the cells: shuffled (seeded by --seed, recorded) or given "
                                         "(as listed)", lambda t: _choice(t, CELL_ORDERS))

    def batches(self) -> tuple[int, ...]:
        """The batch sizes to measure: those given, or the one default cell."""
        return self.batch_sizes if self.batch_sizes is not None else (min(DEFAULT_BATCH_SIZE, self.images),)

    def validate(self) -> None:
        self._check_kinds()
        if not 0 <= self.seed <= MAX_SEED - self.images:
            raise UserError(f"--seed must be from 0 to {MAX_SEED - self.images} (image i uses seed + i), "
                            f"got {self.seed}")
        for name in ("images", "min_repeats", "max_repeats"):
            if getattr(self, name) < 1:
                raise UserError(f"--{name.replace('_', '-')} must be a positive integer, got {getattr(self, name)}")
        batches = self.batches()
        if any(b < 1 for b in batches) or not batches:
            raise UserError(f"--batch-size must be positive integers, got {list(batches)}")
        too_big = [b for b in batches if b > self.images]
        if too_big:
            raise UserError(f"--batch-size {','.join(map(str, too_big))} is larger than --images {self.images}: a "
                            f"window generates --images images, so it would never fill that batch (and the record "
                            f"would name a batch size that never ran); raise --images or lower --batch-size")
        if self.warmup < 0 or self.min_duration_s < 0 or self.idle_s < 0 or self.warmup_max_s < 0:
            raise UserError("--warmup, --warmup-max, --min-duration and --idle must not be negative")
        if not 0 <= self.warmup_tolerance < 1:
            raise UserError(f"--warmup-tolerance must be in [0, 1), got {self.warmup_tolerance}")
        if self.cell_order not in CELL_ORDERS:
            raise UserError(f"--cell-order must be one of {', '.join(CELL_ORDERS)}, got {self.cell_order!r}")
        if self.min_repeats > self.max_repeats:
            raise UserError("--min-repeats must not exceed --max-repeats")


@dataclass(frozen=True)
class QualityConfig(_Axis):
    """How quality is judged, and the band a model must stay within.

    Attributes:
        quality_samples: Images per model for FID/KID/accuracy (0: quality not measured).
        quality_seeds: Disjoint draws of ``quality_samples`` images each (digits): with 2 or more,
            FID is their mean, its spread is recorded and a verdict within that noise is marginal.
        fid_ratio: Quality-matched needs FID <= ``fid_ratio`` x the reference's FID ...
        accuracy_drop: ... and accuracy at most this much (a fraction) below the reference's.
        clip: Local CLIP model folder for quality on pipeline backbones (``None``: not measured).
    """

    quality_samples: int = option(DEFAULT_QUALITY_SAMPLES, "images per model for quality (0: not measured)",
                                  non_negative_int)
    quality_seeds: int = option(1, "digits: disjoint draws of --quality-samples images; 2 or more give FID's spread "
                                   "and mark verdicts within it as marginal", positive_int)
    clip: str | None = option(None, "diffusers backbones: local CLIP folder for CLIP-score quality")
    fid_ratio: float = option(DEFAULT_FID_RATIO, "quality band: FID at most this x the reference's", finite)
    accuracy_drop: float = option(DEFAULT_ACCURACY_DROP, "quality band: accuracy at most this much (a fraction) "
                                                         "below the reference's", finite)

    def validate(self) -> None:
        self._check_kinds()
        if self.quality_samples < 0 or not self.fid_ratio >= 1 or not 0 <= self.accuracy_drop <= 1:
            raise UserError("--quality-samples must be >= 0, --fid-ratio >= 1, --accuracy-drop in [0, 1]")
        if self.quality_seeds < 1:
            raise UserError(f"--quality-seeds must be a positive integer, got {self.quality_seeds}")

    def options(self) -> QualityOptions:
        """What the backbone's quality evaluator is given."""
        return QualityOptions(samples=self.quality_samples, seeds=self.quality_seeds, fid_ratio=self.fid_ratio,
                              accuracy_drop=self.accuracy_drop, clip=self.clip)


@dataclass(frozen=True)
class LedgerConfig(_Axis):
    """The ledger's settings (recorded with the run; reports compute the ledger from them).

    Attributes:
        pue: Power usage effectiveness for the ledger's facility boundary.
        lifetime_images: Images a model serves over its life (amortises its training energy).
    """

    pue: float = option(DEFAULT_PUE, "power usage effectiveness for the ledger (Uptime Institute 2024 average)", finite)
    lifetime_images: int = option(DEFAULT_LIFETIME_IMAGES, "images a model serves over its life; its training "
                                                           "energy is divided by this", positive_int)

    def validate(self) -> None:
        self._check_kinds()
        if self.pue < 1 or self.lifetime_images < 1:
            raise UserError("--pue must be >= 1 and --lifetime-images positive")


@dataclass(frozen=True)
class OutputConfig(_Axis):
    """Where the run's files go.

    Attributes:
        out: The output folder (``results.jsonl``, ``quality.jsonl``, ``samples/``).
        fresh: Start the folder over (its earlier files are moved aside, nothing is deleted).
    """

    out: Path | None = option(None, "output folder (default: runs/<UTC time>)", path_arg)
    fresh: bool = option(False, "start --out over: its earlier results are moved aside (needed when they were "
                                "measured with other options)")

    def __post_init__(self) -> None:
        if isinstance(self.out, str):
            object.__setattr__(self, "out", Path(self.out))

    def validate(self) -> None:
        if self.out is None:
            raise UserError("no output folder given")


@dataclass(frozen=True)
class ExecutorConfig(_Axis):
    """Where cells run.

    Not part of the record's ``config.run``: where a cell ran is recorded beside its figures
    (``executor``, ``node``, ``host``), it does not shape them.

    Attributes:
        executor: ``local``, ``ray`` (the cluster at ``RAY_ADDRESS``, else a local one) or ``ray:ADDRESS``.
        allow_mixed: Ray: run even if nodes differ in un0-bench version or weights.
        retries: Ray: times a cell whose worker died (OOM, node lost) is tried again before it is recorded
            as failed.
        cell_cpus: Ray: CPU threads a CPU cell asks for (and torch uses).
    """

    executor: str = option(DEFAULT_EXECUTOR, "where cells run: local, ray (the cluster at RAY_ADDRESS, else a local "
                                             "one) or ray:ADDRESS")
    allow_mixed: bool = option(False, "ray: run even if nodes differ in un0-bench version or weights (recorded in "
                                      "every record)")
    retries: int = option(DEFAULT_CELL_RETRIES, "ray: times a cell whose worker died is tried again", non_negative_int)
    cell_cpus: int = option(DEFAULT_CELL_CPUS, "ray: CPUs (torch threads) a CPU cell asks for", positive_int)

    @property
    def is_ray(self) -> bool:
        return self.executor.partition(":")[0] == "ray"

    def validate(self) -> None:
        self._check_kinds()
        if not self.is_ray:
            for f in fields(self):
                if f.name != "executor" and getattr(self, f.name) != default_of(f):
                    raise UserError(f"{_flag(f)} applies to --executor ray only")
        if self.retries < 0 or self.cell_cpus < 1:
            raise UserError("--retries must not be negative and --cell-cpus must be positive")


#: The axes of a run, as :class:`RunConfig` names them.
AXES: dict[str, type[_Axis]] = {"sweep": SweepConfig, "protocol": ProtocolConfig, "quality": QualityConfig,
                                "ledger": LedgerConfig, "output": OutputConfig, "executor": ExecutorConfig}
#: The axes a record's ``config.run`` holds (not the executor: see :class:`ExecutorConfig`).
RECORDED_AXES = ("sweep", "protocol", "quality", "ledger", "output")


def axis_fields() -> Iterator[tuple[str, Field]]:
    """``(axis, field)`` of every option of a run, axis by axis."""
    for axis, kind in AXES.items():
        for f in fields(kind):
            yield axis, f


def _axis_of() -> dict[str, str]:
    return {f.name: axis for axis, f in axis_fields()}


def flag_of(name: str) -> str:
    """The CLI flag of a run option (a field of any axis)."""
    if name == "backbone_options":
        return "backbone options (--device, --dtype, --prompts)"
    by_name = {f.name: f for _, f in axis_fields()}
    return _flag(by_name[name]) if name in by_name else "--" + name.replace("_", "-")


@dataclass(frozen=True)
class RunConfig:
    """What to measure and how hard: one config per axis (see each for its fields)."""

    sweep: SweepConfig = field(default_factory=SweepConfig)
    protocol: ProtocolConfig = field(default_factory=ProtocolConfig)
    quality: QualityConfig = field(default_factory=QualityConfig)
    ledger: LedgerConfig = field(default_factory=LedgerConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    executor: ExecutorConfig = field(default_factory=ExecutorConfig)

    @classmethod
    def of(cls, **options: Any) -> RunConfig:
        """A config from options named as their fields (``models=[...], images=4, pue=1.1``), each to its axis."""
        where = _axis_of()
        unknown = sorted(set(options) - set(where))
        if unknown:
            raise TypeError(f"unknown run option {unknown[0]!r}; the options are {', '.join(sorted(where))}")
        per_axis: dict[str, dict[str, Any]] = {axis: {} for axis in AXES}
        for name, value in options.items():
            per_axis[where[name]][name] = value
        return cls(**{axis: kind(**per_axis[axis]) for axis, kind in AXES.items()})

    def validate(self) -> None:
        """Each axis's validator, in turn (a bad value: one :class:`UserError` naming its flag)."""
        for axis in AXES:
            getattr(self, axis).validate()

    def flat(self, **resolved: Any) -> dict[str, Any]:
        """Every recorded option by name, as a record's ``config.run`` stores it (``resolved`` replaces some)."""
        out: dict[str, Any] = {}
        for axis in RECORDED_AXES:
            part = getattr(self, axis)
            out.update({f.name: getattr(part, f.name) for f in fields(part)})
        out.update(resolved)
        return json.loads(json.dumps(out, default=str))
