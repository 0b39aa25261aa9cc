"""Counted ops as GPU kernels: which kernel class each op launches, and how big each launch is.

The projection (:mod:`un0_bench.harness.projection.roofline`) charges every launched kernel by its class: a GEMM or a
convolution on tensor cores (by dtype), attention (the fused SDPA kernel), or a normalisation or
element-wise kernel bound by the bytes it moves, plus a fixed host cost per launch. This module only
sorts what the counter recorded; it charges nothing.

Kernel classes:

* ``conv``: ``aten.convolution`` (cuDNN on a GPU);
* ``matmul``: ``mm``, ``addmm``, ``bmm``, ``baddbmm`` and the int8 matmuls (cuBLAS);
* ``attention``: the fused scaled-dot-product-attention ops (flash / memory-efficient);
* ``norm``: group, layer and batch norm, softmax (one pass over the bytes, a little arithmetic);
* ``elementwise``: everything else that moves bytes or does arithmetic (adds, activations, copies,
  concatenations, upsampling);
* no kernel: views, reshapes and bare allocations (no bytes moved, no FLOPs): not a launch.

NB: one aten op is taken as one kernel launch. A GPU sometimes runs two (cuDNN's group norm, a
convolution with a separate bias add) or fuses several (the flash attention kernel); the count of
launches is the count of ops that move bytes or compute.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from un0_bench.harness.counters.records import OpStat

__all__ = ["KERNEL_CLASSES", "kernel_class", "kernel_groups"]

#: The kernel classes, in the order reports list them.
KERNEL_CLASSES = ("conv", "matmul", "attention", "norm", "elementwise")

_MATMUL = frozenset({"mm", "addmm", "bmm", "baddbmm", "_int_mm", "_weight_int8pack_mm", "linear", "matmul",
                     "mv", "addmv", "dot", "vdot"})
_NORM = frozenset({"native_group_norm", "native_layer_norm", "native_batch_norm", "_native_batch_norm_legit",
                   "_native_batch_norm_legit_no_training", "_softmax", "_log_softmax", "_safe_softmax"})


def kernel_class(op: str) -> str:
    """The kernel class of an aten overload name (``"aten.convolution.default"`` -> ``"conv"``)."""
    ns, _, rest = op.partition(".")
    name = rest.partition(".")[0]
    if ns == "quantized":
        return "conv" if name.startswith("conv") else "matmul" if name.startswith("linear") else "elementwise"
    if name == "convolution" or name.startswith("cudnn_convolution"):
        return "conv"
    if name in _MATMUL:
        return "matmul"
    if "scaled_dot_product" in name:
        return "attention"
    if name in _NORM:
        return "norm"
    return "elementwise"


def kernel_groups(stats: list[OpStat], phase: str = "") -> list[list[Any]]:
    """Launched kernels of ``stats`` as compact groups of identical launches.

    Returns:
        Rows ``[phase, kernel class, dtype, calls, flops per call, bytes per call]``, sorted, one per
        distinct (class, dtype, per-call FLOPs, per-call bytes); ops that move no bytes and compute
        nothing (views) are left out: they launch no kernel.
    """
    groups: dict[tuple[str, str, int, int], int] = defaultdict(int)
    for s in stats:
        moved = s.bytes_read + s.bytes_written
        if s.calls <= 0 or (moved == 0 and s.flops == 0):
            continue
        # NB: a group (op, dtype, role, module) can mix call sizes (one module called at two shapes);
        # its launches are charged at their mean size.
        key = (kernel_class(s.op), s.dtype, round(s.flops / s.calls), round(moved / s.calls))
        groups[key] += s.calls
    return [[phase, c, d, n, f, b] for (c, d, f, b), n in sorted(groups.items())]
