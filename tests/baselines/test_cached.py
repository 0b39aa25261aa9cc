import pytest
import torch
from diffusers import UNet2DModel
from un0_bench.backbones.digits import DigitsBackbone
from un0_bench.baselines.cached import DeepCache
from un0_bench.harness.core.generator import GenerationRequest
from un0_bench.harness.core.model import Model
from un0_bench.harness.core.stack import make_generator, resolve
from un0_bench.harness.counters.ops import OpCounter
from un0_bench.harness.errors import SpecError, StackError

from tests.baselines.test_diffusion import TINY, TinyDigits, tiny
from tests.contract import GeneratorContract


class TestCachedContract(GeneratorContract):
    @pytest.fixture
    def generator(self):
        return tiny("sd:steps=3+cached:interval=2")  # calls 0, 2 full; 1 cached


def test_interval_1_is_the_plain_unet():
    # Every call is full: the technique must not change a single bit.
    req = GenerationRequest(("1", "two", "digit 9"), seed=5, batch_size=3)
    plain = tiny("sd:steps=3").generate(req).images
    cached = tiny("sd:steps=3+cached:interval=1").generate(req).images
    assert torch.equal(plain, cached)


def test_interval_1_is_sd_on_the_teacher():
    backbone = DigitsBackbone()
    req = GenerationRequest(("0", "8"), seed=2, batch_size=2)
    plain = make_generator("sd:steps=4", backbone).generate(req).images
    cached = make_generator("sd-cached:steps=4,interval=1", backbone).generate(req).images
    assert torch.equal(plain, cached)


def _feature_of_last_up_block(unet, calls):
    """Record the hidden state entering ``unet.up_blocks[-1]`` on every call."""
    def hook(module, args, kwargs):
        calls.append(kwargs["hidden_states"] if "hidden_states" in kwargs else args[0])
    return unet.up_blocks[-1].register_forward_pre_hook(hook, with_kwargs=True)


