"""Typed registries, one per kind: generators, techniques, backbones, meters, training targets.

Entries are lazy, duplicates are refused and an unknown name gets "did you mean". A registry with a
base class (techniques, backbones, meters) holds its subclasses only, checked when an entry is
registered as an object or first imported; anything else is refused with :class:`EntryTypeError`.
Generator factories and training functions are typed (``Registry[Callable[...]]``) but not checked.

An entry is a ``"module:attr"`` string, imported only when chosen, so listing generators does not
import diffusers or pynvml. The built-in entries are registered in one place, :mod:`un0_bench.catalog`
(imported with the package); third-party generators, techniques, backbones and meters register
through the entry-point groups ``un0_bench.generators``, ``un0_bench.techniques``,
``un0_bench.backbones`` and ``un0_bench.meters``.
"""

from __future__ import annotations

import difflib
import importlib
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from importlib import metadata
from typing import TYPE_CHECKING, Any, Generic, TypeVar, cast

from un0_bench.harness.errors import UserError

if TYPE_CHECKING:
    from un0_bench.harness.core.backbone import Backbone
    from un0_bench.harness.core.generator import Generator
    from un0_bench.harness.core.technique import Technique
    from un0_bench.harness.meters.base import Meter

T = TypeVar("T")


class UnknownNameError(UserError):
    """A name that is not registered; the message suggests close matches and lists what exists."""


class EntryTypeError(UserError):
    """An entry that is not what its registry holds (a plug-in's meter that is no :class:`Meter`, ...)."""


@dataclass(frozen=True)
class Entry:
    """One registered name.

    Attributes:
        name: The registered name.
        target: ``"module:attr"`` (imported on first use) or the object itself; for a generator,
            either one factory for every backbone kind it supports, or ``{kind: factory}``.
        summary: One line for ``un0-bench list``.
        kinds: Backbone kinds the entry supports (``None``: every kind).
        unsupported: Backbone kind -> why the entry is not available there.
        alias: Backbone kind -> the stack this name stands for there (``"sd+int8:scales=static"``).
    """

    name: str
    target: str | Callable[..., Any] | dict[str, str | Callable[..., Any]] | None
    summary: str = ""
    kinds: tuple[str, ...] | None = None
    unsupported: dict[str, str] = field(default_factory=dict)
    alias: dict[str, str] | None = None

    def supports(self, kind: str) -> bool:
        if kind in self.unsupported:
            return False
        if self.alias and kind in self.alias:
            return True
        if self.target is None:
            return False
        if isinstance(self.target, dict):
            return kind in self.target
        return self.kinds is None or kind in self.kinds

    def is_alias(self, kind: str) -> bool:
        """Whether on backbone ``kind`` this name stands for a stack."""
        return bool(self.alias) and kind in self.alias  # type: ignore[operator]

    def why_not(self, kind: str) -> str:
        """The reason the entry is not available on backbone ``kind`` (for an unsupported kind)."""
        if kind in self.unsupported:
            return self.unsupported[kind]
        own = self.target if isinstance(self.target, dict) else (self.kinds or ())
        supported = sorted({*(self.alias or {}), *own})
        return f"it is available on {', '.join(supported) or 'no backbone'} only"

    def target_for(self, kind: str | None) -> str | Callable[..., Any]:
        """The target for backbone ``kind`` (``None``: the single target, whatever the kind)."""
        if kind is not None and not self.supports(kind):
            raise UserError(f"{self.name} is not available on {kind} backbones: {self.why_not(kind)}")
        if isinstance(self.target, dict):
            if kind not in self.target:
                raise UserError(f"{self.name} is not available on {kind} backbones: {self.why_not(str(kind))}")
            return self.target[kind]
        if self.target is None:
            raise ValueError(f"{self.name} is an alias and has no target of its own")
        return self.target


