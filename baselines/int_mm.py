"""``torch._int_mm`` (int8 x int8 -> int32) behind a guard: canonical strides and a first-use self-check.

``torch._int_mm`` is a private kernel, and on some CPUs it silently returns wrong products: on the
2-core Sapphire Rapids host (torch 2.13.0+cpu) an activation of shape (4, 1) with strides (1, 2) (a
reshape of an ``unfold`` view) gives numbers in the millions where the exact product is below 400,
a different number on every call. Such a tensor counts as contiguous (the stride of a size-1
dimension is ignored), so ``.contiguous()`` returns it unchanged and does not help.

The guard therefore does two things:

* every operand is passed with canonical strides (:func:`canonical`): ``a`` row-major, ``b``
  row-major or the transpose of a row-major matrix (the layout of a weight ``w.t()``, which int8
  GEMMs take natively); anything else is copied once;
* before the first product per (device type, operand dtypes) the kernel multiplies a fixed set of
  small matrices (odd sizes, one-column and one-row cases) in both layouts of ``b`` and is compared
  with the exact int32 product (an int64 matmul); a wrong kernel is refused with one clear line
  naming the kernel and the host, and the verdict is cached.

torchao's W8A8 linear (``baselines/torchao_int8.py``) also ends in ``torch._int_mm`` (int8 x int8,
or uint8 x int8 on AVX512-VNNI CPUs without AMX), with a row-major activation and a transposed
weight; the technique runs the self-check on torchao's layouts for those operand dtypes before it quantises,
and gives torchao no linear with a single input feature (the one-column case that fails above).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from un0_bench.harness.errors import UserError

#: (M, K, N) of the self-check: one-column and one-row operands, odd sizes, M <= 16 and M > 16.
CHECK_SHAPES = ((4, 1, 5), (1, 7, 3), (3, 9, 1), (17, 33, 8), (5, 64, 40))


class IntMMError(UserError):
    """The int8 matmul kernel gives wrong results on this host."""


def _row_major_strides(shape: torch.Size) -> tuple[int, ...]:
    strides, step = [], 1
    for size in reversed(shape):
        strides.append(step)
        step *= max(size, 1)
    return tuple(reversed(strides))


def canonical(a: torch.Tensor, allow_transposed: bool = False) -> torch.Tensor:
    """``a`` with row-major strides (every dimension, size-1 ones too); copied only if it lacks them.

    Args:
        a: A 2-D tensor.
        allow_transposed: Also accept the transpose of a row-major matrix (strides ``(1, rows)``).
    """
    if a.stride() == _row_major_strides(a.shape):
        return a
    # A size-1 dimension makes the transposed layout ambiguous: (1, 5) with strides (1, 1) is both
    # "row-major" and "transposed" to torch, and the CPU kernel gets it wrong (the self-check's
    # (4, 1) x (1, 5) case), so such an operand is copied to plain row-major.
    if allow_transposed and 1 not in a.shape and a.t().stride() == _row_major_strides(a.t().shape):
        return a
    # clone(contiguous_format) rewrites the strides of size-1 dimensions too; .contiguous() would not.
    return a.clone(memory_format=torch.contiguous_format)


def _host(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    from un0_bench.harness.measuring.environment import cpu_model

    return cpu_model()


class CheckedIntMM:
    """An int8 matmul kernel ``(M, K) x (K, N) -> (M, N) int32`` with canonical operands and a self-check.

    Args:
        kernel: The kernel (``torch._int_mm``; tests pass a fake).
        name: Its name in the refusal.
    """

    def __init__(self, kernel: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
                 name: str = "torch._int_mm") -> None:
        self.kernel = kernel if kernel is not None else torch._int_mm
        self.name = name
        self._checked: set[tuple[str, torch.dtype, torch.dtype, str]] = set()

    def check(self, device: torch.device | str, a_dtype: torch.dtype = torch.int8,
              b_dtype: torch.dtype = torch.int8, operands: str = "guarded") -> None:
        """Compare the kernel with the exact product on :data:`CHECK_SHAPES`, once per device type and dtypes.

        Args:
            device: Where the kernel runs.
            a_dtype: Activation dtype (int8, or uint8 for torchao's u8s8 path).
            b_dtype: Weight dtype.
            operands: ``guarded``: as :meth:`__call__` passes them (canonical strides);
                ``torchao``: as torchao 0.18 passes them (row-major activation, ``w.contiguous().t()``),
                on the shapes with K > 1 (torchao is given no linear with one input feature).

        Raises:
            IntMMError: If any product differs from the exact one.
        """
        device = torch.device(device)
        key = (device.type, a_dtype, b_dtype, operands)
        if key in self._checked or device.type == "meta":  # nothing runs on the meta device
            return
        g = torch.Generator().manual_seed(0)
        lo = 0 if a_dtype == torch.uint8 else -127
        for m, k, n in CHECK_SHAPES:
            a = torch.randint(lo, 128, (m, k), dtype=a_dtype, generator=g)
            w = torch.randint(-127, 128, (n, k), dtype=b_dtype, generator=g)
            exact = a.long() @ w.long().t()  # (M, N): the int32 product, computed exactly in int64
            # NB: on CUDA the kernel needs M > 16 and K, N multiples of 8; only (5, 64, 40) after
            # padding to 17 rows fits, which is the case the int8 layers use there.
            if device.type == "cuda" and (k % 8 or n % 8):
                continue
            if operands == "torchao" and k == 1:
                continue
            rows = max(m, 17) if device.type == "cuda" else m
            a_dev = torch.cat([a, a.new_zeros(rows - m, k)]).to(device)
            # The weight row-major (K, N), and transposed (the layout of w.t()).
            for b in (w.t().clone(memory_format=torch.contiguous_format), w.contiguous().t()):
                b = b.to(device)
                got = (self.kernel(a_dev, b) if operands == "torchao" else
                       self.kernel(canonical(a_dev), canonical(b, allow_transposed=True)))[:m].cpu()
                if got.dtype != torch.int32 or not torch.equal(got.long(), exact):
                    err = int((got.long() - exact).abs().max()) if got.shape == exact.shape else "shape"
                    raise IntMMError(
                        f"{self.name} gives wrong {str(a_dtype).removeprefix('torch.')} x "
                        f"{str(b_dtype).removeprefix('torch.')} products on this host ({device.type}: "
                        f"{_host(device)}, torch {torch.__version__}): ({m}, {k}) x ({k}, {n}) is off by up to "
                        f"{err}; int8 cannot run here (use bf16, or another torch build)")
        self._checked.add(key)

    def __call__(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """``a (M, K) @ b (K, N)`` in int32, both with canonical strides, after the self-check."""
        self.check(a.device, a.dtype, b.dtype)
        return self.kernel(canonical(a), canonical(b, allow_transposed=True))


#: The one guarded ``torch._int_mm`` of the project.
int_mm = CheckedIntMM()