def test_cached_call_with_a_fresh_cache_equals_the_full_call():
    # Fed the deep feature of the same input, the shallow branch must give the full call's output
    # bit for bit: it proves the stubs hand the last up block the right skip features (conv_in and
    # the first down block's resnet, not the stubs' placeholders) and the right deep feature.
    gen = tiny("sd:steps=4+cached:interval=2")
    unet = gen.model.denoiser
    x = torch.randn(3, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    other = torch.randn(3, 1, 16, 16, generator=torch.Generator().manual_seed(1))
    t, labels = torch.full((3,), 600), torch.tensor([0, 4, 7])
    mid_calls, deep = [], []
    unet.mid_block.register_forward_hook(lambda *a: mid_calls.append(1))
    _feature_of_last_up_block(unet, deep)
    with torch.no_grad():
        reference = unet(x, t, class_labels=labels).sample  # outside a batch: no hooks run
        with gen.batch(("0", "4", "7")):
            full = unet(x, t, class_labels=labels).sample  # call 0: full
            shallow = unet(x, t, class_labels=labels).sample  # call 1: cached
            full_other = unet(other, t, class_labels=labels).sample  # call 2: full
            shallow_other = unet(x, t, class_labels=labels).sample  # call 3: cached, deep feature of `other`
    assert torch.equal(full, reference)
    assert torch.equal(shallow, full)
    assert not torch.equal(shallow_other, full)  # the deep feature really is reused
    assert not torch.equal(full_other, full)
    # The mid block ran on the full calls only (reference, 0, 2), and the last up block was fed the kept
    # feature: the output of up_blocks[-2], 16 channels upsampled to 16x16.
    assert len(mid_calls) == 3
    assert [f.shape for f in deep] == [(3, 16, 16, 16)] * 5
    assert torch.equal(deep[2], deep[1]) and torch.equal(deep[4], deep[3])
    # After each call the UNet has its own blocks back.
    assert type(unet.mid_block).__name__ == "UNetMidBlock2D"
    assert [type(b).__name__ for b in unet.down_blocks] == list(TINY["down_block_types"])
    assert [type(b).__name__ for b in unet.up_blocks] == list(TINY["up_block_types"])
    assert type(unet.down_blocks[0].downsamplers[0]).__name__ == "Downsample2D"


def test_the_first_call_of_every_batch_is_full():
    gen = tiny("sd:steps=5+cached:interval=2")
    mid_calls = []
    gen.model.denoiser.mid_block.register_forward_hook(lambda *a: mid_calls.append(1))
    req = GenerationRequest(("1", "2", "3"), seed=0, batch_size=2)
    images = gen.generate(req).images
    # Calls 0, 2, 4 of each batch are full: 3 per batch, 2 batches. Had the cache carried over from
    # the first batch (2 images) into the second (1 image), call 0 would have failed.
    assert len(mid_calls) == 6
    # And every image is the one it would be alone: nothing leaks between batches.
    alone = tiny("sd:steps=5+cached:interval=2").generate(GenerationRequest(("1", "2", "3"), seed=0,
                                                                            batch_size=1)).images
    torch.testing.assert_close(images, alone, atol=1e-4, rtol=0)


def test_a_cached_call_without_a_full_call_of_its_batch_is_refused():
    gen = tiny("sd:steps=4+cached:interval=2")
    unet = gen.model.denoiser
    t, labels = torch.full((2,), 600), torch.tensor([0, 4])
    with torch.no_grad(), gen.batch(("0", "4")):
        unet(torch.randn(2, 1, 16, 16), t, class_labels=labels)  # call 0: full, on 2 images
        with pytest.raises(RuntimeError, match="no full call of this batch ran before it"):
            unet(torch.randn(3, 1, 16, 16), torch.full((3,), 600), class_labels=torch.tensor([0, 4, 1]))
    assert type(unet.mid_block).__name__ == "UNetMidBlock2D"


def test_reuse_changes_the_images_but_not_much():
    req = GenerationRequest(("3", "5"), seed=0, batch_size=2)
    plain = tiny("sd:steps=3").generate(req).images
    cached = tiny("sd:steps=3+cached:interval=3").generate(req).images
    assert not torch.equal(plain, cached)
    # NB: a random tiny UNet is no diffusion model, so "not much" is only loosely bounded here.
    assert (plain - cached).abs().mean() < 0.5


def test_interval_3_counts_full_calls_plus_shallow_calls():
    req = GenerationRequest(("1", "2"), seed=0, batch_size=2)
    plain_gen, cached_gen = tiny("sd:steps=3"), tiny("sd:steps=3+cached:interval=3")
    with OpCounter() as c:
        plain_gen.generate(req)
    plain = c.counts(images=2).flops()
    with OpCounter() as c:
        cached_gen.generate(req)
    cached = c.counts(images=2).flops()
    # Call 0 is full (1/3 of the plain run's work); calls 1 and 2 run the shallow branch.
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
    # so one shallow call per image costs between 1.0x and 1.15x the convolutions.
    conv = 2_891_776
    assert TINY["block_out_channels"] == (8, 16)  # the hand count above is for these widths
    full_part = plain / 3
    images, shallow_calls = 2, 2
    assert full_part + shallow_calls * images * conv < cached < full_part + shallow_calls * images * conv * 1.15
    assert cached / plain < 0.7  # and the saving is real: a shallow call is ~1/6 of a full one


def test_cached_teacher_counts_fewer_flops():
    backbone = DigitsBackbone()
    req = GenerationRequest(("7",), seed=0, batch_size=1)
    flops = {}
    for text in ("sd:steps=4", "sd-cached:steps=4,interval=2"):
        gen = make_generator(text, backbone)
        with OpCounter() as c:
            gen.generate(req)
        flops[text] = c.counts(images=1).flops()
    # Calls 0 and 2 are full, 1 and 3 shallow: half the full calls, plus two shallow ones.
    ratio = flops["sd-cached:steps=4,interval=2"] / flops["sd:steps=4"]
    assert 0.5 < ratio < 0.75


def test_describe_reports_the_reuse():
    d = tiny("sd-cached").describe()  # sd's 50 steps, interval 3
    assert d["technique"] == "cached" and d["steps"] == 50
    (layer,) = d["layers"]
    assert layer["technique"] == "cached" and layer["params"] == {"interval": 3}
    # Full calls 0, 3, ..., 48: 17 of the 50.
    assert layer["full_calls_per_image"] == 17 and layer["cached_calls_per_image"] == 33
    assert layer["full_share"] == pytest.approx(17 / 50)


@pytest.mark.parametrize("text", ["sd-cached:interval=0", "sd-cached:interval=x", "sd-cached:interval=-2",
                                  "sd+cached:interval=1001"])
def test_bad_interval_is_refused_with_the_range(text):
    with pytest.raises(SpecError, match=r"interval must be an integer >= 1 and <= 1000"):
        resolve(text, DigitsBackbone())


def test_spec_params_bind():
    backbone = DigitsBackbone()
    # sd-cached is sd+cached: steps go to sd, interval to cached.
    stack = resolve("sd-cached:interval=5,steps=20", backbone)
    assert [(layer.name, dict(layer.params)) for layer in stack.layers] == [("sd", {"steps": 20}),
                                                                           ("cached", {"interval": 5})]
    assert stack.canonical == resolve("sd:steps=20+cached:interval=5", backbone).canonical
    assert resolve("sd-cached", backbone).canonical == "sd:steps=50+cached:interval=3"


@pytest.mark.parametrize("text", ["sd:steps=1+cached", "sd-distilled:steps=1+cached"])
def test_one_call_per_image_leaves_nothing_to_reuse(text):
    with pytest.raises(StackError, match="nothing to reuse"):
        resolve(text, DigitsBackbone())


def test_a_few_step_student_can_be_cached():
    stack = resolve("sd-distilled+cached:interval=2", DigitsBackbone())
    assert stack.plan.steps == 4 and stack.plan.layers == ["sd", "distilled", "cached"]


def test_models_without_a_denoiser_are_refused():
    with pytest.raises(StackError, match="transforms a diffusion denoiser"):
        resolve("noise+cached", DigitsBackbone())


def test_unsupported_unets_are_refused():
    single = {**TINY, "block_out_channels": (8,), "down_block_types": ("DownBlock2D",),
              "up_block_types": ("UpBlock2D",)}
    fourier = {**TINY, "time_embedding_type": "fourier"}
    for config, match in ((single, "a single resolution"), (fourier, "a Fourier time embedding")):
        torch.manual_seed(0)
        model = Model(denoiser=UNet2DModel(**config), steps=4)
        with pytest.raises(StackError, match=f"cached supports plain UNets only; .*{match}"):
            DeepCache().apply(model, TinyDigits(), interval=2)
    # What the hand-written forward this replaced could not run, the UNet's own forward can.
    req = GenerationRequest(("1", "2"), seed=0, batch_size=2)
    centred = {**TINY, "center_input_sample": True}

    class Centred(TinyDigits):
        def base_model(self, steps):
            torch.manual_seed(0)
            return Model(denoiser=UNet2DModel(**centred), steps=steps)

    plain = make_generator("sd:steps=3", Centred()).generate(req).images
    assert torch.equal(make_generator("sd:steps=3+cached:interval=1", Centred()).generate(req).images, plain)
    assert not torch.equal(make_generator("sd:steps=3+cached:interval=3", Centred()).generate(req).images, plain)
