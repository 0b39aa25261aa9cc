"""``tome``: token merging for Stable Diffusion (Bolya and Hoffman, CVPR-W 2023), from its package, ``tomesd``.

This is the one module that imports ``tomesd`` (lazily, in :meth:`TokenMerging.apply`). ``tomesd``
patches every ``BasicTransformerBlock`` of a diffusers UNet: before self-attention the tokens of a
feature map are split into destination tokens (one per ``sx x sy`` cell) and source tokens, the
``ratio`` most similar sources are merged into their destinations (bipartite soft matching), the
block runs on the shorter sequence, and the output is unmerged back to the full map. Only blocks
at most ``max_downsample`` times below the input resolution are merged (1: the highest-resolution
blocks, where attention costs most).

Counting sees what really runs: the shorter attention, plus the similarity matmul, argsort and
gathers/scatters of the merge itself (listed under ops with no FLOP formula where they have none).

NB: ``tomesd`` draws the destination tokens' positions from a generator it forks from torch's
global RNG on first use; this layer seeds that generator before every batch (seed 0), so images
reproduce, and the positions depend on the call order within a batch, not on the request's seed.
"""

from __future__ import annotations

from importlib import metadata
from typing import Any

from un0_bench.harness.core.backbone import Backbone
from un0_bench.harness.core.model import Layer, Model, Run
from un0_bench.harness.core.spec import Param
from un0_bench.harness.core.technique import Technique
from un0_bench.harness.errors import StackError

#: tomesd's own limit: at most 1 - 1 / (sx * sy) of the tokens can merge, 0.75 at its 2 x 2 stride.
RATIO = Param(float, 0.5, "share of a block's tokens merged before self-attention (tomesd's default 0.5)",
              low=0.0, high=0.75, low_open=True)
MAX_DOWNSAMPLE = Param(str, "1", "merge in blocks at most this many times downsampled (tomesd: 1, 2, 4 or 8)",
                       choices=("1", "2", "4", "8"))


class _TomeLayer(Layer):
    def __init__(self, unet: Any, params: dict[str, Any], blocks: int) -> None:
        super().__init__("tome", params, {
            "library": "tomesd", "library_version": metadata.version("tomesd"),
            "patched_blocks": blocks, "merge": "self-attention only (tomesd's defaults: no cross-attention, no MLP)",
        })
        self.unet = unet

    def before_batch(self, run: Run) -> None:
        import torch

        info = self.unet._tome_info["args"]
        info["generator"] = torch.Generator(device="cpu").manual_seed(0)


class TokenMerging(Technique):
    """``tome`` / ``tome:ratio=0.5,max_downsample=1``."""

    name = "tome"
    stacking = "anywhere after the base, on a UNet with transformer blocks (Stable Diffusion and kin)"
    params = {"ratio": RATIO, "max_downsample": MAX_DOWNSAMPLE}
    denoisers = ("UNet2DConditionModel",)

    def apply(self, model: Model, backbone: Backbone, ratio: float = 0.5, max_downsample: str = "1") -> Layer:
        import tomesd

        unet = model.denoiser
        blocks = sum(type(m).__name__ == "BasicTransformerBlock" for m in unet.modules())
        if blocks == 0:
            raise StackError(f"tome merges tokens in transformer blocks; this {type(unet).__name__} has none")
        tomesd.apply_patch(unet, ratio=ratio, max_downsample=int(max_downsample))
        return _TomeLayer(unet, {"ratio": ratio, "max_downsample": max_downsample}, blocks)
