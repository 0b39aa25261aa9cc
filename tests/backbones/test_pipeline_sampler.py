"""The pipeline sampler (a pipeline's own ``__call__``) and the techniques on its denoiser, on the tiny pipeline.

Every technique is the one implementation the digits backbone uses too; what is checked here is
what it does to a real diffusers pipeline: int8 quantises every Conv2d and Linear of the UNet,
DeepCache skips its deep blocks, magnitude pruning zeroes half of each weight and saves nothing,
the 16-bit casts stop at the denoiser's boundary, and per-phase measurement sees the text
encoder, every denoiser call and the VAE decode. (un0's contextual sparsity: tests/un0_impl/test_contextual.py.)
"""

from __future__ import annotations

import json

import pytest
import torch
from un0_bench.backbones.pipeline import PipelineBackbone
from un0_bench.backbones.pipeline_sampler import PipelineSampler
from un0_bench.backbones.tiny_pipeline import IMAGE_SIZE
from un0_bench.harness.core.generator import GenerationRequest
from un0_bench.harness.core.stack import build, make_generator, resolve
from un0_bench.harness.counters.ops import OpCounter
from un0_bench.harness.errors import SpecError, StackError
from un0_bench.harness.measuring.protocol import count_ops, measure_phases
from un0_bench.harness.meters.proxy import ProxyMeter
from un0_bench.harness.meters.wall import WallMeter
from un0_bench.harness.registry import GENERATORS, TECHNIQUES

from tests.contract import GeneratorContract

#: The tiny pipeline's ops are too small to share between threads (see conftest.one_torch_thread).
pytestmark = pytest.mark.usefixtures("one_torch_thread")

STEPS = 2
SD = f"sd:steps={STEPS}"
PROMPTS = ("a cat", "a red bicycle", "a lighthouse at dusk")
#: Two batches (2 + 1 prompts), so every per-batch reset is exercised.
REQUEST = GenerationRequest(PROMPTS, seed=0, batch_size=2)
#: For comparisons of counted work (a counting pass costs a Python call per op).
ONE = GenerationRequest(("a cat",), seed=0)
FLOAT_LAYERS = (torch.nn.Conv2d, torch.nn.Linear)
#: The ops of an nn.Conv2d / nn.Linear that carry its multiply-adds.
MATMULS = ("aten.convolution.default", "aten.addmm.default", "aten.mm.default")
#: What DeepCache skips on a cached call of the tiny two-level UNet.
DEEP_BLOCKS = ("down_blocks.0.downsamplers", "down_blocks.1", "mid_block", "up_blocks.0")


@pytest.fixture(scope="module")
def backbone(tiny_dir):
    return PipelineBackbone(str(tiny_dir))


@pytest.fixture(scope="module")
def sd(backbone):
    return make_generator(SD, backbone)


@pytest.fixture(scope="module")
def sd_images(sd):
    return sd.generate(REQUEST).images


@pytest.fixture(scope="module")
def sd_counts(sd):
    return count_ops(sd, ONE)


@pytest.fixture
def nothing_loads(backbone, monkeypatch):
    """A refused stack must be refused from its plan, before any pipeline loads."""
    monkeypatch.setattr(type(backbone), "load_pipeline", lambda self, dtype=None: pytest.fail("a pipeline loaded"))


def _float_layers(denoiser):
    return [(n, m) for n, m in denoiser.named_modules() if type(m) in FLOAT_LAYERS]


class _PipelineContract(GeneratorContract):
    image_shape = (3, IMAGE_SIZE, IMAGE_SIZE)
    prompts = PROMPTS
    bad_prompt = ""


class TestPipelineContract(_PipelineContract):
    @pytest.fixture
    def generator(self, sd):
        return sd


@pytest.fixture(scope="module")
def cached(backbone):
    return make_generator("sd:steps=3+cached:interval=2", backbone)


class TestCachedContract(_PipelineContract):
    @pytest.fixture
    def generator(self, cached):
        return cached


# -- the sampler ------------------------------------------------------------------------------------


def test_sd_defaults_to_the_pipelines_own_steps(backbone):
    stack = resolve("sd", backbone)
    assert stack.canonical == "sd:steps=50" and stack.plan.steps == 50  # StableDiffusionPipeline.__call__'s default
    gen = build(stack, backbone)
    try:
        assert isinstance(gen, PipelineSampler) and gen.spec == "sd" and gen.model.steps == 50
        d = gen.describe()
        assert json.loads(json.dumps(d)) == d
        assert d["technique"] == "diffusion" and d["steps"] == 50 and d["layers"] == []
        assert d["phases"] == ["text_encoder", "denoise_step", "vae_decode"]
        assert d["pipeline"] == "StableDiffusionPipeline" and d["scheduler"] == "DDIMScheduler"
        assert (d["denoiser"], d["denoiser_class"]) == ("unet", "UNet2DConditionModel")
        assert (d["height"], d["width"], d["guidance_scale"]) == (IMAGE_SIZE, IMAGE_SIZE, 7.5)
        assert (d["dtype"], d["pipeline_dtype"], d["device"]) == ("fp32", "fp32", "cpu")
        assert d["backbone"] == backbone.name
    finally:
        gen.close()


