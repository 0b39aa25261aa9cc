"""un0_bench.harness.training: the energy a trainer records, its loop and its EMA."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from un0_bench.harness import training
from un0_bench.harness.counters.ops import OpCounter
from un0_bench.harness.meters.base import MeterUnavailable
from un0_bench.harness.meters.proxy import proxy_energy
from un0_bench.harness.meters.wall import WallMeter
from un0_bench.harness.training import (
    TrainingEnergy,
    deterministic_algorithms,
    ema_update,
    metered_training,
    one_cycle,
    run_steps,
    training_metadata,
)


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


@pytest.mark.parametrize("before", [False, True])
def test_deterministic_algorithms_is_on_inside_and_restored_after(before):
    torch.use_deterministic_algorithms(before)
    try:
        with deterministic_algorithms():
            assert torch.are_deterministic_algorithms_enabled()
        assert torch.are_deterministic_algorithms_enabled() is before
        with pytest.raises(RuntimeError, match="boom"), deterministic_algorithms():
            raise RuntimeError("boom")
        assert torch.are_deterministic_algorithms_enabled() is before
    finally:
        torch.use_deterministic_algorithms(False)


def test_run_steps_trains_with_deterministic_algorithms():
    seen: list[bool] = []
    run_steps(lambda: seen.append(torch.are_deterministic_algorithms_enabled()) or 0.0, 2, "test")
    assert seen == [True, True] and not torch.are_deterministic_algorithms_enabled()


def _lrs(sched, steps: int) -> list[float]:
    lrs = [sched.get_last_lr()[0]]
    for _ in range(steps):
        sched.optimizer.step()
        sched.step()
        lrs.append(sched.get_last_lr()[0])
    return lrs


@pytest.mark.parametrize("total_steps", [1, 2, 3, 4, 10, 20, 21, 39, 40])
@pytest.mark.parametrize("pct_start", [0.05, 0.1])
def test_one_cycle_runs_any_length(total_steps, pct_start):
    # torch's OneCycleLR divides by zero at 20 steps x 5% and 10 steps x 10% (a 1-step warm-up).
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    lrs = _lrs(one_cycle(opt, 0.1, total_steps, pct_start), total_steps)
    assert all(0.0 < lr <= 0.1 + 1e-12 for lr in lrs[:-1])
    if total_steps >= 3:
        # The peak falls at step pct * total_steps - 1, often between two steps; the nearest one
        # comes within 5% of it (21 steps x 10%: peak at 1.1, step 1 gets 0.099998).
        assert max(lrs) == pytest.approx(0.1, rel=0.05)


def test_one_cycle_is_torchs_schedule_when_the_warm_up_has_two_steps():
    # 1,500 steps x 5% = 75 warm-up steps, as the shipped teacher run: the schedule must not move.
    a = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    b = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    ours = _lrs(one_cycle(a, 3e-3, 1500, 0.05), 1500)
    torchs = _lrs(torch.optim.lr_scheduler.OneCycleLR(b, max_lr=3e-3, total_steps=1500, pct_start=0.05), 1500)
    assert ours == torchs


@pytest.mark.parametrize("bad", [0, -1, 2.5, True])
def test_one_cycle_refuses_a_bad_length(bad):
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    with pytest.raises(ValueError, match="total_steps must be a positive integer"):
        one_cycle(opt, 0.1, bad, 0.05)


def test_training_metadata_records_the_thread_count():
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        meta = training_metadata(kind="k", config={"a": 1}, energy=TrainingEnergy(duration_s=2.5),
                                 extra={"seed": 7})
    finally:
        torch.set_num_threads(before)
    assert (meta["torch_threads"], meta["kind"], meta["config"], meta["duration_s"], meta["seed"]) == (
        1, "k", {"a": 1}, 2.5, 7)
    assert meta["torch"] == torch.__version__
