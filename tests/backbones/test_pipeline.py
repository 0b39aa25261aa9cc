"""The diffusers:PATH backbone on a tiny pipeline built from configs (offline, exactly a real folder's path)."""

from __future__ import annotations

import json

import pytest
import torch
from un0_bench.backbones.pipeline import (
    BUILTIN_PROMPTS,
    CALIBRATION_PROMPTS,
    PipelineBackbone,
    clip_quality,
    read_prompts_file,
)
from un0_bench.backbones.tiny_pipeline import IMAGE_SIZE, make_tiny_clip, make_tiny_pipeline
from un0_bench.harness.core.backbone import QualityOptions
from un0_bench.harness.core.generator import GenerationRequest, GenerationResult
from un0_bench.harness.core.model import Plan
from un0_bench.harness.errors import PromptError, UserError

#: The tiny pipeline's ops are too small to share between threads (see conftest.one_torch_thread).
pytestmark = pytest.mark.usefixtures("one_torch_thread")



@pytest.fixture(scope="module")
def backbone(tiny_dir):
    return PipelineBackbone(str(tiny_dir))


def test_tiny_pipeline_folder_is_a_diffusers_pipeline(tiny_dir):
    index = json.loads((tiny_dir / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline"
    assert index["unet"] == ["diffusers", "UNet2DConditionModel"]
    assert index["tokenizer"] == ["transformers", "CLIPTokenizer"]
    assert (tiny_dir / "unet" / "diffusion_pytorch_model.safetensors").is_file()


def test_make_tiny_pipeline_refuses_a_non_empty_folder(tiny_dir, tmp_path):
    with pytest.raises(UserError, match="not an empty folder"):
        make_tiny_pipeline(tiny_dir)
    with pytest.raises(UserError, match="unknown scheduler 'euler'"):
        make_tiny_pipeline(tmp_path / "x", scheduler="euler")


def test_backbone_reads_the_folder(backbone, tiny_dir):
    assert backbone.kind == "diffusers"
    assert backbone.name == f"diffusers:{tiny_dir}"
    assert backbone.denoiser == "unet"
    assert backbone.class_name == "StableDiffusionPipeline"
    d = backbone.describe()
    assert json.loads(json.dumps(d)) == d
    assert d["components"] == ["scheduler", "text_encoder", "tokenizer", "unet", "vae"]
    assert d["device"] == "cpu" and d["dtype"] == "fp32" and d["local"] is True
    assert d["prompts"] == {"count": len(BUILTIN_PROMPTS), "source": "built-in"}
    assert len(d["config_sha256"]) == 64


def test_load_pipeline_offline_gives_a_fresh_copy(backbone):
    a, b = backbone.load_pipeline(), backbone.load_pipeline()
    assert type(a).__name__ == "StableDiffusionPipeline"
    assert a.unet is not b.unet  # techniques change the denoiser in place
    assert a.unet.dtype == torch.float32 and a.unet.device.type == "cpu"
    assert backbone.load_pipeline(torch.float16).unet.dtype == torch.float16


def test_missing_path_and_folders_are_refused(tmp_path):
    with pytest.raises(UserError, match="needs a pipeline"):
        PipelineBackbone(None)
    with pytest.raises(UserError, match="no such folder"):
        PipelineBackbone(str(tmp_path / "nope"))
    with pytest.raises(UserError, match="no model_index.json"):
        PipelineBackbone(str(tmp_path))
    (tmp_path / "models").mkdir()
    with pytest.raises(UserError, match="no such folder"):  # a mistyped local path is never sent to the hub
        PipelineBackbone(str(tmp_path / "models" / "sd15"))


def _fake_folder(path, class_name, components):
    path.mkdir()
    index = {"_class_name": class_name, **{c: ["diffusers", "X"] for c in components}}
    (path / "model_index.json").write_text(json.dumps(index))
    return str(path)


def test_unsupported_pipelines_are_refused_by_class_name(tmp_path):
    with pytest.raises(UserError, match="StableDiffusionImg2ImgPipeline is not a text-to-image pipeline"):
        PipelineBackbone(_fake_folder(tmp_path / "a", "StableDiffusionImg2ImgPipeline",
                                      ["unet", "vae", "text_encoder", "tokenizer"]))
    with pytest.raises(UserError, match="DDPMPipeline has no text encoder"):
        PipelineBackbone(_fake_folder(tmp_path / "b", "DDPMPipeline", ["unet", "scheduler"]))
    with pytest.raises(UserError, match="KandinskyV22CombinedPipeline has no unet or transformer denoiser"):
        PipelineBackbone(_fake_folder(tmp_path / "c", "KandinskyV22CombinedPipeline",
                                      ["prior_prior", "decoder_unet", "prior_text_encoder"]))
    with pytest.raises(UserError, match="StableDiffusionControlNetPipeline is not a text-to-image"):
        PipelineBackbone(_fake_folder(tmp_path / "d", "StableDiffusionControlNetPipeline",
                                      ["unet", "controlnet", "text_encoder", "tokenizer"]))


def test_device_and_dtype_are_checked(tiny_dir):
    with pytest.raises(UserError, match="expected cpu, cuda or cuda:N"):
        PipelineBackbone(str(tiny_dir), device="tpu")
    with pytest.raises(UserError, match="expected one of fp32, fp16, bf16"):
        PipelineBackbone(str(tiny_dir), dtype="int4")
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="no CUDA device"):
            PipelineBackbone(str(tiny_dir), device="cuda:0")
    assert PipelineBackbone(str(tiny_dir), dtype="bf16").describe()["dtype"] == "bf16"


def test_prompts_any_text_up_to_the_tokenizer_limit(backbone):
    assert backbone.prompt_limit() == 75  # 77 positions minus start and end
    backbone.check_prompt("a photo of a cat")
    backbone.check_prompt("x " * 75)
    with pytest.raises(PromptError, match="accepted prompts: any non-empty text of at most 75 tokens"):
        backbone.check_prompt("   ")
    with pytest.raises(PromptError, match="76 tokens long"):
        backbone.check_prompt("x " * 76)


def test_default_prompts_cycle_the_built_in_list(backbone):
    got = backbone.default_prompts(len(BUILTIN_PROMPTS) + 2)
    assert got[: len(BUILTIN_PROMPTS)] == list(BUILTIN_PROMPTS)
    assert got[-2:] == list(BUILTIN_PROMPTS[:2])
    assert not set(BUILTIN_PROMPTS) & set(CALIBRATION_PROMPTS)  # gates are not fitted on what they serve


def test_prompts_file(tiny_dir, tmp_path):
    f = tmp_path / "prompts.txt"
    f.write_text("a cat\n\n  a dog  \n\n")
    bb = PipelineBackbone(str(tiny_dir), prompts_file=f)
    assert bb.default_prompts(3) == ["a cat", "a dog", "a cat"]
    assert bb.describe()["prompts"]["source"] == str(f)
    with pytest.raises(UserError, match="no such file"):
        PipelineBackbone(str(tiny_dir), prompts_file=tmp_path / "missing.txt")
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    with pytest.raises(UserError, match="holds no prompt"):
        read_prompts_file(empty)
    long = tmp_path / "long.txt"
    long.write_text("fine\n" + "x " * 80 + "\n")
    with pytest.raises(UserError, match=r"long.txt, prompt 2: prompt .* 80 tokens long"):
        PipelineBackbone(str(tiny_dir), prompts_file=long)


def test_clip_quality_not_measured_without_a_model(tmp_path):
    images = torch.rand(2, 3, IMAGE_SIZE, IMAGE_SIZE)
    assert clip_quality(images, ["a", "b"], None) is None
    with pytest.raises(UserError, match="no such folder"):
        clip_quality(images, ["a", "b"], tmp_path / "no-clip")


def test_clip_quality_with_a_local_tiny_clip(tmp_path):
    clip = make_tiny_clip(tmp_path / "clip")
    g = torch.Generator().manual_seed(0)
    images = torch.rand(3, 3, IMAGE_SIZE, IMAGE_SIZE, generator=g)
    prompts = ["a cat", "a red bicycle", "a cat"]
    q = clip_quality(images, prompts, clip)
    assert q["images"] == 3 and len(q["clip_score_per_image"]) == 3
    assert all(0.0 <= s <= 100.0 for s in q["clip_score_per_image"])
    assert q["clip_score"] == pytest.approx(sum(q["clip_score_per_image"]) / 3)
    assert clip_quality(images, prompts, clip) == q  # deterministic
    with pytest.raises(UserError, match="N prompts"):
        clip_quality(images, prompts[:2], clip)


# -- the base model, its sampler and quality ---------------------------------------------------------


def test_plan_base_reads_the_denoiser_class_without_loading(backbone, monkeypatch):
    monkeypatch.setattr(type(backbone), "load_pipeline", lambda self, dtype=None: pytest.fail("a pipeline loaded"))
    assert backbone.plan_base(None) == Plan("diffusers", "UNet2DConditionModel", 50, weights="pipeline")
    assert backbone.plan_base(3).steps == 3


def test_base_model_holds_the_pipelines_own_denoiser(backbone):
    from un0_bench.backbones.pipeline_sampler import PipelineSampler

    model = backbone.base_model(2)
    assert model.steps == 2 and model.layers == [] and model.derivation is None
    assert model.denoiser is model.host.unet and type(model.host).__name__ == "StableDiffusionPipeline"
    assert backbone.base_model(None).steps == 50  # StableDiffusionPipeline.__call__'s default
    sampler = backbone.sampler(model)
    assert isinstance(sampler, PipelineSampler) and sampler.model is model
    sampler.close()


def _options(**kw):
    return QualityOptions(**{"samples": 4, "seeds": 1, "fid_ratio": 1.25, "accuracy_drop": 0.03, **kw})


def test_quality_options_are_checked_before_any_run(backbone, tmp_path):
    backbone.check_quality_options(_options())
    with pytest.raises(UserError, match="--quality-seeds applies to the digits backbone"):
        backbone.check_quality_options(_options(seeds=2))
    with pytest.raises(UserError, match="no such folder"):
        backbone.check_quality_options(_options(clip=str(tmp_path / "no-clip")))
    # A folder without a CLIP model is refused now, not after the first model is measured.
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match=r"^--clip '.*empty': cannot load a CLIP model and processor from it"):
        backbone.check_quality_options(_options(clip=str(tmp_path / "empty")))
    backbone.check_quality_options(_options(samples=0, clip=str(tmp_path / "empty")))  # quality off: not needed
    backbone.check_quality_options(_options(clip=str(make_tiny_clip(tmp_path / "clip"))))


