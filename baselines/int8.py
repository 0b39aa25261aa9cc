"""``int8``: the denoiser's linears (and, with calibrated scales, convolutions) in int8.

Two ways, chosen by the parameters:

* ``int8`` / ``int8:mode=w8a8`` (dynamic scales, the default) and ``int8:mode=weight-only``: torchao,
  the maintained PyTorch-native library, as users deploy it (``quantize_`` with
  ``Int8DynamicActivationInt8WeightConfig`` or ``Int8WeightOnlyConfig``; ``baselines/torchao_int8.py``).
  torchao 0.18 quantises ``nn.Linear`` only, so every convolution stays in its float dtype; the
  record lists those layers, and the FLOPs by dtype show the share that ran in int8. Stacks on any
  denoiser (``sd-distilled+int8``, ``sd-int8`` on a pipeline).
* ``int8:scales=static`` (``sd-int8`` on digits): the project's own int8 layers
  (:class:`Int8Linear`, :class:`Int8Conv2d`) with one input scale per layer and timestep bucket,
  calibrated on real digits (the ``un0-bench train sd-int8`` target, ``training/int8_calibration.py``),
  because the range of a layer's input changes along the noise schedule. Every Conv2d and Linear
  runs in int8: weights int8 per output channel, inputs int8 (symmetric, zero point 0), the product
  by the guarded ``torch._int_mm`` (``baselines/int_mm.py``), rescaled to float32 and the bias
  added. Convolutions are a matmul through an explicit im2col of the int8 input (``F.unfold`` has
  no int8 kernel on CPU, so the patches are taken with ``Tensor.unfold`` views and copied once).

The sampler's arithmetic stays float32; so do group norms, SiLU, the attention scores and
softmax, the embeddings and the residual adds.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from un0_bench.baselines.int_mm import int_mm
from un0_bench.harness.core.backbone import Backbone
from un0_bench.harness.core.model import Layer, Model, Plan, Run
from un0_bench.harness.core.spec import Param
from un0_bench.harness.core.technique import Technique
from un0_bench.harness.errors import StackError
from un0_bench.harness.weights.checkpoints import file_sha256
from un0_bench.harness.weights.quantize import QMAX, quantize_per_channel

# ---------------------------------------------------------------------------------------------
# int8 layers
# ---------------------------------------------------------------------------------------------

@dataclass
class TimestepBucket:
    """Which activation scale the int8 layers use: the bucket of the current diffusion timestep.

    The timesteps ``[0, num_train_timesteps)`` are split into ``n_buckets`` equal ranges. One object
    is shared by every int8 layer of a UNet; the generator sets :attr:`index` before each forward.
    """

    n_buckets: int
    num_train_timesteps: int = 1000
    index: int = 0

    def __post_init__(self) -> None:
        if self.n_buckets < 1 or self.num_train_timesteps < self.n_buckets:
            raise ValueError(f"need 1 <= n_buckets <= num_train_timesteps, got {self.n_buckets}, "
                             f"{self.num_train_timesteps}")

    def of(self, timestep: int) -> int:
        """Bucket of ``timestep``; raises ValueError outside ``[0, num_train_timesteps)``."""
        if not 0 <= timestep < self.num_train_timesteps:
            raise ValueError(f"timestep {timestep} is outside [0, {self.num_train_timesteps})")
        return timestep * self.n_buckets // self.num_train_timesteps

    def set(self, t: torch.Tensor | int) -> None:
        """Select the bucket of timestep ``t`` (a batch of equal timesteps, or an int)."""
        if isinstance(t, torch.Tensor):
            flat = t.reshape(-1)
            if not bool((flat == flat[0]).all()):
                raise ValueError("int8 layers use one activation scale per batch: all timesteps must be equal")
            t = int(flat[0])
        self.index = self.of(t)


def _dynamic_scale(x: torch.Tensor, dims: tuple[int, ...]) -> torch.Tensor:
    """Max |x| / 127 over ``dims`` (kept as size-1 dims); a tiny positive scale where x is all zero."""
    return x.abs().amax(dim=dims, keepdim=True).clamp_(min=1e-12) / QMAX


def _quantize_activation(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Quantise float to int8 with a per-tensor ``scale`` (0-dim): round(x / scale), saturated to +-127."""
    # Three float32 elementwise ops (div, round, clamp) and a cast; the counter charges them.
    return torch.round(x / scale).clamp_(-QMAX, QMAX).to(torch.int8)


