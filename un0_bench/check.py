"""The CI energy gate: recount a small fixed proxy-only suite and compare it with a committed baseline.

Proxy energy and FLOPs are deterministic, so any change beyond the tolerance is a real change in what
a model executes. A regression (more expensive) fails with a table of what moved; an improvement is
reported, and ``--update`` rewrites the baseline.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from un0_bench.harness.core.generator import GenerationRequest
from un0_bench.harness.core.stack import make_generator
from un0_bench.harness.measuring.protocol import count_ops
from un0_bench.harness.meters.proxy import DEFAULT_PROFILE
from un0_bench.harness.registry import GENERATORS
from un0_bench.harness.running.runner import load_backbone

#: The gate's fixed protocol: few images, one batch, digits backbone, default profile.
GATE_IMAGES = 10
GATE_SEED = 0
GATE_BACKBONE = "digits"
GATE_PROFILE = DEFAULT_PROFILE


#: Stacks the gate counts besides every registered name: the suite's combined models.
GATE_STACKS = ["sd-distilled+int8", "sd-distilled:steps=1+int8"]


def gate_models() -> list[str]:
    """Every registered generator on the gate's backbone at its defaults, and the suite's combined stacks."""
    return [e.name for e in GENERATORS if e.supports(GATE_BACKBONE)] + GATE_STACKS


def measure(models: list[str]) -> dict[str, dict[str, float]]:
    """Proxy J/image and FLOPs/image of each model under the gate protocol."""
    from un0_bench.harness.meters.proxy import proxy_energy

    backbone = load_backbone(GATE_BACKBONE)
    prompts = tuple(backbone.default_prompts(GATE_IMAGES))
    out = {}
    for model in models:
        gen = make_generator(model, backbone)
        request = GenerationRequest(prompts, seed=GATE_SEED, batch_size=GATE_IMAGES)
        gen.generate(request)  # warm: cached generators are gated at their steady state
        counts = count_ops(gen, request)
        out[model] = {
            "proxy_j_per_image": proxy_energy(counts, GATE_PROFILE).total_j / GATE_IMAGES,
            "flops_per_image": counts.flops() / GATE_IMAGES,
        }
    return out


@dataclass
class Change:
    model: str
    metric: str
    baseline: float | None
    current: float | None

    @property
    def ratio(self) -> float | None:
        if self.baseline in (None, 0) or self.current is None:
            return None
        return self.current / self.baseline


def compare(baseline: dict[str, dict[str, float]], current: dict[str, dict[str, float]],
            tolerance: float) -> tuple[list[Change], list[Change], list[str]]:
    """Split changes beyond ``tolerance`` into ``(regressions, improvements, notes)``.

    A model new in the current suite is a note; one that vanished from it is a regression.
    """
    regressions, improvements, notes = [], [], []
    for model in sorted(set(baseline) | set(current)):
        if model not in current:
            regressions.append(Change(model, "missing from the current suite", None, None))
            continue
        if model not in baseline:
            notes.append(f"{model}: new model, not in the baseline (run with --update to add it)")
            continue
        for metric in sorted(baseline[model]):
            b, c = baseline[model][metric], current[model].get(metric)
            change = Change(model, metric, b, c)
            if c is None:
                regressions.append(Change(model, f"{metric} missing from the current run", b, None))
            elif c > b * (1 + tolerance) + 1e-30:
                regressions.append(change)
            elif c < b * (1 - tolerance):
                improvements.append(change)
    return regressions, improvements, notes


def load_baseline(path: Path, expected: dict[str, Any] | None = None) -> dict[str, Any]:
    """The baseline at ``path``, refused unless it was made under ``expected`` (default: the gate's protocol)."""
    from un0_bench.harness.errors import UserError

    expected = protocol() if expected is None else expected
    if not path.is_file():
        raise UserError(f"baseline {path} does not exist (create it with `un0-bench check --update`)")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"baseline {path} is not valid JSON: {e}") from None
    if data.get("protocol") != expected:
        raise UserError(f"baseline {path} was made with another protocol {data.get('protocol')}; "
                        f"this gate uses {expected} (re-create it with --update)")
    return data


def protocol() -> dict[str, Any]:
    return {"images": GATE_IMAGES, "seed": GATE_SEED, "backbone": GATE_BACKBONE, "profile": GATE_PROFILE}


#: The protocol of a baseline made from a run folder's records (``check --run DIR``).
RUN_PROTOCOL = {"source": "records of a run folder (un0-bench check --run DIR)"}


def write_baseline(path: Path, current: dict[str, dict[str, float]], made_with: dict[str, Any] | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"protocol": protocol() if made_with is None else made_with, "models": current},
                               indent=2, sort_keys=True, allow_nan=False) + "\n")


def from_run(folder: Path) -> dict[str, dict[str, float]]:
    """The gated figures of every model measured in a run folder (``un0_bench.measure``, ``run``, ``compare``).

    Per model (``model`` or ``model@backbone`` when the folder holds several backbones, ``/bN`` for
    batch sizes after the first): ``proxy_j_per_image`` and ``flops_per_image`` from its proxy record
    (deterministic), ``<meter>_j_per_image`` from each other meter that measured energy, and
    ``wall_s_per_image``. Failed and unavailable records are left out.
    """
    from un0_bench.harness.errors import UserError
    from un0_bench.harness.running.results import ResultStore

    if not (folder / "results.jsonl").is_file():
        raise UserError(f"{folder} has no results.jsonl (measure into it first)")
    records = [r for r in ResultStore(folder).load() if r.status == "ok"]
    backbones = {r.backbone for r in records}
    first_batch: dict[tuple[str, str], int] = {}
    out: dict[str, dict[str, float]] = {}
    for r in records:
        batch = first_batch.setdefault((r.model, r.backbone), r.batch_size)
        name = r.model + (f"@{r.backbone}" if len(backbones) > 1 else "") + (
            f"/b{r.batch_size}" if r.batch_size != batch else "")
        figures = out.setdefault(name, {})
        if r.meter == "proxy":
            figures["proxy_j_per_image"] = r.energy_j_per_image
            figures["flops_per_image"] = r.flops_per_image
        elif r.meter == "wall":
            figures["wall_s_per_image"] = r.duration_s_per_image
        elif r.energy_j_per_image is not None:
            figures[f"{r.meter}_j_per_image"] = r.energy_j_per_image
    if not out:
        raise UserError(f"{folder} has no measured record (every one failed or was unavailable)")
    return out


def format_changes(changes: list[Change]) -> str:
    lines = [f"{'model':<28} {'metric':<18} {'baseline':>12} {'current':>12} {'ratio':>8}"]
    for c in changes:
        b = "—" if c.baseline is None else f"{c.baseline:.6g}"
        cur = "—" if c.current is None else f"{c.current:.6g}"
        r = "—" if c.ratio is None else f"{c.ratio:.4f}"
        lines.append(f"{c.model:<28} {c.metric:<18} {b:>12} {cur:>12} {r:>8}")
    return "\n".join(lines)
