"""The wall meter: monotonic clock, always available, duration only."""

from __future__ import annotations

import time

from un0_bench.harness.meters.base import Meter, Reading


class WallMeter(Meter):
    """Monotonic wall clock (``time.perf_counter``). Reports duration only, no energy."""

    name = "wall"

    def __init__(self) -> None:
        super().__init__()
        self._t0 = 0.0

    def _start(self) -> None:
        self._t0 = time.perf_counter()

    def _stop(self) -> Reading:
        return Reading(meter=self.name, duration_s=time.perf_counter() - self._t0)
