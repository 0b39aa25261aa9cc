"""The benchmark's techniques applied to a real diffusers pipeline's denoiser (``--backbone diffusers:PATH``).

Every generator here runs the pipeline through its one entry point, ``pipe(...)``, with its own
scheduler, and changes only the denoiser (``unet`` or ``transformer``):

* ``sd`` / ``sd:steps=N`` -- :class:`PipelineGenerator`, the pipeline as loaded;
* ``sd-fp16`` / ``sd-bf16`` -- the denoiser cast to half precision, its inputs and outputs cast at
  its boundary (text encoder and VAE stay in the backbone's ``--dtype``);
* ``sd-int8`` -- every ``nn.Linear`` of the denoiser with int8 weights and int8 activations:
  torchao's dynamic int8 on CUDA when torchao is installed, else :class:`Int8Linear` (per-channel
  weights, per-token dynamic activations, ``torch._int_mm``); convolutions stay in float;
* ``sd-cached`` -- :class:`CachedPipelineGenerator`, DeepCache on a ``UNet2DConditionModel``;
* ``sd-pruned-unstructured`` -- 50% magnitude pruning, dense kernels: zero savings, on purpose;
* ``un0`` -- :class:`GatedPipelineGenerator`: contextual sparsity of the denoiser's feed-forward
  layers, without training: per prompt a small predictor picks the top ``keep`` fraction of hidden
  units of each layer; those rows and columns are gathered into compact weights, cached per prompt.

Per-phase energy: a :class:`PipelineGenerator` calls ``phase_hook("begin" | "end", phase)`` around
each text-encoder call, each denoiser call (one denoising step), the VAE decode and un0's gate;
:func:`measure_phases` turns that into one meter window per phase occurrence.
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from un0_bench.backbones.base import Backbone
from un0_bench.harness.counters.ops import gating_scope, mark_gating
from un0_bench.harness.counters.records import Counts, OpStat
from un0_bench.harness.errors import UserError
from un0_bench.harness.generator import GenerationRequest, GenerationResult, Generator
from un0_bench.harness.meters.base import Meter, MeterUnavailable, Reading
from un0_bench.harness.spec import Param, takes

#: Phases a pipeline generator can be metered by separately, in the order they first run.
PHASES = ("text_encoder", "gate", "denoise_step", "vae_decode")

#: Techniques of the digits world that have no pipeline counterpart here, with the reason;
#: ``un0-bench list`` shows these and the factories refuse them on ``diffusers:PATH``.
NOT_SUPPORTED: dict[str, str] = {
    "sd-pruned": "structured pruning of a real UNet needs fine-tuning, out of scope here "
                 "(sd-pruned-unstructured shows what pruning without it saves: nothing)",
    "sd-distilled": "distilling a real pipeline into a few-step student needs a training run on a GPU "
                    "cluster, out of scope here (use a published few-step pipeline folder as the backbone)",
    "un0-osc": "the oscillator generator is a digits-world model trained from scratch; it has no "
               "counterpart inside a pretrained pipeline",
    "noise": "a quality floor for FID on digits; on a pipeline, quality is the CLIP score",
    "real": "held-out real digits; a pipeline backbone has no reference image set",
}

# Spec parameters (validated by the registry before anything loads). ``steps`` defaults to None:
# the pipeline's own default number of steps.
STEPS = Param(int, None, "denoising steps (default: the pipeline's own)", low=1, high=1000)
INTERVAL = Param(int, 3, "full UNet pass every N denoiser calls", low=1, high=1000)
SPARSITY = Param(float, 0.5, "fraction of each layer's weights zeroed", low=0.0, high=1.0, low_open=True)
KEEP = Param(float, 0.1, "fraction of feed-forward hidden units kept per prompt", low=0.0, high=1.0, low_open=True)

#: Seed of the latents un0's calibration runs start from (fixed, so gates are reproducible).
CALIBRATION_SEED = 1_000_000


def require_pipeline(backbone: Backbone, model: str) -> None:
    """Refuse a backbone that is not ``diffusers:PATH``, and names in :data:`NOT_SUPPORTED`."""
    if backbone.kind != "diffusers":
        raise UserError(f"{model}: this factory runs on diffusers:PATH backbones, not {backbone.name!r}")
    if model in NOT_SUPPORTED:
        raise UserError(f"{model} is not available on {backbone.name}: {NOT_SUPPORTED[model]}")


def _check_int(name: str, value: Any, low: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise UserError(f"{name} must be an integer >= {low}, got {value!r}")


def _cast_floats(obj: Any, dtype: torch.dtype) -> Any:
    """``obj`` with every floating tensor inside (tuples, lists, dicts, diffusers outputs) cast to ``dtype``."""
    if isinstance(obj, torch.Tensor):
        return obj.to(dtype) if obj.is_floating_point() and obj.dtype != dtype else obj
    if isinstance(obj, dict):
        items = {k: _cast_floats(v, dtype) for k, v in obj.items()}
        # diffusers' BaseOutput is a dataclass and a dict; rebuild it as itself.
        return type(obj)(**items) if hasattr(type(obj), "__dataclass_fields__") else type(obj)(items)
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):
        return type(obj)(*(_cast_floats(v, dtype) for v in obj))
    if isinstance(obj, (list, tuple)):
        return type(obj)(_cast_floats(v, dtype) for v in obj)
    return obj


def _image_size(pipe: Any, denoiser: nn.Module) -> tuple[int, int]:
    """The pipeline's default ``(height, width)`` in pixels: latent sample size x VAE scale factor."""
    vsf = getattr(pipe, "vae_scale_factor", None)
    size = getattr(getattr(denoiser, "config", None), "sample_size", None) or getattr(pipe, "default_sample_size", None)
    if vsf is None or size is None:
        raise UserError(f"{type(pipe).__name__}: cannot tell its default image size "
                        "(no vae_scale_factor or sample_size)")
    h, w = (size, size) if isinstance(size, int) else tuple(size)
    return int(h) * int(vsf), int(w) * int(vsf)


# ---------------------------------------------------------------------------------------------
# sd: the pipeline as loaded, with phase hooks
# ---------------------------------------------------------------------------------------------


