"""Count what a model executed, op by op: FLOPs, dtype, bytes moved, module path and role.

``OpCounter`` is a :class:`~torch.utils._python_dispatch.TorchDispatchMode`: every aten (and
``quantized::``) op that runs inside it, forward or backward, is recorded into
:class:`~un0_bench.harness.counters.records.OpStat` groups keyed by (op overload, dtype, role, module path)::

    with OpCounter(root=model) as c:
        model(x)
    counts = c.counts(images=x.shape[0])

or ``counts = count(model, x, images=x.shape[0])``.

Counting is its own pass: a dispatch mode costs a Python call per op, so it must never be active
while a meter times a run (see :func:`counting_active`).

FLOP formulas (one MAC = 2 FLOPs, the convention of ``torch.utils.flop_counter``):

* matmuls, convolutions and attention: torch's ``flop_registry``, plus formulas registered here
  for what it misses on CPU (``_scaled_dot_product_flash_attention_for_cpu`` and its backward),
  int8 compute (``_int_mm``, ``quantized::conv*`` / ``quantized::linear*``) and ``mv``/``dot``;
* elementwise arithmetic and activations: 1 FLOP per output element;
* reductions: 1 FLOP per input element;
* normalisations and softmax: a small documented constant per element;
* data movement (views, copies, concatenation, gathers, allocation): 0 FLOPs, counted;
* anything else: ``counted=False``, listed by :meth:`Counts.uncounted_ops`.

Add a formula with ``@register_formula(torch.ops.aten.some_op)``.

Bytes: ``bytes_read`` is the size of every tensor input (tensors inside lists included, and the
weights inside packed-parameter objects of quantized ops); ``bytes_written`` the size of every
tensor output. Ops that return a view or alias of an input, and bare allocations (``empty``), move
no bytes.
"""

from __future__ import annotations

import contextlib
import threading
import weakref
from collections.abc import Callable, Iterator
from math import prod
from typing import Any

import torch
import torch.utils.flop_counter as _torch_flops
from torch.nn.modules.module import register_module_forward_hook, register_module_forward_pre_hook
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from un0_bench.harness.counters.records import Counts, OpStat

__all__ = [
    "GATING_ATTR",
    "OpCounter",
    "count",
    "counting_active",
    "current_counter",
    "dtype_name",
    "gating_scope",
    "is_gating",
    "mark_gating",
    "op_dtype",
    "register_formula",
]

aten = torch.ops.aten

#: Attribute that :func:`mark_gating` sets on a module.
GATING_ATTR = "_un0_gating"

# ---------------------------------------------------------------------------------------------
# Formula registry
# ---------------------------------------------------------------------------------------------

#: Formulas registered here, keyed by OpOverloadPacket or OpOverload. Looked up before torch's
#: ``flop_registry``, so a formula here overrides torch's. Not torch's ``register_flop_formula``: that
#: writes into torch's process-wide registry (every ``FlopCounterMode`` would see these formulas, and
#: one torch adds later would clash at import) and takes packets only, not single overloads.
_FORMULAS: dict[Any, Callable[..., int]] = {}


def register_formula(*targets: Any, get_raw: bool = False) -> Callable[[Callable[..., int]], Callable[..., int]]:
    """Register a FLOP formula for one or more ops (a decorator).

    Args:
        *targets: Op overload packets (``torch.ops.aten.mm``) or single overloads
            (``torch.ops.aten.add.Tensor``); lists of them are flattened.
        get_raw: If False (the default) the formula receives shapes in place of tensors and the
            output's shape as ``out_shape=``, like torch's formulas. If True it receives the
            tensors themselves and the output as ``out_val=``.

    Returns:
        The decorator, which returns the formula unchanged.

    Raises:
        RuntimeError: If a target already has a formula registered here.
    """
    flat, _ = tree_flatten(list(targets))

    def decorator(formula: Callable[..., int]) -> Callable[..., int]:
        wrapped = formula if get_raw else _torch_flops.shape_wrapper(formula)
        for target in flat:
            if target in _FORMULAS:
                raise RuntimeError(f"duplicate FLOP formula for {target}")
            _FORMULAS[target] = wrapped
        return formula

    return decorator


def _formula_for(func: Any) -> Callable[..., int] | None:
    packet = getattr(func, "_overloadpacket", None)
    f = _FORMULAS.get(func) or _FORMULAS.get(packet)
    if f is None:
        # Read torch's registry at call time: it is rebound at import and may grow afterwards.
        f = _torch_flops.flop_registry.get(packet)
    return f


def _ops(namespace: Any, names: Iterator[str] | list[str] | tuple[str, ...]) -> list[Any]:
    """Op packets for ``names`` in ``namespace``, skipping names this torch build lacks."""
    out = []
    for n in names:
        try:
            out.append(getattr(namespace, n))
        except (AttributeError, RuntimeError):
            pass
    return out


