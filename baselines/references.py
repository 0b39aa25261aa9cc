"""Reference "generators" that bracket quality: ``noise`` (the floor) and ``real`` (the ceiling).

They show what the quality gate measures: a generator that outputs noise is nearly free and
worthless, and held-out real digits are what a perfect generator would draw. Both go through the
same interface and the same measurements as every model, so their FLOPs and energy are counted the
same way too.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from un0_bench.backbones.digits import IMAGE_SHAPE, load_data, prompt_labels, to_unit
from un0_bench.harness.core.backbone import Backbone
from un0_bench.harness.core.generator import NOT_TRAINED, GenerationRequest, GenerationResult, Generator, image_noise
from un0_bench.harness.core.spec import takes


class Reference(Generator):
    """A bound, not a generator to beat: nothing was trained for it."""

    def derivation(self) -> dict[str, Any]:
        return NOT_TRAINED


class NoiseGenerator(Reference):
    """Uniform random images in [0, 1], one seeded draw per image; the prompt is checked, then ignored.

    Image ``i`` is the per-image Gaussian noise every generator starts from (``image_noise``, seeded
    with ``seed + i``) mapped through the normal CDF, ``u = (1 + erf(z / sqrt(2))) / 2``, which makes
    each pixel uniform on [0, 1].
    """

    def generate(self, request: GenerationRequest) -> GenerationResult:
        prompt_labels(request.prompts)  # refuses bad prompts like every generator
        out = []
        for first, prompts in request.batches():
            z = image_noise(request.seed, first, len(prompts), IMAGE_SHAPE)  # (B, 1, 16, 16), N(0, 1)
            # NB: drawing the random numbers (aten normal_) has no FLOP formula and is listed as
            # uncounted; the counted FLOPs are the CDF transform, about 4 per pixel.
            out.append((1.0 + torch.erf(z / math.sqrt(2.0))) / 2.0)
        return GenerationResult(images=torch.cat(out), prompts=request.prompts)

    def describe(self) -> dict[str, Any]:
        return {"technique": "reference", "reference": "noise", "backbone": "digits",
                "distribution": "uniform on [0, 1] per pixel", "parameters": 0}


class RealGenerator(Reference):
    """Held-out real digits: for a prompt naming digit ``k``, a held-out real ``k``.

    The ``j``-th prompt of a request that names ``k`` (``j`` counts from 0 over the whole request)
    gets held-out image number ``(seed + j) mod count_k`` among the ``count_k`` (35-37) held-out
    images of class ``k``, in split order. Counting per class, not by image index, walks every class
    evenly through its whole pool: with prompts cycling over the ten digits, ``(seed + i) mod count_k``
    would step by 10 and, for a class of 35 or 36 images, reuse only a fifth or a half of them. The
    choice depends on the seed and the prompts, never on the batch size. The images are mapped to
    [0, 1] once, here, so generating is pure indexing (no arithmetic).
    """

    def __init__(self) -> None:
        data = load_data()
        images = to_unit(data.test_images)  # (360, 1, 16, 16) in [0, 1]
        self._by_class = [images[data.test_labels == k].contiguous() for k in range(10)]  # (count_k, 1, 16, 16)
        self.held_out_images = len(data.test_labels)

    def generate(self, request: GenerationRequest) -> GenerationResult:
        labels = prompt_labels(request.prompts).tolist()  # refuses bad prompts before any work
        seen = [0] * 10  # prompts so far naming each digit
        out = []
        for k in labels:
            pool = self._by_class[k]
            out.append(pool[(request.seed + seen[k]) % pool.shape[0]])
            seen[k] += 1
        return GenerationResult(images=torch.stack(out), prompts=request.prompts)

    def describe(self) -> dict[str, Any]:
        return {"technique": "reference", "reference": "real", "backbone": "digits",
                "source": "held-out split of sklearn digits", "held_out_images": self.held_out_images,
                "parameters": 0}


@takes()
def build_noise(backbone: Backbone) -> Generator:
    """``noise``: the quality floor."""
    return NoiseGenerator()


@takes()
def build_real(backbone: Backbone) -> Generator:
    """``real``: the quality ceiling (held-out real digits)."""
    return RealGenerator()
