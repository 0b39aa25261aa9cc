"""``sd``: the digits backbone's base model (the teacher UNet) sampled by the digits DDIM loop.

Also the tiny stand-ins the other baseline tests build on: :func:`tiny_unet`, and :class:`TinyDigits`,
the digits backbone with a random tiny UNet as its base model, so that whole stacks
(``sd:steps=3+cached:interval=2``) are built by the real :func:`make_generator` in milliseconds.
"""

import json

import pytest
import torch
from diffusers import UNet2DModel
from un0_bench.backbones.ddim import DigitsSampler, ddim_sample, make_scheduler
from un0_bench.backbones.digits import DEFAULT_STEPS, IMAGE_SHAPE, DigitsBackbone
from un0_bench.harness.core.generator import GenerationRequest, image_noise
from un0_bench.harness.core.model import Model
from un0_bench.harness.core.stack import make_generator, resolve
from un0_bench.harness.counters.ops import OpCounter
from un0_bench.harness.errors import SpecError

from tests.contract import GeneratorContract

TINY = dict(sample_size=16, in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
            down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
            norm_num_groups=4, attention_head_dim=8, num_class_embeds=10)


def tiny_unet(seed: int = 0) -> UNet2DModel:
    torch.manual_seed(seed)
    return UNet2DModel(**TINY)


class TinyDigits(DigitsBackbone):
    """The digits backbone whose base model is a random tiny UNet (``tiny_unet(seed)``); reads no weights file.

    Techniques that ship their own weights (``pruned``, ``distilled``, ``int8:scales=static``) read them
    from ``weights_dir`` (the shipped folder by default) and check them against :meth:`denoiser_config`,
    the tiny UNet's (so only files made for the tiny UNet fit); every other technique stacks on this
    one exactly as on the teacher.
    """

    def __init__(self, seed: int = 0, derivation: dict | None = None, weights_dir=None) -> None:
        super().__init__(weights_dir=weights_dir)
        self.seed, self.derivation = seed, derivation

    def base_model(self, steps: int | None) -> Model:
        return Model(denoiser=tiny_unet(self.seed), steps=DEFAULT_STEPS if steps is None else steps,
                     derivation=self.derivation)

    def denoiser_config(self) -> dict:
        return json.loads(json.dumps(TINY))  # as a metadata file holds it (tuples become lists)


def tiny(text: str, **backbone) -> DigitsSampler:
    """``make_generator(text)`` on :class:`TinyDigits`."""
    return make_generator(text, TinyDigits(**backbone))


class TestDiffusionContract(GeneratorContract):
    @pytest.fixture
    def generator(self):
        return tiny("sd:steps=2")


def test_sampler_is_deterministic_ddim_of_the_denoiser():
    # The digits loop written out by hand: diffusers' DDIMScheduler, eta = 0, image i from
    # image_noise(seed, i), the label of each prompt; model space [-1, 1] mapped to [0, 1].
    unet = tiny_unet().eval()  # as the sampler runs it (train-mode attention rounds differently)
    gen = DigitsSampler(Model(denoiser=tiny_unet(), steps=3))
    images = gen.generate(GenerationRequest(("1", "two", "digit 9"), seed=5, batch_size=3)).images
    sched = make_scheduler()
    sched.set_timesteps(3)
    noise = image_noise(5, 0, 3, IMAGE_SHAPE)
    labels = torch.tensor([1, 2, 9])
    x = noise
    with torch.no_grad():
        for t in sched.timesteps:
            eps = unet(x, t.expand(3), class_labels=labels).sample
            x = sched.step(eps, t, x, eta=0.0).prev_sample
    assert torch.equal(images, ((x + 1) / 2).clamp(0, 1))
    # The loop also runs standalone (teacher pairs, training roll-outs), with the same result.
    assert torch.equal(gen.sample(noise, labels), x)
    assert torch.equal(ddim_sample(unet, 3, noise, labels), x)


def test_a_throwaway_sampler_leaves_no_hooks_behind():
    unet = tiny_unet()
    ddim_sample(unet, 2, image_noise(0, 0, 1, IMAGE_SHAPE), torch.tensor([4]))
    assert not unet._forward_pre_hooks and not unet._forward_hooks
    gen = DigitsSampler(Model(denoiser=unet, steps=2))
    assert len(unet._forward_pre_hooks) == 1 and len(unet._forward_hooks) == 1
    gen.close()
    assert not unet._forward_pre_hooks and not unet._forward_hooks


def test_every_denoiser_call_is_a_denoise_step_phase():
    gen = tiny("sd:steps=3")
    events = []
    gen.phase_hook = lambda kind, phase: events.append((kind, phase))
    gen.generate(GenerationRequest(("1", "2", "3"), seed=0, batch_size=2))
    # Two batches (2 + 1 images) x 3 DDIM steps: six windows, opened and closed in turn.
    assert events == [("begin", "denoise_step"), ("end", "denoise_step")] * 6
    assert gen.phases() == ("denoise_step",)
    assert gen.run is None  # no batch state survives the request


def test_steps_scale_the_work():
    req = GenerationRequest(("1", "2"), seed=0, batch_size=2)
    flops = {}
    for steps in (2, 4):
        gen = tiny(f"sd:steps={steps}")
        with OpCounter() as c:
            gen.generate(req)
        flops[steps] = c.counts(images=2).flops()
    # Work is dominated by the per-step UNet forward: twice the steps, close to twice the FLOPs.
    assert flops[4] / flops[2] == pytest.approx(2.0, rel=0.01)


def test_sd_is_the_shipped_teacher_with_50_ddim_steps():
    from un0_bench.backbones.teacher import load_teacher

    backbone = DigitsBackbone()
    gen = make_generator("sd", backbone)
    teacher, meta = load_teacher(backbone.weights("teacher"))
    assert isinstance(gen, DigitsSampler) and gen.model.steps == 50 and gen.spec == "sd"
    for (name, a), b in zip(gen.model.denoiser.state_dict().items(), teacher.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    d = gen.describe()
    assert json.loads(json.dumps(d)) == d
    assert d["technique"] == "diffusion" and d["layers"] == [] and d["steps"] == 50
    assert d["denoiser_class"] == "UNet2DModel" and d["dtype"] == "float32" and d["sampler"] == "DDIM (eta=0)"
    assert d["parameters"] == sum(p.numel() for p in teacher.parameters())
    # Its derivation is the teacher's training, whose energy the ledger amortises.
    assert gen.derivation() == meta and "energy" in meta


def test_sd_steps_are_bound_and_checked():
    backbone = DigitsBackbone()
    # "sd" means the backbone's own 50 steps: one canonical model with sd:steps=50.
    assert resolve("sd", backbone).canonical == resolve("sd:steps=50", backbone).canonical == "sd:steps=50"
    assert resolve("sd:steps=7", backbone).plan.steps == 7
    for text in ("sd:steps=0", "sd:steps=1001", "sd:steps=two"):
        with pytest.raises(SpecError, match=r"steps must be an integer >= 1 and <= 1000"):
            resolve(text, backbone)


def test_fewer_steps_is_the_same_teacher_sampled_coarser():
    backbone = DigitsBackbone()
    req = GenerationRequest(("4", "9"), seed=0, batch_size=2)
    a = make_generator("sd:steps=2", backbone).generate(req).images
    b = make_generator("sd:steps=2", backbone).generate(req).images
    c = make_generator("sd:steps=3", backbone).generate(req).images
    assert torch.equal(a, b)  # a fresh copy of the teacher each time, same images
    assert not torch.equal(a, c)