def _with_inplace(names: tuple[str, ...]) -> list[str]:
    return [v for n in names for v in (n, n + "_")]


def _numel(x: Any) -> int:
    return sum(t.numel() for t in tree_flatten(x)[0] if isinstance(t, torch.Tensor))


# -- matmul-like ops torch does not cover ------------------------------------------------------


@register_formula(aten._scaled_dot_product_flash_attention_for_cpu)
def _sdpa_cpu_flop(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    """CPU flash attention: the two batched matmuls of torch's ``sdpa_flop_count``.

    ``Q @ K^T`` and ``P @ V`` give 2*B*H*Sq*Skv*D each, 4*B*H*Sq*Skv*D in all when D_q == D_v.
    """
    # NB: as in torch's sdpa_flop, softmax, scaling and masking are not counted, and causal
    # attention is charged as full attention.
    return _torch_flops.sdpa_flop_count(query_shape, key_shape, value_shape)


@register_formula(aten._scaled_dot_product_flash_attention_for_cpu_backward)
def _sdpa_cpu_backward_flop(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None,
                            **kwargs) -> int:
    """CPU flash attention backward: the five batched matmuls of torch's ``sdpa_backward_flop_count``."""
    # NB: the softmax backward is not counted, as in torch's sdpa_backward_flop.
    return _torch_flops.sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


@register_formula(aten._int_mm)
def _int_mm_flop(a_shape, b_shape, *args, out_shape=None, **kwargs) -> int:
    """int8 x int8 -> int32 matmul: (M, K) @ (K, N) is 2*M*K*N integer operations."""
    m, k = a_shape
    _, n = b_shape
    return 2 * m * k * n


@register_formula(_ops(aten, ["_weight_int8pack_mm"]))
def _weight_int8pack_mm_flop(x_shape, w_shape, *args, out_shape=None, **kwargs) -> int:
    """Weight-only int8 matmul: x (M, K) times int8 weight (N, K), dequantised: 2*M*K*N."""
    m, k = x_shape
    n = w_shape[0]
    return 2 * m * k * n


@register_formula(aten.mv)
def _mv_flop(a_shape, v_shape, *args, out_shape=None, **kwargs) -> int:
    """Matrix (M, N) times vector (N,): 2*M*N."""
    return 2 * prod(a_shape)


@register_formula(aten.addmv)
def _addmv_flop(self_shape, a_shape, v_shape, *args, out_shape=None, **kwargs) -> int:
    """Like ``mv``; the added vector is not counted (as torch's addmm does not count its bias)."""
    return 2 * prod(a_shape)


@register_formula(aten.dot, aten.vdot)
def _dot_flop(a_shape, b_shape, *args, out_shape=None, **kwargs) -> int:
    """Dot product of two (N,) vectors: 2*N."""
    return 2 * prod(a_shape)


# -- int8 ops of the quantized:: namespace (eager-mode quantization) ---------------------------


def _packed_weight(packed: Any) -> torch.Tensor:
    """The weight inside a ``quantized::`` packed-parameters object (``unpack()`` -> (w, b))."""
    return packed.unpack()[0]


_QUANTIZED_CONVS = _ops(torch.ops.quantized, ["conv1d", "conv2d", "conv3d", "conv1d_relu", "conv2d_relu",
                                              "conv3d_relu"])
_QUANTIZED_LINEARS = _ops(torch.ops.quantized, ["linear", "linear_relu", "linear_dynamic",
                                                "linear_relu_dynamic", "linear_dynamic_fp16"])


@register_formula(_QUANTIZED_CONVS, get_raw=True)
def _quantized_conv_flop(x, packed, *args, out_val=None, **kwargs) -> int:
    """``quantized::conv*``: the convolution formula with the weight taken from the packed params."""
    # NB: as for float convolutions, the bias, requantisation and fused ReLU are not counted.
    w = _packed_weight(packed)
    return _torch_flops.conv_flop_count(list(x.shape), list(w.shape), list(out_val.shape))


@register_formula(_QUANTIZED_LINEARS, get_raw=True)
def _quantized_linear_flop(x, packed, *args, out_val=None, **kwargs) -> int:
    """``quantized::linear*``: (..., K) @ W^T with W (N, K) from the packed params: 2*M*K*N."""
    w = _packed_weight(packed)
    n, k = w.shape
    return 2 * (x.numel() // k) * k * n


# -- elementwise, reductions, normalisation, softmax -------------------------------------------

#: Elementwise arithmetic and activations, each charged 1 FLOP per output element (in-place and
#: backward variants included).
# NB: a transcendental (exp, tanh, erf in gelu) costs several instructions on real hardware, and
# addcmul/lerp/silu are 2-3 arithmetic steps; charging 1 per element keeps the convention simple
# and stated. torch's own counter charges pointwise ops nothing at all.
POINTWISE_OPS: tuple[str, ...] = (
    "add", "sub", "rsub", "mul", "div", "neg", "abs", "reciprocal", "pow", "sqrt", "rsqrt",
    "exp", "exp2", "expm1", "log", "log2", "log10", "log1p", "sin", "cos", "tan", "tanh",
    "sigmoid", "silu", "gelu", "relu", "leaky_relu", "elu", "hardtanh", "hardswish", "hardsigmoid",
    "softplus", "mish", "erf", "erfc", "sign", "sgn", "floor", "ceil", "round", "trunc", "frac",
    "fmod", "remainder", "clamp", "clamp_min", "clamp_max", "clip", "minimum", "maximum", "where",
    "lerp", "addcmul", "addcdiv", "atan2", "square", "masked_fill", "threshold", "eq", "ne", "lt",
    "le", "gt", "ge", "logical_not", "logical_and", "logical_or", "bitwise_and", "bitwise_or",
    "bitwise_xor", "bitwise_not", "nan_to_num", "xlogy", "hypot",
    # (de)quantisation: scale, shift and round each element (charged 1 like the rest)
    "quantize_per_tensor", "quantize_per_tensor_dynamic", "quantize_per_channel", "dequantize",
    # backward kernels of activations, one output element each
    "threshold_backward", "silu_backward", "gelu_backward", "sigmoid_backward", "tanh_backward",
    "hardtanh_backward", "leaky_relu_backward", "elu_backward", "softplus_backward",
    "hardswish_backward", "hardsigmoid_backward", "mish_backward",
)

#: Optimizer ``_foreach_*`` kernels: 1 FLOP per element of the tensors they update.
FOREACH_OPS: tuple[str, ...] = (
    "_foreach_add", "_foreach_sub", "_foreach_mul", "_foreach_div", "_foreach_addcmul",
    "_foreach_addcdiv", "_foreach_lerp", "_foreach_sqrt", "_foreach_neg", "_foreach_maximum",
    "_foreach_sign", "_foreach_pow", "_foreach_reciprocal",
)

#: Reductions, each charged 1 FLOP per *input* element (one accumulate or compare).
# NB: var/std need about 3 per element (subtract, square, accumulate); charged 1 like the rest.
# topk: one compare per element is a lower bound for the selection.
REDUCTION_OPS: tuple[str, ...] = (
    "sum", "mean", "prod", "amax", "amin", "max", "min", "argmax", "argmin", "var", "var_mean",
    "std", "std_mean", "norm", "linalg_vector_norm", "logsumexp", "cumsum", "cumprod", "any", "all",
    "topk", "aminmax", "nansum",
)

#: FLOPs per input element for a normalisation (group, layer, batch norm) in the forward pass.
# NB: statistics pass: sum and sum of squares (1 add + 1 mul + 1 add = 3); apply pass: the kernels
# fold mean, rstd, gamma and beta into one per-channel scale and shift, y = x*scale + shift (2).
# 3 + 2 = 5. The per-channel work (rstd, folding) is O(channels) and ignored.
NORM_FLOPS_PER_ELEMENT = 5
#: FLOPs per input element for a normalisation's backward.
# NB: roughly twice the forward (the usual backward ~ 2x forward rule): dy*gamma, x_hat, two
# reductions, the combination, and dgamma/dbeta accumulations come to about 10 per element.
NORM_BACKWARD_FLOPS_PER_ELEMENT = 10
#: FLOPs per input element for softmax and log-softmax.
# NB: max (1 compare), subtract the max (1), exp (1), sum (1), divide by the sum (1) = 5.
SOFTMAX_FLOPS_PER_ELEMENT = 5
#: FLOPs per element for the softmax backward: y * (dy - sum(dy * y)) = mul, sum, sub, mul = 4.
SOFTMAX_BACKWARD_FLOPS_PER_ELEMENT = 4
#: FLOPs per input element of an MSE loss: subtract, square, accumulate = 3.
MSE_FLOPS_PER_ELEMENT = 3
#: FLOPs per element of the MSE loss backward: 2 * (x - y) * grad = sub, mul, mul = 3.
MSE_BACKWARD_FLOPS_PER_ELEMENT = 3

#: Pure data movement and allocation: 0 FLOPs, but counted (their cost is known to be no arithmetic).
DATA_MOVEMENT_OPS: tuple[str, ...] = (
    "view", "_unsafe_view", "_reshape_alias", "reshape", "permute", "transpose", "t", "expand",
    "expand_as", "clone", "copy", "copy_", "_copy_from", "_copy_from_and_resize", "cat", "stack",
    "index_select", "gather", "scatter", "slice", "slice_scatter", "select", "select_scatter",
    "unsqueeze", "unsqueeze_", "squeeze", "squeeze_", "_to_copy", "empty", "empty_like",
    "empty_strided", "new_empty", "new_empty_strided", "zeros", "zeros_like", "new_zeros", "ones",
    "ones_like", "new_ones", "full", "full_like", "new_full", "fill", "fill_", "zero_", "detach",
    "detach_", "contiguous", "split", "split_with_sizes", "unbind", "narrow", "as_strided", "alias",
    "lift_fresh", "lift_fresh_copy", "flip", "roll", "repeat", "index", "index_put", "index_put_",
    "_index_put_impl_", "embedding", "constant_pad_nd", "reflection_pad1d", "reflection_pad2d",
    "replication_pad1d", "replication_pad2d", "upsample_nearest1d", "upsample_nearest2d",
    "upsample_nearest3d", "_upsample_nearest_exact2d", "arange", "scalar_tensor",
    "_local_scalar_dense", "unfold", "im2col", "view_as_real", "view_as_complex", "_conj",
    "resolve_conj", "resolve_neg", "slice_backward", "select_backward", "masked_select",
    "masked_scatter", "nonzero", "diagonal", "movedim", "tril", "triu", "bucketize",
    "_unsafe_index", "_unsafe_index_put", "_empty_affine_quantized", "_empty_per_channel_affine_quantized",
    "_make_per_tensor_quantized_tensor", "int_repr",
)

#: Weight packing of eager-mode quantized layers (a reorder of the weights, no arithmetic).
_QUANTIZED_PREPACK = _ops(torch.ops.quantized, ["conv1d_prepack", "conv2d_prepack", "conv3d_prepack",
                                                "linear_prepack", "linear_prepack_fp16"])

#: Backward ops that add each incoming gradient element once (scatter-add of a gather or repeat):
#: 1 FLOP per element of the incoming gradient (first argument).
SCATTER_ADD_BACKWARD_OPS: tuple[str, ...] = (
    "embedding_dense_backward", "upsample_nearest1d_backward", "upsample_nearest2d_backward",
    "upsample_nearest3d_backward", "_upsample_nearest_exact2d_backward", "index_add", "index_add_",
    "scatter_add", "scatter_add_", "col2im",
)


@register_formula(_ops(aten, _with_inplace(POINTWISE_OPS)), get_raw=True)
def _pointwise_flop(*args, out_val=None, **kwargs) -> int:
    """One FLOP per output element."""
    return _numel(out_val)


@register_formula(_ops(aten, _with_inplace(FOREACH_OPS)), get_raw=True)
def _foreach_flop(*args, out_val=None, **kwargs) -> int:
    """One FLOP per element of the updated tensors (in-place variants return nothing)."""
    return _numel(out_val) or _numel(args[0])


@register_formula(_ops(aten, REDUCTION_OPS), get_raw=True)
def _reduction_flop(x, *args, out_val=None, **kwargs) -> int:
    """One FLOP per input element."""
    return _numel(x)


@register_formula(_ops(aten, ["native_group_norm", "native_layer_norm", "native_batch_norm",
                              "_native_batch_norm_legit", "_native_batch_norm_legit_no_training",
                              "_native_batch_norm_legit_functional"]), get_raw=True)
def _norm_flop(x, *args, out_val=None, **kwargs) -> int:
    """``NORM_FLOPS_PER_ELEMENT`` per input element."""
    return NORM_FLOPS_PER_ELEMENT * x.numel()


@register_formula(_ops(aten, ["native_group_norm_backward", "native_layer_norm_backward",
                              "native_batch_norm_backward"]), get_raw=True)
def _norm_backward_flop(grad_out, x, *args, out_val=None, **kwargs) -> int:
    """``NORM_BACKWARD_FLOPS_PER_ELEMENT`` per input element."""
    return NORM_BACKWARD_FLOPS_PER_ELEMENT * x.numel()


@register_formula(_ops(aten, ["avg_pool1d", "avg_pool2d", "avg_pool3d", "_adaptive_avg_pool2d"]), get_raw=True)
def _avg_pool_flop(x, *args, out_val=None, **kwargs) -> int:
    """Average pooling: one add per input element a window reads (the window's divide is ignored)."""
    # NB: overlapping windows read some inputs twice; diffusers' resnet downsampling (kernel 2,
    # stride 2) does not overlap, so this is exact there.
    return x.numel()


@register_formula(aten._softmax, aten._log_softmax, _ops(aten, ["_safe_softmax"]), get_raw=True)
def _softmax_flop(x, *args, out_val=None, **kwargs) -> int:
    """``SOFTMAX_FLOPS_PER_ELEMENT`` per input element.

    ``_safe_softmax`` is the softmax that attention's math path decomposes into (as on the meta
    device, where there is no fused CPU kernel); it costs the same.
    """
    return SOFTMAX_FLOPS_PER_ELEMENT * x.numel()


@register_formula(aten._softmax_backward_data, aten._log_softmax_backward_data, get_raw=True)
def _softmax_backward_flop(grad_out, *args, out_val=None, **kwargs) -> int:
    """``SOFTMAX_BACKWARD_FLOPS_PER_ELEMENT`` per gradient element."""
    return SOFTMAX_BACKWARD_FLOPS_PER_ELEMENT * grad_out.numel()


@register_formula(aten.mse_loss, get_raw=True)
def _mse_flop(x, *args, out_val=None, **kwargs) -> int:
    """``MSE_FLOPS_PER_ELEMENT`` per input element."""
    return MSE_FLOPS_PER_ELEMENT * x.numel()


@register_formula(aten.mse_loss_backward, get_raw=True)
def _mse_backward_flop(grad_out, x, *args, out_val=None, **kwargs) -> int:
    """``MSE_BACKWARD_FLOPS_PER_ELEMENT`` per input element."""
    return MSE_BACKWARD_FLOPS_PER_ELEMENT * x.numel()


@register_formula(_ops(aten, DATA_MOVEMENT_OPS), _QUANTIZED_PREPACK, get_raw=True)
def _data_movement_flop(*args, out_val=None, **kwargs) -> int:
    """Data movement: no arithmetic."""
    # NB: index_put_ with accumulate=True adds; charged 0 like the plain scatter.
    return 0


@register_formula(_ops(aten, SCATTER_ADD_BACKWARD_OPS), get_raw=True)
def _scatter_add_flop(x, *args, out_val=None, **kwargs) -> int:
    """One add per element of the incoming gradient (or source, for index_add/scatter_add)."""
    # index_add(self, dim, index, source) and scatter_add(self, dim, index, src) add the source.
    src = args[2] if len(args) >= 3 and isinstance(args[2], torch.Tensor) else x
    return src.numel()


# ---------------------------------------------------------------------------------------------
# Bytes and dtype
# ---------------------------------------------------------------------------------------------

#: Metadata queries and profiler markers: no work, never recorded.
_METADATA_OPS = frozenset(
    _ops(aten, ["size", "sym_size", "stride", "sym_stride", "storage_offset", "sym_storage_offset",
                "numel", "sym_numel", "dim", "is_contiguous", "sym_is_contiguous",
                "is_strides_like_format", "is_non_overlapping_and_dense"])
    + _ops(torch.ops.prim, ["layout", "device"])
    # profiler markers (the optimizers wrap step() in record_function): bookkeeping, not work
    + _ops(torch.ops.profiler, ["_record_function_enter", "_record_function_enter_new", "_record_function_exit"])
)

#: Ops that return a fresh tensor sharing storage with an input although their schema does not say
#: so, and bare allocations: no bytes moved.
_NO_TRAFFIC_OPS = frozenset(_ops(aten, ["_unsafe_view", "empty", "empty_like", "empty_strided", "new_empty",
                                        "new_empty_strided", "_empty_affine_quantized",
                                        "_empty_per_channel_affine_quantized"]))

#: Gathers read only the selected elements of their source: bytes read = bytes of the output plus
#: the index tensors, not the whole source (a gather of 1% of a weight matrix reads 1% of it).
_GATHER_OPS = frozenset(_ops(aten, ["index_select", "gather", "embedding", "index", "_unsafe_index",
                                    "masked_select"]))

#: Ops whose first argument is overwritten without being read.
_WRITE_ONLY_SELF = frozenset(_ops(aten, ["copy_", "fill_", "zero_"]))

_no_traffic_cache: dict[Any, bool] = {}


def _moves_no_bytes(func: Any) -> bool:
    """True for views and aliases (a return annotated ``Tensor(a)``, not written) and allocations."""
    hit = _no_traffic_cache.get(func)
    if hit is None:
        hit = func._overloadpacket in _NO_TRAFFIC_OPS
        if not hit:
            try:
                hit = any(r.alias_info is not None and not r.alias_info.is_write for r in func._schema.returns)
            except AttributeError:
                hit = False
        _no_traffic_cache[func] = hit
    return hit


def _tensor_nbytes(t: torch.Tensor) -> int:
    # NB: an expanded (stride-0) input is charged at its logical size, not its storage size.
    return t.numel() * t.element_size()


def _nbytes(x: Any) -> int:
    """Bytes of every tensor in ``x``, including the weights inside packed-parameter objects."""
    total = 0
    for leaf in tree_flatten(x)[0]:
        if isinstance(leaf, torch.Tensor):
            total += _tensor_nbytes(leaf)
        elif isinstance(leaf, torch.ScriptObject) and hasattr(leaf, "unpack"):
            # quantized:: packed params (conv/linear): weight and bias are read by the kernel.
            total += _nbytes(list(leaf.unpack()))
    return total


def _read_operands(func: Any, args: tuple, kwargs: dict) -> tuple[list[Any], dict[str, Any]]:
    """Arguments that are read: drop ``out=`` arguments and the overwritten self of copy_/fill_."""
    try:
        out_names = {a.name for a in func._schema.arguments if a.is_out}
    except AttributeError:
        out_names = set()
    read_kwargs = {k: v for k, v in kwargs.items() if k not in out_names}
    read_args = list(args[1:]) if func._overloadpacket in _WRITE_ONLY_SELF else list(args)
    return read_args, read_kwargs


#: Ops whose arithmetic runs in int8 although their first tensor operand is float (the kernel
#: quantises it on the fly).
_INT8_COMPUTE_OPS = frozenset(_ops(torch.ops.quantized, ["linear_dynamic", "linear_relu_dynamic"]))

_DTYPE_NAMES = {"quint8": "int8", "qint8": "int8", "qint32": "int32", "quint4x2": "int4", "quint2x4": "int2"}


def dtype_name(dtype: torch.dtype) -> str:
    """Name of a torch dtype as recorded in :class:`OpStat` (quantized int8 types become ``"int8"``)."""
    name = str(dtype).removeprefix("torch.")
    return _DTYPE_NAMES.get(name, name)


def op_dtype(func: Any, args: tuple, kwargs: dict | None = None, out: Any = None) -> str:
    """The dtype an op computed in.

    Rule: ops in a short override list (``quantized::linear_dynamic``, which quantises its float
    input to int8) are ``"int8"``; otherwise the dtype of the first tensor input that is not
    ``bool`` (so ``where(mask, a, b)`` is ``a``'s dtype, ``index_select(x, 0, idx)`` is ``x``'s);
    else the first tensor input; else the first output tensor (for factories such as ``zeros``);
    else ``"none"``. Quantized dtypes map to their integer width (``quint8`` -> ``"int8"``).
    """
    packet = getattr(func, "_overloadpacket", func)
    if packet in _INT8_COMPUTE_OPS:
        return "int8"
    args_read, kwargs_read = _read_operands(func, args, kwargs or {}) if hasattr(func, "_schema") else (
        list(args), kwargs or {})
    tensors = [t for t in tree_flatten((args_read, kwargs_read))[0] if isinstance(t, torch.Tensor)]
    for t in tensors:
        if t.dtype is not torch.bool:
            return dtype_name(t.dtype)
    if tensors:
        return dtype_name(tensors[0].dtype)
    outs = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
    return dtype_name(outs[0].dtype) if outs else "none"


# ---------------------------------------------------------------------------------------------
# Gating attribution
# ---------------------------------------------------------------------------------------------

_tls = threading.local()
_active_lock = threading.Lock()
_active_counters = 0


def mark_gating(module: torch.nn.Module) -> torch.nn.Module:
    """Mark ``module`` as gating: ops inside it and its children are recorded with role ``"gating"``.

    Costs nothing at run time: it only sets an attribute the counter reads while counting.

    Returns:
        The same module, so ``self.gate = mark_gating(nn.Linear(...))`` reads naturally.
    """
    setattr(module, GATING_ATTR, True)
    return module


def is_gating(module: torch.nn.Module) -> bool:
    """True if :func:`mark_gating` marked this module."""
    return bool(getattr(module, GATING_ATTR, False))


@contextlib.contextmanager
def gating_scope() -> Iterator[None]:
    """Record ops run inside this block with role ``"gating"``.

    For gating work outside any gating module, such as the gather of the kept weights. The scope
    is thread-local, and entering it costs an attribute increment whether or not a counter is open.
    """
    _tls.gating_depth = getattr(_tls, "gating_depth", 0) + 1
    try:
        yield
    finally:
        _tls.gating_depth -= 1


def counting_active() -> bool:
    """True while any :class:`OpCounter` is open (the runner checks this before timing a run)."""
    return _active_counters > 0


# ---------------------------------------------------------------------------------------------
# Module tracking
# ---------------------------------------------------------------------------------------------


class _ModuleTracker:
    """Which module an op runs in, in forward and in backward.

    Forward: global forward pre/post hooks keep a per-thread stack of (module path, gating) entries;
    the innermost module is on top.

    Backward: an op running in backward belongs to the forward op whose autograd node is being
    executed. Autograd numbers its nodes in creation order, and a forward op's node is created just
    before the op reaches the dispatch mode, so at dispatch time the node's number is
    ``_get_sequence_nr() - 1``. The forward pass records number -> (module, gating); in backward,
    ``_current_autograd_node()._sequence_nr()`` looks it up. Ops run by nodes the forward did not
    create (the root gradient, parameter gradient accumulation) get module ``""``.
    """

    def __init__(self, root: torch.nn.Module | None) -> None:
        self._names: weakref.WeakKeyDictionary[torch.nn.Module, str] = weakref.WeakKeyDictionary()
        if root is not None:
            for name, mod in root.named_modules():
                self._names[mod] = name
        self._tls = threading.local()
        self._handles: list[Any] = []
        # Autograd node sequence number -> (module path, gating). Written in forward, read in backward.
        self._nodes: dict[int, tuple[str, bool]] = {}

    def name(self, mod: torch.nn.Module) -> str:
        name = self._names.get(mod)
        if name is None:
            # Outside the root (or no root): the module is named by its class, its submodules by
            # their attribute path below it, as torch's ModuleTracker does.
            name = type(mod).__name__
            self._names[mod] = name
            for sub_name, sub in mod.named_modules():
                if sub_name and sub not in self._names:
                    self._names[sub] = f"{name}.{sub_name}"
        return name

    def _stack(self) -> list[tuple[str, bool]]:
        s = getattr(self._tls, "stack", None)
        if s is None:
            s = self._tls.stack = []
        return s

    def current(self, args: tuple, kwargs: dict) -> tuple[str, bool]:
        """(innermost module path, gating) for an op about to be recorded with these inputs."""
        if torch._C._current_graph_task_id() != -1:  # in backward
            node = torch._C._current_autograd_node()
            return self._nodes.get(node._sequence_nr(), ("", False)) if node is not None else ("", False)
        stack = self._stack()
        module, gating = stack[-1] if stack else ("", False)
        gating = gating or getattr(_tls, "gating_depth", 0) > 0
        if torch.is_grad_enabled() and any(
            isinstance(t, torch.Tensor) and t.requires_grad for t in tree_flatten((args, kwargs))[0]
        ):
            # This op's autograd node was created just before dispatch; the first op to see the
            # number is the one that created it, so later ones do not overwrite it.
            self._nodes.setdefault(torch._C._autograd._get_sequence_nr() - 1, (module, gating))
        return module, gating

    def _pre_hook(self, mod: torch.nn.Module, inputs: Any) -> None:
        stack = self._stack()
        parent_gating = stack[-1][1] if stack else False
        stack.append((self.name(mod), parent_gating or is_gating(mod)))

    def _post_hook(self, mod: torch.nn.Module, inputs: Any, output: Any) -> None:
        stack = self._stack()
        if stack:
            stack.pop()

    def __enter__(self) -> _ModuleTracker:
        self._handles = [
            register_module_forward_pre_hook(self._pre_hook),
            # always_call: pop even when forward raises, so the stack stays balanced.
            register_module_forward_hook(self._post_hook, always_call=True),
        ]
        return self

    def __exit__(self, *exc: object) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        self._tls = threading.local()
        self._nodes = {}


# ---------------------------------------------------------------------------------------------
# The counter
# ---------------------------------------------------------------------------------------------


class OpCounter(TorchDispatchMode):
    """Record every op run inside ``with OpCounter() as c:`` (forward and backward).

    Args:
        root: The model being counted; modules are then named by their path in
            ``root.named_modules()`` (the root itself is ``""``). Without a root, the outermost
            module seen is named by its class and its children by attribute path below it.

    Example:
        >>> with OpCounter(root=model) as c:
        ...     model(x)
        >>> counts = c.counts(images=x.shape[0])
    """

    def __init__(self, root: torch.nn.Module | None = None) -> None:
        super().__init__()
        self._tracker = _ModuleTracker(root)
        # (calls, flops, bytes_read, bytes_written, counted) per group, as tuples replaced on every update: a
        # snapshot is then a shallow copy, and `since` finds the changed groups by identity.
        self._groups: dict[tuple[str, str, str, str], tuple[int, int, int, int, bool]] = {}
        self._lock = threading.Lock()

    # -- context
    def __enter__(self) -> OpCounter:
        global _active_counters
        self._tracker.__enter__()
        with _active_lock:
            _active_counters += 1
        try:
            return super().__enter__()
        except BaseException:
            self._leave()
            raise

    def __exit__(self, *exc: object) -> None:
        try:
            super().__exit__(*exc)
        finally:
            self._leave()

    def _leave(self) -> None:
        global _active_counters
        self._tracker.__exit__()
        with _active_lock:
            _active_counters -= 1

    # -- results
    def counts(self, images: int) -> Counts:
        """Everything counted so far, charged to ``images`` images, sorted by (op, dtype, role, module)."""
        if isinstance(images, bool) or not isinstance(images, int) or images < 1:
            raise ValueError(f"images must be a positive integer, got {images!r}")
        with self._lock:
            stats = [
                OpStat(op=op, dtype=dtype, role=role, module=module, calls=g[0], flops=g[1],
                       bytes_read=g[2], bytes_written=g[3], counted=g[4])
                for (op, dtype, role, module), g in sorted(self._groups.items())
            ]
        return Counts(images=images, stats=stats)

    def reset(self) -> None:
        """Forget everything counted so far."""
        with self._lock:
            self._groups.clear()

    def snapshot(self) -> dict[tuple[str, str, str, str], tuple[int, int, int, int, bool]]:
        """Totals so far by (op, dtype, role, module): ``(calls, flops, bytes_read, bytes_written, counted)``."""
        with self._lock:
            return dict(self._groups)

    @staticmethod
    def since(before: dict[tuple[str, str, str, str], tuple], after: dict[tuple[str, str, str, str], tuple]
              ) -> list[OpStat]:
        """What was counted between two :meth:`snapshot` s, as op groups."""
        out = []
        get = before.get
        for key in [k for k, g in after.items() if get(k) is not g]:
            calls, flops, br, bw, counted = after[key]
            c0, f0, r0, w0, _ = get(key, (0, 0, 0, 0, True))
            if calls > c0:
                out.append(OpStat(*key, calls=calls - c0, flops=flops - f0, bytes_read=br - r0, bytes_written=bw - w0,
                                  counted=counted))
        return out

    def add(self, stats: list[OpStat]) -> None:
        """Count ``stats`` again, as if their ops had run once more (a replay of identical work)."""
        with self._lock:
            for s in stats:
                key = (s.op, s.dtype, s.role, s.module)
                c, f, r, w, counted = self._groups.get(key, (0, 0, 0, 0, s.counted))
                self._groups[key] = (c + s.calls, f + s.flops, r + s.bytes_read, w + s.bytes_written, counted)

    # -- dispatch
    @contextlib.contextmanager
    def _dispatch_only(self) -> Iterator[None]:
        # Re-enter the dispatch mode alone (not the module tracker or the active-counter count).
        TorchDispatchMode.__enter__(self)
        try:
            yield
        finally:
            TorchDispatchMode.__exit__(self, None, None, None)

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        packet = getattr(func, "_overloadpacket", None)
        if packet in _METADATA_OPS:
            return func(*args, **kwargs)
        # Before running the op: in forward this claims the op's autograd node for its module.
        where = self._tracker.current(args, kwargs)
        formula = _formula_for(func)
        if formula is None:
            # As torch's FlopCounterMode: an op with no formula may decompose into ops that have one.
            with self._dispatch_only():
                r = func.decompose(*args, **kwargs)
            if r is not NotImplemented:
                return r
        out = func(*args, **kwargs)
        self._record(func, formula, args, kwargs, out, where)
        return out

    def _record(self, func: Any, formula: Callable[..., int] | None, args: tuple, kwargs: dict, out: Any,
                where: tuple[str, bool]) -> None:
        flops = int(formula(*args, **kwargs, out_val=out)) if formula is not None else 0
        if _moves_no_bytes(func):
            bytes_read = bytes_written = 0
        elif func._overloadpacket in _GATHER_OPS:
            bytes_written = _nbytes(out)
            # The source is the first argument of every gather; the rest are indices and scalars.
            bytes_read = bytes_written + _nbytes((args[1:], kwargs))
        else:
            read_args, read_kwargs = _read_operands(func, args, kwargs)
            bytes_read = _nbytes((read_args, read_kwargs))
            bytes_written = _nbytes(out)
        module, gating = where
        role = "gating" if gating else "compute"
        key = (str(func), op_dtype(func, args, kwargs, out), role, module)
        with self._lock:
            c, f, r, w, counted = self._groups.get(key, (0, 0, 0, 0, formula is not None))
            self._groups[key] = (c + 1, f + flops, r + bytes_read, w + bytes_written, counted)


def current_counter() -> OpCounter | None:
    """The innermost :class:`OpCounter` open on this thread, or ``None`` (called outside any op)."""
    from torch.utils._python_dispatch import _get_current_dispatch_mode_stack

    for mode in reversed(_get_current_dispatch_mode_stack()):
        if isinstance(mode, OpCounter):
            return mode
    return None


def count(fn: Callable[..., Any], *args: Any, images: int, root: torch.nn.Module | None = None,
          **kwargs: Any) -> Counts:
    """Run ``fn(*args, **kwargs)`` once under an :class:`OpCounter` and return what it counted.

    Args:
        fn: What to count (a module, a generator's forward, a training step).
        *args: Positional arguments for ``fn``.
        images: Number of images the call produces (or trains on), for per-image figures.
        root: Model whose ``named_modules()`` names the module paths; defaults to ``fn`` when
            ``fn`` is a module.
        **kwargs: Keyword arguments for ``fn``.
    """
    if root is None and isinstance(fn, torch.nn.Module):
        root = fn
    with OpCounter(root=root) as c:
        fn(*args, **kwargs)
    return c.counts(images=images)