class _Int8Layer(nn.Module):
    """State shared by the int8 layers: int8 weight, its scales, bias, activation scales per bucket.

    ``bucket`` is ``None`` for dynamic scales (computed from each input); the ``act_scale`` buffer
    then holds one unused entry, so static and dynamic layers have the same state keys.
    """

    weight: torch.Tensor
    weight_scale: torch.Tensor
    act_scale: torch.Tensor
    bias: torch.Tensor | None

    def __init__(self, weight_shape: tuple[int, ...], bias: bool, bucket: TimestepBucket | None) -> None:
        super().__init__()
        self.bucket = bucket
        n_buckets = bucket.n_buckets if bucket is not None else 1
        self.register_buffer("weight", torch.zeros(weight_shape, dtype=torch.int8))
        self.register_buffer("weight_scale", torch.ones(weight_shape[0]))
        self.register_buffer("act_scale", torch.ones(n_buckets))
        self.register_buffer("bias", torch.zeros(weight_shape[0]) if bias else None)

    @property
    def dynamic(self) -> bool:
        return self.bucket is None

    def _load_float(self, layer: nn.Conv2d | nn.Linear, act_scale: torch.Tensor) -> None:
        if act_scale.shape != self.act_scale.shape:
            raise ValueError(f"act_scale must have shape {tuple(self.act_scale.shape)}, got {tuple(act_scale.shape)}")
        if not bool((act_scale > 0).all()):
            raise ValueError("activation scales must be positive")
        q, s = quantize_per_channel(layer.weight)
        self.weight.copy_(q)
        self.weight_scale.copy_(s)
        self.act_scale.copy_(act_scale)
        if layer.bias is not None:
            self.bias.copy_(layer.bias.detach().float())

    def _int8_matmul(self, a: torch.Tensor, x_scale: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """``a`` (M, K) int8 times ``w`` (O, K) int8 transposed, in int32; rescaled to float32 ``(M, O)``."""
        # NB: on CPU the kernel takes any M, K, N; CUDA needs M > 16 (pad with zero rows, whose
        # cost is counted) and K, N multiples of 8 (such layers are not made on CUDA).
        m = a.shape[0]
        if a.is_cuda and m <= 16:
            a = torch.cat([a, a.new_zeros(17 - m, a.shape[1])])
        acc = int_mm(a, w.t())[:m]  # (M, O) int32, through the guard (canonical strides, self-checked)
        # int32 -> float32 (a cast, no arithmetic), then one float32 multiply per output by the
        # combined scale x_scale * w_scale[o], and the float32 bias.
        y = acc.to(torch.float32) * (x_scale * self.weight_scale)
        return y + self.bias if self.bias is not None else y


class Int8Linear(_Int8Layer):
    """``nn.Linear`` with int8 weights and int8 inputs, computed by ``torch._int_mm``.

    Args:
        in_features: K.
        out_features: N.
        bias: Whether there is a (float32) bias.
        bucket: The shared timestep bucket selecting the activation scale.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool, bucket: TimestepBucket | None) -> None:
        super().__init__((out_features, in_features), bias, bucket)
        self.in_features, self.out_features = in_features, out_features

    @classmethod
    def from_float(cls, layer: nn.Linear, act_scale: torch.Tensor, bucket: TimestepBucket | None) -> Int8Linear:
        m = cls(layer.in_features, layer.out_features, layer.bias is not None, bucket)
        m._load_float(layer, act_scale)
        return m

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., K) -> (..., N)
        if self.bucket is None:
            x2 = x.reshape(-1, self.in_features).float()  # (M, K)
            s = _dynamic_scale(x2, dims=(1,))  # (M, 1): one scale per token
            y = self._int8_matmul(_quantize_activation(x2, s), s, self.weight)
        else:
            s = self.act_scale[self.bucket.index]
            y = self._int8_matmul(_quantize_activation(x, s).reshape(-1, self.in_features), s, self.weight)
        y = y.reshape(*x.shape[:-1], self.out_features)
        return y if x.dtype == torch.float32 else y.to(x.dtype)

    def extra_repr(self) -> str:
        policy = "dynamic per token" if self.bucket is None else "static"
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 ({policy})"


class Int8Conv2d(_Int8Layer):
    """``nn.Conv2d`` (groups 1, dilation 1, zero padding) as int8 im2col + ``torch._int_mm``, static scales.

    Args:
        in_channels: C.
        out_channels: O.
        kernel_size: (kh, kw).
        stride: (sh, sw).
        padding: (ph, pw), zeros.
        bias: Whether there is a (float32) bias.
        bucket: The shared timestep bucket selecting the activation scale (static scales only).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: tuple[int, int], stride: tuple[int, int],
                 padding: tuple[int, int], bias: bool, bucket: TimestepBucket) -> None:
        super().__init__((out_channels, in_channels, *kernel_size), bias, bucket)
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size, self.stride, self.padding = tuple(kernel_size), tuple(stride), tuple(padding)

    @classmethod
    def from_float(cls, layer: nn.Conv2d, act_scale: torch.Tensor, bucket: TimestepBucket) -> Int8Conv2d:
        if not cls.supports(layer):
            raise ValueError(f"Int8Conv2d supports groups=1, dilation=1 and numeric zero padding; got {layer}")
        m = cls(layer.in_channels, layer.out_channels, layer.kernel_size, layer.stride, layer.padding,
                layer.bias is not None, bucket)
        m._load_float(layer, act_scale)
        return m

    @staticmethod
    def supports(layer: nn.Conv2d) -> bool:
        return (layer.groups == 1 and tuple(layer.dilation) == (1, 1) and layer.padding_mode == "zeros"
                and not isinstance(layer.padding, str))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) -> (B, O, Ho, Wo)
        in_dtype = x.dtype
        s = self.act_scale[self.bucket.index]
        # Channels-last int8 (a no-op copy when x already is): the im2col copy below then moves
        # runs of C contiguous bytes, about 7x faster on CPU than gathering from NCHW.
        q = _quantize_activation(x, s).permute(0, 2, 3, 1).contiguous()  # (B, H, W, C) int8
        ph, pw = self.padding
        if ph or pw:
            q = F.pad(q, (0, 0, pw, pw, ph, ph))  # int8 zero is float zero (zero point 0)
        (kh, kw), (sh, sw) = self.kernel_size, self.stride
        patches = q.unfold(1, kh, sh).unfold(2, kw, sw)  # (B, Ho, Wo, C, kh, kw), a view
        b, ho, wo, c = patches.shape[:4]
        # im2col: the one copy of the int8 patches; rows are output pixels, columns (kh, kw, C).
        a = patches.permute(0, 1, 2, 4, 5, 3).reshape(b * ho * wo, kh * kw * c)  # (B*Ho*Wo, kh*kw*C)
        # The weight in the same column order (O, kh, kw, C): a copy of the small int8 weight.
        w = self.weight.permute(0, 2, 3, 1).reshape(self.out_channels, -1)  # (O, kh*kw*C)
        y = self._int8_matmul(a, s, w)  # (B*Ho*Wo, O) float32
        # Channels-last result viewed as NCHW; the next ops keep that memory format.
        y = y.reshape(b, ho, wo, self.out_channels).permute(0, 3, 1, 2)  # (B, O, Ho, Wo)
        return y if in_dtype == torch.float32 else y.to(in_dtype)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}, int8")


