import pytest
import torch
from un0_bench.backbones.digits import DigitsBackbone, load_data, to_unit
from un0_bench.baselines.references import NoiseGenerator, RealGenerator, build_noise, build_real
from un0_bench.harness.core.generator import GenerationRequest
from un0_bench.harness.core.stack import make_generator, resolve
from un0_bench.harness.counters.ops import OpCounter
from un0_bench.harness.errors import SpecError, StackError

from tests.contract import GeneratorContract


class TestNoiseContract(GeneratorContract):
    @pytest.fixture
    def generator(self):
        return build_noise(DigitsBackbone())


class TestRealContract(GeneratorContract):
    @pytest.fixture
    def generator(self):
        return build_real(DigitsBackbone())

    def test_counted_flops_positive(self, generator):
        # Honest exception to the contract: `real` does no arithmetic. Its images are mapped to [0, 1]
        # once at construction, and generating only indexes them, so the counter must see 0 FLOPs
        # (data movement only), not a positive number.
        with OpCounter() as counter:
            generator.generate(GenerationRequest(self.prompts[:2], seed=0, batch_size=2))
        counts = counter.counts(images=2)
        assert counts.flops() == 0
        assert counts.uncounted_ops() == {}


def test_noise_flops_are_the_cdf_transform():
    with OpCounter() as counter:
        NoiseGenerator().generate(GenerationRequest(("1", "2"), seed=0, batch_size=2))
    # (1 + erf(z / sqrt 2)) / 2: div, erf, add, div = 4 FLOPs per pixel; 2 images x 256 pixels x 4.
    assert counter.counts(images=2).flops() == 2 * 256 * 4


def test_noise_is_uniform_on_unit_interval():
    images = NoiseGenerator().generate(GenerationRequest(("7",) * 40, seed=0, batch_size=40)).images
    # 40 x 256 = 10,240 pixels of U(0, 1): mean 0.5 and std 1/sqrt(12) = 0.2887, each within ~1%.
    assert float(images.mean()) == pytest.approx(0.5, abs=0.01)
    assert float(images.std()) == pytest.approx(12 ** -0.5, abs=0.005)
    assert float((images < 0.1).float().mean()) == pytest.approx(0.1, abs=0.01)


def test_real_draws_held_out_images_of_the_prompted_digit():
    data = load_data()
    gen = RealGenerator()
    prompts = ("digit 3", "seven", "3", "a handwritten zero")
    out = gen.generate(GenerationRequest(prompts, seed=5, batch_size=4)).images
    real = to_unit(data.test_images)
    # the j-th prompt naming k gets held-out image (seed + j) mod count_k of class k
    for i, (k, j) in enumerate(((3, 0), (7, 0), (3, 1), (0, 0))):
        pool = real[data.test_labels == k]
        assert torch.equal(out[i], pool[(5 + j) % len(pool)])


def test_real_cycles_through_every_held_out_image():
    data = load_data()
    n = len(data.test_labels)
    prompts = tuple(f"digit {k}" for k in data.test_labels.tolist())
    out = RealGenerator().generate(GenerationRequest(prompts, seed=0, batch_size=n)).images
    # With seed 0 each class's pool is walked from its start, so asking for the held-out labels in
    # split order returns the held-out images themselves.
    expected = to_unit(data.test_images)
    for k in range(10):
        got = out[data.test_labels == k]
        want = expected[data.test_labels == k]
        assert torch.equal(got, want)


def test_describe_says_reference():
    assert NoiseGenerator().describe()["technique"] == "reference"
    assert RealGenerator().describe() | {"held_out_images": 360} == RealGenerator().describe()


class _OtherBackbone:
    kind = "diffusers"
    name = "diffusers:/nowhere"


@pytest.mark.parametrize("name, why", [
    ("noise", "a quality floor for FID on digits"),
    ("real", "held-out real digits; a pipeline backbone has no reference image set"),
])
def test_refuses_other_backbones(name, why):
    # Refused when the stack is resolved, from the registry's entry, before anything is built.
    with pytest.raises(StackError, match=f"{name} is not available on diffusers backbones: {why}"):
        resolve(name, _OtherBackbone())


@pytest.mark.parametrize("name", ["noise", "real"])
def test_references_build_through_the_stack_and_take_no_techniques(name):
    gen = make_generator(name, DigitsBackbone())
    assert isinstance(gen, NoiseGenerator if name == "noise" else RealGenerator) and gen.spec == name
    with pytest.raises(StackError, match=f"int8 transforms a diffusion denoiser; {name} has none"):
        resolve(f"{name}+int8", DigitsBackbone())
    with pytest.raises(SpecError, match=f"unknown parameter 'steps'; {name} accepts: none"):
        resolve(f"{name}:steps=2", DigitsBackbone())