class PipelineGenerator(Generator):
    """Images from a diffusers pipeline, seeded per image, with hooks around each phase.

    Image ``i`` of a request starts from its own CPU ``torch.Generator`` seeded with ``seed + i``:
    for UNet pipelines the initial latents ``(C, H / f, W / f)`` are drawn from it here and passed
    as ``latents=``, and the same (advanced) generator is passed on to the pipeline for any noise
    its scheduler draws later (ancestral samplers). Transformer pipelines draw their latents from
    those generators themselves (some pack latents in their own layout). Images therefore do not
    depend on the batch size or the device.

    Subclasses change the denoiser and may override :meth:`before_denoise`, :meth:`after_denoise`
    and :meth:`after_batch` (called around every denoiser call and pipeline call).

    Attributes:
        phase_hook: ``None`` or a callable ``(kind, phase)``, called with ``("begin", phase)`` and
            ``("end", phase)`` around every occurrence of a phase in :meth:`phases` (so a runner can
            open and close a meter window on each).
        denoiser_calls: Denoiser calls so far in the current pipeline call (the step index).
    """

    technique = "diffusion"

    def __init__(self, backbone: Backbone, pipe: Any, steps: int | None = None,
                 metadata: dict[str, Any] | None = None) -> None:
        from un0_bench.backbones.pipeline import call_defaults, denoiser_of

        self.backbone = backbone
        self.pipe = pipe
        self.denoiser_name, self.denoiser = denoiser_of(pipe)
        self.denoiser.eval().requires_grad_(False)
        defaults = call_defaults(pipe)
        self.steps = int(defaults.get("num_inference_steps", 50)) if steps is None else steps
        _check_int("steps", self.steps)
        self.guidance_scale = defaults.get("guidance_scale")
        self.height, self.width = _image_size(pipe, self.denoiser)
        self.device = torch.device(getattr(backbone, "device", "cpu"))
        #: dtype of everything around the denoiser (the backbone's --dtype).
        self.pipeline_dtype: torch.dtype = getattr(backbone, "dtype", torch.float32)
        self.metadata = metadata or {}
        self.phase_hook: Callable[[str, str], None] | None = None
        self.denoiser_calls = 0
        self._batch_prompts: tuple[str, ...] = ()
        self._install_hooks()

    # -- hooks ------------------------------------------------------------------------------------

    def _emit(self, kind: str, phase: str) -> None:
        hook = self.phase_hook
        if hook is not None:
            hook(kind, phase)

    def _install_hooks(self) -> None:
        from un0_bench.backbones.pipeline import text_encoders_of

        for encoder in text_encoders_of(self.pipe):
            encoder.register_forward_pre_hook(lambda m, a: self._emit("begin", "text_encoder"))
            encoder.register_forward_hook(lambda m, a, o: self._emit("end", "text_encoder"), always_call=True)
        self.denoiser.register_forward_pre_hook(self._denoiser_pre, with_kwargs=True)
        self.denoiser.register_forward_hook(self._denoiser_post)
        self.denoiser.register_forward_hook(self._denoiser_end, always_call=True)
        vae = getattr(self.pipe, "vae", None)
        if vae is not None:
            # The pipeline calls vae.decode (not forward): wrap that one method of this instance.
            original = vae.decode

            def decode(*args: Any, **kwargs: Any) -> Any:
                self._emit("begin", "vae_decode")
                try:
                    return original(*args, **kwargs)
                finally:
                    self._emit("end", "vae_decode")

            vae.decode = decode

    def _denoiser_pre(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        self.before_denoise(args, kwargs)
        self._emit("begin", "denoise_step")
        dtype = self.denoiser_dtype
        if dtype == self.pipeline_dtype:
            return None
        # The timestep (second positional argument or ``timestep=``) keeps its dtype: bf16 would round it.
        args = (_cast_floats(args[0], dtype), *args[1:2], *_cast_floats(args[2:], dtype)) if args else args
        kwargs = {k: (v if k == "timestep" else _cast_floats(v, dtype)) for k, v in kwargs.items()}
        return args, kwargs

    def _denoiser_post(self, module: nn.Module, args: tuple, output: Any) -> Any:
        if self.denoiser_dtype == self.pipeline_dtype:
            return None
        return _cast_floats(output, self.pipeline_dtype)

    def _denoiser_end(self, module: nn.Module, args: tuple, output: Any) -> None:
        try:
            self.after_denoise()
        finally:
            self._emit("end", "denoise_step")
            self.denoiser_calls += 1

    def before_denoise(self, args: tuple, kwargs: dict) -> None:
        """Called before every denoiser call (``self.denoiser_calls`` is its index). Default: nothing."""

    def after_denoise(self) -> None:
        """Called after every denoiser call, even one that raised. Default: nothing."""

    def after_batch(self) -> None:
        """Called after every pipeline call, even one that raised. Default: nothing."""

    # -- generation -------------------------------------------------------------------------------

    @property
    def denoiser_dtype(self) -> torch.dtype:
        return next(self.denoiser.parameters()).dtype

    def latent_shape(self) -> tuple[int, ...] | None:
        """``(C, H / f, W / f)`` of one image's initial latents for UNet pipelines, else ``None``."""
        if self.denoiser_name != "unet":
            return None
        f = self.pipe.vae_scale_factor
        return (int(self.denoiser.config.in_channels), self.height // f, self.width // f)

    def phases(self) -> tuple[str, ...]:
        return ("text_encoder", "denoise_step", "vae_decode")

    def run_batch(self, prompts: Sequence[str], seed: int, first: int) -> torch.Tensor:
        """Images ``(B, 3, H, W)`` in [0, 1] (float32, CPU) of one pipeline call."""
        gens = [torch.Generator().manual_seed(seed + first + k) for k in range(len(prompts))]
        kwargs: dict[str, Any] = dict(prompt=list(prompts), height=self.height, width=self.width,
                                      num_inference_steps=self.steps, generator=gens, output_type="pt")
        shape = self.latent_shape()
        if shape is not None:
            # Same draws as harness.generator.image_noise: image i's own generator, seeded seed + i.
            latents = torch.stack([torch.randn(shape, generator=g) for g in gens])  # (B, C, h, w)
            kwargs["latents"] = latents.to(self.device, self.pipeline_dtype)
        self._batch_prompts = tuple(prompts)
        self.denoiser_calls = 0
        try:
            images = self.pipe(**kwargs).images  # (B, 3, H, W) in [0, 1]
        finally:
            self.after_batch()
        return images.detach().float().cpu().clamp(0.0, 1.0)

    def generate(self, request: GenerationRequest) -> GenerationResult:
        for p in request.prompts:  # refuse bad prompts before any work
            self.backbone.check_prompt(p)
        out = [self.run_batch(prompts, request.seed, first) for first, prompts in request.batches()]
        return GenerationResult(images=torch.cat(out), prompts=request.prompts,
                                info={"steps": self.steps, "denoiser_calls_last_batch": self.denoiser_calls})

    def describe(self) -> dict[str, Any]:
        from un0_bench.backbones.pipeline import dtype_label

        return {
            "technique": self.technique,
            "backbone": self.backbone.name,
            "pipeline": type(self.pipe).__name__,
            "scheduler": type(self.pipe.scheduler).__name__,
            "steps": self.steps,
            "guidance_scale": self.guidance_scale,
            "height": self.height,
            "width": self.width,
            "device": str(self.device),
            "pipeline_dtype": dtype_label(self.pipeline_dtype),
            "denoiser": self.denoiser_name,
            "dtype": dtype_label(self.denoiser_dtype),
            "parameters": sum(p.numel() for p in self.denoiser.parameters()),
            "phases": list(self.phases()),
        }

    def derivation(self) -> dict[str, Any] | None:
        return self.metadata or None


# ---------------------------------------------------------------------------------------------
# sd-int8
# ---------------------------------------------------------------------------------------------


class Int8Linear(nn.Module):
    """``nn.Linear`` with int8 weights and int8 activations, computed by ``torch._int_mm``.

    Weights are quantised once, symmetric per output channel; activations per token (row) at run
    time, symmetric (dynamic quantisation, no calibration). ``y = (x_q @ w_q^T) * s_x * s_w + b``:
    the matmul accumulates in int32 and is counted as int8 work by the op counter.
    """

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        w = linear.weight.detach().float()  # (N, K)
        scale = w.abs().amax(dim=1).clamp(min=1e-12) / 127.0  # (N,)
        self.register_buffer("weight_int8", torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8))
        self.register_buffer("weight_scale", scale)
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().float().clone())
        self.in_features, self.out_features = linear.in_features, linear.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1]).float()  # (M, K)
        sx = x2.abs().amax(dim=1, keepdim=True).clamp(min=1e-12) / 127.0  # (M, 1)
        xq = torch.round(x2 / sx).clamp(-127, 127).to(torch.int8)
        m = xq.shape[0]
        if xq.is_cuda and m <= 16:
            # NB: CUDA's int8 matmul needs more than 16 rows; pad with zero rows (their cost is counted).
            xq = torch.cat([xq, xq.new_zeros(17 - m, xq.shape[1])])
        acc = torch._int_mm(xq, self.weight_int8.t())[:m]  # (M, N) int32
        y = acc.float() * sx * self.weight_scale
        if self.bias is not None:
            y = y + self.bias
        return y.to(x.dtype).reshape(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 (w8a8 dynamic)"


def _int8_own(denoiser: nn.Module) -> dict[str, Any]:
    """Replace every ``nn.Linear`` of ``denoiser`` by :class:`Int8Linear`; what was quantised."""
    cuda = next(denoiser.parameters()).is_cuda
    quantized, skipped = [], []
    for name, module in list(denoiser.named_modules()):
        if type(module) is not nn.Linear:
            continue
        if cuda and (module.in_features % 8 or module.out_features % 8):
            skipped.append(name)  # cuBLAS int8 needs K and N divisible by 8
            continue
        parent_name, _, attr = name.rpartition(".")
        setattr(denoiser.get_submodule(parent_name) if parent_name else denoiser, attr, Int8Linear(module))
        quantized.append(name)
    return {"backend": "torch._int_mm (w8a8: int8 weights per channel, int8 activations per token, dynamic)",
            "quantized": quantized, "skipped": skipped}


def _int8_torchao(denoiser: nn.Module) -> dict[str, Any] | None:
    """Quantise every Linear with torchao (int8 dynamic activations, int8 weights); ``None`` without torchao."""
    try:
        import torchao
        import torchao.quantization as tq
    except ImportError:
        return None
    names = [n for n, m in denoiser.named_modules() if type(m) is nn.Linear]
    config = getattr(tq, "Int8DynamicActivationInt8WeightConfig", None)
    config = config() if config is not None else tq.int8_dynamic_activation_int8_weight()
    tq.quantize_(denoiser, config, filter_fn=lambda m, fqn: type(m) is nn.Linear)
    return {"backend": f"torchao {torchao.__version__} int8 dynamic activation, int8 weight",
            "quantized": names, "skipped": []}


class Int8PipelineGenerator(PipelineGenerator):
    """The pipeline with its denoiser's linear layers in int8 (see :func:`build_int8`)."""

    technique = "int8"

    def __init__(self, backbone: Backbone, pipe: Any, steps: int | None = None) -> None:
        super().__init__(backbone, pipe, steps)
        total = sum(p.numel() for p in self.denoiser.parameters())
        info = _int8_torchao(self.denoiser) if self.device.type == "cuda" else None
        self.quantization = info or _int8_own(self.denoiser)
        linear_params = sum(m.weight_int8.numel() for m in self.denoiser.modules() if isinstance(m, Int8Linear))
        self.quantization["float_parameters_before"] = total
        if isinstance(info, dict):
            self.quantization["note"] = "torchao on CUDA"
        else:
            self.quantization["int8_weights"] = linear_params
            self.quantization["int8_share_of_weights"] = linear_params / total if total else 0.0
        self.quantization["not_quantized"] = "convolutions, normalisations, embeddings (kept in float)"

    @property
    def denoiser_dtype(self) -> torch.dtype:
        return self.pipeline_dtype  # Int8Linear returns its input's dtype: no cast at the boundary

    def describe(self) -> dict[str, Any]:
        q = dict(self.quantization)
        q["quantized_layers"] = len(q.pop("quantized"))
        q["skipped_layers"] = q.pop("skipped")
        return {**super().describe(), "dtype": "int8", "quantization": q}


# ---------------------------------------------------------------------------------------------
# sd-cached: DeepCache on a UNet2DConditionModel
# ---------------------------------------------------------------------------------------------


class _SkipDown(nn.Module):
    """Stands in for a deep down block on a cached step: no work, the right number of residuals."""

    def __init__(self, residuals: int) -> None:
        super().__init__()
        self.residuals = residuals

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> tuple[torch.Tensor, tuple]:
        return hidden_states, (hidden_states,) * self.residuals


class _SkipMid(nn.Module):
    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return hidden_states


class _SkipUp(nn.Module):
    """Stands in for a deep up block: consumes its residuals and returns the cached deep feature."""

    def __init__(self, resnets: int, deep: Callable[[], torch.Tensor]) -> None:
        super().__init__()
        self.resnets = [None] * resnets  # UNet2DConditionModel reads len(block.resnets)
        self._deep = deep

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self._deep()


class CachedPipelineGenerator(PipelineGenerator):
    """DeepCache (Ma, Fang and Wang, CVPR 2024) on the pipeline's ``UNet2DConditionModel``.

    On a *full* denoiser call the whole UNet runs and the input of its last up block (the output
    of ``up_blocks[-2]``) is kept. On the next ``interval - 1`` calls only the shallow branch runs:
    time (and added) embeddings, ``conv_in``, the first down block without its downsampler, the
    last up block fed with the kept feature and the fresh skip features, and the output head. The
    UNet's own ``forward`` runs every time; on cached calls its deep blocks are swapped for stubs
    that do no work, so SD 1.x/2.x and SDXL (added embeddings) need no hand-written forward.
    A call is full when ``call_index % interval == 0``; ``interval=1`` is the plain pipeline.
    """

    technique = "deepcache"

    def __init__(self, backbone: Backbone, pipe: Any, steps: int | None = None, interval: int = 3) -> None:
        super().__init__(backbone, pipe, steps)
        _check_int("interval", interval)
        unet = self.denoiser
        if type(unet).__name__ != "UNet2DConditionModel":
            raise UserError(f"sd-cached needs a UNet2DConditionModel denoiser; {type(pipe).__name__} has "
                            f"{type(unet).__name__} (DeepCache's deep/shallow split is defined for UNets)")
        if len(unet.down_blocks) < 2 or len(unet.up_blocks) != len(unet.down_blocks):
            raise UserError("sd-cached needs a UNet with at least two resolutions (nothing deep to cache)")
        self.interval = interval
        self._deep: torch.Tensor | None = None  # (R, C, h, w) input of the last up block
        self._saved: tuple | None = None
        self.cached_calls = 0
        self.full_calls = 0
        down0 = unet.down_blocks[0]
        self._down_stubs = [_SkipDown(len(b.resnets) + (1 if b.downsamplers is not None else 0))
                            for b in unet.down_blocks[1:]]
        self._mid_stub = _SkipMid() if unet.mid_block is not None else None
        self._up_stubs = [_SkipUp(len(b.resnets), self._cached_feature) for b in unet.up_blocks[:-1]]
        self._downsampler_stub = (nn.ModuleList([_SkipMid() for _ in down0.downsamplers])
                                  if down0.downsamplers is not None else None)
        unet.up_blocks[-1].register_forward_pre_hook(self._keep_deep, with_kwargs=True)

    def _cached_feature(self) -> torch.Tensor:
        assert self._deep is not None  # checked in before_denoise
        return self._deep

    def _keep_deep(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        self._deep = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]

    def before_denoise(self, args: tuple, kwargs: dict) -> None:
        if self.denoiser_calls % self.interval == 0:
            self.full_calls += 1
            return
        sample = args[0] if args else kwargs["sample"]
        if self._deep is None or self._deep.shape[0] != sample.shape[0]:
            raise RuntimeError(f"call {self.denoiser_calls} reuses the deep feature, but no full call of this "
                               "batch ran before it")
        unet = self.denoiser
        down0 = unet.down_blocks[0]
        self._saved = (list(unet.down_blocks), unet.mid_block, list(unet.up_blocks), down0.downsamplers)
        for i, stub in enumerate(self._down_stubs, start=1):
            unet.down_blocks[i] = stub
        if self._mid_stub is not None:
            unet.mid_block = self._mid_stub
        for i, stub in enumerate(self._up_stubs):
            unet.up_blocks[i] = stub
        if self._downsampler_stub is not None:
            down0.downsamplers = self._downsampler_stub
        self.cached_calls += 1

    def after_denoise(self) -> None:
        if self._saved is None:
            return
        unet = self.denoiser
        downs, mid, ups, downsamplers = self._saved
        for i, block in enumerate(downs):
            unet.down_blocks[i] = block
        unet.mid_block = mid
        for i, block in enumerate(ups):
            unet.up_blocks[i] = block
        unet.down_blocks[0].downsamplers = downsamplers
        self._saved = None

    def after_batch(self) -> None:
        self._deep = None  # a batch's features never leak into the next batch

    def describe(self) -> dict[str, Any]:
        full = math.ceil(self.steps / self.interval)
        return {
            **super().describe(),
            "interval": self.interval,
            "full_share": full / self.steps,
            "cached_feature": "input of the last up block (output of up_blocks[-2])",
            "note": "one step = one denoiser call; schedulers that call the denoiser twice per step "
                    "(Heun, DPM2) count each call",
        }


# ---------------------------------------------------------------------------------------------
# sd-pruned-unstructured
# ---------------------------------------------------------------------------------------------


@torch.no_grad()
def magnitude_prune_(module: nn.Module, sparsity: float) -> dict[str, Any]:
    """Zero the smallest-magnitude ``sparsity`` fraction of each Linear and Conv2d weight, in place."""
    layers = zeros = total = 0
    for m in module.modules():
        if not isinstance(m, (nn.Linear, nn.Conv2d)):
            continue
        w = m.weight.view(-1)
        k = int(round(sparsity * w.numel()))
        if k:
            w[torch.topk(w.abs().float(), k, largest=False).indices] = 0
        layers += 1
        zeros += int((w == 0).sum())
        total += w.numel()
    return {"layers": layers, "zero_weights": zeros, "weights": total, "sparsity": zeros / total if total else 0.0}


class PrunedPipelineGenerator(PipelineGenerator):
    """Magnitude-pruned denoiser weights run with dense kernels: the zeros are still multiplied."""

    technique = "unstructured-pruning"

    def __init__(self, backbone: Backbone, pipe: Any, steps: int | None = None, sparsity: float = 0.5) -> None:
        super().__init__(backbone, pipe, steps)
        if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)) or not 0 <= sparsity < 1:
            raise UserError(f"sparsity must be a number in [0, 1), got {sparsity!r}")
        self.pruning = magnitude_prune_(self.denoiser, float(sparsity))
        self.pruning["criterion"] = "per-layer weight magnitude (Linear and Conv2d), no fine-tuning"
        self.pruning["kernels"] = "dense: zeros are still multiplied, so FLOPs and energy do not drop"

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "pruning": self.pruning}


