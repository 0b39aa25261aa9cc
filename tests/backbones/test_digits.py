import pytest
import torch
from un0_bench.backbones.digits import DigitsBackbone, load_data, prompt_label
from un0_bench.harness.errors import PromptError


@pytest.mark.parametrize("prompt, label", [("7", 7), ("digit 7", 7), ("a handwritten seven", 7),
                                           ("  Digit   0 ", 0), ("the number 3", 3), ("nine", 9)])
def test_accepted_prompt_forms(prompt, label):
    assert prompt_label(prompt) == label


@pytest.mark.parametrize("prompt", ["", "10", "digit seventy", "a cat", "7 and 8", "digit -1"])
def test_other_prompts_are_refused_with_the_accepted_forms(prompt):
    with pytest.raises(PromptError, match=r'accepted prompts: "7", "digit 7", "a handwritten seven"'):
        prompt_label(prompt)


def test_data_split_shapes_range_and_balance():
    d = load_data()
    assert d.train_images.shape == (1437, 1, 16, 16) and d.test_images.shape == (360, 1, 16, 16)
    assert float(d.train_images.min()) >= -1.0 and float(d.train_images.max()) <= 1.0
    # Stratified: each digit has 35 or 36 held-out images (1,797 images, 20% held out).
    counts = torch.bincount(d.test_labels, minlength=10)
    assert int(counts.min()) >= 35 and int(counts.max()) <= 37
    assert len(d.sha256) == 64


def test_default_prompts_cycle_over_digits():
    prompts = DigitsBackbone().default_prompts(23)
    assert [prompt_label(p) for p in prompts] == [i % 10 for i in range(23)]


# --- the Backbone interface: base model, sampler, quality rule ---------------------------------------
def _options(samples=100, seeds=1, fid_ratio=1.25, accuracy_drop=0.03):
    from un0_bench.harness.core.backbone import QualityOptions

    return QualityOptions(samples=samples, seeds=seeds, fid_ratio=fid_ratio, accuracy_drop=accuracy_drop)


def test_plan_base_knows_the_teacher_without_loading_it(tmp_path):
    backbone = DigitsBackbone(weights_dir=tmp_path)  # an empty folder: nothing is read
    plan = backbone.plan_base(None)
    assert (plan.backbone_kind, plan.denoiser, plan.steps, plan.weights) == ("digits", "UNet2DModel", 50, "teacher")
    assert backbone.plan_base(7).steps == 7


def test_quality_options_and_rule():
    from un0_bench.harness.errors import UserError

    backbone = DigitsBackbone()
    with pytest.raises(UserError, match="--quality-samples must be 0 .off. or at least 2 on digits"):
        backbone.check_quality_options(_options(samples=1))
    backbone.check_quality_options(_options(samples=0))
    backbone.check_quality_options(_options(samples=2, seeds=3))
    assert backbone.evaluate_quality(None, None, _options(samples=0)) is None
    assert backbone.quality_missing_reason(_options(samples=0)) == "--quality-samples 0"
    ref = {"fid": 1.0, "accuracy": 0.98}
    # FID at most 1.25x the reference's and accuracy at most 3 points below it.
    assert backbone.quality_band({"fid": 1.25, "accuracy": 0.95}, ref, _options()) == (True, None)
    assert backbone.quality_band({"fid": 1.26, "accuracy": 0.98}, ref, _options())[0] is False
    assert backbone.quality_band({"fid": 1.0, "accuracy": 0.94}, ref, _options())[0] is False
    assert backbone.quality_band({"fid": 1.26, "accuracy": 0.98}, ref, _options(fid_ratio=1.3))[0] is True


def test_sampler_of_the_base_model_is_ddim_from_each_images_own_noise():
    from un0_bench.backbones.ddim import ddim_sample
    from un0_bench.backbones.teacher import load_teacher
    from un0_bench.harness.core.generator import GenerationRequest, image_noise

    backbone = DigitsBackbone()
    if not backbone.weights("teacher").is_file():
        pytest.skip("teacher not trained")
    model = backbone.base_model(2)
    assert model.steps == 2 and model.derivation["command"].startswith("un0-bench train teacher")
    gen = backbone.sampler(model)
    out = gen.generate(GenerationRequest(("3", "digit 7"), seed=5, batch_size=1)).images
    unet, _ = load_teacher()
    ref = ddim_sample(unet, 2, image_noise(5, 0, 2, (1, 16, 16)), torch.tensor([3, 7]))
    torch.testing.assert_close(out, ((ref + 1) / 2).clamp(0, 1), rtol=0, atol=1e-5)


def test_the_judge_is_checked_before_the_first_cell(monkeypatch):
    from un0_bench.backbones import quality
    from un0_bench.harness.errors import CheckpointError

    calls = []

    def truncated():
        calls.append(1)
        raise CheckpointError("judge.safetensors: truncated (tensors need 900 bytes, file has 800)")

    monkeypatch.setattr(quality, "default_judge", truncated)
    backbone = DigitsBackbone()
    backbone.check_quality_options(_options(samples=0))  # quality off: the judge is not needed
    assert calls == []
    with pytest.raises(CheckpointError, match=r"^judge.safetensors: truncated \(tensors need 900 bytes"):
        backbone.check_quality_options(_options(samples=2))
    assert calls == [1]
