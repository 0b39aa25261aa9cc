"""``sd``: the full diffusion baseline. The digits teacher sampled with DDIM (50 steps by default).

``sd:steps=N`` is the same network with fewer steps: the honest "just do fewer steps" baseline that
every few-step technique must beat.
"""

from __future__ import annotations

from typing import Any

import torch

from un0_bench.backbones.base import Backbone
from un0_bench.backbones.digits import IMAGE_SHAPE, prompt_labels, to_unit
from un0_bench.harness.generator import GenerationRequest, GenerationResult, Generator, image_noise
from un0_bench.harness.spec import Param, takes

STEPS = Param(int, 50, "DDIM sampling steps", low=1, high=1000)


class DiffusionGenerator(Generator):
    """Class-conditional DDIM sampling of a ``UNet2DModel`` on the digits backbone.

    Subclasses change how the network runs (dtype, pruned weights, cached features) by overriding
    :meth:`denoise`; the sampling loop, seeding and prompt handling stay here.
    """

    technique = "diffusion"

    def __init__(self, unet: torch.nn.Module, steps: int = 50, metadata: dict[str, Any] | None = None,
                 dtype: torch.dtype = torch.float32) -> None:
        from un0_bench.backbones.teacher import make_scheduler

        self.unet = unet.eval().requires_grad_(False)
        self.steps = steps
        self.dtype = dtype
        self.metadata = metadata or {}
        self.scheduler = make_scheduler()

    def denoise(self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor, step: int) -> torch.Tensor:
        """Predicted noise for ``x`` ``(B, 1, 16, 16)`` at timestep ``t``; ``step`` counts from 0."""
        return self.unet(x.to(self.dtype), t, class_labels=labels).sample.float()

    @torch.no_grad()
    def sample(self, noise: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Deterministic DDIM (eta = 0) from ``noise`` ``(B, 1, 16, 16)``; returns model space [-1, 1]."""
        self.scheduler.set_timesteps(self.steps)
        x = noise
        for i, t in enumerate(self.scheduler.timesteps):
            eps = self.denoise(x, t.expand(x.shape[0]), labels, i)
            x = self.scheduler.step(eps, t, x, eta=0.0).prev_sample
        return x

    def generate(self, request: GenerationRequest) -> GenerationResult:
        labels = prompt_labels(request.prompts)  # refuses bad prompts before any work
        out = []
        for first, prompts in request.batches():
            noise = image_noise(request.seed, first, len(prompts), IMAGE_SHAPE)
            out.append(to_unit(self.sample(noise, labels[first : first + len(prompts)])))
        return GenerationResult(images=torch.cat(out), prompts=request.prompts)

    def describe(self) -> dict[str, Any]:
        return {
            "technique": self.technique,
            "backbone": "digits",
            "sampler": "DDIM (eta=0)",
            "steps": self.steps,
            "dtype": str(self.dtype).removeprefix("torch."),
            "parameters": sum(p.numel() for p in self.unet.parameters()),
        }

    def derivation(self) -> dict[str, Any] | None:
        return self.metadata or None


@takes(steps=STEPS)
def build(backbone: Backbone, steps: int) -> Generator:
    """``sd`` and ``sd:steps=N``."""
    from un0_bench.backbones.teacher import load_teacher

    require_digits(backbone, "sd")
    unet, meta = load_teacher(backbone.weights("teacher"))
    return DiffusionGenerator(unet, steps=steps, metadata=meta)


def require_digits(backbone: Backbone, model: str) -> None:
    if backbone.kind != "digits":
        from un0_bench.harness.errors import UserError

        raise UserError(f"{model} is not available on backbone {backbone.name!r} yet")
