"""The contract every generator passes. A generator's test module subclasses :class:`GeneratorContract`
and supplies only a tiny instance through the ``generator`` fixture (and, if its images are not
1x16x16 digits, ``image_shape`` and ``prompts``).
"""

from __future__ import annotations

import json

import pytest
import torch
from un0_bench.harness.core.generator import GenerationRequest, Generator
from un0_bench.harness.counters.ops import OpCounter
from un0_bench.harness.errors import PromptError


class GeneratorContract:
    #: (C, H, W) of one image.
    image_shape: tuple[int, int, int] = (1, 16, 16)
    #: Prompts the generator accepts; a mix of forms.
    prompts: tuple[str, ...] = ("3", "digit 7", "a handwritten seven")
    #: A prompt it must refuse.
    bad_prompt: str = "a photo of a cat"
    #: Tolerance between batch sizes (batched kernels may round differently).
    batch_atol: float = 1e-4

    @pytest.fixture
    def generator(self) -> Generator:  # pragma: no cover - overridden
        raise NotImplementedError

    def test_shape_and_range(self, generator):
        out = generator.generate(GenerationRequest(self.prompts, seed=0, batch_size=2))
        assert out.images.shape == (len(self.prompts), *self.image_shape)
        assert out.images.dtype == torch.float32
        assert float(out.images.min()) >= 0.0 and float(out.images.max()) <= 1.0
        assert out.prompts == self.prompts

    def test_same_seed_same_images(self, generator):
        req = GenerationRequest(self.prompts, seed=3, batch_size=2)
        a = generator.generate(req).images
        b = generator.generate(req).images
        assert torch.equal(a, b)
        c = generator.generate(GenerationRequest(self.prompts, seed=4, batch_size=2)).images
        assert not torch.equal(a, c)

    def test_batch_size_does_not_change_images(self, generator):
        one = generator.generate(GenerationRequest(self.prompts, seed=1, batch_size=1)).images
        all_ = generator.generate(GenerationRequest(self.prompts, seed=1, batch_size=len(self.prompts))).images
        torch.testing.assert_close(one, all_, atol=self.batch_atol, rtol=0)

    def test_bad_prompt_is_refused(self, generator):
        with pytest.raises(PromptError, match="accepted prompts"):
            generator.generate(GenerationRequest((self.prompts[0], self.bad_prompt), seed=0, batch_size=2))

    def test_counted_flops_positive(self, generator):
        with OpCounter() as counter:
            generator.generate(GenerationRequest(self.prompts[:2], seed=0, batch_size=2))
        assert counter.counts(images=2).flops() > 0

    def test_describe_is_json(self, generator):
        d = generator.describe()
        assert json.loads(json.dumps(d)) == d and "technique" in d