# ---------------------------------------------------------------------------------------------
# un0: contextual sparsity of the denoiser's feed-forward layers
# ---------------------------------------------------------------------------------------------

#: Gated-linear activations: ``proj`` gives ``[a, g]`` and the hidden unit is ``a * act(g)``.
_GLU_ACTS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {"GEGLU": F.gelu, "SwiGLU": F.silu}


class _FeedForwardSpec:
    """The pieces of one diffusers ``FeedForward``: input projection, activation, output projection."""

    def __init__(self, path: str, ff: nn.Module) -> None:
        act_module = ff.net[0]
        kind = type(act_module).__name__
        outs = [m for m in ff.net if isinstance(m, nn.Linear)]
        proj = getattr(act_module, "proj", None)
        if not outs or not isinstance(proj, nn.Linear):
            raise UserError(f"un0: feed-forward {path} has no input and output projection to gate")
        self.path, self.kind, self.act_module, self.proj, self.out = path, kind, act_module, proj, outs[-1]
        self.glu = kind in _GLU_ACTS
        if self.glu:
            self.act: Callable[[torch.Tensor], torch.Tensor] = _GLU_ACTS[kind]
        elif kind == "GELU":
            approximate = act_module.approximate
            self.act = lambda x: F.gelu(x, approximate=approximate)
        elif kind == "ApproximateGELU":
            self.act = lambda x: x * torch.sigmoid(1.702 * x)
        elif kind == "LinearActivation":
            self.act = act_module.activation
        else:
            raise UserError(f"un0: feed-forward {path} uses {kind}; supported activations: GEGLU, SwiGLU, GELU, "
                            "ApproximateGELU, LinearActivation")
        self.inner = self.out.in_features  # hidden units


