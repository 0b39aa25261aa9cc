"""``sd-cached``: DeepCache-style reuse of the teacher UNet's deep features across DDIM steps.

DeepCache (Ma, Fang and Wang, CVPR 2024, "DeepCache: Accelerating Diffusion Models for Free")
observes that the deep, low-resolution features of a UNet change slowly between adjacent sampling
steps. On a *full* step the whole UNet runs and the output of the up-path block just before the
shallowest one is cached: it is exactly what the shallowest up block takes as its main input. On
the next ``interval - 1`` *partial* steps only the shallow branch runs:

    time and class embedding -> conv_in -> the resnets of the first down block (not its downsampler)
    -> the last up block (cached deep feature + the fresh skip features) -> norm, act, conv_out

and the cached deep feature is reused. A step is full when ``step % interval == 0``, so
``interval=1`` is the plain teacher and step 0 always refreshes the cache. Nothing is trained: the
weights are the teacher's, so the derivation is the teacher's.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from un0_bench.backbones.base import Backbone
from un0_bench.baselines.diffusion import STEPS, DiffusionGenerator, require_digits
from un0_bench.harness.generator import Generator
from un0_bench.harness.spec import Param, takes

INTERVAL = Param(int, 3, "DDIM steps per full UNet pass (the deep feature is reused in between)", low=1,
                 high=1000)

#: First down blocks whose inner loop :meth:`CachedDiffusionGenerator._shallow_down` replicates.
_SHALLOW_DOWN_TYPES = ("DownBlock2D", "AttnDownBlock2D")


class CachedDiffusionGenerator(DiffusionGenerator):
    """DDIM on a ``UNet2DModel`` that recomputes only the shallow branch between full steps.

    The UNet's submodules are run by hand (replicating ``UNet2DModel.forward`` of diffusers 0.42)
    so the feature entering the last up block can be kept. Only plain UNets are accepted: no skip
    blocks (``SkipDownBlock2D`` and kin), no Fourier time embedding, no input centring, no FreeU.
    """

    technique = "deepcache"

    def __init__(self, unet: torch.nn.Module, steps: int = 50, interval: int = 3,
                 metadata: dict[str, Any] | None = None) -> None:
        if isinstance(interval, bool) or not isinstance(interval, int) or interval < 1:
            raise ValueError(f"interval must be an integer >= 1, got {interval!r}")
        _check_supported(unet)
        super().__init__(unet, steps=steps, metadata=metadata)
        self.interval = interval
        self._deep: torch.Tensor | None = None  # (B, C, H, W) input of the last up block

    # -- the UNet, by hand ---------------------------------------------------------------------

    def _embedding(self, t: torch.Tensor, labels: torch.Tensor, batch: int) -> torch.Tensor:
        """Time plus class embedding ``(B, E)``, as ``UNet2DModel.forward`` steps 1."""
        unet = self.unet
        t = t[None] if t.ndim == 0 else t
        t = t * torch.ones(batch, dtype=t.dtype, device=t.device)  # broadcast as diffusers does
        emb = unet.time_embedding(unet.time_proj(t).to(dtype=unet.dtype))
        if unet.class_embedding is not None:
            emb = emb + unet.class_embedding(labels).to(dtype=unet.dtype)
        return emb

    def _shallow_down(self, h: torch.Tensor, emb: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Outputs of the first down block's resnets (and attentions), without its downsampler.

        The downsampled output feeds only deeper blocks, whose result is cached, so it is skipped.
        """
        block = self.unet.down_blocks[0]
        attentions = getattr(block, "attentions", None) or [None] * len(block.resnets)
        outs: tuple[torch.Tensor, ...] = ()
        for resnet, attn in zip(block.resnets, attentions, strict=True):
            h = resnet(h, emb)
            if attn is not None:
                h = attn(h)
            outs += (h,)
        return outs

    def _head(self, h: torch.Tensor) -> torch.Tensor:
        unet = self.unet
        return unet.conv_out(unet.conv_act(unet.conv_norm_out(h)))

    def full_step(self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor]:
        """The whole UNet: ``(eps (B, 1, H, W), deep feature entering the last up block)``."""
        unet = self.unet
        emb = self._embedding(t, labels, x.shape[0])
        h = unet.conv_in(x)
        res: tuple[torch.Tensor, ...] = (h,)
        for block in unet.down_blocks:
            h, block_res = block(hidden_states=h, temb=emb)
            res += block_res
        if unet.mid_block is not None:
            h = unet.mid_block(h, emb)
        for block in unet.up_blocks[:-1]:
            n = len(block.resnets)
            h = block(h, res[-n:], emb)
            res = res[:-n]
        deep = h
        h = unet.up_blocks[-1](h, res, emb)
        return self._head(h), deep

    def shallow_step(self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor, deep: torch.Tensor
                     ) -> torch.Tensor:
        """Only the shallow branch, reusing ``deep`` from an earlier full step; eps ``(B, 1, H, W)``."""
        unet = self.unet
        emb = self._embedding(t, labels, x.shape[0])
        h = unet.conv_in(x)  # (B, C0, H, W)
        res = (h, *self._shallow_down(h, emb))
        return self._head(unet.up_blocks[-1](deep, res, emb))

    def denoise(self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor, step: int) -> torch.Tensor:
        if step % self.interval == 0:
            eps, self._deep = self.full_step(x, t, labels)
            return eps
        if self._deep is None or self._deep.shape[0] != x.shape[0]:
            raise RuntimeError(f"step {step} reuses the deep feature, but no full step of this batch ran before it")
        return self.shallow_step(x, t, labels, self._deep)

    @torch.no_grad()
    def sample(self, noise: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        try:
            return super().sample(noise, labels)
        finally:
            self._deep = None  # a batch's features never leak into the next batch

    def full_steps(self) -> int:
        """Full UNet passes per image: steps 0, interval, 2*interval, ..."""
        return math.ceil(self.steps / self.interval)

    def describe(self) -> dict[str, Any]:
        return {
            **super().describe(),
            "interval": self.interval,
            "full_steps": self.full_steps(),
            "cached_steps": self.steps - self.full_steps(),
            "full_step_share": self.full_steps() / self.steps,
            "cached_feature": "input of the last up block (output of up_blocks[-2])",
        }


def _check_supported(unet: torch.nn.Module) -> None:
    cfg = unet.config
    problems = []
    if cfg.center_input_sample:
        problems.append("center_input_sample")
    if cfg.time_embedding_type != "positional":
        problems.append(f"time_embedding_type={cfg.time_embedding_type!r}")
    if len(unet.down_blocks) < 2:
        problems.append("a single resolution (nothing deep to cache)")
    first = type(unet.down_blocks[0]).__name__
    if first not in _SHALLOW_DOWN_TYPES:
        problems.append(f"first down block {first}")
    if any(hasattr(b, "skip_conv") for b in (*unet.down_blocks, *unet.up_blocks)):
        problems.append("skip blocks")
    if getattr(unet.up_blocks[-1], "s1", None):
        problems.append("FreeU")
    if problems:
        raise ValueError(f"sd-cached supports plain UNet2DModels only; this one has {', '.join(problems)}")


@takes(steps=STEPS, interval=INTERVAL)
def build(backbone: Backbone, steps: int, interval: int) -> Generator:
    """``sd-cached``, ``sd-cached:interval=N`` and ``sd-cached:steps=S,interval=N`` (teacher weights)."""
    from un0_bench.backbones.teacher import load_teacher

    require_digits(backbone, "sd-cached")
    unet, meta = load_teacher(backbone.weights("teacher"))
    return CachedDiffusionGenerator(unet, steps=steps, interval=interval, metadata=meta)