class Registry(Generic[T]):
    """Name -> lazily imported object, for one kind of thing.

    Args:
        kind: What the entries are, for messages (``"meter"``).
        base: ``"module:attr"`` of the base class every entry subclasses (a string, so that building
            the registry imports nothing); ``None``: entries are not checked.
        entry_point_group: Package entry-point group whose entries join this registry (``un0_bench.meters``).
    """

    def __init__(self, kind: str, base: str | None = None, entry_point_group: str | None = None) -> None:
        if base is not None and ":" not in base:
            raise ValueError(f"base must be 'module:attr', got {base!r}")
        self.kind = kind
        self.base = base
        self._entries: dict[str, Entry] = {}
        self.entry_point_group = entry_point_group
        self._entry_points_loaded = entry_point_group is None

    def register(self, name: str, target: str | Callable[..., Any] | dict[str, Any] | None, summary: str = "", *,
                 kinds: tuple[str, ...] | None = None, unsupported: dict[str, str] | None = None,
                 alias: dict[str, str] | None = None) -> None:
        """Add ``name``; refuses a name that is already registered and a lazy target without ``:``."""
        if name in self._entries:
            raise ValueError(f"{self.kind} {name!r} is already registered")
        targets = target.values() if isinstance(target, dict) else [target]
        for t in targets:
            if isinstance(t, str) and ":" not in t:
                raise ValueError(f"lazy target must be 'module:attr', got {t!r}")
        if target is None and not alias:
            raise ValueError(f"{name}: give a target, an alias, or both (for different backbone kinds)")
        for t in targets:
            if t is not None and not isinstance(t, str):
                self._checked(name, t)
        self._entries[name] = Entry(name, target, summary, kinds, dict(unsupported or {}), alias)

    def _load_entry_points(self) -> None:
        if self._entry_points_loaded:
            return
        self._entry_points_loaded = True
        for ep in metadata.entry_points(group=self.entry_point_group):
            if ep.name not in self._entries:
                self._entries[ep.name] = Entry(ep.name, ep.value, f"(plugin from {ep.value})")

    def names(self) -> list[str]:
        self._load_entry_points()
        return sorted(self._entries)

    def __contains__(self, name: str) -> bool:
        self._load_entry_points()
        return name in self._entries

    def names_in_order(self) -> list[str]:
        """Names in registration order (training targets depend on earlier ones)."""
        self._load_entry_points()
        return list(self._entries)

    def __iter__(self) -> Iterator[Entry]:
        return iter(self._entries[n] for n in self.names())

    def entry(self, name: str) -> Entry:
        self._load_entry_points()
        try:
            return self._entries[name]
        except KeyError:
            raise UnknownNameError(self.unknown_message(name)) from None

    def get(self, name: str, kind: str | None = None) -> T:
        """The registered object (for backbone ``kind``), importing its module on first use.

        Raises:
            EntryTypeError: The entry is not what this registry holds.
        """
        target = self.entry(name).target_for(kind)
        return self._checked(name, _resolve(target) if isinstance(target, str) else target, target)

    def _checked(self, name: str, obj: object, target: object = None) -> T:
        """``obj`` if it is what this registry holds; else :class:`EntryTypeError`, naming where it came from."""
        if self.base is not None:
            base = _resolve(self.base)
            if not (isinstance(obj, type) and issubclass(obj, base)):
                where = f" ({target})" if isinstance(target, str) else ""
                raise EntryTypeError(f"{self.kind} {name!r}{where} is {obj!r}, not a subclass of {self.base}")
        return cast(T, obj)

    def unknown_message(self, name: str) -> str:
        return unknown_name(self.kind, name, self.names())


def _resolve(target: str) -> Any:
    """The object a ``"module:attr"`` string names (``attr`` may be dotted), importing its module."""
    module, _, attr = target.partition(":")
    obj: Any = importlib.import_module(module)
    for part in attr.split("."):
        obj = getattr(obj, part)
    return obj


def lookup(kind: str, name: str, table: Mapping[str, T]) -> T:
    """``table[name]``; an unknown name raises :class:`UnknownNameError` (did you mean, the sorted names)."""
    if name not in table:
        raise UnknownNameError(unknown_name(kind, name, sorted(table)))
    return table[name]


def unknown_name(kind: str, name: str, names: Iterable[str]) -> str:
    """``unknown KIND 'NAME'. Did you mean ...? Available: ...``: the one wording of every name lookup."""
    names = list(names)
    close = difflib.get_close_matches(name or "", names, n=3, cutoff=0.5)
    hint = f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
    return f"unknown {kind} {name!r}.{hint} Available: {', '.join(names)}"


#: Base models (``sd``, ``un0``, references) and aliases of stacks (``sd-int8``): factories
#: ``(backbone, **params) -> Generator``.
GENERATORS: Registry[Callable[..., Generator]] = Registry("generator", entry_point_group="un0_bench.generators")
#: Transforms of a denoiser that stack on a base model (``int8``, ``cached``, ...).
TECHNIQUES: Registry[type[Technique]] = Registry("technique", "un0_bench.harness.core.technique:Technique",
                                                  entry_point_group="un0_bench.techniques")
#: Where weights, prompts, samplers and quality come from (``digits``, ``diffusers:PATH``, ``arch:NAME``).
BACKBONES: Registry[type[Backbone]] = Registry("backbone", "un0_bench.harness.core.backbone:Backbone",
                                                entry_point_group="un0_bench.backbones")
#: Measurement windows (``wall``, ``proxy``, ``rapl``, ...).
METERS: Registry[type[Meter]] = Registry("meter", "un0_bench.harness.meters.base:Meter",
                                          entry_point_group="un0_bench.meters")
#: ``un0-bench train TARGET``: functions taking ``steps``, ``seed``, ``out`` and returning metadata.
TRAINERS: Registry[Callable[..., dict[str, Any]]] = Registry("training target")

# The built-in entries are registered by the top floor (un0_bench.catalog), which knows the
# concrete backbones, techniques and generators; the instrument knows only these registries.
