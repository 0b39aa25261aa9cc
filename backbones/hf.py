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
    "DDPMScheduler": "diffusers",
    "DPMSolverMultistepScheduler": "diffusers",
    "DiffusionPipeline": "diffusers",
    "EulerAncestralDiscreteScheduler": "diffusers",
    "EulerDiscreteScheduler": "diffusers",
    "PNDMScheduler": "diffusers",
    "PixArtTransformer2DModel": "diffusers",
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
    "CLIPTextModel", "CLIPTextModelWithProjection", "CLIPTokenizer", "T5Config", "T5EncoderModel",
})

#: transformers model class -> its config class, for models built from a config dict on the meta device.
_TRANSFORMERS_CONFIGS = {"CLIPTextModel": "CLIPTextConfig", "CLIPTextModelWithProjection": "CLIPTextConfig",
                         "T5EncoderModel": "T5Config"}


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


def build_on_meta(class_name: str, config: dict[str, Any]) -> Any:
    """A diffusers or transformers model built from a config dict on the ``meta`` device: no weights.

    Parameters are meta tensors (shapes and dtypes, no storage), so an SDXL UNet costs no memory
    and nothing is downloaded; a forward pass runs no arithmetic and yields meta tensors, which is
    all an op counter needs. The model is in eval mode with gradients off.

    Args:
        class_name: A diffusers class of :data:`_DIFFUSERS` (``"UNet2DConditionModel"``,
            ``"AutoencoderKL"``, ...) or a transformers model of ``_TRANSFORMERS_CONFIGS``
            (``"CLIPTextModel"``, ``"CLIPTextModelWithProjection"``).
        config: The model's ``config.json`` as a dict (``_``-prefixed keys are ignored).

    Raises:
        KeyError: For a class this project does not build (a programming error).
        UserError: If the library cannot be imported or rejects the config.
    """
    import torch

    config = {k: v for k, v in config.items() if not k.startswith("_")}
    try:
        with torch.device("meta"):
            if class_name in _TRANSFORMERS_CONFIGS:
                cfg = transformers_class(_TRANSFORMERS_CONFIGS[class_name])(**config)
                model = transformers_class(class_name)(cfg)
            else:
                model = diffusers_class(class_name).from_config(config)
    except (TypeError, ValueError) as e:
        raise UserError(f"cannot build {class_name} from its config ({e})") from None
    return model.eval().requires_grad_(False)


def scheduler_from_config(config: dict[str, Any]) -> Any:
    """A diffusers scheduler from its ``scheduler_config.json`` dict (``_class_name`` names the class)."""
    cfg = dict(config)
    name = cfg.pop("_class_name", None)
    if name is None:
        raise UserError("a scheduler config needs _class_name")
    try:
        cls = diffusers_class(name)
    except KeyError:
        raise UserError(f"scheduler {name!r} is not one this project uses "
                        f"({', '.join(k for k in _DIFFUSERS if k.endswith('Scheduler'))})") from None
    return cls.from_config(cfg)
