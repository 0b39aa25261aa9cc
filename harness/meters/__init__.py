"""Energy and time meters: one module per meter, all sharing :class:`harness.meters.base.Meter`."""

from harness.meters.base import Meter, MeterUnavailable, Reading

__all__ = ["Meter", "MeterUnavailable", "Reading"]
