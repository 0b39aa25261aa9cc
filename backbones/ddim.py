"""The digits sampler: class-conditional deterministic DDIM around any digits denoiser.

The sampler belongs to the backbone: every technique (int8, bf16, DeepCache, pruning, distillation)
changes the denoiser it runs, never this loop. Two schedules:

* the teacher's own: diffusers' ``DDIMScheduler`` with ``model.steps`` steps (``sd``, ``sd:steps=N``);
* an explicit one (``model.sampler["schedule"]``): decreasing timesteps and what the network predicts
  at each (``"epsilon"`` or ``"sample"``), for distilled students, stepped by :func:`ddim_step`.

Hooks (:class:`~un0_bench.harness.core.technique.DenoiserGenerator`) run around every denoiser call, and
each call is a ``denoise_step`` phase.
"""

from __future__ import annotations

from typing import Any

import torch
from un0_bench.backbones.digits_data import IMAGE_SHAPE, prompt_labels, to_unit
from un0_bench.backbones.hf import diffusers_class
from un0_bench.harness.core.generator import image_noise
from un0_bench.harness.core.model import Model
from un0_bench.harness.core.technique import DenoiserGenerator

#: Noise schedule shared by training and sampling (DDIM, epsilon prediction, samples clipped to [-1, 1]).
SCHEDULER_CONFIG: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_schedule": "squaredcos_cap_v2",
    "prediction_type": "epsilon",
    "clip_sample": True,
    "set_alpha_to_one": True,
}


def make_scheduler() -> Any:
    return diffusers_class("DDIMScheduler")(**SCHEDULER_CONFIG)


def ddim_step(alphas_cumprod: torch.Tensor, x: torch.Tensor, out: torch.Tensor, t: int, t_next: int | None,
              prediction: str) -> tuple[torch.Tensor, torch.Tensor]:
    """One deterministic DDIM step from timestep ``t`` to ``t_next`` (``None``: to the clean image).

    The update of diffusers' ``DDIMScheduler.step`` with ``eta=0``, ``clip_sample`` and
    ``use_clipped_model_output=True``: x0 is clipped to [-1, 1] and the noise is re-derived from the
    clipped x0 (as GLIDE does). The re-derivation is what makes a noise-predicting first step at
    t = 999 usable: there x0 = (x - sqrt(1 - a) eps) / sqrt(a) with sqrt(a) = 5e-5 is mostly clipped,
    and without it the step would carry the unclipped prediction's noise forward.

    Args:
        alphas_cumprod: The noise schedule's alpha_bar ``(1000,)``.
        x: Current sample ``(B, C, H, W)``.
        out: Network output for ``x`` at ``t`` ``(B, C, H, W)``.
        t: Timestep of ``x``.
        t_next: Timestep to step to, or ``None`` for the clean image (alpha_bar = 1).
        prediction: How ``out`` is read: ``"epsilon"`` or ``"sample"`` (x0).

    Returns:
        ``(x_next, x0)``: the next sample and the *unclipped* x0 prediction (for the loss).
    """
    a = alphas_cumprod[t]
    a_next = alphas_cumprod[t_next] if t_next is not None else torch.tensor(1.0)
    x0 = (x - (1 - a).sqrt() * out) / a.sqrt() if prediction == "epsilon" else out
    x0_clipped = x0.clamp(-1.0, 1.0)
    eps = (x - a.sqrt() * x0_clipped) / (1 - a).sqrt()
    return a_next.sqrt() * x0_clipped + (1 - a_next).sqrt() * eps, x0


class DigitsSampler(DenoiserGenerator):
    """DDIM (eta = 0) on a class-conditional ``UNet2DModel``; image ``i`` starts from ``image_noise(seed, i)``."""

    def __init__(self, model: Model) -> None:
        model.denoiser.eval().requires_grad_(False)
        super().__init__(model)
        self.scheduler = make_scheduler()

    def check_prompts(self, prompts: tuple[str, ...]) -> None:
        prompt_labels(prompts)

    def denoise(self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The denoiser's output ``(B, 1, 16, 16)`` in float32 (hooks run around the call)."""
        return self.model.denoiser(x, t, class_labels=labels).sample.float()

    @torch.no_grad()
    def sample(self, noise: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Deterministic DDIM from ``noise`` ``(B, 1, 16, 16)``; returns model space [-1, 1]."""
        if self.run is None:  # called directly (teacher pairs, tests): one batch of its own
            with self.batch(tuple(str(int(v)) for v in labels)):
                return self.sample(noise, labels)
        schedule = self.model.sampler.get("schedule")
        x = noise
        if schedule is None:
            self.scheduler.set_timesteps(self.model.steps)
            for t in self.scheduler.timesteps:
                eps = self.denoise(x, t.expand(x.shape[0]), labels)
                x = self.scheduler.step(eps, t, x, eta=0.0).prev_sample
            return x
        timesteps, predictions = schedule
        alphas = self.scheduler.alphas_cumprod
        for i, t in enumerate(timesteps):
            out = self.denoise(x, torch.full((x.shape[0],), t), labels)
            t_next = timesteps[i + 1] if i + 1 < len(timesteps) else None
            x, _ = ddim_step(alphas, x, out, t, t_next, predictions[i])
        return x

    def sample_batch(self, prompts: tuple[str, ...], seed: int, first: int) -> torch.Tensor:
        labels = prompt_labels(prompts)
        noise = image_noise(seed, first, len(prompts), IMAGE_SHAPE)
        return to_unit(self.sample(noise, labels))

    def describe(self) -> dict[str, Any]:
        schedule = self.model.sampler.get("schedule")
        sampler = "DDIM (eta=0)" if schedule is None else (
            f"DDIM (eta=0) at timesteps {list(schedule[0])}, predicting {list(schedule[1])}")
        return {**super().describe(), "backbone": "digits", "sampler": sampler}


def ddim_sample(unet: torch.nn.Module, steps: int, noise: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``steps``-step DDIM of ``unet`` from ``noise`` ``(B, 1, 16, 16)`` (model space), with a throwaway sampler."""
    sampler = DigitsSampler(Model(denoiser=unet, steps=steps))
    try:
        return sampler.sample(noise, labels)
    finally:
        sampler.close()
