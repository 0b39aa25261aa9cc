import pytest
import torch
from diffusers import UNet2DModel

from un0_bench.baselines.diffusion import DiffusionGenerator
from tests.contract import GeneratorContract

TINY = dict(sample_size=16, in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
            down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
            norm_num_groups=4, attention_head_dim=8, num_class_embeds=10)


def tiny_unet(seed: int = 0) -> UNet2DModel:
    torch.manual_seed(seed)
    return UNet2DModel(**TINY)


class TestDiffusionContract(GeneratorContract):
    @pytest.fixture
    def generator(self):
        return DiffusionGenerator(tiny_unet(), steps=2)


def test_steps_scale_the_work():
    from un0_bench.harness.counters.ops import OpCounter
    from un0_bench.harness.generator import GenerationRequest

    req = GenerationRequest(("1", "2"), seed=0, batch_size=2)
    flops = {}
    for steps in (2, 4):
        with OpCounter() as c:
            DiffusionGenerator(tiny_unet(), steps=steps).generate(req)
        flops[steps] = c.counts(images=2).flops()
    # Work is dominated by the per-step UNet forward: twice the steps, close to twice the FLOPs.
    assert flops[4] / flops[2] == pytest.approx(2.0, rel=0.01)