class CompactFeedForward:
    """The kept hidden units of one feed-forward layer, gathered into dense compact weights.

    Built inside the gate (its gathers are gating work); called inside the denoiser (compute).
    """

    def __init__(self, spec: _FeedForwardSpec, keep: torch.Tensor) -> None:
        rows = torch.cat([keep, keep + spec.inner]) if spec.glu else keep  # GLU: [a-rows, g-rows]
        self.spec = spec
        self.w_in = spec.proj.weight.index_select(0, rows)  # (k or 2k, D)
        self.b_in = None if spec.proj.bias is None else spec.proj.bias.index_select(0, rows)
        self.w_out = spec.out.weight.index_select(1, keep)  # (D_out, k)
        self.b_out = spec.out.bias  # whole: one per output channel, shared with the dense layer
        self.units = int(keep.numel())

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        h = F.linear(x, self.w_in, self.b_in)  # (..., k) or (..., 2k)
        if self.spec.glu:
            a, g = h.chunk(2, dim=-1)
            h = a * self.spec.act(g)
        else:
            h = self.spec.act(h)
        return F.linear(h, self.w_out, self.b_out)  # (..., D_out)

    @property
    def nbytes(self) -> int:
        ts = [self.w_in, self.w_out] + ([self.b_in] if self.b_in is not None else [])
        return sum(t.numel() * t.element_size() for t in ts)