def test_phase_hook_brackets_every_phase(sd):
    events = []
    sd.phase_hook = lambda kind, phase: events.append((kind, phase))
    try:
        sd.generate(ONE)
    finally:
        sd.phase_hook = None
    # Classifier-free guidance encodes the prompt and the empty negative prompt; one denoiser call per step.
    assert events == [("begin", "text_encoder"), ("end", "text_encoder")] * 2 + \
        [("begin", "denoise_step"), ("end", "denoise_step")] * STEPS + [("begin", "vae_decode"), ("end", "vae_decode")]
    assert sd.phases() == ("text_encoder", "denoise_step", "vae_decode")


def test_images_depend_on_the_seed_of_each_image(sd, sd_images):
    # Image 2 of seed 0 is image 0 of seed 2 when its prompt is the same.
    shifted = sd.generate(GenerationRequest((PROMPTS[2],), seed=2)).images
    torch.testing.assert_close(shifted[0], sd_images[2], atol=1e-5, rtol=0)


def test_close_removes_every_hook_of_the_sampler(backbone):
    model = backbone.base_model(1)
    pipe = model.host
    sampler = backbone.sampler(model)
    assert "decode" in vars(pipe.vae)  # the instance's vae.decode is wrapped into a phase
    assert len(model.denoiser._forward_pre_hooks) == len(model.denoiser._forward_hooks) == 1
    assert len(pipe.text_encoder._forward_pre_hooks) == len(pipe.text_encoder._forward_hooks) == 1
    sampler.close()
    assert "decode" not in vars(pipe.vae)
    assert not model.denoiser._forward_pre_hooks and not model.denoiser._forward_hooks
    assert not pipe.text_encoder._forward_pre_hooks and not pipe.text_encoder._forward_hooks


# -- stacks: what resolves, what is refused ----------------------------------------------------------


def test_stacks_resolve_to_one_canonical_text(backbone, nothing_loads):
    assert (resolve("sd-int8+cached", backbone).canonical
            == "sd:steps=50+int8:mode=w8a8,scales=dynamic+cached:interval=3")
    assert resolve("sd-cached:steps=20", backbone).canonical == "sd:steps=20+cached:interval=3"
    assert resolve("sd:steps=2+cached:interval=2", backbone).canonical == "sd:steps=2+cached:interval=2"
    assert resolve("sd-pruned-unstructured", backbone).canonical == "sd:steps=50+pruned-unstructured:sparsity=0.5"
    assert resolve("sd-bf16", backbone).canonical == "sd:steps=50+bf16"
    assert resolve("sd-fp16:steps=4", backbone).canonical == "sd:steps=4+fp16"


@pytest.mark.parametrize("name", ["sd-pruned", "sd-distilled", "un0-osc", "noise", "real"])
def test_unsupported_names_are_refused_with_their_reason(backbone, nothing_loads, name):
    why = GENERATORS.entry(name).why_not("diffusers")
    assert why and not why.startswith("it is available on")  # each name says why, not just where it runs
    with pytest.raises(StackError) as e:
        make_generator(name, backbone)
    assert str(e.value) == f"{name} is not available on diffusers backbones: {why}"


def test_techniques_that_cannot_apply_are_refused_with_their_reason(backbone, nothing_loads):
    for tech in ("pruned", "distilled"):
        why = TECHNIQUES.entry(tech).why_not("diffusers")
        with pytest.raises(StackError) as e:
            resolve(f"sd+{tech}", backbone)
        assert str(e.value) == f"sd+{tech}: {tech} is not available on diffusers backbones: {why}"
    with pytest.raises(StackError, match=r"use int8 \(dynamic scales\)"):
        resolve("sd+int8:scales=static", backbone)
    with pytest.raises(StackError, match="1 call per image, so there is nothing to reuse"):
        resolve("sd:steps=1+cached", backbone)
    with pytest.raises(SpecError, match="interval must be an integer >= 1"):
        resolve("sd+cached:interval=0", backbone)
    with pytest.raises(StackError, match=r"sparsity must be in \[0, 1\)"):
        resolve("sd+pruned-unstructured:sparsity=1", backbone)
    with pytest.raises(StackError, match="int8 appears twice"):
        resolve("sd-int8+int8", backbone)


# -- dtype, int8, pruning ----------------------------------------------------------------------------