def quantizable_layers(unet: nn.Module) -> list[str]:
    """Names of the ``nn.Conv2d`` and ``nn.Linear`` modules of ``unet``, in module order."""
    return [name for name, m in unet.named_modules() if type(m) in (nn.Conv2d, nn.Linear)]


def quantize_unet(unet: nn.Module, act_scales: dict[str, torch.Tensor], bucket: TimestepBucket) -> nn.Module:
    """A copy of ``unet`` with every Conv2d/Linear replaced by its int8 version (``unet`` is untouched).

    Args:
        unet: A float32 UNet.
        act_scales: Layer name -> ``(n_buckets,)`` activation scales (calibrated by
            ``training/int8_calibration.py``); must name exactly the layers of :func:`quantizable_layers`.
        bucket: The timestep bucket object the new layers share.
    """
    names = quantizable_layers(unet)
    if set(act_scales) != set(names):
        missing, extra = sorted(set(names) - set(act_scales)), sorted(set(act_scales) - set(names))
        raise ValueError(f"activation scales do not match the UNet's layers (missing {missing[:3]}, "
                         f"unexpected {extra[:3]})")
    q = copy.deepcopy(unet).float()
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = q.get_submodule(parent_name)
        layer = getattr(parent, child)
        cls = Int8Conv2d if isinstance(layer, nn.Conv2d) else Int8Linear
        setattr(parent, child, cls.from_float(layer, act_scales[name], bucket))
    return q.eval().requires_grad_(False)


# ---------------------------------------------------------------------------------------------
# The technique
# ---------------------------------------------------------------------------------------------