class GatedFeedForward(nn.Module):
    """Replaces a ``FeedForward``: each batch row runs through its prompt's compact sub-network.

    Rows map to prompts as diffusers lays out classifier-free guidance (``[uncond; cond]``): row
    ``r`` of a batch of ``B`` prompts belongs to prompt ``r % B``, so both halves of an image use
    the keep-set of its prompt.
    """

    def __init__(self, dense: nn.Module, spec: _FeedForwardSpec) -> None:
        super().__init__()
        self.dense = dense  # kept so the weights stay in the module tree; never called
        self.spec = spec
        self.active: list[CompactFeedForward] | None = None

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        subs = self.active
        if subs is None:
            raise RuntimeError(f"gated feed-forward {self.spec.path} called before the gate chose its units")
        b, rows = len(subs), hidden_states.shape[0]
        if b == 1:
            return subs[0](hidden_states)
        if rows % b:
            raise RuntimeError(f"{rows} rows for {b} prompts in {self.spec.path}")
        with gating_scope():  # the split and merge are caused by gating
            out = hidden_states.new_empty(*hidden_states.shape[:-1], self.spec.out.out_features)
        for p, sub in enumerate(subs):
            y = sub(hidden_states[p::b])
            with gating_scope():
                out[p::b] = y
        return out


class PromptGate(nn.Module):
    """Per-prompt scores of every feed-forward hidden unit, from the prompt's mean text embedding.

    Kernel ridge regression with a linear kernel, in closed form, fitted on ``P`` calibration
    prompts: ``score_l(f) = mean_l + k(f) A_l`` with ``k(f) = X_c (f - mu)`` the similarities of the
    prompt to the (centred) calibration prompts. So the gate is two small linear maps: one shared
    ``D -> P`` and one ``P -> U_l`` per layer.
    """

    def __init__(self, features: torch.Tensor, targets: list[torch.Tensor], ridge: float) -> None:
        super().__init__()
        x = features.double()  # (P, D)
        mu = x.mean(0)
        xc = x - mu
        p = x.shape[0]
        kernel = xc @ xc.T  # (P, P)
        lam = ridge * float(kernel.diagonal().mean()) + 1e-12
        system = kernel + lam * torch.eye(p, dtype=torch.float64)
        self.project = nn.Linear(x.shape[1], p)
        self.project.weight.data = xc.float()
        self.project.bias.data = (-(xc @ mu)).float()
        self.heads = nn.ModuleList()
        for y in targets:  # (P, U_l)
            y = y.double()
            mean = y.mean(0)
            a = torch.linalg.solve(system, y - mean)  # (P, U_l)
            head = nn.Linear(p, y.shape[1])
            head.weight.data = a.T.float().contiguous()
            head.bias.data = mean.float()
            self.heads.append(head)
        mark_gating(self)

    def forward(self, features: torch.Tensor) -> list[torch.Tensor]:
        z = self.project(features.float())  # (N, P)
        return [head(z) for head in self.heads]  # [(N, U_l)]