def test_quality_is_the_clip_score_of_the_measured_images(backbone, tmp_path):
    clip = make_tiny_clip(tmp_path / "clip")
    images = torch.rand(2, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(1))
    measured = GenerationResult(images=images, prompts=("a cat", "a dog"))
    assert backbone.evaluate_quality(None, measured, _options()) is None  # no --clip: not measured
    assert backbone.quality_missing_reason(_options()) == "no --clip model given: energy is not quality-matched"
    assert backbone.evaluate_quality(None, measured, _options(samples=0, clip=str(clip))) is None
    assert backbone.quality_missing_reason(_options(samples=0)) == "--quality-samples 0"
    q = backbone.evaluate_quality(None, measured, _options(clip=str(clip)))
    assert q == clip_quality(images, ["a cat", "a dog"], str(clip))
    # Matched: a CLIP score at most accuracy_drop (relative) below the reference's; no second criterion.
    ref = {"clip_score": 20.0}
    assert backbone.quality_band({"clip_score": 19.5}, ref, _options()) == (True, None)
    assert backbone.quality_band({"clip_score": 19.3}, ref, _options()) == (False, None)


@pytest.mark.gpu
def test_cuda_fp16_pipeline(tiny_dir):
    from un0_bench.harness.core.stack import make_generator

    bb = PipelineBackbone(str(tiny_dir), device="cuda", dtype="fp16")
    out = make_generator("sd:steps=2", bb).generate(GenerationRequest(("a cat",), seed=0))
    assert out.images.shape == (1, 3, IMAGE_SIZE, IMAGE_SIZE) and out.images.dtype == torch.float32
