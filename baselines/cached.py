"""``cached``: DeepCache-style reuse of a UNet's deep features across denoiser calls.

DeepCache (Ma, Fang and Wang, CVPR 2024, "DeepCache: Accelerating Diffusion Models for Free")
observes that the deep, low-resolution features of a UNet change slowly between adjacent sampling
steps. On a *full* call the whole UNet runs and the input of its last up block (the output of
``up_blocks[-2]``) is kept. On the next ``interval - 1`` *cached* calls only the shallow branch runs:
the time (and class or added) embeddings, ``conv_in``, the first down block without its
downsampler, the last up block fed with the kept feature and the fresh skip features, and the
output head. A call is full when ``call_index % interval == 0``, so ``interval=1`` is the plain
model and the first call of every batch refreshes the cache.

The UNet's own ``forward`` runs every time; on cached calls its deep blocks are swapped for stubs
that do no work and hand on the right number of skip features. So one implementation serves the
digits ``UNet2DModel`` and a pipeline's ``UNet2DConditionModel`` (SD 1.x/2.x, SDXL's added
embeddings) alike. It replaced a hand-copied ``UNet2DModel.forward`` for digits: the stubs follow
whatever forward the installed diffusers has, and gave the same images.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from un0_bench.harness.core.backbone import Backbone
from un0_bench.harness.core.model import Layer, Model, Plan, Run
from un0_bench.harness.core.spec import Param
from un0_bench.harness.core.technique import Technique
from un0_bench.harness.errors import StackError

INTERVAL = Param(int, 3, "denoiser calls per full UNet pass (the deep feature is reused in between)", low=1,
                 high=1000)


class _SkipDown(nn.Module):
    """Stands in for a deep down block on a cached call: no work, the right number of residuals."""

    def __init__(self, residuals: int) -> None:
        super().__init__()
        self.residuals = residuals

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> tuple[torch.Tensor, tuple]:
        return hidden_states, (hidden_states,) * self.residuals


class _Identity(nn.Module):
    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return hidden_states


class _SkipUp(nn.Module):
    """Stands in for a deep up block: consumes its residuals and returns the cached deep feature."""

    def __init__(self, resnets: int, deep: Callable[[], torch.Tensor]) -> None:
        super().__init__()
        self.resnets = [None] * resnets  # the UNet's forward reads len(block.resnets)
        self._deep = deep

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self._deep()


class _DeepCacheLayer(Layer):
    def __init__(self, unet: nn.Module, interval: int, steps: int) -> None:
        full = math.ceil(steps / interval)
        super().__init__("cached", {"interval": interval}, {
            "full_calls_per_image": full,
            "cached_calls_per_image": steps - full,
            "full_share": full / steps,
            "cached_feature": "input of the last up block (output of up_blocks[-2])",
            "note": "one step = one denoiser call; schedulers that call the denoiser twice per step "
                    "(Heun, DPM2) count each call",
        })
        self.unet, self.interval = unet, interval
        self._deep: torch.Tensor | None = None  # (R, C, h, w) input of the last up block
        self._saved: tuple | None = None
        down0 = unet.down_blocks[0]
        self._down_stubs = [_SkipDown(len(b.resnets) + (getattr(b, "downsamplers", None) is not None))
                            for b in unet.down_blocks[1:]]
        self._mid_stub = _Identity() if unet.mid_block is not None else None
        self._up_stubs = [_SkipUp(len(b.resnets), self._cached_feature) for b in unet.up_blocks[:-1]]
        downsamplers = getattr(down0, "downsamplers", None)
        self._downsampler_stub = (nn.ModuleList([_Identity() for _ in downsamplers])
                                  if downsamplers is not None else None)
        unet.up_blocks[-1].register_forward_pre_hook(self._keep_deep, with_kwargs=True)

    def _cached_feature(self) -> torch.Tensor:
        assert self._deep is not None  # checked in before_call
        return self._deep

    def _keep_deep(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if self._saved is None:  # a full call: keep what enters the last up block
            self._deep = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]

    def before_call(self, run: Run, args: tuple, kwargs: dict) -> None:
        if run.call_index % self.interval == 0:
            return
        sample = args[0] if args else kwargs["sample"]
        if self._deep is None or self._deep.shape[0] != sample.shape[0]:
            raise RuntimeError(f"call {run.call_index} reuses the deep feature, but no full call of this batch "
                               "ran before it")
        unet = self.unet
        down0 = unet.down_blocks[0]
        self._saved = (list(unet.down_blocks), unet.mid_block, list(unet.up_blocks),
                       getattr(down0, "downsamplers", None))
        for i, stub in enumerate(self._down_stubs, start=1):
            unet.down_blocks[i] = stub
        if self._mid_stub is not None:
            unet.mid_block = self._mid_stub
        for i, stub in enumerate(self._up_stubs):
            unet.up_blocks[i] = stub
        if self._downsampler_stub is not None:
            down0.downsamplers = self._downsampler_stub

    def after_call(self, run: Run) -> None:
        if self._saved is None:
            return
        unet = self.unet
        downs, mid, ups, downsamplers = self._saved
        for i, block in enumerate(downs):
            unet.down_blocks[i] = block
        unet.mid_block = mid
        for i, block in enumerate(ups):
            unet.up_blocks[i] = block
        if downsamplers is not None:
            unet.down_blocks[0].downsamplers = downsamplers
        self._saved = None

    def after_batch(self, run: Run) -> None:
        self._deep = None  # a batch's features never leak into the next batch


class DeepCache(Technique):
    """``cached`` / ``cached:interval=N``."""

    name = "cached"
    stacking = "after the base, on a UNet making 2 or more denoiser calls per image"
    params = {"interval": INTERVAL}
    denoisers = ("UNet2DModel", "UNet2DConditionModel")

    def check(self, plan: Plan, params: dict[str, Any]) -> None:
        super().check(plan, params)
        if plan.steps is not None and plan.steps < 2:
            raise StackError(f"cached reuses deep features between denoiser calls; {'+'.join(plan.layers)} makes "
                             f"{plan.steps} call per image, so there is nothing to reuse")

    def apply(self, model: Model, backbone: Backbone, interval: int = 3) -> Layer:
        unet = model.denoiser
        problems = []
        if len(unet.down_blocks) < 2 or len(unet.up_blocks) != len(unet.down_blocks):
            problems.append("a single resolution (nothing deep to cache)")
        if any(hasattr(b, "skip_conv") for b in (*unet.down_blocks, *unet.up_blocks)):
            problems.append("skip blocks")
        cfg = getattr(unet, "config", None)
        if cfg is not None and getattr(cfg, "time_embedding_type", "positional") == "fourier":
            problems.append("a Fourier time embedding")
        if problems:
            raise StackError(f"cached supports plain UNets only; this {type(unet).__name__} has {', '.join(problems)}")
        return _DeepCacheLayer(unet, interval, model.steps)