class GatedPipelineGenerator(PipelineGenerator):
    """un0 on a pipeline: the denoiser's feed-forward layers keep a per-prompt ``keep`` share of units.

    Built in three steps, none of which trains the pipeline:

    1. calibration: the pipeline runs on calibration prompts while every feed-forward layer's
       hidden activations are recorded; a unit's importance for a prompt is its mean ``|h_j|``
       times the norm of its output column (how much it adds to the layer's output);
    2. a :class:`PromptGate` is fitted to predict those importances from the prompt's mean text
       embedding (contextual sparsity, as Deja Vu does for LLMs, here per prompt);
    3. every ``FeedForward`` is replaced by a :class:`GatedFeedForward`.

    At generation, on the first denoiser call of a batch the gate phase scores the batch's new
    prompts, keeps the top ``keep`` fraction of units per layer and gathers them into compact
    weights, cached per prompt (LRU, bounded in bytes). The gate network is marked and the gathers
    run in ``gating_scope()``, so the counters attribute them to gating.
    """

    technique = "un0-contextual-sparsity"

    def __init__(self, backbone: Backbone, pipe: Any, steps: int | None = None, keep: float = 0.1,
                 calibration_prompts: Sequence[str] | None = None, calibration_steps: int | None = None,
                 ridge: float = 1.0, cache_bytes: int = 2**30, meter_calibration: bool = True) -> None:
        from un0_bench.backbones.pipeline import CALIBRATION_PROMPTS, feed_forward_layers

        super().__init__(backbone, pipe, steps)
        if isinstance(keep, bool) or not isinstance(keep, (int, float)) or not 0 < keep <= 1:
            raise UserError(f"keep must be a number in (0, 1], got {keep!r}")
        self.keep = float(keep)
        self.specs = [_FeedForwardSpec(path, ff) for path, ff in feed_forward_layers(self.denoiser)]
        if not self.specs:
            raise UserError(f"un0: the {self.denoiser_name} of {type(pipe).__name__} has no feed-forward layers")
        self.keep_units = [max(1, round(self.keep * s.inner)) for s in self.specs]
        prompts = tuple(calibration_prompts or CALIBRATION_PROMPTS)
        for p in prompts:
            backbone.check_prompt(p)
        cal_steps = min(self.steps, 10) if calibration_steps is None else calibration_steps
        _check_int("calibration_steps", cal_steps)
        self.cache_bytes = cache_bytes
        self._cache: OrderedDict[str, list[CompactFeedForward]] = OrderedDict()
        self._stats = {"hits": 0, "misses": 0, "evictions": 0}
        #: "record" (calibration: keep prompt features), "plain" (dense, no gate) or "gate".
        self._mode = "plain"
        self._recorded: list[torch.Tensor] = []
        self.gate = self._calibrate(prompts, cal_steps, ridge, meter_calibration)
        self.gated: list[GatedFeedForward] = []
        for spec, (path, ff) in zip(self.specs, feed_forward_layers(self.denoiser), strict=True):
            gated = GatedFeedForward(ff, spec)
            parent, _, attr = path.rpartition(".")
            setattr(self.denoiser.get_submodule(parent) if parent else self.denoiser, attr, gated)
            self.gated.append(gated)
        self._mode = "gate"

    # -- calibration ------------------------------------------------------------------------------

    def _prompt_features(self, kwargs: dict) -> torch.Tensor:
        """Mean text embedding of each prompt of the batch ``(B, D)``, from the denoiser's conditioning."""
        ehs = kwargs.get("encoder_hidden_states")
        if not isinstance(ehs, torch.Tensor):
            raise UserError(f"un0: the {self.denoiser_name} is not called with encoder_hidden_states; "
                            "cannot read the prompt")
        b, rows = len(self._batch_prompts), ehs.shape[0]
        if rows not in (b, 2 * b):
            raise RuntimeError(f"un0: {rows} conditioning rows for {b} prompts")
        cond = ehs[rows - b:]  # (B, T, D): the conditional half under classifier-free guidance
        return cond.float().mean(dim=1)

    def _calibrate(self, prompts: tuple[str, ...], steps: int, ridge: float, meter: bool) -> PromptGate:
        from un0_bench.harness.training import metered_training

        n = len(prompts)
        sums = [torch.zeros(n, s.inner, dtype=torch.float64) for s in self.specs]
        offset = [0]

        def record(index: int) -> Callable[..., None]:
            def hook(module: nn.Module, args: tuple, out: torch.Tensor) -> None:
                h = out.detach().float().abs()
                per_row = h.reshape(h.shape[0], -1, h.shape[-1]).mean(dim=1)  # (R, U)
                b = len(self._batch_prompts)
                per_prompt = per_row.reshape(-1, b, per_row.shape[-1]).sum(dim=0)  # (B, U): CFG halves summed
                sums[index][offset[0] : offset[0] + b] += per_prompt.double().cpu()
            return hook

        batch = 4
        features: list[torch.Tensor] = []

        def run_all() -> None:
            handles = [s.act_module.register_forward_hook(record(i)) for i, s in enumerate(self.specs)]
            self._mode = "record"
            self._recorded = features
            try:
                for first in range(0, n, batch):
                    offset[0] = first
                    self.run_batch(prompts[first : first + batch], CALIBRATION_SEED, first)
            finally:
                for h in handles:
                    h.remove()
                self._mode = "plain"

        saved_steps, self.steps = self.steps, steps
        t0 = time.perf_counter()
        energy: dict[str, Any] = {}
        try:
            if meter:
                with metered_training() as metered:
                    run_all()
                energy = metered.by_meter
                energy["proxy"] = self._count_calibration_batch(prompts[:batch], n, batch)
            else:
                run_all()
        finally:
            self.steps = saved_steps
        duration_s = time.perf_counter() - t0
        targets = []
        for spec, s in zip(self.specs, sums, strict=True):
            column_norm = spec.out.weight.detach().float().norm(dim=0).double().cpu()  # (U,)
            targets.append(s * column_norm)  # (P, U): expected size of each unit's contribution
        gate = PromptGate(torch.cat(features), targets, ridge).to(self.device)
        self.metadata = {
            "kind": "un0-pipeline-calibration",
            "command": f"no separate command: calibrated when un0 is built on {self.backbone.name}",
            "energy": energy,
            "duration_s": duration_s,
            "calibration": {"prompts": n, "steps": steps, "seed": CALIBRATION_SEED, "ridge": ridge,
                            "features": "mean over tokens of the conditional encoder_hidden_states",
                            "importance": "mean |hidden unit| x norm of its output column"},
            "gate_parameters": sum(p.numel() for p in gate.parameters()),
        }
        return gate

    def _count_calibration_batch(self, prompts: tuple[str, ...], n: int, batch: int) -> dict[str, Any]:
        """Proxy energy of calibration: one counted batch x the number of batches."""
        from un0_bench.harness.counters.ops import OpCounter
        from un0_bench.harness.meters.proxy import DEFAULT_PROFILE, proxy_energy

        with OpCounter() as counter:
            self.run_batch(prompts, CALIBRATION_SEED, 0)
        counts = counter.counts(images=len(prompts))
        batches = math.ceil(n / batch)
        return {"status": "ok", "energy_j": proxy_energy(counts, DEFAULT_PROFILE).total_j * batches,
                "flops": counts.flops() * batches, "profile": DEFAULT_PROFILE,
                "note": f"counted cost of one calibration batch x {batches} batches"}

    # -- gating -----------------------------------------------------------------------------------

    def before_denoise(self, args: tuple, kwargs: dict) -> None:
        if self.denoiser_calls != 0 or self._mode == "plain":
            return
        if self._mode == "record":
            self._recorded.append(self._prompt_features(kwargs).cpu())  # (B, D)
            return
        self._emit("begin", "gate")
        try:
            self._gate_batch(kwargs)
        finally:
            self._emit("end", "gate")

    def _gate_batch(self, kwargs: dict) -> None:
        prompts = self._batch_prompts
        with gating_scope():
            new = []
            for i, p in enumerate(prompts):
                if p in self._cache or p in prompts[:i]:
                    self._stats["hits"] += 1
                    if p in self._cache:
                        self._cache.move_to_end(p)
                else:
                    self._stats["misses"] += 1
                    new.append(i)
            if new:
                features = self._prompt_features(kwargs)[new]  # (M, D)
                scores = self.gate(features)  # [(M, U_l)]
                subs: list[list[CompactFeedForward]] = [[] for _ in new]
                for spec, k, s in zip(self.specs, self.keep_units, scores, strict=True):
                    keep = s.topk(k, dim=-1).indices.sort(dim=-1).values  # (M, k), ascending for locality
                    for j in range(len(new)):
                        subs[j].append(CompactFeedForward(spec, keep[j]))
                for j, i in enumerate(new):
                    self._cache_put(prompts[i], subs[j])
            for layer_index, layer in enumerate(self.gated):
                layer.active = [self._cache[p][layer_index] for p in prompts]

    def _cache_put(self, prompt: str, subs: list[CompactFeedForward]) -> None:
        self._cache[prompt] = subs
        while self._cache_nbytes() > self.cache_bytes and len(self._cache) > 1:
            oldest = next(iter(self._cache))
            if oldest == prompt:
                break
            del self._cache[oldest]
            self._stats["evictions"] += 1

    def _cache_nbytes(self) -> int:
        return sum(s.nbytes for subs in self._cache.values() for s in subs)

    def after_batch(self) -> None:
        for layer in getattr(self, "gated", ()):
            layer.active = None

    def phases(self) -> tuple[str, ...]:
        return ("text_encoder", "gate", "denoise_step", "vae_decode")

    def reset_cache(self) -> None:
        self._cache.clear()
        self._stats = {"hits": 0, "misses": 0, "evictions": 0}

    def cache_stats(self) -> dict[str, Any]:
        return {**self._stats, "entries": len(self._cache), "bytes_held": self._cache_nbytes(),
                "limit_bytes": self.cache_bytes}

    def describe(self) -> dict[str, Any]:
        units = sum(s.inner for s in self.specs)
        ff_params = sum(p.numel() for s in self.specs for p in (s.proj.weight, s.out.weight))
        total = sum(p.numel() for p in self.denoiser.parameters())  # the gate lives outside the denoiser
        return {
            **super().describe(),
            "keep": self.keep,
            "gated_layers": len(self.specs),
            "activations": sorted({s.kind for s in self.specs}),
            "hidden_units": units,
            "kept_units": sum(self.keep_units),
            "feed_forward_share_of_weights": ff_params / total if total else 0.0,
            "gate": "kernel ridge on the mean text embedding, fitted on calibration prompts (no training)",
            "gate_parameters": sum(p.numel() for p in self.gate.parameters()),
            "cache_limit_bytes": self.cache_bytes,
        }