#: What the quantisation is; part of the config a calibration file must match.
INT8_SCHEME: dict[str, Any] = {
    "weights": "int8, symmetric, per output channel, max |w| / 127",
    "activations": "int8, symmetric, per tensor, static",
    "layers": "every Conv2d and Linear",
    "timestep_buckets": 10,
    # Clip each layer's input at the 99.99th percentile of |x| (per batch, max over batches): on
    # 1,000 digits it matched sd slightly better than the plain max (mean |diff| 0.0039 vs 0.0041,
    # FID 0.2067 vs 0.2101 with sd at 0.2065) and much better than one bucket for all timesteps (0.0059).
    "percentile": 99.99,
    "calibration_data": "digits train split noised to the 50-step DDIM timesteps",
}


def int8_config(unet_config: dict[str, Any], teacher_path: Path) -> dict[str, Any]:
    """The config an ``sd-int8`` calibration file must carry: the UNet's config, the scheme and the teacher file."""
    return {"unet": copy.deepcopy(unet_config), "scheme": copy.deepcopy(INT8_SCHEME),
            "teacher_sha256": file_sha256(teacher_path)}



SCALES = Param(str, "dynamic", "input scales: dynamic (from each input, torchao) or static (calibrated, digits "
               "teacher, every conv and linear)", choices=("dynamic", "static"))
MODE = Param(str, "w8a8", "w8a8: int8 weights and int8 activations; weight-only: int8 weights, float compute",
             choices=("w8a8", "weight-only"))

#: What stays float under torchao, in the record.
TORCHAO_FLOAT = ("torchao 0.18 quantize_ has no Conv2d path (its conv path, PT2E + torch.compile, runs kernels "
                 "the op counter cannot see)")


class _TimestepHook(Layer):
    """Selects the static scales' timestep bucket before every denoiser call."""

    def __init__(self, params: dict[str, Any], changes: dict[str, Any], bucket: TimestepBucket | None) -> None:
        super().__init__("int8", params, changes)
        self.bucket = bucket

    def before_call(self, run: Run, args: tuple, kwargs: dict) -> None:
        if self.bucket is not None:
            self.bucket.set(run.timestep)


class Int8(Technique):
    """``int8`` (torchao W8A8 linears), ``int8:mode=weight-only``, ``int8:scales=static`` (every conv and linear)."""

    name = "int8"
    stacking = "anywhere after the base; scales=static right after sd on digits only"
    params = {"mode": MODE, "scales": SCALES}

    def check(self, plan: Plan, params: dict[str, Any]) -> None:
        super().check(plan, params)
        if params["scales"] == "static" and params["mode"] != "w8a8":
            raise StackError("int8:scales=static calibrates activation scales; mode=weight-only has no int8 "
                             "activations: use int8:mode=weight-only (without scales) or int8:scales=static")
        if params["scales"] == "static" and (plan.backbone_kind != "digits" or plan.weights != "teacher"):
            raise StackError(f"int8:scales=static uses the activation scales calibrated for the digits teacher "
                             f"(un0-bench train sd-int8); {'+'.join(plan.layers)} on {plan.backbone_kind} runs "
                             "other weights: use int8 (dynamic scales)")
        if params["scales"] == "static":
            self.require_first(plan, "with static scales uses scales calibrated on the teacher's own activations")

    def check_weights(self, backbone: Backbone, mode: str = "w8a8", scales: str = "dynamic") -> list[Path]:
        if scales != "static":
            return []  # dynamic scales are computed from each call's own activations
        from un0_bench.harness.weights.checkpoints import check_checkpoint

        check_checkpoint(backbone.weights("sd-int8"), expected_config=_expected_config(backbone))
        return [backbone.weights("sd-int8")]

    def apply(self, model: Model, backbone: Backbone, mode: str = "w8a8", scales: str = "dynamic") -> Layer:
        total = sum(p.numel() for p in model.denoiser.parameters())
        if scales == "static":
            int_mm.check(next(model.denoiser.parameters()).device)
            model.denoiser, bucket, meta = _static_teacher(model.denoiser, backbone)
            model.derivation = meta
            int8 = [m for m in model.denoiser.modules() if isinstance(m, _Int8Layer)]
            changes = {
                "library": f"un0-bench int8 layers (torch {torch.__version__}); {TORCHAO_FLOAT}",
                "int8_layers": len(int8),
                "int8_parameters": sum(m.weight.numel() for m in int8),
                "float_parameters_before": total,
                "layers": {"Conv2d": "int8 im2col + matmul, static scales", "Linear": "int8 matmul, static scales"},
                "float_layers": [],
                "weights": INT8_SCHEME["weights"],
                "activations": f"{INT8_SCHEME['activations']}, {bucket.n_buckets} timestep buckets",
                "kernel": "torch._int_mm (int8 x int8 -> int32), canonical strides, self-checked on first use",
            }
        else:
            bucket = None
            changes = _torchao_(model.denoiser, mode)
            changes["float_parameters_before"] = total
        changes["float32_ops"] = ("group norms, SiLU, attention scores and softmax, embeddings, residual adds, "
                                  "int8 (de)quantisation and the sampler's update")
        return _TimestepHook({"mode": mode, "scales": scales}, changes, bucket)


