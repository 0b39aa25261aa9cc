"""Stacks: a base model and techniques applied left to right (``sd-distilled+int8``, ``sd:steps=20+cached:interval=3``).

:func:`resolve` parses a stack, expands aliases (``sd-int8`` is ``sd+int8:scales=static`` on digits),
binds every layer's parameters and checks the whole plan with each technique's
:meth:`~un0_bench.harness.core.technique.Technique.check`: a stack that cannot work is refused here,
with the reason, before anything loads. :func:`build` then builds the base and applies the
techniques in order.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from un0_bench.harness.core.backbone import Backbone
from un0_bench.harness.core.generator import Generator
from un0_bench.harness.core.model import Model, Plan
from un0_bench.harness.core.spec import ModelSpec, Param, bind, takes
from un0_bench.harness.core.technique import Technique
from un0_bench.harness.errors import SpecError, StackError
from un0_bench.harness.registry import GENERATORS, TECHNIQUES, Registry


@dataclass(frozen=True)
class LayerSpec:
    """One layer of a stack: a base model or a technique, with its bound parameters."""

    name: str
    params: tuple[tuple[str, Any], ...]
    #: ``(file name, sha256)`` of each weights file the layer loads, once :func:`check_weights` opened them.
    weights: tuple[tuple[str, str], ...] = ()

    def text(self) -> str:
        shown = ",".join(f"{k}={_fmt(v)}" for k, v in self.params if v is not None)
        return f"{self.name}:{shown}" if shown else self.name


def _fmt(v: Any) -> str:
    return f"{v:g}" if isinstance(v, float) else str(v)


@dataclass(frozen=True)
class Stack:
    """A resolved stack.

    Attributes:
        text: The spec as written (results are keyed by it).
        layers: Base first, then the techniques, each with every parameter bound (defaults filled).
        plan: What the stack will be (denoiser, steps), checked by every technique.
    """

    text: str
    layers: tuple[LayerSpec, ...]
    plan: Plan

    @property
    def canonical(self) -> str:
        """One text per distinct model: aliases expanded, every parameter written (``sd:steps=50+int8:...``)."""
        return "+".join(layer.text() for layer in self.layers)

    def describe(self) -> list[dict[str, Any]]:
        return [{"name": layer.name, "params": dict(layer.params), **({"weights": dict(layer.weights)}
                                                                     if layer.weights else {})}
                for layer in self.layers]

    def weights(self) -> dict[str, str]:
        """Every weights file the stack loads (file name -> sha256): its identity in resume keys."""
        return {name: digest for layer in self.layers for name, digest in layer.weights}


def _schema(obj: Any) -> dict[str, Param]:
    return dict(getattr(obj, "params", {}) or {})


def _split(text: str) -> list[ModelSpec]:
    text = text.strip()
    parts = text.split("+")
    if any(not p.strip() for p in parts):
        raise SpecError(f"bad stack {text!r}: expected BASE+TECHNIQUE+... (e.g. sd-distilled+int8)")
    return [ModelSpec.parse(p) for p in parts]


def _expand(first: ModelSpec, kind: str, generators: Registry, techniques: Registry) -> list[ModelSpec]:
    """The base of a stack, with an alias expanded and its parameters routed to the layers that take them."""
    entry = generators.entry(first.name)  # unknown: "did you mean"
    if not entry.supports(kind):
        raise StackError(f"{first.name} is not available on {kind} backbones: {entry.why_not(kind)}")
    if not entry.is_alias(kind):
        return [first]
    expanded = _split(entry.alias[kind])  # type: ignore[index]
    # A parameter given to the alias goes to the last layer that takes it (sd-distilled:steps=1 is the
    # student's steps; sd-cached:steps=20 is sd's, since cached takes no steps).
    schemas = [_schema(generators.get(expanded[0].name, kind))] + [
        _schema(_technique(p.name, techniques)) for p in expanded[1:]]
    params = [dict(p.params) for p in expanded]
    for key, value in first.params:
        takers = [i for i, s in enumerate(schemas) if key in s]
        if not takers:
            accepted = sorted({k for s in schemas for k in s})
            raise SpecError(f"{first.text}: unknown parameter {key!r}; {first.name} accepts: "
                            f"{', '.join(accepted) or 'none'}")
        params[takers[-1]][key] = value
    return [ModelSpec(text=p.name, name=p.name, params=tuple(params[i].items())) for i, p in enumerate(expanded)]


def _technique(name: str, techniques: Registry = TECHNIQUES) -> Technique:
    return techniques.get(name)()


def resolve(text: str, backbone: Backbone, generators: Registry = GENERATORS,
            techniques: Registry = TECHNIQUES) -> Stack:
    """Parse, expand, bind and check a stack for ``backbone``; raises SpecError/StackError with the reason."""
    kind = backbone.kind
    parts = _split(text)
    layers = _expand(parts[0], kind, generators, techniques)
    for p in parts[1:]:
        if p.name not in techniques and p.name in generators:
            raise StackError(f"{text}: {p.name} is a model, not a technique; a stack is one base model "
                             f"followed by techniques ({', '.join(techniques.names())})")
        entry = techniques.entry(p.name)  # unknown: "did you mean"
        if not entry.supports(kind):
            raise StackError(f"{text}: {p.name} is not available on {kind} backbones: {entry.why_not(kind)}")
        layers.append(p)
    base = generators.get(layers[0].name, kind)
    bound = [LayerSpec(layers[0].name, tuple(bind(layers[0], _schema(base)).items()))]
    planner = getattr(base, "plan", None)
    plan = planner(backbone, **dict(bound[0].params)) if planner else Plan(kind, None, None)
    plan.layers = [layers[0].name]
    if dict(bound[0].params).get("steps", 0) is None and plan.steps is not None:
        # "the backbone's own steps", written out, so sd and sd:steps=50 are one canonical model on digits
        bound[0] = LayerSpec(bound[0].name, tuple((k, plan.steps if k == "steps" else v) for k, v in bound[0].params))
    for p in layers[1:]:
        tech = _technique(p.name, techniques)
        params = bind(p, _schema(tech))
        if p.name in plan.layers:
            raise StackError(f"{text}: {p.name} appears twice in the stack")
        tech.check(plan, params)
        plan.layers.append(p.name)
        bound.append(LayerSpec(p.name, tuple(params.items())))
    return Stack(text=text.strip(), layers=tuple(bound), plan=plan)


def check_weights(stack: Stack, backbone: Backbone, generators: Registry = GENERATORS,
                  techniques: Registry = TECHNIQUES) -> Stack:
    """Pre-flight: open every weights file ``stack`` will load (no tensors read) and name each by its hash.

    Raises ``CheckpointError`` naming the file (missing, truncated, foreign, another config). Returns
    the stack with each layer's files and their SHA-256 (:meth:`Stack.weights`).
    """
    from dataclasses import replace

    from un0_bench.harness.weights.checkpoints import file_sha256

    base = generators.get(stack.layers[0].name, backbone.kind)
    checker = getattr(base, "check_weights", None)
    found = [checker(backbone, **dict(stack.layers[0].params)) if checker else []]
    found += [_technique(layer.name, techniques).check_weights(backbone, **dict(layer.params))
              for layer in stack.layers[1:]]
    layers = tuple(replace(layer, weights=tuple((backbone.weights_name(f), file_sha256(f)) for f in files))
                   for layer, files in zip(stack.layers, found, strict=True))
    return replace(stack, layers=layers)


def resolve_checked(text: str, backbone: Backbone, generators: Registry = GENERATORS,
                    techniques: Registry = TECHNIQUES) -> Stack:
    """:func:`resolve` then :func:`check_weights`: the stack every measured cell is built from."""
    return check_weights(resolve(text, backbone, generators, techniques), backbone, generators, techniques)


def build(stack: Stack, backbone: Backbone, generators: Registry = GENERATORS,
          techniques: Registry = TECHNIQUES) -> Generator:
    """Build the base of ``stack`` on ``backbone`` and apply its techniques left to right."""
    base = generators.get(stack.layers[0].name, backbone.kind)
    made = base(backbone, **dict(stack.layers[0].params))
    if isinstance(made, Model):
        for layer in stack.layers[1:]:
            made.layers.append(_technique(layer.name, techniques).apply(made, backbone, **dict(layer.params)))
        gen = backbone.sampler(made)
    elif len(stack.layers) > 1:  # resolve() refuses this; a plugin base without a plan could get here
        raise StackError(f"{stack.text}: {stack.layers[0].name} is not a denoiser model; techniques cannot stack on it")
    else:
        gen = made
    gen.spec = stack.text
    return gen


def make_generator(text: str, backbone: Backbone, generators: Registry = GENERATORS,
                   techniques: Registry = TECHNIQUES) -> Generator:
    """Resolve and build a stack in one step."""
    return build(resolve(text, backbone, generators, techniques), backbone, generators, techniques)


#: ``sd:steps=N``. ``None``: the backbone's own default (50 DDIM steps on digits; a pipeline's default).
STEPS = Param(int, None, "sampling steps (default: the backbone's own)", low=1, high=1000)


@takes(steps=STEPS)
def diffusion_base(backbone: Backbone, steps: int | None = None) -> Model:
    """``sd``: the backbone's base diffusion model, sampled by the backbone's own sampler."""
    return backbone.base_model(steps)


def _plan_base(backbone: Backbone, steps: int | None = None) -> Plan:
    return backbone.plan_base(steps)


def _check_base_weights(backbone: Backbone, steps: int | None = None) -> list[Path]:
    return backbone.check_base_weights()


diffusion_base.plan = _plan_base  # type: ignore[attr-defined]
diffusion_base.check_weights = _check_base_weights  # type: ignore[attr-defined]
