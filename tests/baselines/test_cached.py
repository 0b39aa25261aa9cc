import pytest
import torch

from un0_bench.baselines.cached import CachedDiffusionGenerator
from un0_bench.baselines.diffusion import DiffusionGenerator
from un0_bench.harness.counters.ops import OpCounter
from un0_bench.harness.errors import SpecError
from un0_bench.harness.generator import GenerationRequest
from un0_bench.harness.runner import generator_factory
from un0_bench.harness.spec import ModelSpec
from tests.baselines.test_diffusion import TINY, tiny_unet
from tests.contract import GeneratorContract


class TestCachedContract(GeneratorContract):
    @pytest.fixture
    def generator(self):
        return CachedDiffusionGenerator(tiny_unet(), steps=3, interval=2)  # steps 0, 2 full; 1 shallow


def test_interval_1_is_the_plain_unet():
    # Every step is a full step, run through the hand-written forward: bit-identical images prove
    # it replicates UNet2DModel.forward.
    req = GenerationRequest(("1", "two", "digit 9"), seed=5, batch_size=3)
    plain = DiffusionGenerator(tiny_unet(), steps=3).generate(req).images
    cached = CachedDiffusionGenerator(tiny_unet(), steps=3, interval=1).generate(req).images
    assert torch.equal(plain, cached)


def test_shallow_step_with_a_fresh_cache_equals_the_full_step():
    # Fed the deep feature of the same input, the shallow branch must give the full step's output:
    # it proves the shallow path (first down block without its downsampler, last up block) is wired
    # to the right skip features.
    gen = CachedDiffusionGenerator(tiny_unet(), steps=4, interval=2)
    x = torch.randn(3, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    t, labels = torch.full((3,), 600), torch.tensor([0, 4, 7])
    with torch.no_grad():
        eps, deep = gen.full_step(x, t, labels)
        reference = gen.unet(x, t, class_labels=labels).sample
        shallow = gen.shallow_step(x, t, labels, deep)
    assert deep.shape == (3, 16, 16, 16)  # up_blocks[-2] output: 16 channels, upsampled to 16x16
    assert torch.equal(eps, reference)
    assert torch.equal(shallow, eps)


def test_reuse_changes_the_images_but_not_much():
    req = GenerationRequest(("3", "5"), seed=0, batch_size=2)
    plain = DiffusionGenerator(tiny_unet(), steps=3).generate(req).images
    cached = CachedDiffusionGenerator(tiny_unet(), steps=3, interval=3).generate(req).images
    assert not torch.equal(plain, cached)
    # NB: a random tiny UNet is no diffusion model, so "not much" is only loosely bounded here.
    assert (plain - cached).abs().mean() < 0.5


def test_interval_3_counts_full_steps_plus_shallow_steps():
    req = GenerationRequest(("1", "2"), seed=0, batch_size=2)
    with OpCounter() as c:
        DiffusionGenerator(tiny_unet(), steps=3).generate(req)
    plain = c.counts(images=2).flops()
    with OpCounter() as c:
        CachedDiffusionGenerator(tiny_unet(), steps=3, interval=3).generate(req)
    cached = c.counts(images=2).flops()
    # Step 0 is full (1/3 of the plain run's work); steps 1 and 2 run the shallow branch.
    # Hand count of the shallow branch's convolutions for one image of TINY (16x16 = 256 pixels,
    # FLOPs = 2 x pixels x k*k x C_in x C_out):
    #   conv_in 1->8 (3x3):                                    2*256*9*1*8   =    36,864
    #   down_blocks[0] resnet, two 3x3 convs 8->8:           2*(2*256*9*8*8) =   589,824
    #   up_blocks[-1] resnet 0: 3x3 (16+8)->8, 3x3 8->8, 1x1 shortcut 24->8:
    #                                  2*256*(9*24*8 + 9*8*8 + 24*8)         = 1,277,952
    #   up_blocks[-1] resnet 1: 3x3 (8+8)->8, 3x3 8->8, 1x1 shortcut 16->8:
    #                                  2*256*(9*16*8 + 9*8*8 + 16*8)         =   950,272
    #   conv_out 8->1 (3x3):                                   2*256*9*8*1   =    36,864
    #   total                                                                  2,891,776
    # Time embedding linears, group norms, activations and the DDIM update add a few percent on top,
    # so one shallow step per image costs between 1.0x and 1.15x the convolutions.
    conv = 2_891_776
    assert TINY["block_out_channels"] == (8, 16)  # the hand count above is for these widths
    full_part = plain / 3
    images, shallow_steps = 2, 2
    assert full_part + shallow_steps * images * conv < cached < full_part + shallow_steps * images * conv * 1.15
    assert cached / plain < 0.7  # and the saving is real: a shallow step is ~1/6 of a full one


def test_describe_reports_the_reuse():
    d = CachedDiffusionGenerator(tiny_unet(), steps=50, interval=3).describe()
    assert d["interval"] == 3 and d["full_steps"] == 17 and d["cached_steps"] == 33  # steps 0, 3, ..., 48
    assert d["full_step_share"] == pytest.approx(17 / 50)
    assert d["technique"] == "deepcache"


@pytest.mark.parametrize("text", ["sd-cached:interval=0", "sd-cached:interval=x", "sd-cached:interval=-2"])
def test_bad_interval_is_refused_with_the_range(text):
    with pytest.raises(SpecError, match=r"interval must be an integer >= 1"):
        generator_factory(ModelSpec.parse(text))


def test_spec_params_bind():
    _, params = generator_factory(ModelSpec.parse("sd-cached:interval=5,steps=20"))
    assert params == {"steps": 20, "interval": 5}
    _, params = generator_factory(ModelSpec.parse("sd-cached"))
    assert params == {"steps": 50, "interval": 3}


def test_unsupported_unets_are_refused():
    from diffusers import UNet2DModel

    with pytest.raises(ValueError, match="center_input_sample"):
        CachedDiffusionGenerator(UNet2DModel(**{**TINY, "center_input_sample": True}), steps=4)
    with pytest.raises(ValueError, match="interval must be an integer >= 1"):
        CachedDiffusionGenerator(tiny_unet(), steps=4, interval=0)
