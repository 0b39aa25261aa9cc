"""The record of one counting pass: per-op totals, and how they split by role, dtype and module.

These are plain data; :mod:`un0_bench.harness.counters.ops` produces them and the proxy meter and the runner
consume them.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

#: Role of an op for the accounting boundaries. Ops run inside a module marked as gating (see
#: :func:`un0_bench.harness.counters.ops.mark_gating`) or inside ``gating_scope()`` get ``"gating"``.
ROLES = ("compute", "gating")


@dataclass
class OpStat:
    """Totals for one (op, dtype, role, module) group.

    Attributes:
        op: aten overload name, e.g. ``"aten.convolution.default"``.
        dtype: dtype the op computed in (e.g. ``"float32"``, ``"int8"``), from its tensor operands.
        role: ``"compute"`` or ``"gating"``.
        module: dotted module path the op ran inside (``""`` at top level).
        calls: number of times the op ran.
        flops: floating or integer operations (one MAC = 2 FLOPs); 0 for ops with no formula.
        bytes_read: bytes of tensor inputs.
        bytes_written: bytes of tensor outputs.
        counted: False when the op has no FLOP formula (so its FLOPs are unknown, not zero).
    """

    op: str
    dtype: str
    role: str
    module: str
    calls: int = 0
    flops: int = 0
    bytes_read: int = 0
    bytes_written: int = 0
    counted: bool = True


@dataclass
class Counts:
    """Everything one counting pass saw, with the number of images it produced.

    All totals are for the whole pass; divide by ``images`` for per-image figures.
    """

    images: int
    stats: list[OpStat] = field(default_factory=list)

    # -- totals ---------------------------------------------------------------------------------
    def flops(self, role: str | None = None) -> int:
        return sum(s.flops for s in self.stats if role is None or s.role == role)

    def bytes_moved(self, role: str | None = None) -> int:
        return sum(s.bytes_read + s.bytes_written for s in self.stats if role is None or s.role == role)

    def flops_by_dtype(self, role: str | None = None) -> dict[str, int]:
        out: dict[str, int] = defaultdict(int)
        for s in self.stats:
            if role is None or s.role == role:
                out[s.dtype] += s.flops
        return dict(out)

    def uncounted_ops(self) -> dict[str, int]:
        """Ops that ran with no FLOP formula, with their call counts."""
        out: dict[str, int] = defaultdict(int)
        for s in self.stats:
            if not s.counted:
                out[s.op] += s.calls
        return dict(sorted(out.items()))

    def scaled(self, images: int) -> Counts:
        """The same work charged to a different image count (used when a pass covered a batch)."""
        return Counts(images=images, stats=self.stats)

    def to_dict(self) -> dict[str, Any]:
        return {"images": self.images, "stats": [vars(s) for s in self.stats]}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Counts:
        return cls(images=int(d["images"]), stats=[OpStat(**s) for s in d["stats"]])
