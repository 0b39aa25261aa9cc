"""Counted ops sorted into the kernel classes the projection charges: classes by op name, views launch nothing,
identical launches grouped with their per-launch size."""

from __future__ import annotations

import torch
from un0_bench.harness.counters.kernels import kernel_class, kernel_groups
from un0_bench.harness.counters.ops import count
from un0_bench.harness.counters.records import OpStat


def test_kernel_class_by_op_name():
    assert kernel_class("aten.convolution.default") == "conv"
    assert kernel_class("aten.addmm.default") == "matmul" and kernel_class("aten.bmm.default") == "matmul"
    assert kernel_class("aten._scaled_dot_product_flash_attention_for_cpu.default") == "attention"
    assert kernel_class("aten.native_group_norm.default") == "norm" and kernel_class("aten._softmax.default") == "norm"
    assert kernel_class("aten.silu.default") == "elementwise" and kernel_class("aten.cat.default") == "elementwise"
    assert kernel_class("quantized.linear_dynamic.default") == "matmul"


def test_groups_drop_views_and_merge_identical_launches():
    stats = [OpStat("aten.view.default", "float16", "compute", "a", calls=7),
             OpStat("aten.mm.default", "float16", "compute", "a", calls=2, flops=200, bytes_read=40, bytes_written=20),
             OpStat("aten.mm.default", "float16", "compute", "b", calls=3, flops=300, bytes_read=60, bytes_written=30),
             OpStat("aten.add.Tensor", "float32", "compute", "a", calls=4, flops=40, bytes_read=96, bytes_written=48)]
    # mm in modules a and b: 100 FLOPs and 30 bytes per launch each -> one group of 5 launches; the view: none.
    assert kernel_groups(stats, "p") == [["p", "elementwise", "float32", 4, 10, 36],
                                         ["p", "matmul", "float16", 5, 100, 30]]


def test_counted_linear_is_one_matmul_and_one_activation_launch():
    lin = torch.nn.Linear(8, 4).eval()
    with torch.no_grad():
        counts = count(lambda x: torch.relu(lin(x)), torch.ones(2, 8), images=2)
    rows = kernel_groups(counts.stats)
    # addmm (2, 8) @ (8, 4): 2 * 2 * 8 * 4 = 128 FLOPs; relu on 8 elements: 8 FLOPs; transposing the weight: no launch.
    assert [(r[1], r[3], r[4]) for r in rows] == [("elementwise", 1, 8), ("matmul", 1, 128)]
