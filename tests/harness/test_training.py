"""harness.training: the energy a trainer records, its loop and its EMA."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from harness import training
from harness.counters.ops import OpCounter
from harness.meters.base import MeterUnavailable
from harness.meters.proxy import proxy_energy
from harness.meters.wall import WallMeter
from harness.training import TrainingEnergy, ema_update, metered_training, run_steps


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
    monkeypatch.setattr(training, "_TRAINING_METERS", ("wall", "missing"))
    monkeypatch.setattr(training, "METERS", SimpleNamespace(get=meters.__getitem__))
    with metered_training() as energy:
        sum(range(1000))
    wall = energy.by_meter["wall"]
    assert wall["status"] == "ok" and wall["energy_j"] is None and 0 < wall["duration_s"] <= energy.duration_s + 1
    assert energy.by_meter["missing"] == {"status": "unavailable: no such counter here", "energy_j": None}


def test_run_steps_steps_the_scheduler_and_hook_each_step():
    seen: list[int] = []

    class Sched:
        n = 0

        def step(self):
            self.n += 1

    sched = Sched()
    losses = iter([3.0, 2.0, 1.0])
    out = run_steps(lambda: next(losses), 3, "test", scheduler=sched, after_step=seen.append, every=2)
    assert out == [3.0, 2.0, 1.0]
    assert (sched.n, seen) == (3, [0, 1, 2])


def test_ema_update_moves_each_parameter_by_one_minus_decay():
    ema, model = torch.nn.Linear(2, 1), torch.nn.Linear(2, 1)
    with torch.no_grad():
        ema.weight.fill_(1.0), ema.bias.fill_(0.0)
        model.weight.fill_(3.0), model.bias.fill_(10.0)
    ema_update(ema, model, decay=0.75)
    # 0.75 * 1 + 0.25 * 3 = 1.5; 0.75 * 0 + 0.25 * 10 = 2.5
    assert ema.weight.tolist() == [[1.5, 1.5]] and ema.bias.tolist() == [2.5]
