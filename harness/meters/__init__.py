"""Energy and time meters: one module per meter, all sharing :class:`un0_bench.harness.meters.base.Meter`."""

from un0_bench.harness.meters.base import Meter, MeterUnavailable, Reading

__all__ = ["Meter", "MeterUnavailable", "Reading"]