def test_fp16_denoiser(backbone, sd_counts, sd_images):
    gen = make_generator(f"sd-fp16:steps={STEPS}", backbone)
    d = gen.describe()
    assert d["technique"] == "fp16" and d["dtype"] == "fp16" and d["pipeline_dtype"] == "fp32"
    counts = count_ops(gen, ONE)
    assert counts.flops() == sd_counts.flops()  # a cast adds no counted work
    by_dtype = counts.flops_by_dtype()
    assert by_dtype["float16"] > by_dtype["float32"]  # the denoiser dominates
    torch.testing.assert_close(gen.generate(REQUEST).images, sd_images, atol=0.02, rtol=0)


def test_bf16_denoiser_is_cast_at_its_boundary(backbone):
    gen = make_generator("sd-bf16:steps=1", backbone)
    unet = gen.model.denoiser
    inside, outside = [], []
    unet.conv_in.register_forward_pre_hook(lambda m, args: inside.append(args[0].dtype))
    unet.register_forward_hook(lambda m, args, out: outside.append(out[0].dtype))  # after the cast back
    out = gen.generate(ONE).images
    assert unet.dtype == torch.bfloat16 and out.dtype == torch.float32
    assert inside == [torch.bfloat16] and outside == [torch.float32]  # what the scheduler sees is float32
    assert gen.pipe.vae.dtype == gen.pipe.text_encoder.dtype == torch.float32


def test_int8_quantizes_the_linears_with_torchao_and_leaves_the_convolutions_float(backbone, sd, sd_images):
    linears = {n for n, m in sd.model.denoiser.named_modules() if type(m) is torch.nn.Linear}
    convs = [n for n, m in sd.model.denoiser.named_modules() if type(m) is torch.nn.Conv2d]
    gen = make_generator(f"sd-int8:steps={STEPS}", backbone)
    q = gen.describe()["layers"][0]
    assert q["technique"] == "int8" and q["params"] == {"mode": "w8a8", "scales": "dynamic"}
    assert q["library"].startswith("torchao ") and q["kernel"].startswith("torch._int_mm")
    # torchao 0.18 quantize_ has no Conv2d path: the record names every convolution left in float.
    assert q["int8_layers"] == len(linears) > 0 and q["float_layers"] == convs
    unet = gen.model.denoiser
    assert all(unet.get_submodule(n).weight.qdata.dtype == torch.int8 for n in linears)
    # Every multiply-add of the linears now runs in int8: exactly as many as sd runs in float; the
    # convolutions run as many float FLOPs as before.
    with OpCounter(root=sd.model.denoiser) as c:
        sd.generate(ONE)
    plain = c.counts(images=1).stats
    float_mm = sum(s.flops for s in plain if s.module in linears and s.op in MATMULS)
    with OpCounter(root=unet) as c:
        gen.generate(ONE)
    counts = c.counts(images=1)
    assert counts.flops_by_dtype()["int8"] == float_mm > 0
    assert {s.module for s in counts.stats if s.dtype == "int8"} == linears
    conv_flops = sum(s.flops for s in plain if s.op == "aten.convolution.default")
    convs_now = [s for s in counts.stats if s.op == "aten.convolution.default"]
    assert {s.dtype for s in convs_now} == {"float32"} and sum(s.flops for s in convs_now) == conv_flops
    torch.testing.assert_close(gen.generate(REQUEST).images, sd_images, atol=0.1, rtol=0)


def test_unstructured_pruning_zeros_half_of_every_weight_and_saves_nothing(backbone, sd, sd_counts, sd_images):
    gen = make_generator(f"sd-pruned-unstructured:steps={STEPS}", backbone)
    dense, pruned = _float_layers(sd.model.denoiser), _float_layers(gen.model.denoiser)
    assert [n for n, _ in dense] == [n for n, _ in pruned]
    p = gen.describe()["layers"][0]
    assert p["params"] == {"sparsity": 0.5} and p["pruned_layers"] == len(pruned)
    assert not any(bool((m.weight == 0).any()) for _, m in dense)  # the tiny pipeline has no zeros of its own
    for (name, d), (_, m) in zip(dense, pruned, strict=True):
        w, w0 = m.weight.detach(), d.weight.detach()
        zero = w == 0
        assert int(zero.sum()) == w.numel() // 2, name  # floor(0.5 * numel) in every layer
        assert torch.equal(w[~zero], w0[~zero]), name  # the rest untouched
        assert float(w0.abs()[zero].max()) <= float(w0.abs()[~zero].min()), name  # the smallest went
    assert p["weight_sparsity"] == pytest.approx(0.5, abs=0.01)
    assert count_ops(gen, ONE).flops() == sd_counts.flops()  # dense kernels multiply the zeros
    assert not torch.equal(gen.generate(REQUEST).images, sd_images)


