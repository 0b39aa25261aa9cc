"""The energy a derivation spends (training, calibration), by meter: what the ledger's last boundary charges.

Every shipped model records what it cost to make (``derivation.energy`` per meter) so the ledger's
"amortised training" boundary can charge it. The whole-host meters watch the run from outside; the
proxy figure is the counted cost of one step times the number of steps, so it is deterministic like
every proxy figure. The trainers (``training/``) and a technique that calibrates when it is built
(``contextual``) meter themselves with :func:`metered_training`.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from un0_bench.harness.meters.proxy import DEFAULT_PROFILE
from un0_bench.harness.registry import METERS

# Meters that can watch a long training run from outside (proxy is computed from counts instead).
_TRAINING_METERS = ("wall", "rapl", "nvml", "codecarbon")


@dataclass
class TrainingEnergy:
    """Energy spent deriving a model, by meter. Filled by :func:`metered_training`."""

    by_meter: dict[str, dict[str, Any]] = field(default_factory=dict)
    duration_s: float = 0.0

    def add_proxy(self, step_counts: Any, steps: int, profile: str = DEFAULT_PROFILE) -> None:
        """Charge ``steps`` training steps at the proxy cost of one counted step."""
        from un0_bench.harness.meters.proxy import get_profile, proxy_energy

        per_step = proxy_energy(step_counts, get_profile(profile))
        self.by_meter["proxy"] = {
            "status": "ok",
            "energy_j": per_step.total_j * steps,
            "flops": step_counts.flops() * steps,
            "profile": profile,
            "note": f"counted cost of one training step x {steps} steps",
        }

    def count_proxy(self, step: Callable[[], Any], images: int, steps: int) -> None:
        """Run ``step`` once more under the op counter and charge ``steps`` steps at its proxy cost.

        One step stands for all: every step runs the same ops on the same shapes. The extra step
        changes a trainer's raw weights, so trainers save from an EMA or a copy taken before it.
        """
        from un0_bench.harness.counters.ops import OpCounter

        with OpCounter() as counter:
            step()
        self.add_proxy(counter.counts(images=images), steps)

    def add_parent(self, name: str, parent: dict[str, Any] | None) -> None:
        """Include the derivation energy of the model this one was derived from (e.g. the teacher)."""
        if parent:
            self.by_meter.setdefault("includes", {})[name] = parent.get("energy", {})


@contextlib.contextmanager
def metered_training() -> Iterator[TrainingEnergy]:
    """Meter a training run with every whole-host meter that works here; unavailable ones say why."""
    result = TrainingEnergy()
    meters = []
    for name in _TRAINING_METERS:
        try:
            meter = METERS.get(name)()
            meter.start()
            meters.append(meter)
        except Exception as e:  # a meter that cannot run is recorded with its reason, not as 0 J
            result.by_meter[name] = {"status": f"unavailable: {e}", "energy_j": None}
    t0 = time.perf_counter()
    try:
        yield result
    finally:
        result.duration_s = time.perf_counter() - t0
        for meter in meters:
            try:
                r = meter.stop()
                result.by_meter[meter.name] = {
                    "status": r.status,
                    "energy_j": r.total_energy_j,
                    "duration_s": r.duration_s,
                    **{k: v for k, v in r.details.items() if isinstance(v, (str, int, float, bool))},
                }
            finally:
                meter.close()
