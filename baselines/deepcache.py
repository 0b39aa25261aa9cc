"""``deepcache``: DeepCache (Ma, Fang and Wang, CVPR 2024) from its authors' package, ``DeepCache``.

This is the one module that imports ``DeepCache`` (lazily, in :meth:`DeepCachePackage.apply`). Its
``DeepCacheSDHelper`` wraps the UNet's forward and every block, resnet and attention of it: on
every ``interval``-th step (by the step's index in the scheduler's timesteps) everything runs and
each wrapped module's output is kept; on the steps between, the modules deeper than the cache
branch return their kept outputs, and only the shallow branch runs. Branch ``b`` is layer
``b % 3`` of block ``b // 3``: branch 0 (the package's default) recomputes ``conv_in``, the last
resnet (and attention) of the last up block and the output head.

Our own ``cached`` (:mod:`~un0_bench.baselines.cached`) is this algorithm at the branch after the
first down block's resnets (branch ``len(down_blocks[0].resnets)``, 2 for SD 1.5): the first down
block without its downsampler and the whole last up block are recomputed; the tests check that the
two give the same images, so ``cached`` also runs where the package cannot (digits, arch).

NB: the helper reads the step index from a diffusers pipeline's scheduler and the timestep's value,
so it runs on ``diffusers:PATH`` backbones only.
"""

from __future__ import annotations

from importlib import metadata
from types import SimpleNamespace
from typing import Any

from un0_bench.harness.core.backbone import Backbone
from un0_bench.harness.core.model import Layer, Model, Plan
from un0_bench.harness.core.spec import Param
from un0_bench.harness.core.technique import Technique
from un0_bench.harness.errors import StackError

INTERVAL = Param(int, 3, "steps per full UNet pass (DeepCache's cache_interval)", low=1, high=1000)
BRANCH = Param(int, 0, "cache branch (DeepCache's cache_branch_id: layer b % 3 of block b // 3)", low=0, high=11)


class DeepCachePackage(Technique):
    """``deepcache`` / ``deepcache:interval=3,branch=0``."""

    name = "deepcache"
    stacking = "after the base, on a pipeline UNet making 2 or more denoiser calls per image"
    params = {"interval": INTERVAL, "branch": BRANCH}
    denoisers = ("UNet2DConditionModel",)

    def check(self, plan: Plan, params: dict[str, Any]) -> None:
        super().check(plan, params)
        if plan.steps is not None and plan.steps < 2:
            raise StackError(f"deepcache reuses features between steps; {'+'.join(plan.layers)} makes "
                             f"{plan.steps} call per image, so there is nothing to reuse")

    def apply(self, model: Model, backbone: Backbone, interval: int = 3, branch: int = 0) -> Layer:
        from DeepCache import DeepCacheSDHelper

        scheduler = getattr(model.host, "scheduler", None)
        if scheduler is None:
            raise StackError("deepcache needs a diffusers pipeline's scheduler (it indexes its timesteps)")
        # The helper reads pipe.unet and pipe.scheduler.timesteps when called: the denoiser this stack holds.
        helper = DeepCacheSDHelper(pipe=SimpleNamespace(unet=model.denoiser, scheduler=scheduler))
        helper.set_params(cache_interval=interval, cache_branch_id=branch)
        helper.enable()
        return Layer("deepcache", {"interval": interval, "branch": branch}, {
            "library": "DeepCache", "library_version": metadata.version("DeepCache"),
            "cache_block_id": branch // 3, "cache_layer_id": branch % 3,
            "full_steps": "every step whose index in the scheduler's timesteps is a multiple of interval",
        })
