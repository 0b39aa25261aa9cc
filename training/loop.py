"""What every trainer shares: the deterministic step loop, its schedule and EMA, and the metadata it writes.

The energy a run spends is metered by :mod:`~un0_bench.harness.weights.derivation` (which a technique that
calibrates when it is built uses too); this module is the rest of a training run.
"""

from __future__ import annotations

import contextlib
import platform
import shlex
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from un0_bench.harness.measuring.environment import git_commit
from un0_bench.harness.weights.derivation import TrainingEnergy


def run_steps(train_step: Callable[[], float], steps: int, desc: str, *, scheduler: Any = None,
              after_step: Callable[[int], None] | None = None, every: int = 25) -> list[float]:
    """Call ``train_step()`` ``steps`` times under a progress bar; returns the losses.

    After each step the learning-rate ``scheduler`` steps and ``after_step(step)`` runs (e.g. an EMA
    update); the bar shows the mean loss of the last ``every`` steps.
    """
    advance = progress(steps, desc)
    losses: list[float] = []
    with deterministic_algorithms():
        for step in range(steps):
            losses.append(train_step())
            if scheduler is not None:
                scheduler.step()
            if after_step is not None:
                after_step(step)
            if (step + 1) % every == 0 or step == steps - 1:
                recent = losses[-every:]
                advance((step % every) + 1, f"loss {sum(recent) / len(recent):.4f}")
    return losses


@contextlib.contextmanager
def deterministic_algorithms() -> Iterator[None]:
    """Run the block with ``torch.use_deterministic_algorithms(True)``, then restore the setting.

    Why: a shipped file must be reproducible from its seed. With two or more threads, some CPU
    kernels accumulate in an order that varies from run to run. Measured here: two 2-thread runs
    of ``un0-bench train un0`` gave different weights (its backward sums gathered rows of units
    that several prompts keep), while 1-thread runs, or 2-thread runs in this mode, were identical.
    The other trainers gave the same bits with and without this mode.

    Every trainer that uses it runs on the CPU. A CUDA trainer would also need
    ``CUBLAS_WORKSPACE_CONFIG=:4096:8`` in the environment, or cuBLAS matmuls raise in this mode.
    """
    import torch

    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before)


def one_cycle(optimizer: Any, max_lr: float, total_steps: int, pct_start: float) -> Any:
    """``torch.optim.lr_scheduler.OneCycleLR`` that works for any ``total_steps >= 1``.

    OneCycleLR divides by ``pct_start * total_steps - 1``, so it crashes when the warm-up is exactly
    one step long (20 steps at 5%). Here the warm-up lasts at least two steps (at most 3/4 of a
    very short run). Runs long enough for ``pct_start`` to give two steps, which includes every
    shipped run, get exactly the schedule they asked for.
    """
    import torch

    if isinstance(total_steps, bool) or not isinstance(total_steps, int) or total_steps < 1:
        raise ValueError(f"total_steps must be a positive integer, got {total_steps!r}")
    pct = max(pct_start, min(0.75, 2 / total_steps))
    return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=max_lr, total_steps=total_steps, pct_start=pct)


def ema_update(ema: Any, model: Any, decay: float) -> None:
    """Move every parameter of ``ema`` towards ``model``'s: ``ema = decay * ema + (1 - decay) * model``."""
    import torch

    with torch.no_grad():
        for pe, p in zip(ema.parameters(), model.parameters(), strict=True):
            pe.lerp_(p, 1.0 - decay)


def train_command(target: str, **options: Any) -> str:
    """The command that reproduces a run, options in the order given (``_`` written ``-``).

    ``train_command("judge", steps=3, seed=1)`` is ``un0-bench train judge --steps 3 --seed 1``.
    """
    return " ".join([f"un0-bench train {target}", *(f"--{k.replace('_', '-')} {v}" for k, v in options.items())])


def training_metadata(
    *, kind: str, config: dict[str, Any], energy: TrainingEnergy, extra: dict[str, Any],
    losses: list[float] | None = None, command: str | None = None, train: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Metadata JSON written beside a weights file.

    Args:
        kind: What was made (``"digits-judge"``).
        config: The config the file is checked against when loaded.
        energy: What the run spent.
        extra: Further entries (they override the ones above).
        losses: The run's losses; the mean of the last 50 is ``final_loss``.
        command: The command that reproduces the file (default: this process's command line).
        train: The run's settings (seed, steps, learning rate, ...).
    """
    import torch

    return {
        "kind": kind,
        "config": config,
        "command": command if command is not None else (
            "un0-bench " + " ".join(shlex.quote(a) for a in sys.argv[1:])
            if Path(sys.argv[0]).name == "un0-bench" else " ".join(shlex.quote(a) for a in sys.argv)),
        "duration_s": energy.duration_s,
        "energy": energy.by_meter,
        "torch": torch.__version__,
        # The same seed reproduces a file bit for bit only at the same thread count: matmul
        # blocking, and so float rounding, follows the number of threads.
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "git_commit": git_commit(),
        "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        **({"final_loss": sum(losses[-50:]) / len(losses[-50:])} if losses else {}),
        **({"train": train} if train is not None else {}),
        **extra,
    }


def progress(total: int, desc: str) -> Callable[[int, str], None]:
    """A rich progress bar for training loops; returns ``advance(n, status_text)``."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    bar = Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                   TimeRemainingColumn(), TextColumn("{task.fields[status]}"), transient=False)
    task = bar.add_task(desc, total=total, status="")
    bar.start()

    def advance(n: int, status: str = "") -> None:
        bar.update(task, advance=n, status=status)
        if bar.tasks[task].completed >= total:
            bar.stop()

    return advance
