"""Pieces of a loaded diffusers pipeline that the backbone, its sampler and the techniques read.

Its own module so that :mod:`~un0_bench.backbones.pipeline` (the backbone) and
:mod:`~un0_bench.backbones.pipeline_sampler` (its sampler) can both use them without importing
each other. Only :mod:`~un0_bench.backbones.hf` imports diffusers.
"""

from __future__ import annotations

import re
from typing import Any

import torch
from un0_bench.backbones.hf import diffusers_class
from un0_bench.harness.errors import UserError

#: ``--dtype`` names.
DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
#: Model-index components that hold a text encoder.
_TEXT_ENCODER = re.compile(r"^text_encoder(_\d+)?$")


def dtype_label(dtype: torch.dtype) -> str:
    """The ``--dtype`` name of a torch dtype (``torch.float16`` -> ``"fp16"``)."""
    for name, d in DTYPES.items():
        if d == dtype:
            return name
    return str(dtype).removeprefix("torch.")


def denoiser_of(pipe: Any) -> tuple[str, torch.nn.Module]:
    """``("unet" | "transformer", module)`` of a loaded pipeline."""
    for name in ("unet", "transformer"):
        module = getattr(pipe, name, None)
        if module is not None:
            return name, module
    raise UserError(f"{type(pipe).__name__} has no unet or transformer denoiser")


def text_encoders_of(pipe: Any) -> list[torch.nn.Module]:
    """The pipeline's text encoders (``text_encoder``, ``text_encoder_2``, ...), in order."""
    return [m for name, m in sorted(pipe.components.items()) if _TEXT_ENCODER.match(name) and m is not None]


def feed_forward_layers(module: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """``(path, FeedForward)`` of every diffusers feed-forward block inside ``module``."""
    feed_forward = diffusers_class("FeedForward")
    return [(name, m) for name, m in module.named_modules() if isinstance(m, feed_forward)]


def call_defaults(pipe: Any) -> dict[str, Any]:
    """Default values of the pipeline's ``__call__`` parameters (e.g. ``num_inference_steps``)."""
    import inspect

    return {k: p.default for k, p in inspect.signature(type(pipe).__call__).parameters.items()
            if p.default is not inspect.Parameter.empty}
