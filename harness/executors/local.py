"""The local executor: every cell in this process, one after another, on one workbench."""

from __future__ import annotations

from un0_bench.harness.executors import Executor, OnEvent, OnResult
from un0_bench.harness.running.cell import BenchSpec, Cell, Workbench


class LocalExecutor(Executor):
    """Cells one after another on this host; the meters are made once per run, idle is measured around each cell."""

    name = "local"

    def run(self, spec: BenchSpec, cells: list[Cell], on_result: OnResult, on_event: OnEvent) -> None:
        bench = Workbench(spec, on_event=on_event)
        try:
            bench.open()
            for cell in cells:
                on_event("cell", {"model": cell.model, "batch_size": cell.batch_size})
                on_result(bench.measure(cell))
        finally:
            bench.close()
