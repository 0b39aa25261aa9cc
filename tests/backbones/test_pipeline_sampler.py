"""Techniques on a real pipeline's denoiser, run on the tiny pipeline built from configs."""

from __future__ import annotations

import json

import pytest
import torch

from un0_bench.backbones.pipeline import PipelineBackbone
from un0_bench.backbones.tiny_pipeline import IMAGE_SIZE, make_tiny_pipeline
from un0_bench.baselines import pipeline_techniques as pt
from un0_bench.harness.counters.ops import OpCounter
from un0_bench.harness.errors import UserError
from un0_bench.harness.generator import GenerationRequest
from un0_bench.harness.meters.proxy import ProxyMeter
from un0_bench.harness.meters.wall import WallMeter
from tests.contract import GeneratorContract

STEPS = 2
PROMPTS = ("a cat", "a red bicycle", "a lighthouse at dusk")
REQUEST = GenerationRequest(PROMPTS, seed=0, batch_size=2)
#: For comparisons of counted work (a counting pass costs a Python call per op).
ONE = GenerationRequest(("a cat",), seed=0)


@pytest.fixture(scope="module")
def backbone(tmp_path_factory):
    return PipelineBackbone(str(make_tiny_pipeline(tmp_path_factory.mktemp("pipe") / "tiny-sd")))


@pytest.fixture(scope="module")
def sd(backbone):
    return pt.build_sd(backbone, steps=STEPS)


@pytest.fixture(scope="module")
def sd_images(sd):
    return sd.generate(REQUEST).images


@pytest.fixture(scope="module")
def un0(backbone):
    return pt.build_un0(backbone, keep=0.25, steps=STEPS, calibration_prompts=pt_calibration(), meter_calibration=False)


def pt_calibration() -> tuple[str, ...]:
    from un0_bench.backbones.pipeline import CALIBRATION_PROMPTS

    return CALIBRATION_PROMPTS[:6]


def flops(generator, request=REQUEST):
    with OpCounter() as c:
        generator.generate(request)
    return c.counts(images=len(request.prompts))


class _PipelineContract(GeneratorContract):
    image_shape = (3, IMAGE_SIZE, IMAGE_SIZE)
    prompts = PROMPTS
    bad_prompt = ""


class TestPipelineContract(_PipelineContract):
    @pytest.fixture
    def generator(self, sd):
        return sd


class TestUn0Contract(_PipelineContract):
    @pytest.fixture
    def generator(self, un0):
        return un0


@pytest.fixture(scope="module")
def cached(backbone):
    return pt.build_cached(backbone, steps=3, interval=2)


class TestCachedContract(_PipelineContract):
    @pytest.fixture
    def generator(self, cached):
        return cached


# -- sd -------------------------------------------------------------------------------------------


def test_sd_defaults_to_the_pipelines_own_steps(backbone):
    gen = pt.build_sd(backbone)
    assert gen.steps == 50  # StableDiffusionPipeline.__call__'s default
    d = gen.describe()
    assert json.loads(json.dumps(d)) == d
    assert d["pipeline"] == "StableDiffusionPipeline" and d["scheduler"] == "DDIMScheduler"
    assert (d["height"], d["width"], d["guidance_scale"]) == (IMAGE_SIZE, IMAGE_SIZE, 7.5)


def test_phase_hook_brackets_every_phase(sd):
    events = []
    sd.phase_hook = lambda kind, phase: events.append((kind, phase))
    try:
        sd.generate(GenerationRequest(("a cat",), seed=0))
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


def test_factories_refuse_other_backbones_and_unsupported_names():
    class Digits:
        kind, name = "digits", "digits"

    with pytest.raises(UserError, match="runs on diffusers:PATH backbones"):
        pt.build_sd(Digits())
    assert {"sd-pruned", "sd-distilled", "un0-osc"} <= set(pt.NOT_SUPPORTED)
    assert "fine-tuning" in pt.NOT_SUPPORTED["sd-pruned"]


# -- dtype, int8, pruning ----------------------------------------------------------------------------


def test_fp16_denoiser(backbone, sd_images):
    gen = pt.build_fp16(backbone, steps=STEPS)
    assert gen.describe()["dtype"] == "fp16" and gen.describe()["pipeline_dtype"] == "fp32"
    counts = flops(gen, ONE)
    by_dtype = counts.flops_by_dtype()
    assert by_dtype["float16"] > by_dtype["float32"]  # the denoiser dominates
    torch.testing.assert_close(gen.generate(REQUEST).images, sd_images, atol=0.02, rtol=0)


