"""The result record: one typed model of what a cell leaves for each meter, as ``results.jsonl`` stores it.

A :class:`Record` has typed core fields (every record has them), a schema version, and ``extras``: every
other field as written (protocol statistics, per-domain and per-phase figures, quality, placement),
checked against :data:`OPTIONAL` where their type is known. The cell builds records
(:meth:`Record.measured`), the runner builds the record of a cell that could not be measured
(:meth:`Record.failed_cell`), the store writes :meth:`Record.to_json` and reads :meth:`Record.from_json`,
which refuses a missing or mistyped field by its name. On disk the field names are those of schema
versions 1 and 2.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from un0_bench.harness.errors import UserError

#: 2: records name their stack (`stack`, `model_canonical`) and no longer store a ledger (reports compute
#: it from the run's settings); files of version 1 are read the same way.
SCHEMA_VERSION = 2

#: Schema versions this code reads (a record without ``schema`` is of version 1).
READABLE_SCHEMAS = (1, 2)


class SchemaVersionError(UserError):
    """A results file written by a newer un0-bench (a schema version this code cannot read)."""


class RecordError(ValueError):
    """Why a JSON value is not a record: the field at fault (``None``: the value as a whole) and the problem."""

    def __init__(self, field_name: str | None, problem: str) -> None:
        super().__init__(f"{field_name}: {problem}" if field_name else problem)
        self.field, self.problem = field_name, problem


# --- field checks: the problem with a value, or None ---------------------------------------------
Check = Callable[[Any], "str | None"]


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _text(v: Any) -> str | None:
    return None if isinstance(v, str) and v else f"must be a non-empty string, got {v!r}"


def _count(v: Any) -> str | None:
    return None if isinstance(v, int) and not isinstance(v, bool) and v >= 1 else \
        f"must be a positive integer, got {v!r}"


def _or_null(check: Check) -> Check:
    return lambda v: None if v is None else check(v)


def _number(v: Any) -> str | None:
    return None if _is_number(v) else f"must be a finite number or null, got {v!r}"


def _interval(v: Any) -> str | None:
    ok = isinstance(v, (list, tuple)) and len(v) == 2 and all(_is_number(x) for x in v)
    return None if ok else f"must be [low, high] or null, got {v!r}"


def _kind(kind: type, name: str) -> Check:
    return lambda v: None if isinstance(v, kind) else f"must be {name} or null, got {type(v).__name__}"


_object, _list, _bool, _str = _kind(dict, "an object"), _kind(list, "a list"), _kind(bool, "true/false"), \
    _kind(str, "a string")


def core(check: Check, help: str) -> Any:
    """A core field: every record has it; ``check`` gives the problem with a value."""
    return field(metadata={"check": check, "help": help})


#: Fields a record may have beyond its core, with their type: checked when present (null is allowed).
OPTIONAL: dict[str, Check] = {
    **dict.fromkeys(("model_canonical", "meter_spec", "executor", "node", "host", "device", "measured_at",
                     "sample_grid", "quality_note", "derivation_command", "energy_ci_method", "energy_ci_note",
                     "proxy_profile", "note"), _str),
    **dict.fromkeys(("quality_matched", "quality_marginal", "energy_net_below_detection_limit"), _bool),
    **dict.fromkeys(("quality", "quality_band", "warmup", "cell_order", "derivation_energy", "phases", "cache",
                     "projected", "meter_details", "energy_j_per_image_by_domain", "flops_per_image_by_dtype"),
                    _object),
    **dict.fromkeys(("stack", "windows", "window_s", "device_shared_with"), _list),
    **dict.fromkeys(("duration_ci95_s", "windows_span_s"), _or_null(_interval)),
    **dict.fromkeys(("gating_flops_per_image", "gating_bytes_per_image", "idle_added_s", "min_window_s",
                     "meter_duration_s_per_image", "energy_ci_level", "energy_net_j_per_image"), _number),
    "repeats": _count,
}


@dataclass(frozen=True)
class Record(Mapping[str, Any]):
    """One cell's result by one meter (model x backbone x batch size x meter).

    Units are in the names: joules, seconds, FLOPs and bytes per image. A figure a meter or a counter
    could not give is ``None`` with the reason in ``status`` or beside it, never 0.

    Core fields are attributes (``record.energy_j_per_image``); every field, core or extra, can also be
    read by its stored name as ``results.jsonl`` holds it (``record["windows"]``, ``record.get("quality")``;
    ``dict(record) == record.to_json()``), so a reader of records is a reader of ``results.jsonl`` lines.
    A record is never changed: :meth:`with_fields` makes another.
    """

    model: str = core(_text, "the model spec as the run names it (sd:steps=10)")
    backbone: str = core(_text, "the backbone spec (digits, diffusers:PATH)")
    batch_size: int = core(_count, "images per generate batch")
    meter: str = core(_text, "the meter's name (its parameters are in meter_spec)")
    status: str = core(_text, "ok, unavailable: <reason> or failed: <reason>")
    images: int = core(_count, "images per metered window")
    energy_j_per_image: float | None = core(_or_null(_number), "windows' total energy / their images (J), gross")
    energy_ci95_j: tuple[float, float] | None = core(_or_null(_interval), "its 95% interval (J)")
    flops_per_image: float | None = core(_or_null(_number), "FLOPs counted per image")
    bytes_per_image: float | None = core(_or_null(_number), "bytes moved per image")
    duration_s_per_image: float | None = core(_or_null(_number), "wall time per image (s)")
    uncounted_ops: dict[str, Any] | None = core(_or_null(_object), "ops that ran without a FLOP formula")
    config: dict[str, Any] | None = core(_or_null(_object), "generator description and config.run")
    environment: dict[str, Any] | None = core(_or_null(_object), "host, libraries, git commit")
    #: The schema version the record was written with (``None``: version 1, which did not say).
    schema: int | None = SCHEMA_VERSION
    #: Every other field as written, type-checked where :data:`OPTIONAL` names it.
    extras: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def core_fields(cls) -> tuple[str, ...]:
        """The fields every record has, in their order."""
        return tuple(_CHECKS)

    def __post_init__(self) -> None:
        for name, check in _CHECKS.items():
            why = check(getattr(self, name))
            if why is not None:
                raise RecordError(name, why)
        clash = sorted(set(self.extras) & {*_CHECKS, "schema", "extras"})
        if clash:
            raise RecordError(clash[0], "given as a field and as an extra")
        for k, v in self.extras.items():
            why = OPTIONAL[k](v) if k in OPTIONAL and v is not None else None
            if why is not None:
                raise RecordError(k, why)

    # --- the JSON form --------------------------------------------------------------------------
    @classmethod
    def from_json(cls, value: Any) -> Record:
        """The record a JSON value holds; :class:`RecordError` says which field is missing or mistyped.

        A schema version this code cannot read raises :class:`SchemaVersionError` instead (not a bad
        line: a file from a newer un0-bench, to be refused as a whole).
        """
        if not isinstance(value, dict):
            raise RecordError(None, f"not a record (a JSON {type(value).__name__}, expected an object)")
        version = value.get("schema", 1)
        if not isinstance(version, int) or isinstance(version, bool) or version not in READABLE_SCHEMAS:
            raise SchemaVersionError(f"schema version {version!r}; this un0-bench reads versions "
                                     f"{', '.join(map(str, READABLE_SCHEMAS))}")
        names = cls.core_fields()
        missing = [k for k in names if k not in value]
        if missing:
            raise RecordError(missing[0], f"missing (a record lacks {', '.join(missing)})")
        extras = {k: v for k, v in value.items() if k not in names and k != "schema"}
        core_values = {k: value[k] for k in names}
        ci = core_values["energy_ci95_j"]
        if isinstance(ci, list) and _interval(ci) is None:
            core_values["energy_ci95_j"] = (ci[0], ci[1])
        return cls(**core_values, schema=value.get("schema"), extras=extras)

    def to_json(self) -> dict[str, Any]:
        """The record as ``results.jsonl`` stores it (the field names of schema versions 1 and 2)."""
        out = {k: getattr(self, k) for k in self.core_fields()}
        if self.energy_ci95_j is not None:
            out["energy_ci95_j"] = list(self.energy_ci95_j)
        out.update(self.extras)
        if self.schema is not None:
            out["schema"] = self.schema
        return out

    # --- read by stored name (the Mapping protocol, over the JSON form's keys) ---------------------
    def __getitem__(self, name: str) -> Any:
        if name == "energy_ci95_j" and self.energy_ci95_j is not None:
            return list(self.energy_ci95_j)  # as results.jsonl holds it
        if name in _CHECKS:
            return getattr(self, name)
        if name == "schema" and self.schema is not None:
            return self.schema
        return self.extras[name]

    def __iter__(self) -> Iterator[str]:
        yield from _CHECKS
        yield from self.extras
        if self.schema is not None:
            yield "schema"

    def __len__(self) -> int:
        return len(_CHECKS) + len(self.extras) + (self.schema is not None)

    def get(self, name: str, default: Any = None) -> Any:
        """A field by name, core or extra, as ``results.jsonl`` holds it (``default`` when the record lacks it)."""
        return self[name] if name in self else default

    @property
    def failed(self) -> bool:
        """A cell that could not be measured (its worker lost): measured again on resume."""
        return self.status.startswith("failed")

    # --- the two ways a record is made ------------------------------------------------------------
    @classmethod
    def measured(cls, identity: Mapping[str, Any], fields_: Mapping[str, Any]) -> Record:
        """A measured cell's record: its :func:`identity` and what the meter and counters gave."""
        return cls._of({**identity, **fields_})

    @classmethod
    def failed_cell(cls, identity: Mapping[str, Any], reason: str) -> Record:
        """What a cell that could not be measured leaves: its identity, ``status`` failed, no figures."""
        return cls._of({**identity, "status": f"failed: {reason}", "energy_j_per_image": None,
                        "energy_ci95_j": None, "flops_per_image": None, "bytes_per_image": None,
                        "duration_s_per_image": None, "uncounted_ops": None, "environment": None})

    @classmethod
    def _of(cls, values: Mapping[str, Any]) -> Record:
        return cls.from_json({**values, "schema": SCHEMA_VERSION})

    def with_fields(self, **extra: Any) -> Record:
        """This record with more (or other) extra fields: the quality the driver adds."""
        return Record.from_json({**self.to_json(), **extra})


#: Core field -> its check (the fields every record has).
_CHECKS: dict[str, Check] = {f.name: f.metadata["check"] for f in fields(Record) if "check" in f.metadata}


def identity(*, model: str, canonical: str, stack: list[dict[str, Any]], backbone: str, batch_size: int,
             images: int, meter: str, meter_spec: str, run: dict[str, Any], executor: str,
             generator: dict[str, Any] | None = None) -> dict[str, Any]:
    """What every record of a cell says about the cell, measured or failed: the one list of those fields."""
    config: dict[str, Any] = {"run": run} if generator is None else {"generator": generator, "run": run}
    return {"model": model, "model_canonical": canonical, "stack": stack, "backbone": backbone,
            "batch_size": batch_size, "images": images, "meter": meter, "meter_spec": meter_spec,
            "config": config, "executor": executor,
            "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
