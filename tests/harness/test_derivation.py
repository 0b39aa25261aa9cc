"""un0_bench.harness.weights.derivation: the energy a derivation (training, calibration) records."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from un0_bench.harness.counters.ops import OpCounter
from un0_bench.harness.meters.base import MeterUnavailable
from un0_bench.harness.meters.proxy import proxy_energy
from un0_bench.harness.meters.wall import WallMeter
from un0_bench.harness.weights import derivation
from un0_bench.harness.weights.derivation import TrainingEnergy, metered_training


def test_count_proxy_runs_one_step_and_charges_every_step():
    a, b = torch.ones(2, 3), torch.ones(3, 4)
    calls = []

    def step():
        calls.append(1)
        return a @ b

    energy = TrainingEnergy()
    energy.count_proxy(step, images=8, steps=10)
    with OpCounter() as c:
        a @ b
    one_step_j = proxy_energy(c.counts(images=8)).total_j
    proxy = energy.by_meter["proxy"]
    assert len(calls) == 1
    # (2x3) @ (3x4): 2 * 2 * 3 * 4 = 48 FLOPs a step, 10 steps.
    assert proxy["flops"] == 480
    assert proxy["energy_j"] == pytest.approx(10 * one_step_j, rel=1e-12)
    assert proxy["energy_j"] > 0
    assert (proxy["status"], proxy["profile"]) == ("ok", "horowitz-45nm")
    assert proxy["note"] == "counted cost of one training step x 10 steps"


def test_add_parent_nests_the_parents_energy_and_skips_none():
    energy = TrainingEnergy()
    energy.add_parent("teacher", {"energy": {"proxy": {"energy_j": 180.0}}})
    energy.add_parent("missing", None)
    assert energy.by_meter == {"includes": {"teacher": {"proxy": {"energy_j": 180.0}}}}


def test_metered_training_records_unavailable_meters_with_a_reason(monkeypatch):
    class Missing:
        def __init__(self):
            raise MeterUnavailable("no such counter here")

    meters = {"wall": WallMeter, "missing": Missing}
    monkeypatch.setattr(derivation, "_TRAINING_METERS", ("wall", "missing"))
    monkeypatch.setattr(derivation, "METERS", SimpleNamespace(get=meters.__getitem__))
    with metered_training() as energy:
        sum(range(1000))
    wall = energy.by_meter["wall"]
    assert wall["status"] == "ok" and wall["energy_j"] is None and 0 < wall["duration_s"] <= energy.duration_s + 1
    assert energy.by_meter["missing"] == {"status": "unavailable: no such counter here", "energy_j": None}
