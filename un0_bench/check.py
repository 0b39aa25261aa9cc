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

from un0_bench.harness.generator import GenerationRequest
from un0_bench.harness.protocol import count_ops
from un0_bench.harness.registry import GENERATORS
from un0_bench.harness.runner import load_backbone
from un0_bench.harness.stack import make_generator

#: The gate's fixed protocol: few images, one batch, digits backbone, default profile.
GATE_IMAGES = 10
GATE_SEED = 0
GATE_BACKBONE = "digits"
GATE_PROFILE = "horowitz-45nm"


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
        for metric in ("proxy_j_per_image", "flops_per_image"):
            b, c = baseline[model][metric], current[model][metric]
            change = Change(model, metric, b, c)
            if c > b * (1 + tolerance) + 1e-30:
                regressions.append(change)
            elif c < b * (1 - tolerance):
                improvements.append(change)
    return regressions, improvements, notes


def load_baseline(path: Path) -> dict[str, Any]:
    from un0_bench.harness.errors import UserError

    if not path.is_file():
        raise UserError(f"baseline {path} does not exist (create it with `un0-bench check --update`)")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"baseline {path} is not valid JSON: {e}") from None
    if data.get("protocol") != protocol():
        raise UserError(f"baseline {path} was made with another protocol {data.get('protocol')}; "
                        f"this gate uses {protocol()} (re-create it with --update)")
    return data


def protocol() -> dict[str, Any]:
    return {"images": GATE_IMAGES, "seed": GATE_SEED, "backbone": GATE_BACKBONE, "profile": GATE_PROFILE}


def write_baseline(path: Path, current: dict[str, dict[str, float]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"protocol": protocol(), "models": current}, indent=2, sort_keys=True,
                               allow_nan=False) + "\n")


def format_changes(changes: list[Change]) -> str:
    lines = [f"{'model':<28} {'metric':<18} {'baseline':>12} {'current':>12} {'ratio':>8}"]
    for c in changes:
        b = "—" if c.baseline is None else f"{c.baseline:.6g}"
        cur = "—" if c.current is None else f"{c.current:.6g}"
        r = "—" if c.ratio is None else f"{c.ratio:.4f}"
        lines.append(f"{c.model:<28} {c.metric:<18} {b:>12} {cur:>12} {r:>8}")
    return "\n".join(lines)