def test_bf16_denoiser_is_cast_at_its_boundary(backbone):
    gen = pt.build_bf16(backbone, steps=1)
    out = gen.generate(GenerationRequest(("a cat",), seed=0)).images
    assert gen.denoiser.dtype == torch.bfloat16 and out.dtype == torch.float32


def test_int8_quantizes_every_linear_of_the_denoiser(backbone, sd, sd_images):
    n_linear = sum(type(m) is torch.nn.Linear for m in sd.denoiser.modules())
    gen = pt.build_int8(backbone, steps=STEPS)
    q = gen.describe()["quantization"]
    assert q["quantized_layers"] == n_linear and q["skipped_layers"] == []
    assert q["backend"].startswith("torch._int_mm")
    assert not any(type(m) is torch.nn.Linear for m in gen.denoiser.modules())
    assert flops(gen, ONE).flops_by_dtype()["int8"] > 0
    torch.testing.assert_close(gen.generate(REQUEST).images, sd_images, atol=0.05, rtol=0)


def test_int8_linear_matches_float_closely():
    torch.manual_seed(0)
    lin = torch.nn.Linear(32, 16)
    x = torch.randn(3, 5, 32)
    q = pt.Int8Linear(lin)
    # Per-channel weights and per-token activations at 8 bits: about 1% relative error.
    with torch.no_grad():
        err = (q(x) - lin(x)).norm() / lin(x).norm()
    assert float(err) < 0.02
    assert q(x).shape == (3, 5, 16)


def test_unstructured_pruning_saves_nothing(backbone, sd, sd_images):
    gen = pt.build_pruned_unstructured(backbone, steps=STEPS)
    p = gen.describe()["pruning"]
    assert p["sparsity"] == pytest.approx(0.5, abs=0.01)
    assert flops(gen, ONE).flops() == flops(sd, ONE).flops()  # dense kernels multiply the zeros
    assert not torch.equal(gen.generate(REQUEST).images, sd_images)
    with pytest.raises(UserError, match="sparsity"):
        pt.build_pruned_unstructured(backbone, steps=STEPS, sparsity=1.0)


# -- sd-cached ------------------------------------------------------------------------------------------


def test_cached_interval_1_is_the_plain_pipeline(backbone, sd_images):
    gen = pt.build_cached(backbone, steps=STEPS, interval=1)
    assert torch.equal(gen.generate(REQUEST).images, sd_images)


def test_cached_skips_the_deep_blocks_and_restores_them(backbone, sd):
    steps = 4
    plain = pt.build_sd(backbone, steps=steps)
    gen = pt.build_cached(backbone, steps=steps, interval=2)
    before = [type(b).__name__ for b in (*gen.denoiser.down_blocks, gen.denoiser.mid_block, *gen.denoiser.up_blocks)]
    f_cached, f_plain = flops(gen, ONE).flops(), flops(plain, ONE).flops()
    after = [type(b).__name__ for b in (*gen.denoiser.down_blocks, gen.denoiser.mid_block, *gen.denoiser.up_blocks)]
    assert before == after  # stubs never outlive a cached call
    assert gen.full_calls > 0 and gen.cached_calls > 0
    assert f_cached < 0.9 * f_plain
    assert gen.describe()["full_share"] == 0.5
    with pytest.raises(UserError, match="interval"):
        pt.build_cached(backbone, steps=steps, interval=0)


# -- un0 -------------------------------------------------------------------------------------------------


def test_un0_gating_is_counted_as_gating(un0, sd):
    un0.reset_cache()
    cold = flops(un0)
    assert cold.flops("gating") > 0 and cold.bytes_moved("gating") > 0
    warm = flops(un0)  # every prompt cached: no gate, no gather
    assert warm.flops("gating") == 0
    assert flops(un0, ONE).flops() < flops(sd, ONE).flops()
    stats = un0.cache_stats()
    assert stats["entries"] == len(PROMPTS) and stats["bytes_held"] > 0 and stats["hits"] >= len(PROMPTS)
    un0.reset_cache()
    assert un0.cache_stats()["entries"] == 0


