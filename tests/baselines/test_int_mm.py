"""The guarded ``torch._int_mm``: canonical operands and the first-use self-check (baselines/int_mm.py)."""

import pytest
import torch
from un0_bench.baselines.int_mm import CHECK_SHAPES, CheckedIntMM, IntMMError, canonical, int_mm


def _exact(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a.long() @ b.long()).to(torch.int32)


def _odd_stride_operand() -> torch.Tensor:
    """The activation of a 1x1 int8 conv on (2, 1, 1, 2) images: (4, 1) with strides (1, 2)."""
    base = torch.tensor([100, -7, 55, 3, -120], dtype=torch.int8)
    a = base.as_strided((4, 1), (1, 2))  # rows 100, -7, 55, 3
    assert a.is_contiguous() and a.contiguous().stride() == (1, 2)  # .contiguous() does not fix it
    return a


def _row_major(t: torch.Tensor) -> bool:
    return t.stride() == torch.empty(t.shape).stride()


def test_canonical_copies_the_odd_stride_operand_and_keeps_the_others():
    a = _odd_stride_operand()
    c = canonical(a)
    assert c.stride() == (1, 1) and torch.equal(c, a)
    w = torch.ones(5, 3, dtype=torch.int8)
    assert canonical(w) is w
    assert canonical(w.t(), allow_transposed=True).data_ptr() == w.data_ptr()  # a view of w: no copy
    assert canonical(w.t()).stride() == (5, 1)  # not allowed transposed: copied to row-major
    # (5, 1) transposed to (1, 5) has strides (1, 1): ambiguous, so copied to plain row-major.
    one = torch.ones(5, 1, dtype=torch.int8).t()
    assert canonical(one, allow_transposed=True).stride() == (5, 1)


def test_the_real_kernel_through_the_guard_is_exact_on_the_odd_stride_operand():
    a = _odd_stride_operand()
    b = torch.tensor([[3, -2, 1, 127, -127]], dtype=torch.int8)  # (1, 5)
    # Row i is a[i] * (3, -2, 1, 127, -127): 100 -> (300, -200, 100, 12700, -12700),
    # -7 -> (-21, 14, -7, -889, 889), 55 -> (165, -110, 55, 6985, -6985), 3 -> (9, -6, 3, 381, -381).
    expected = torch.tensor([[300, -200, 100, 12700, -12700], [-21, 14, -7, -889, 889],
                             [165, -110, 55, 6985, -6985], [9, -6, 3, 381, -381]], dtype=torch.int32)
    assert torch.equal(_exact(a, b), expected)
    for _ in range(3):  # the unguarded kernel gave a different wrong number on each call here
        assert torch.equal(int_mm(a, b), expected)


def _kernel_wrong_on_odd_strides(calls: list):
    """A stand-in for the host bug: exact on row-major operands (or a transposed b without size-1
    dimensions), garbage otherwise."""
    def kernel(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        calls.append((a.stride(), b.stride()))
        b_ok = _row_major(b) or (1 not in b.shape and _row_major(b.t()))
        garbage = torch.full((a.shape[0], b.shape[1]), 289_319, dtype=torch.int32)
        return _exact(a, b) if _row_major(a) and b_ok else garbage
    return kernel


def test_guard_hands_a_stride_sensitive_kernel_only_canonical_operands():
    calls: list = []
    guarded = CheckedIntMM(_kernel_wrong_on_odd_strides(calls))
    a = _odd_stride_operand()
    b = torch.tensor([[1], [2], [3], [4], [5]], dtype=torch.int8).t()  # (1, 5) strides (1, 1)
    assert b.stride() == (1, 1)
    assert torch.equal(guarded(a, b), _exact(a, b))
    assert calls[-1] == ((1, 1), (5, 1))  # both operands were copied to row-major
    # The unguarded call is wrong: this is what the guard prevents.
    assert not torch.equal(_kernel_wrong_on_odd_strides([])(a, b), _exact(a, b))


def test_self_check_refuses_a_wrong_kernel_once_in_one_line():
    calls = []

    def off_by_one(a, b):
        calls.append(1)
        return _exact(a, b) + 1

    guarded = CheckedIntMM(off_by_one)
    a = torch.ones(2, 3, dtype=torch.int8)
    with pytest.raises(IntMMError, match=r"^torch\._int_mm gives wrong int8 x int8 products on this host "
                                         r"\(cpu: .+, torch .+\): \(4, 1\) x \(1, 5\) is off by up to 1; int8 "
                                         r"cannot run here") as e:
        guarded(a, a.t())
    assert "\n" not in str(e.value)
    assert len(calls) == 1  # the first check case already failed; the product itself never ran


def test_self_check_runs_once_per_device_and_dtypes():
    calls = []

    def exact(a, b):
        calls.append(1)
        return _exact(a, b)

    guarded = CheckedIntMM(exact)
    a = torch.ones(2, 3, dtype=torch.int8)
    guarded(a, a.t())
    # The check: every shape in two weight layouts, then the product itself.
    assert len(calls) == 2 * len(CHECK_SHAPES) + 1
    guarded(a, a.t())
    assert len(calls) == 2 * len(CHECK_SHAPES) + 2
    guarded.check("cpu", torch.uint8, torch.int8, operands="torchao")  # torchao's layouts: shapes with K > 1
    assert len(calls) == 2 * len(CHECK_SHAPES) + 2 + 2 * sum(k > 1 for _, k, _ in CHECK_SHAPES)
    guarded.check("meta")  # nothing runs on the meta device
    assert len(calls) == 2 * len(CHECK_SHAPES) + 2 + 2 * sum(k > 1 for _, k, _ in CHECK_SHAPES)
