"""``bf16`` and ``fp16``: the denoiser's weights and activations in a 16-bit float dtype.

The denoiser is cast (``nn.Module.to``), and hooks cast its floating inputs to that dtype and its
outputs back to the dtype they came in, so everything inside the denoiser runs (and is counted) in
16 bits while the sampler's arithmetic (the DDIM update; a pipeline's scheduler, text encoder and
VAE) stays in its own dtype. The timestep keeps its dtype: bfloat16 would round it.

On the 2-core Xeon (Sapphire Rapids, AMX-BF16) float16 matches ``sd`` closely (mean |diff| 0.0003 on
200 digits) but runs 1.5x slower than float32 (5.5 vs 3.9 ms per image per UNet forward, one thread),
while bfloat16 runs faster (2.8 ms; whole 10-step sampling of 100 digits: 10.3 vs 17.5 ms per image on
one thread, 5.2 vs 13.0 on two): on CPU, ``sd-bf16`` is the 16-bit baseline. The casts at the
boundary are two per call of a (B, 1, 16, 16) tensor on digits: not where time goes.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from un0_bench.harness.core.backbone import Backbone
from un0_bench.harness.core.model import Layer, Model
from un0_bench.harness.core.technique import Technique


def cast_floats(obj: Any, dtype: torch.dtype) -> Any:
    """``obj`` with every floating tensor inside (tuples, lists, dicts, diffusers outputs) cast to ``dtype``."""
    if isinstance(obj, torch.Tensor):
        return obj.to(dtype) if obj.is_floating_point() and obj.dtype != dtype else obj
    if isinstance(obj, dict):
        items = {k: cast_floats(v, dtype) for k, v in obj.items()}
        # diffusers' BaseOutput is a dataclass and a dict; rebuild it as itself.
        return type(obj)(**items) if hasattr(type(obj), "__dataclass_fields__") else type(obj)(items)
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):
        return type(obj)(*(cast_floats(v, dtype) for v in obj))
    if isinstance(obj, (list, tuple)):
        return type(obj)(cast_floats(v, dtype) for v in obj)
    return obj


def _first_float_dtype(args: tuple, kwargs: dict) -> torch.dtype | None:
    for v in (*args, *kwargs.values()):
        if isinstance(v, torch.Tensor) and v.is_floating_point():
            return v.dtype
    return None


class _Cast(Technique):
    dtype: torch.dtype = torch.bfloat16

    def apply(self, model: Model, backbone: Backbone, **params: Any) -> Layer:
        denoiser = model.denoiser
        before = next(denoiser.parameters()).dtype
        # nn.Module.to rather than diffusers' ModelMixin.to, which warns about fp32 modules that
        # from_pretrained could keep.
        nn.Module.to(denoiser, dtype=self.dtype)
        came_in: list[torch.dtype | None] = [None]

        def pre(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
            came_in[0] = _first_float_dtype(args, kwargs)
            # The timestep (second positional argument or ``timestep=``) keeps its dtype.
            args = (cast_floats(args[0], self.dtype), *args[1:2], *cast_floats(args[2:], self.dtype)) if args else args
            kwargs = {k: (v if k == "timestep" else cast_floats(v, self.dtype)) for k, v in kwargs.items()}
            return args, kwargs

        def post(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
            return cast_floats(output, came_in[0]) if came_in[0] is not None else output

        denoiser.register_forward_pre_hook(pre, with_kwargs=True)
        denoiser.register_forward_hook(post, with_kwargs=True)
        label = str(self.dtype).removeprefix("torch.")
        return Layer(self.name, params, {"dtype": label, "dtype_before": str(before).removeprefix("torch."),
                                         "boundary": f"inputs cast to {label}, outputs back; the sampler's "
                                                     "own arithmetic stays in its dtype"})


class BFloat16(_Cast):
    name = "bf16"
    dtype = torch.bfloat16


class Float16(_Cast):
    name = "fp16"
    dtype = torch.float16
