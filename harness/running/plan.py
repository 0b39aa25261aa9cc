"""Pre-flight: the user's :class:`~un0_bench.harness.running.config.RunConfig` turned into a frozen :class:`RunPlan`.

Everything that can be checked before the first cell is checked here (every axis's options, meter
names and parameters, the backbone and its quality options, every model's stack and weights), and
what the run will measure is decided once: each model measured once (``sd,sd:steps=50`` is one
canonical stack), each batch size once, the reference among the models. The runner, the workbenches
and the records read the plan; nothing changes it, and nothing changes the configuration it came from.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from un0_bench.harness.core.backbone import Backbone
from un0_bench.harness.core.spec import ModelSpec
from un0_bench.harness.core.stack import Stack, resolve_checked
from un0_bench.harness.errors import UserError
from un0_bench.harness.meters.base import Meter
from un0_bench.harness.registry import BACKBONES, GENERATORS, METERS, TECHNIQUES, Registry
from un0_bench.harness.running.config import MEASUREMENT_FIELDS, RunConfig


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


def meter_specs(names: list[str], registry: Registry = METERS) -> dict[str, str]:
    """Each meter's name -> its spec as given (``proxy`` -> ``proxy:profile=NAME``), checked.

    A meter with parameters is built from its spec but keyed, recorded and reported by its name (its
    readings are keyed so, and reports single out ``proxy``); its parameters are in the record's
    ``meter_details``. A meter named twice is refused.
    """
    from un0_bench.harness.core.spec import bind

    specs: dict[str, str] = {}
    for text in resolve_meters(names, registry):
        spec = ModelSpec.parse(text)
        if spec.name in specs:
            raise UserError(f"--meters names {spec.name!r} twice ({specs[spec.name]!r} and {text!r}); one each")
        schema = getattr(registry.get(spec.name), "params", None)
        if schema is not None:
            bind(spec, schema)  # typed parameters (nvml:devices=0+1): a bad one is refused here, before any work
        specs[spec.name] = text
    return specs


def make_meter(text: str, registry: Registry = METERS) -> Meter | str:
    """A ready meter, or the reason it cannot measure here (``"unavailable: ..."``)."""
    spec = ModelSpec.parse(text)
    try:
        factory = registry.get(spec.name)
        # A Meter class declares typed parameters (nvml:devices=0+1): parsed like model parameters, so
        # a bad one is the user's error here, not an "unavailable" meter later.
        from_spec = getattr(factory, "from_spec", None)
        meter = from_spec(text) if from_spec is not None else factory(**dict(spec.params))
    except UserError:
        raise
    except TypeError as e:
        raise UserError(f"meter {text!r}: {e}") from None
    except Exception as e:  # a meter whose construction fails is unavailable, with the reason
        return f"unavailable: {type(e).__name__}: {e}"
    status = meter.probe()
    return meter if status == "ok" else status


@dataclass(frozen=True)
class RunPlan:
    """What a run measures, decided before it starts.

    Attributes:
        config: The configuration as the user gave it.
        models: The models to measure, each once, the reference among them.
        batch_sizes: The batch sizes to measure, each once.
        reference: The model whose energy is 1x and whose quality sets the band (as ``models`` names it).
        meter_specs: ``(name, spec)`` of every meter, ``auto`` expanded.
        stacks: ``(model, stack)`` of every model, checked, its weights opened and hashed.
        notes: What pre-flight decided on the user's behalf (a model given twice, the reference added).
    """

    config: RunConfig
    models: tuple[str, ...]
    batch_sizes: tuple[int, ...]
    reference: str
    meter_specs: tuple[tuple[str, str], ...]
    stacks: tuple[tuple[str, Stack], ...]
    notes: tuple[str, ...] = ()

    @property
    def meter_names(self) -> tuple[str, ...]:
        return tuple(name for name, _ in self.meter_specs)

    def meter_spec(self, name: str) -> str:
        return dict(self.meter_specs)[name]

    def stack(self, model: str) -> Stack | None:
        """The stack of one of the plan's models (``None``: not one of them)."""
        return dict(self.stacks).get(model)

    @property
    def run(self) -> dict[str, Any]:
        """The run configuration as every record stores it (``config.run``): the options, as resolved."""
        return self.config.flat(models=list(self.models), batch_sizes=list(self.batch_sizes), reference=self.reference)

    def measurement(self) -> dict[str, Any]:
        """What shapes a measurement besides its cell (model, backbone, batch size, meter).

        As stored in a record's ``config.run``: a folder's records must all share it, or resuming would mix them.
        """
        run = self.run
        return {k: run[k] for k in MEASUREMENT_FIELDS}


def preflight(config: RunConfig, generators: Registry = GENERATORS, techniques: Registry = TECHNIQUES,
              meters: Registry = METERS, backbones: Registry = BACKBONES) -> tuple[RunPlan, Backbone]:
    """Check ``config`` and decide what the run measures; returns the plan and the loaded backbone.

    Bad input raises :class:`UserError` (one line) before any work starts.
    """
    config.validate()
    sweep = config.sweep
    specs = meter_specs(list(sweep.meters), meters)
    backbones.entry(sweep.backbone.partition(":")[0])
    backbone = load_backbone(sweep.backbone, backbones, **sweep.backbone_options)
    why = backbone.unmeasurable()
    if why is not None:
        raise UserError(f"--backbone {sweep.backbone}: {why}")
    backbone.check_quality_options(config.quality.options())

    def resolve(text: str) -> Stack:
        return resolve_checked(text, backbone, generators, techniques)

    notes: list[str] = []
    stacks = {m: resolve(m) for m in sweep.models or ()}
    # A model given twice (sd,sd; sd,sd:steps=50: one canonical stack) is measured once, saying so.
    first: dict[str, str] = {}
    for model in sweep.models or ():
        canonical = stacks[model].canonical
        if canonical not in first:
            first[canonical] = model
        elif model == first[canonical]:
            notes.append(f"--models gives {model} twice: measured once")
        else:
            notes.append(f"--models {model} is the same model as {first[canonical]} ({canonical}): measured once, "
                         f"as {first[canonical]}")
            del stacks[model]
    models = list(first.values())
    given = config.protocol.batches()
    batches = tuple(dict.fromkeys(given))
    if len(batches) < len(given):
        twice = sorted({b for b in given if given.count(b) > 1})
        notes.append(f"--batch-size gives {', '.join(map(str, twice))} more than once: each measured once")
    # The reference is checked like a model name, and is measured in the run: its energy is 1x and its
    # quality sets the band, so one not among the models is added to them, saying so.
    reference = sweep.reference
    ref = resolve(reference)  # unknown names: "did you mean"
    same = [m for m, s in stacks.items() if s.canonical == ref.canonical]
    if reference not in stacks:
        if same:
            notes.append(f"--reference {reference} is {same[0]} of --models (the same model); using {same[0]}")
            reference = same[0]
        else:
            notes.append(f"--reference {reference} is not among --models: added to the run (its energy is 1x and "
                         f"its quality sets the band)")
            models.append(reference)
            stacks[reference] = ref
    plan = RunPlan(config=config, models=tuple(models), batch_sizes=batches, reference=reference,
                   meter_specs=tuple(specs.items()), stacks=tuple(stacks.items()), notes=tuple(notes))
    return plan, backbone
