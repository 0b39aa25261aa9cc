"""The one module that imports diffusers and transformers (lazily: importing it costs nothing).

The rest of the code asks for a class by name (:func:`diffusers_class`, :func:`transformers_class`),
so a missing or too-old library is reported once, in one sentence, and the differences between
library releases are handled here rather than at every use.
"""

from __future__ import annotations

import importlib
from typing import Any

from un0_bench.harness.errors import UserError

#: Where each diffusers class this project uses lives. Top-level names are stable across releases;
#: the building blocks (attention, resamplers) are only importable from their submodules.
_DIFFUSERS: dict[str, str] = {
    "AutoencoderKL": "diffusers",
    "DDIMScheduler": "diffusers",
    "DiffusionPipeline": "diffusers",
    "PNDMScheduler": "diffusers",
    "StableDiffusionPipeline": "diffusers",
    "UNet2DConditionModel": "diffusers",
    "UNet2DModel": "diffusers",
    "Attention": "diffusers.models.attention_processor",
    "Downsample2D": "diffusers.models.downsampling",
    "FeedForward": "diffusers.models.attention",
    "Upsample2D": "diffusers.models.upsampling",
}

#: The transformers classes this project uses (text encoders, tokenizers and CLIP for scoring).
_TRANSFORMERS = frozenset({
    "AutoTokenizer", "CLIPConfig", "CLIPImageProcessor", "CLIPModel", "CLIPProcessor", "CLIPTextConfig",
    "CLIPTextModel", "CLIPTokenizer",
})


def _import(module: str) -> Any:
    try:
        return importlib.import_module(module)
    except ImportError as e:
        package = module.split(".")[0]
        raise UserError(f"{package} is needed here but cannot be imported ({e}); "
                        f"install the project with `make install` (it pins a working {package})") from None


def diffusers_class(name: str) -> Any:
    """The diffusers class ``name`` (one of :data:`_DIFFUSERS`).

    Raises:
        KeyError: If ``name`` is not one this project uses (a programming error, not user input).
        UserError: If diffusers cannot be imported.
    """
    return getattr(_import(_DIFFUSERS[name]), name)


def transformers_class(name: str) -> Any:
    """The transformers class ``name`` (one of :data:`_TRANSFORMERS`)."""
    if name not in _TRANSFORMERS:
        raise KeyError(f"{name} is not a transformers class this project uses")
    return getattr(_import("transformers"), name)


def text2image_pipeline_classes() -> list[type]:
    """The pipeline classes diffusers' ``AutoPipelineForText2Image`` maps model families to."""
    mapping = _import("diffusers.pipelines.auto_pipeline").AUTO_TEXT2IMAGE_PIPELINES_MAPPING
    return list(mapping.values())


def from_pretrained_dtype_key() -> str:
    """``from_pretrained``'s dtype keyword in the installed diffusers.

    Newer releases renamed ``torch_dtype`` to ``dtype`` and warn on the old name; older ones know
    only ``torch_dtype``.
    """
    deprecation = _import("diffusers.utils.deprecation_utils")
    return "dtype" if hasattr(deprecation, "_TORCH_DTYPE_DEPRECATION_MESSAGE") else "torch_dtype"