# ---------------------------------------------------------------------------------------------
# Factories (the registered digits factories dispatch here when backbone.kind == "diffusers")
# ---------------------------------------------------------------------------------------------


@takes(steps=STEPS)
def build_sd(backbone: Backbone, steps: int | None = None) -> Generator:
    """``sd`` and ``sd:steps=N``: the pipeline as loaded, with its own scheduler (``None``: its default)."""
    require_pipeline(backbone, "sd")
    return PipelineGenerator(backbone, backbone.load_pipeline(), steps)


def _build_cast(backbone: Backbone, steps: int | None, dtype: torch.dtype, name: str) -> Generator:
    require_pipeline(backbone, name)
    gen = PipelineGenerator(backbone, backbone.load_pipeline(), steps)
    gen.denoiser.to(dtype)
    gen.technique = f"{str(dtype).removeprefix('torch.')} denoiser"
    return gen


@takes(steps=STEPS)
def build_fp16(backbone: Backbone, steps: int | None = None) -> Generator:
    """``sd-fp16``: the denoiser's weights and activations in float16 (the rest in ``--dtype``)."""
    return _build_cast(backbone, steps, torch.float16, "sd-fp16")


@takes(steps=STEPS)
def build_bf16(backbone: Backbone, steps: int | None = None) -> Generator:
    """``sd-bf16``: the denoiser's weights and activations in bfloat16 (the rest in ``--dtype``)."""
    return _build_cast(backbone, steps, torch.bfloat16, "sd-bf16")


@takes(steps=STEPS)
def build_int8(backbone: Backbone, steps: int | None = None) -> Generator:
    """``sd-int8``: int8 weights and activations on every linear layer of the denoiser."""
    require_pipeline(backbone, "sd-int8")
    return Int8PipelineGenerator(backbone, backbone.load_pipeline(), steps)


@takes(steps=STEPS, interval=INTERVAL)
def build_cached(backbone: Backbone, steps: int | None = None, interval: int = 3) -> Generator:
    """``sd-cached``: DeepCache with a full UNet pass every ``interval`` denoiser calls."""
    require_pipeline(backbone, "sd-cached")
    return CachedPipelineGenerator(backbone, backbone.load_pipeline(), steps, interval)


@takes(steps=STEPS, sparsity=SPARSITY)
def build_pruned_unstructured(backbone: Backbone, steps: int | None = None, sparsity: float = 0.5) -> Generator:
    """``sd-pruned-unstructured``: magnitude pruning of the denoiser, dense kernels (zero savings)."""
    require_pipeline(backbone, "sd-pruned-unstructured")
    return PrunedPipelineGenerator(backbone, backbone.load_pipeline(), steps, sparsity)


@takes(keep=KEEP, steps=STEPS)
def build_un0(backbone: Backbone, keep: float = 0.1, steps: int | None = None, *,
              calibration_prompts: Sequence[str] | None = None, calibration_steps: int | None = None,
              meter_calibration: bool = True) -> Generator:
    """``un0``: per-prompt neuron gating of the denoiser's feed-forward layers, calibrated at build time."""
    require_pipeline(backbone, "un0")
    return GatedPipelineGenerator(backbone, backbone.load_pipeline(), steps, keep,
                                  calibration_prompts=calibration_prompts, calibration_steps=calibration_steps,
                                  meter_calibration=meter_calibration)


# ---------------------------------------------------------------------------------------------
# Per-phase measurement
# ---------------------------------------------------------------------------------------------

_Key = tuple[str, str, str, str]


