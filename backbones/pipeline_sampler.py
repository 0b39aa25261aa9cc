"""The sampler of a ``diffusers:PATH`` backbone: the pipeline's own ``__call__``, seeded per image.

Every technique changes only the denoiser (``unet`` or ``transformer``); this class runs the
pipeline through its one entry point, ``pipe(...)``, with its own scheduler. Hooks around the text
encoders and ``vae.decode`` make ``text_encoder`` and ``vae_decode`` phases; the denoiser hooks of
:class:`~un0_bench.harness.core.technique.DenoiserGenerator` make a ``denoise_step`` phase of every
denoiser call and call every layer's hooks.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from un0_bench.harness.core.backbone import Backbone
from un0_bench.harness.core.model import Model
from un0_bench.harness.core.technique import DenoiserGenerator
from un0_bench.harness.errors import UserError


def _image_size(pipe: Any, denoiser: nn.Module) -> tuple[int, int]:
    """The pipeline's default ``(height, width)`` in pixels: latent sample size x VAE scale factor."""
    vsf = getattr(pipe, "vae_scale_factor", None)
    size = getattr(getattr(denoiser, "config", None), "sample_size", None) or getattr(pipe, "default_sample_size", None)
    if vsf is None or size is None:
        raise UserError(f"{type(pipe).__name__}: cannot tell its default image size "
                        "(no vae_scale_factor or sample_size)")
    h, w = (size, size) if isinstance(size, int) else tuple(size)
    return int(h) * int(vsf), int(w) * int(vsf)


class PipelineSampler(DenoiserGenerator):
    """Images from a diffusers pipeline around a :class:`Model`.

    Image ``i`` of a request starts from its own CPU ``torch.Generator`` seeded with ``seed + i``:
    for UNet pipelines the initial latents ``(C, H / f, W / f)`` are drawn from it here and passed
    as ``latents=``, and the same (advanced) generator is passed on to the pipeline for any noise
    its scheduler draws later (ancestral samplers). Transformer pipelines draw their latents from
    those generators themselves (some pack latents in their own layout). Images therefore do not
    depend on the batch size or the device.
    """

    def __init__(self, model: Model, backbone: Backbone) -> None:
        from un0_bench.backbones.pipeline_parts import call_defaults, denoiser_of, text_encoders_of

        self.backbone = backbone
        self.pipe = pipe = model.host
        self.denoiser_name, _ = denoiser_of(pipe)
        setattr(pipe, self.denoiser_name, model.denoiser)  # a technique may have replaced it
        model.denoiser.eval().requires_grad_(False)
        super().__init__(model)
        self.guidance_scale = call_defaults(pipe).get("guidance_scale")
        self.height, self.width = _image_size(pipe, model.denoiser)
        self.device = torch.device(getattr(backbone, "device", "cpu"))
        #: dtype of everything around the denoiser (the backbone's --dtype).
        self.pipeline_dtype: torch.dtype = getattr(backbone, "dtype", torch.float32)
        for encoder in text_encoders_of(pipe):
            self._handles.append(encoder.register_forward_pre_hook(lambda m, a: self.emit("begin", "text_encoder")))
            self._handles.append(encoder.register_forward_hook(lambda m, a, o: self.emit("end", "text_encoder"),
                                                               always_call=True))
        self._vae = vae = getattr(pipe, "vae", None)
        if vae is not None:
            # The pipeline calls vae.decode (not forward): wrap that one method of this instance.
            original = vae.decode

            def decode(*args: Any, **kwargs: Any) -> Any:
                with self.phase("vae_decode"):
                    return original(*args, **kwargs)

            vae.decode = decode

    def close(self) -> None:
        super().close()
        if self._vae is not None and "decode" in vars(self._vae):
            del self._vae.decode  # back to the class's method

    def backbone_phases(self) -> tuple[tuple[str, ...], tuple[str, ...]]:
        return ("text_encoder",), ("vae_decode",)

    def check_prompts(self, prompts: tuple[str, ...]) -> None:
        for p in prompts:
            self.backbone.check_prompt(p)

    def latent_shape(self) -> tuple[int, ...] | None:
        """``(C, H / f, W / f)`` of one image's initial latents for UNet pipelines, else ``None``."""
        if self.denoiser_name != "unet":
            return None
        f = self.pipe.vae_scale_factor
        return (int(self.model.denoiser.config.in_channels), self.height // f, self.width // f)

    def sample_batch(self, prompts: tuple[str, ...], seed: int, first: int) -> torch.Tensor:
        gens = [torch.Generator().manual_seed(seed + first + k) for k in range(len(prompts))]
        kwargs: dict[str, Any] = dict(prompt=list(prompts), height=self.height, width=self.width,
                                      num_inference_steps=self.model.steps, generator=gens, output_type="pt")
        shape = self.latent_shape()
        if shape is not None:
            # Same draws as harness.core.generator.image_noise: image i's own generator, seeded seed + i.
            latents = torch.stack([torch.randn(shape, generator=g) for g in gens])  # (B, C, h, w)
            kwargs["latents"] = latents.to(self.device, self.pipeline_dtype)
        images = self.pipe(**kwargs).images  # (B, 3, H, W) in [0, 1]
        return images.detach().float().cpu().clamp(0.0, 1.0)

    def describe(self) -> dict[str, Any]:
        from un0_bench.backbones.pipeline_parts import dtype_label

        d = super().describe()
        return {
            **d,
            "backbone": self.backbone.name,
            "pipeline": type(self.pipe).__name__,
            "scheduler": type(self.pipe.scheduler).__name__,
            "guidance_scale": self.guidance_scale,
            "height": self.height,
            "width": self.width,
            "device": str(self.device),
            "pipeline_dtype": dtype_label(self.pipeline_dtype),
            "denoiser": self.denoiser_name,
            # The backbone's --dtype names (fp16, bf16, fp32), or int8 for int8 weights.
            "dtype": "int8" if d["dtype"] == "int8" else dtype_label(next(self.model.denoiser.parameters()).dtype),
        }
