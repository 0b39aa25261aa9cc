"""un0_bench.training.loop: a trainer's step loop, its schedule, its EMA and its metadata."""

from __future__ import annotations

import pytest
import torch
from un0_bench.harness.weights.derivation import TrainingEnergy
from un0_bench.training.loop import (
    deterministic_algorithms,
    ema_update,
    one_cycle,
    run_steps,
    train_command,
    training_metadata,
)


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


def test_training_metadata_final_loss_is_the_mean_of_the_last_50_losses():
    losses = [100.0] * 10 + [float(i) for i in range(50)]  # the last 50: 0..49, mean 24.5
    meta = training_metadata(kind="k", config={}, energy=TrainingEnergy(), extra={}, losses=losses)
    assert meta["final_loss"] == 24.5
    assert "final_loss" not in training_metadata(kind="k", config={}, energy=TrainingEnergy(), extra={})


def test_train_command_writes_the_options_in_order():
    assert train_command("teacher", steps=2, batch_size=4, seed=3) == (
        "un0-bench train teacher --steps 2 --batch-size 4 --seed 3")
    meta = training_metadata(kind="k", config={}, energy=TrainingEnergy(), extra={},
                             command=train_command("judge", steps=1, seed=0), train={"seed": 0})
    assert (meta["command"], meta["train"]) == ("un0-bench train judge --steps 1 --seed 0", {"seed": 0})