def test_un0_keep_sets_depend_on_the_prompt(un0):
    un0.reset_cache()
    un0.generate(REQUEST)
    subs = [un0._cache[p] for p in PROMPTS]
    kept = [[tuple(s.w_out[0].tolist()) for s in layer] for layer in subs]
    assert any(kept[0][i] != kept[1][i] for i in range(len(kept[0])))
    d = un0.describe()
    assert d["gated_layers"] == 4 and d["activations"] == ["GEGLU"]
    assert d["kept_units"] == pytest.approx(0.25 * d["hidden_units"], abs=d["gated_layers"])


def test_un0_keep_1_equals_the_pipeline(backbone, sd_images):
    gen = pt.build_un0(backbone, keep=1.0, steps=STEPS, calibration_prompts=pt_calibration()[:2],
                       meter_calibration=False)
    torch.testing.assert_close(gen.generate(REQUEST).images, sd_images, atol=1e-5, rtol=0)
    with pytest.raises(UserError, match="keep"):
        pt.build_un0(backbone, keep=0.0, steps=STEPS)


def test_un0_calibration_is_metered_into_its_derivation(backbone, monkeypatch):
    import un0_bench.harness.training

    monkeypatch.setattr(harness.training, "_TRAINING_METERS", ("wall",))  # skip the slow whole-host meters
    gen = pt.build_un0(backbone, keep=0.5, steps=STEPS, calibration_prompts=pt_calibration()[:2])
    meta = gen.derivation()
    assert meta["calibration"]["prompts"] == 2 and meta["calibration"]["steps"] == STEPS
    assert meta["energy"]["wall"]["status"] == "ok"
    assert meta["energy"]["proxy"]["energy_j"] > 0 and meta["energy"]["proxy"]["flops"] > 0


# -- per-phase measurement -------------------------------------------------------------------------------


def test_measure_phases_un0_cold(un0):
    res = pt.measure_phases(un0, REQUEST, [ProxyMeter(), WallMeter()], cold=True)
    assert set(res) == {"text_encoder", "gate", "denoise_step", "vae_decode", "other"}
    batches = len(REQUEST.batches())
    assert res["denoise_step"]["calls"] == STEPS * batches
    assert res["gate"]["calls"] == batches and res["vae_decode"]["calls"] == batches
    for phase in un0.phases():
        assert res[phase]["energy_j"]["proxy"] > 0, phase
        assert res[phase]["energy_j"]["wall"] is None  # time only
        assert res[phase]["duration_s"] > 0
    assert res["gate"]["gating_flops"] == res["gate"]["flops"] > 0
    # Phases plus "other" account for exactly the counted work of the whole call.
    un0.reset_cache()
    total = flops(un0).flops()
    assert sum(r["flops"] for r in res.values()) == total


def test_measure_phases_sd(sd):
    res = pt.measure_phases(sd, GenerationRequest(("a cat",), seed=0), {"proxy": ProxyMeter()})
    assert set(res) == {"text_encoder", "denoise_step", "vae_decode", "other"}
    assert res["text_encoder"]["calls"] == 2  # prompt and negative prompt
    assert res["denoise_step"]["energy_j"]["proxy"] > res["text_encoder"]["energy_j"]["proxy"] > 0


@pytest.mark.gpu
def test_int8_on_cuda(tmp_path):
    bb = PipelineBackbone(str(make_tiny_pipeline(tmp_path / "tiny")), device="cuda")
    gen = pt.build_int8(bb, steps=STEPS)
    assert gen.generate(GenerationRequest(("a cat",), seed=0)).images.shape == (1, 3, IMAGE_SIZE, IMAGE_SIZE)


def test_measure_phases_sums_each_windows_energy(sd):
    from tests.conftest import SequenceMeter

    # 1 prompt, 2 steps: 2 text-encoder windows (prompt, negative prompt), 2 steps, 1 decode = 5 windows.
    # Each window reads the counter at (2k, 2k + 1) joules and seconds: 1 J and 1 s per window.
    seq = SequenceMeter(energy_j=[float(i) for i in range(10)], times_s=[float(i) for i in range(10)])
    seq.min_window_s = 10.0  # pretend the counter updates slower than any window here
    res = pt.measure_phases(sd, GenerationRequest(("a cat",), seed=0), [seq])
    assert {p: res[p]["energy_j"]["seq"] for p in sd.phases()} == {"text_encoder": 2.0, "denoise_step": 2.0,
                                                                    "vae_decode": 1.0}
    assert all(res[p]["below_resolution"] == ["seq"] for p in sd.phases())
    assert res["other"]["energy_j"]["seq"] is None  # between phases nothing but the proxy can price
