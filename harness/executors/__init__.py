"""Executors: who measures the cells of a run, and where.

The runner (the driver) plans the cells and alone writes the output folder; an executor hands each
:class:`~un0_bench.harness.running.cell.Cell` to a :class:`~un0_bench.harness.running.cell.Workbench` somewhere and
passes every :class:`~un0_bench.harness.running.cell.CellResult` back as soon as it is in. ``local`` measures
the cells one after another in this process; ``ray`` (:mod:`~un0_bench.harness.executors.ray`, an
optional extra) runs one task per cell on a Ray cluster.
"""

from __future__ import annotations

import abc
from collections.abc import Callable
from typing import Any

from un0_bench.harness.errors import UserError
from un0_bench.harness.running.cell import BenchSpec, Cell, CellResult
from un0_bench.harness.running.config import ExecutorConfig

OnResult = Callable[[CellResult], None]
OnEvent = Callable[[str, dict[str, Any]], None]


class Executor(abc.ABC):
    """Measures cells and hands back their results, in any order, one at a time."""

    #: What records name as their ``executor``.
    name: str = "executor"

    def check(self, spec: BenchSpec) -> None:
        """Pre-flight, before any cell: refuse with a :class:`UserError` what cannot run (default: nothing)."""

    @abc.abstractmethod
    def run(self, spec: BenchSpec, cells: list[Cell], on_result: OnResult, on_event: OnEvent) -> None:
        """Measure ``cells``; call ``on_result`` in the calling thread for each, as it finishes."""


def make_executor(config: ExecutorConfig) -> Executor:
    """The executor ``config`` describes, checked first.

    ``local``, ``ray`` (the cluster at ``RAY_ADDRESS``, or a local one) or ``ray:ADDRESS``.
    """
    config.validate()
    text = config.executor
    name, _, address = text.partition(":")
    if name == "local" and not address:
        from un0_bench.harness.executors.local import LocalExecutor

        return LocalExecutor()
    if name == "ray":
        from un0_bench.harness.executors.ray import RayExecutor

        return RayExecutor(address or None, retries=config.retries, allow_mixed=config.allow_mixed,
                           cpus_per_cell=config.cell_cpus)
    raise UserError(f"unknown executor {text!r}: use local, ray (the cluster at RAY_ADDRESS, or a local one) or "
                    f"ray:ADDRESS")