def _torchao_(denoiser: nn.Module, mode: str) -> dict[str, Any]:
    """Quantise the linears of ``denoiser`` in place with torchao; the record's description of every layer.

    On the meta device (``arch:NAME``, counting only) nothing runs and torchao's meta path is a float
    ``mm``; the W8A8 linears are then the project's dynamic :class:`Int8Linear`, which dispatches the
    same ``torch._int_mm`` of the same shapes as torchao on a CPU, so the count is what torchao runs.
    """
    from un0_bench.baselines.torchao_int8 import quantize_linears_, torchao_version

    device = next(denoiser.parameters()).device
    # NB: a linear with one input feature makes a one-column activation, which torch._int_mm gets
    # wrong on some CPUs with the layouts torchao passes (baselines/int_mm.py); it stays float.
    linears = [n for n, m in denoiser.named_modules() if type(m) is nn.Linear and m.in_features > 1]
    floats = [n for n, m in denoiser.named_modules()
              if isinstance(m, nn.Conv2d) or (type(m) is nn.Linear and n not in set(linears))]
    version = torchao_version()
    if mode == "w8a8" and device.type == "meta":
        unused = torch.ones(1)  # the unused static scale (a CPU tensor: it is checked for positivity)
        for name in linears:
            parent_name, _, child = name.rpartition(".")
            parent = denoiser.get_submodule(parent_name) if parent_name else denoiser
            with torch.device("meta"):  # stays weightless
                setattr(parent, child, Int8Linear.from_float(getattr(parent, child), unused, None))
        config = f"counted as torchao {version} W8A8 runs on CPU: torch._int_mm per linear, per-token scales"
    else:
        if mode == "w8a8":  # torchao's CPU product is torch._int_mm: s8s8, or u8s8 on VNNI CPUs without AMX
            for a_dtype in (torch.int8, torch.uint8):
                int_mm.check(device, a_dtype, torch.int8, operands="torchao")
        config = quantize_linears_(denoiser, mode, linears)
    compute = "int8 x int8 -> int32 (torch._int_mm)" if mode == "w8a8" else "weights dequantised, float matmul"
    return {
        "library": f"torchao {version}",
        "config": config,
        "int8_layers": len(linears),
        "int8_parameters": sum(denoiser.get_submodule(n).weight.numel() for n in linears),
        "layers": {"Linear": f"torchao {version} {mode}: {compute}", "Conv2d": f"float ({TORCHAO_FLOAT})",
                   "Linear with 1 input feature": "float (torch._int_mm is wrong on one-column operands on some CPUs)"},
        "float_layers": floats,
        "weights": "int8, symmetric, per output channel (torchao PerRow)",
        "activations": "int8, symmetric, dynamic per token" if mode == "w8a8" else "float (weight-only)",
        "kernel": "torch._int_mm, self-checked on first use" if mode == "w8a8" else "float mm of dequantised weights",
    }


def _static_teacher(teacher: nn.Module, backbone: Backbone) -> tuple[nn.Module, TimestepBucket, dict[str, Any]]:
    """The teacher with the shipped calibrated int8 state (``sd-int8`` on digits), and its metadata.

    Raises:
        CheckpointError: If the calibration file is missing or was made for another UNet config,
            scheme or teacher file (run ``un0-bench train sd-int8``).
    """
    from un0_bench.harness.weights.checkpoints import load_checkpoint, load_into

    path = backbone.weights("sd-int8")
    state, meta = load_checkpoint(path, expected_config=_expected_config(backbone))
    bucket = TimestepBucket(INT8_SCHEME["timestep_buckets"])
    names = quantizable_layers(teacher)
    # Placeholder scales: the loaded state overwrites every int8 buffer.
    qunet = quantize_unet(teacher, {n: torch.ones(bucket.n_buckets) for n in names}, bucket)
    load_into(qunet, state, path)
    return qunet, bucket, meta


def _expected_config(backbone: Backbone) -> dict[str, Any]:
    """The config the backbone's ``sd-int8`` file must carry: its teacher's UNet config and file."""
    return int8_config(backbone.denoiser_config(), backbone.weights("teacher"))