def _snapshot(counter: Any) -> dict[_Key, tuple[int, int, int, int, bool]]:
    return {(s.op, s.dtype, s.role, s.module): (s.calls, s.flops, s.bytes_read, s.bytes_written, s.counted)
            for s in counter.counts(images=1).stats}


def _diff(after: dict[_Key, tuple], before: dict[_Key, tuple]) -> list[OpStat]:
    out = []
    for key, (calls, flops, br, bw, counted) in after.items():
        c0, f0, r0, w0, _ = before.get(key, (0, 0, 0, 0, True))
        if calls > c0:
            out.append(OpStat(*key, calls=calls - c0, flops=flops - f0, bytes_read=br - r0, bytes_written=bw - w0,
                              counted=counted))
    return out


def measure_phases(generator: PipelineGenerator, request: GenerationRequest,
                   meters: Mapping[str, Meter] | Sequence[Meter], *, cold: bool = False) -> dict[str, dict[str, Any]]:
    """Energy, time and counted work of each phase of one ``generate(request)``.

    Two passes over the same request: a counting pass (:class:`~harness.counters.ops.OpCounter`,
    snapshotted at every phase boundary, so each phase occurrence has its own counts) and a metered
    pass, in which every meter opens a window at each ``begin`` and closes it at the matching
    ``end``; the proxy meter is handed that occurrence's counts before it closes. Windows of one
    phase are summed.

    Args:
        generator: A pipeline generator (it has ``phase_hook`` and :meth:`phases`).
        request: What to generate.
        meters: Ready meters, by name or as a list.
        cold: Empty the generator's cache before each pass, so un0's gate does its full work.

    Returns:
        ``{phase: {"calls", "duration_s", "energy_j": {meter: J or None}, "status": {meter: ...},
        "flops", "bytes", "gating_flops", "below_resolution": [meters]}}`` for every phase in
        ``generator.phases()``, plus ``"other"``: work outside any phase (scheduler arithmetic,
        image post-processing), counted but not windowed, so only the proxy prices it.
    """
    from un0_bench.harness.counters.ops import OpCounter
    from un0_bench.harness.meters.proxy import ProxyMeter, proxy_energy

    meters = dict(meters) if isinstance(meters, Mapping) else {m.name: m for m in meters}
    phases = generator.phases()
    if not phases:
        raise ValueError("the generator has no phases to measure")
    images = len(request.prompts)

    # 1. Counting pass.
    if cold:
        generator.reset_cache()
    occurrences: list[tuple[str, list[OpStat]]] = []
    with OpCounter() as counter:
        opened: dict[str, dict[_Key, tuple]] = {}

        def count_hook(kind: str, phase: str) -> None:
            if kind == "begin":
                opened[phase] = _snapshot(counter)
            else:
                occurrences.append((phase, _diff(_snapshot(counter), opened.pop(phase))))

        generator.phase_hook = count_hook
        try:
            generator.generate(request)
        finally:
            generator.phase_hook = None
        total = counter.counts(images=images)

    # 2. Metered pass: one window per phase occurrence.
    if cold:
        generator.reset_cache()
    result: dict[str, dict[str, Any]] = {
        p: {"calls": 0, "duration_s": 0.0, "energy_j": {n: 0.0 for n in meters}, "status": {n: "ok" for n in meters},
            "flops": 0, "bytes": 0, "gating_flops": 0, "below_resolution": []}
        for p in phases
    }
    state: dict[str, Any] = {"index": 0, "t0": 0.0, "started": []}

    def meter_hook(kind: str, phase: str) -> None:
        if kind == "begin":
            state["started"] = []
            for name, m in meters.items():
                try:
                    m.start()
                    state["started"].append(name)
                except MeterUnavailable as e:
                    result[phase]["status"][name] = f"unavailable: {e}"
                    result[phase]["energy_j"][name] = None
            state["t0"] = time.perf_counter()
            return
        duration_s = time.perf_counter() - state["t0"]
        i = state["index"]
        if i >= len(occurrences) or occurrences[i][0] != phase:
            for name in state["started"]:
                meters[name].stop()
            raise RuntimeError(f"phase {phase!r} ran out of the order of the counting pass; "
                               "the generator is not deterministic in its phases")
        stats = occurrences[i][1]
        state["index"] = i + 1
        readings: dict[str, Reading] = {}
        for name in state["started"]:
            meters[name].record_work(Counts(images=images, stats=stats))
            readings[name] = meters[name].stop()
        r = result[phase]
        r["calls"] += 1
        r["duration_s"] += duration_s
        for name, reading in readings.items():
            if not reading.ok:
                r["status"][name], r["energy_j"][name] = reading.status, None
            elif r["energy_j"][name] is not None:
                e = reading.total_energy_j
                r["energy_j"][name] = None if e is None else r["energy_j"][name] + e
            if duration_s < getattr(meters[name], "min_window_s", 0.0) and name not in r["below_resolution"]:
                r["below_resolution"].append(name)

    generator.phase_hook = meter_hook
    t0 = time.perf_counter()
    try:
        generator.generate(request)
    finally:
        generator.phase_hook = None
    total_s = time.perf_counter() - t0
    if state["index"] != len(occurrences):
        raise RuntimeError("the metered pass ran fewer phases than the counting pass")

    # Counted work per phase, and what ran outside every phase.
    inside: dict[_Key, list[int]] = {}
    for phase, stats in occurrences:
        r = result[phase]
        for s in stats:
            r["flops"] += s.flops
            r["bytes"] += s.bytes_read + s.bytes_written
            r["gating_flops"] += s.flops if s.role == "gating" else 0
            acc = inside.setdefault((s.op, s.dtype, s.role, s.module), [0, 0, 0, 0])
            for j, v in enumerate((s.calls, s.flops, s.bytes_read, s.bytes_written)):
                acc[j] += v
    outside = _diff({(s.op, s.dtype, s.role, s.module): (s.calls, s.flops, s.bytes_read, s.bytes_written, s.counted)
                     for s in total.stats}, {k: (*v, True) for k, v in inside.items()})
    other_counts = Counts(images=images, stats=outside)
    proxies = {n: m for n, m in meters.items() if isinstance(m, ProxyMeter)}
    result["other"] = {
        "calls": 1,
        "duration_s": max(0.0, total_s - sum(result[p]["duration_s"] for p in phases)),
        "energy_j": {n: (proxy_energy(other_counts, proxies[n].profile).total_j if n in proxies else None)
                     for n in meters},
        "status": {n: ("ok" if n in proxies else "not windowed: between phases") for n in meters},
        "flops": other_counts.flops(),
        "bytes": other_counts.bytes_moved(),
        "gating_flops": other_counts.flops("gating"),
        "below_resolution": [],
    }
    return result
