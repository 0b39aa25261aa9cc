"""Model specs: ``name`` or ``name:key=value,key=value`` (e.g. ``sd:steps=10``), and their parameters."""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from un0_bench.harness.errors import SpecError

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")


@dataclass(frozen=True)
class ModelSpec:
    """A parsed model spec. ``text`` is kept exactly as written: results are keyed by it."""

    text: str
    name: str
    params: tuple[tuple[str, str], ...] = ()

    @classmethod
    def parse(cls, text: str) -> ModelSpec:
        text = text.strip()
        name, _, rest = text.partition(":")
        if not _NAME.match(name):
            raise SpecError(f"bad model spec {text!r}: expected NAME or NAME:key=value,...")
        params: list[tuple[str, str]] = []
        if rest:
            for item in rest.split(","):
                key, eq, value = item.partition("=")
                key, value = key.strip(), value.strip()
                if not eq or not key or not value:
                    raise SpecError(f"bad parameter {item!r} in {text!r}: expected key=value")
                if key in dict(params):
                    raise SpecError(f"parameter {key!r} given twice in {text!r}")
                params.append((key, value))
        return cls(text=text, name=name, params=tuple(params))


@dataclass(frozen=True)
class Param:
    """A generator parameter: type, default, inclusive bounds (``low_open`` makes ``low`` exclusive)."""

    kind: type
    default: Any
    help: str = ""
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    choices: tuple[str, ...] | None = None

    def valid_range(self) -> str:
        if self.kind is list:
            return "one or more items joined by + (0+1, GPU-8f2c...+GPU-1a3d...)"
        if self.choices is not None:
            return "one of " + ", ".join(self.choices)
        if self.kind is str:
            return "a string"
        kind = "an integer" if self.kind is int else "a number"
        lo = "" if self.low is None else (f"> {self.low:g}" if self.low_open else f">= {self.low:g}")
        hi = "" if self.high is None else f"<= {self.high:g}"
        bounds = " and ".join(b for b in (lo, hi) if b)
        return f"{kind} {bounds}".strip()

    def parse(self, key: str, raw: str, spec: str) -> Any:
        try:
            if self.kind is list:
                # A list in a spec: items joined by "+" (commas separate parameters, and --meters items).
                items = [t.strip() for t in raw.split("+")]
                if not all(items):
                    raise ValueError(raw)
                return items
            if self.kind is int:
                value: Any = int(raw)
            elif self.kind is float:
                value = float(raw)
                if not math.isfinite(value):
                    raise ValueError(raw)
            else:
                value = raw
        except ValueError:
            raise SpecError(f"{spec}: {key}={raw!r} is not valid; {key} must be {self.valid_range()}") from None
        if self.choices is not None and value not in self.choices:
            raise SpecError(f"{spec}: {key}={raw!r} is not valid; {key} must be {self.valid_range()}")
        if self.kind is not str:
            too_low = self.low is not None and (value <= self.low if self.low_open else value < self.low)
            too_high = self.high is not None and value > self.high
            if too_low or too_high:
                raise SpecError(f"{spec}: {key}={raw} is out of range; {key} must be {self.valid_range()}")
        return value


def takes(**params: Param) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Declare the spec parameters a generator factory accepts: ``@takes(steps=Param(int, 50, ...))``."""

    def wrap(fn: Callable[..., Any]) -> Callable[..., Any]:
        fn.params = dict(params)  # type: ignore[attr-defined]
        return fn

    return wrap


def bind(spec: ModelSpec, schema: dict[str, Param]) -> dict[str, Any]:
    """Validate the spec's parameters against the factory's schema and fill in defaults."""
    given = dict(spec.params)
    unknown = sorted(set(given) - set(schema))
    if unknown:
        accepted = ", ".join(f"{k} ({p.valid_range()})" for k, p in schema.items()) or "none"
        raise SpecError(f"{spec.text}: unknown parameter {unknown[0]!r}; {spec.name} accepts: {accepted}")
    return {k: (p.parse(k, given[k], spec.text) if k in given else p.default) for k, p in schema.items()}