# -- sd-cached ------------------------------------------------------------------------------------------


def test_cached_interval_1_is_the_plain_pipeline(backbone, sd_images):
    gen = make_generator(f"sd:steps={STEPS}+cached:interval=1", backbone)
    assert torch.equal(gen.generate(REQUEST).images, sd_images)


def test_cached_skips_the_deep_blocks_and_restores_them(backbone, sd, sd_counts):
    gen = make_generator(f"sd:steps={STEPS}+cached:interval=2", backbone)  # per batch: one full, one cached call
    unet = gen.model.denoiser

    def blocks():
        return [b for b in (*unet.down_blocks, unet.mid_block, *unet.up_blocks, unet.down_blocks[0].downsamplers)]

    before = blocks()
    full_calls = []
    unet.mid_block.register_forward_hook(lambda *a: full_calls.append(1))
    f_cached = count_ops(gen, ONE).flops()
    assert blocks() == before  # the stubs never outlive a cached call
    assert len(full_calls) == 1
    # The saving is exactly the deep blocks' work on one call (the shallow branch does the same work).
    with OpCounter(root=sd.model.denoiser) as c:
        sd.generate(ONE)
    deep = sum(s.flops for s in c.counts(images=1).stats
               if any(s.module == p or s.module.startswith(p + ".") for p in DEEP_BLOCKS))
    assert deep > 0 and sd_counts.flops() - f_cached == deep // STEPS
    assert f_cached < 0.95 * sd_counts.flops()
    # The first call of every batch refreshes the cache: two batches, two full calls.
    gen.generate(GenerationRequest(PROMPTS[:2], seed=0, batch_size=1))
    assert len(full_calls) == 3
    layer = gen.describe()["layers"][0]
    assert (layer["full_calls_per_image"], layer["cached_calls_per_image"], layer["full_share"]) == (1, 1, 0.5)


def test_int8_and_cached_stack(backbone, sd_counts):
    gen = make_generator(f"sd-int8:steps={STEPS}+cached:interval=2", backbone)
    assert gen.spec == f"sd-int8:steps={STEPS}+cached:interval=2" and gen.describe()["technique"] == "int8+cached"
    counts = count_ops(gen, ONE)
    assert counts.flops_by_dtype()["int8"] > 0
    assert counts.flops() < sd_counts.flops()


# -- per-phase measurement -------------------------------------------------------------------------------


def test_measure_phases_sd(sd, sd_counts):
    res = measure_phases(sd, ONE, {"proxy": ProxyMeter(), "wall": WallMeter()})
    assert set(res) == {"text_encoder", "denoise_step", "vae_decode", "other"}
    assert [res[p]["calls"] for p in sd.phases()] == [2, STEPS, 1]  # prompt and negative prompt; steps; decode
    assert res["denoise_step"]["energy_j"]["proxy"] > res["text_encoder"]["energy_j"]["proxy"] > 0
    for phase in sd.phases():
        assert res[phase]["energy_j"]["wall"] is None  # time only
        assert res[phase]["duration_s"] > 0 and res[phase]["status"] == {"proxy": "ok", "wall": "ok"}
        assert res[phase]["gating_flops"] == 0
    assert res["other"]["energy_j"]["wall"] is None and res["other"]["status"]["wall"] == "not windowed: between phases"
    # Phases plus "other" account for exactly the counted work of the whole call.
    assert sum(r["flops"] for r in res.values()) == sd_counts.flops()


def test_measure_phases_sums_each_windows_energy(sd):
    from tests.conftest import SequenceMeter

    # 1 prompt, 2 steps: 2 text-encoder windows (prompt, negative prompt), 2 steps, 1 decode = 5 windows.
    # Each window reads the counter at (2k, 2k + 1) joules and seconds: 1 J and 1 s per window.
    seq = SequenceMeter(energy_j=[float(i) for i in range(10)], times_s=[float(i) for i in range(10)])
    seq.min_window_s = 10.0  # pretend the counter updates slower than any window here
    res = measure_phases(sd, ONE, [seq])
    assert {p: res[p]["energy_j"]["seq"] for p in sd.phases()} == {"text_encoder": 2.0, "denoise_step": 2.0,
                                                                    "vae_decode": 1.0}
    assert all(res[p]["below_resolution"] == ["seq"] for p in sd.phases())
    assert res["other"]["energy_j"]["seq"] is None  # between phases nothing but the proxy can price


@pytest.mark.gpu
def test_int8_on_cuda(tiny_dir):
    bb = PipelineBackbone(str(tiny_dir), device="cuda")
    gen = make_generator(f"sd-int8:steps={STEPS}", bb)
    assert gen.generate(ONE).images.shape == (1, 3, IMAGE_SIZE, IMAGE_SIZE)
