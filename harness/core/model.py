"""The data a technique works on: :class:`Model`, :class:`Plan`, :class:`Run` and :class:`Layer`.

A :class:`Model` is a denoiser with its steps and layers; its :class:`Plan` is known before
anything loads; :class:`Run` is one batch's state; a :class:`Layer` is what a technique did.

These are the data the instrument passes between a backbone (which builds the base model and
samples it), the techniques (which change it, :mod:`~un0_bench.harness.core.technique`) and the sampler
(which calls every layer's hooks). Neither the backbone nor the technique module is imported here,
so both can use these types without importing each other.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from torch import nn
from un0_bench.harness.core.generator import emitting


@dataclass
class Plan:
    """What a stack will be, known before any weights load: enough for every technique's check.

    Attributes:
        backbone_kind: ``"digits"``, ``"diffusers"``, ...
        denoiser: Class name of the denoiser (``"UNet2DModel"``, ``"UNet2DConditionModel"``, a
            transformer class), or ``None`` for a model that is not a denoiser (un0, references).
        steps: Denoiser calls per image (sampling steps), or ``None`` when unknown.
        layers: Names of the base and the techniques so far, in order.
        weights: Who made the denoiser's weights so far (``"teacher"``, ``"sd-pruned"``, ...).
        default_steps: The backbone's default sampling steps (``None``: it does not say), so a
            technique can tell whether the steps before it were changed.
    """

    backbone_kind: str
    denoiser: str | None
    steps: int | None
    layers: list[str] = field(default_factory=list)
    weights: str = "base"
    default_steps: int | None = None


@dataclass
class Model:
    """A denoiser with its sampling settings and the layers applied so far.

    Attributes:
        denoiser: The diffusers denoiser; techniques change it in place or replace it.
        steps: Denoiser calls per image.
        sampler: Backbone-specific sampler settings a technique may set (the digits DDIM loop
            reads ``"schedule"``: explicit timesteps and predictions of a distilled student).
        layers: What each technique did, in order.
        derivation: Metadata of the training that produced the weights (its ``energy`` is
            amortised by the ledger); replaced by techniques that ship their own weights.
        host: The object that holds the denoiser (a diffusers pipeline), or ``None``.
    """

    denoiser: nn.Module
    steps: int
    sampler: dict[str, Any] = field(default_factory=dict)
    layers: list[Layer] = field(default_factory=list)
    derivation: dict[str, Any] | None = None
    host: Any = None


@dataclass
class Run:
    """The state of one batch, shared with every layer's hooks.

    Attributes:
        prompts: The batch's prompts.
        call_index: Denoiser calls so far in this batch (the step index of the current call).
        emit: ``(kind, phase)`` -> None: opens or closes a phase window (see :class:`Generator`).
        timestep: The timestep of the current denoiser call (a tensor), once it began.
    """

    prompts: tuple[str, ...]
    emit: Callable[[str, str], None]
    call_index: int = 0
    timestep: Any = None

    def phase(self, name: str) -> contextlib.AbstractContextManager[None]:
        """``with run.phase("gate"): ...`` opens and closes a phase window from inside a layer hook."""
        return emitting(self.emit, name)


class Layer:
    """What one technique did to a model, and its hooks. Subclasses override the hooks they need.

    Attributes:
        technique: Registry name (``"int8"``).
        params: The technique's validated parameters.
        changes: JSON facts for the record: what was changed (layers quantised, weights zeroed).
        phases: Phases this layer adds before the first denoiser call of a batch (``("gate",)``).
    """

    phases: tuple[str, ...] = ()

    def __init__(self, technique: str, params: dict[str, Any], changes: dict[str, Any] | None = None) -> None:
        self.technique = technique
        self.params = dict(params)
        self.changes = dict(changes or {})

    def before_batch(self, run: Run) -> None:
        """Called before each sampler run (batch)."""

    def before_call(self, run: Run, args: tuple, kwargs: dict) -> None:
        """Called before every denoiser call, before its ``denoise_step`` phase opens."""

    def after_call(self, run: Run) -> None:
        """Called after every denoiser call, even one that raised."""

    def after_batch(self, run: Run) -> None:
        """Called after each sampler run, even one that raised."""

    def reset_cache(self) -> None:
        """Forget cached work, so the next call runs cold."""

    def cache_stats(self) -> dict[str, Any] | None:
        return None

    def describe(self) -> dict[str, Any]:
        return {"technique": self.technique, "params": self.params, **self.changes}
