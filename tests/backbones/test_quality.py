import functools
import json
import statistics

import pytest
import torch
from un0_bench.backbones.digits import DigitsBackbone
from un0_bench.backbones.judge import JUDGE_FILE, build_judge
from un0_bench.backbones.quality import (
    EVAL_SEED,
    QualityBand,
    evaluate,
    evaluate_generator,
    evaluate_generator_seeds,
    features,
    quality_matched,
    real_images,
)
from un0_bench.baselines.references import build_noise, build_real


@functools.lru_cache(maxsize=1)
def shipped_accuracy() -> float:
    return json.loads(JUDGE_FILE.with_suffix(".json").read_text())["held_out_accuracy"]


def test_real_against_itself_is_zero_distance():
    images, labels = real_images()
    q = evaluate(images, labels)
    assert q["samples"] == 360 and q["real_samples"] == 360
    # Identical feature sets: FID = 2 tr(S) - 2 tr(sqrt(S S)) = 0 up to float64 rounding.
    assert abs(q["fid"]) < 1e-6
    # KID compares random subsets of the same 360 images: unbiased, so it scatters around 0.
    assert abs(q["kid"]) < 2 * q["kid_std"] + 1e-4
    # The judge reads the held-out images exactly as when its accuracy was recorded.
    assert q["accuracy"] == pytest.approx(shipped_accuracy(), abs=1e-12)


def test_features_shape_and_dtype():
    images, _ = real_images()
    f = features(images[:7])
    assert f.shape == (7, 64) and f.dtype == torch.float64


def test_evaluate_is_deterministic_and_leaves_the_global_rng_alone():
    images, labels = real_images()
    torch.manual_seed(123)
    before = torch.rand(3)
    torch.manual_seed(123)
    a = evaluate(images[:150], labels[:150])
    after = torch.rand(3)
    b = evaluate(images[:150], labels[:150])
    assert a == b
    assert torch.equal(before, after)  # KID's subset draws used their own seed


def test_wrong_labels_cost_accuracy_not_fid():
    images, labels = real_images()
    right = evaluate(images, labels)
    wrong = evaluate(images, (labels + 1) % 10)
    assert wrong["fid"] == pytest.approx(right["fid"], abs=1e-9)
    # A correct judge is never right when every label is off by one; it misreads a few images as
    # exactly the next digit, so accuracy is near 0, not exactly 0.
    assert wrong["accuracy"] < 0.05


def test_noise_ranks_far_below_real():
    backbone = DigitsBackbone()
    noise = evaluate_generator(build_noise(backbone), n=200)
    real = evaluate_generator(build_real(backbone), n=200)
    assert noise["samples"] == real["samples"] == 200 and noise["seed"] == 500_000
    assert noise["fid"] > 50 * max(real["fid"], 1e-3)
    assert noise["kid"] > 50 * max(real["kid"], 1e-4)
    assert noise["accuracy"] < 0.3
    assert real["accuracy"] >= 0.95


def test_custom_judge_is_used():
    images, labels = real_images()
    untrained = build_judge().eval()
    q = evaluate(images, labels, judge=untrained)
    # The real images against themselves: FID stays ~0 in any feature space.
    assert abs(q["fid"]) < 1e-6
    assert q["accuracy"] < 0.5  # an untrained classifier is no judge
    assert not torch.allclose(features(images[:5], judge=untrained), features(images[:5]))


@pytest.mark.parametrize(
    ("images", "labels", "match"),
    [
        (torch.zeros(4, 1, 8, 8), torch.zeros(4, dtype=torch.long), "images must be a tensor"),
        (torch.zeros(1, 1, 16, 16), torch.zeros(1, dtype=torch.long), "at least 2 images"),
        (torch.full((4, 1, 16, 16), -1.0), torch.zeros(4, dtype=torch.long), r"in \[0, 1\]"),
        (torch.full((4, 1, 16, 16), float("nan")), torch.zeros(4, dtype=torch.long), "finite"),
        (torch.zeros(4, 1, 16, 16, dtype=torch.uint8), torch.zeros(4, dtype=torch.long), "floating point"),
        (torch.zeros(4, 1, 16, 16), torch.zeros(3, dtype=torch.long), "one per image"),
        (torch.zeros(4, 1, 16, 16), torch.full((4,), 10), "digits 0-9"),
        (torch.zeros(4, 1, 16, 16), torch.zeros(4), "digits 0-9"),
    ],
)
def test_bad_input_is_refused(images, labels, match):
    with pytest.raises(ValueError, match=match):
        evaluate(images, labels)


def test_kid_subset_is_checked():
    images, labels = real_images()
    assert evaluate(images[:50], labels[:50], kid_subset=20)["kid_subset_size"] == 20
    assert evaluate(images[:50], labels[:50])["kid_subset_size"] == 50
    with pytest.raises(ValueError, match="kid_subset must be an integer from 2 to 50"):
        evaluate(images[:50], labels[:50], kid_subset=51)


def test_quality_band():
    ref = {"fid": 2.0, "accuracy": 0.98}
    assert quality_matched({"fid": 2.5, "accuracy": 0.95}, ref)  # at both edges: 1.25 x 2.0, 0.98 - 0.03
    assert not quality_matched({"fid": 2.51, "accuracy": 0.99}, ref)
    assert not quality_matched({"fid": 1.0, "accuracy": 0.949}, ref)
    assert quality_matched({"fid": 3.0, "accuracy": 0.9}, ref, fid_ratio=1.5, accuracy_drop=0.1)
    band = QualityBand()
    assert band.describe() == {"fid_ratio": 1.25, "accuracy_drop": 0.03}
    assert band.matched({"fid": 0.0, "accuracy": 1.0}, ref)
    with pytest.raises(ValueError, match="fid_ratio"):
        QualityBand(fid_ratio=0.5)
    with pytest.raises(ValueError, match="accuracy_drop"):
        QualityBand(accuracy_drop=-0.01)


def test_several_draws_average_disjoint_seeds():
    gen = build_noise(DigitsBackbone())
    one = evaluate_generator_seeds(gen, n=40, seeds=1)
    assert one == evaluate_generator(gen, n=40)  # one draw: exactly the single evaluation
    q = evaluate_generator_seeds(gen, n=40, seeds=3)
    draws = [evaluate_generator(gen, n=40, seed=EVAL_SEED + k * 40) for k in range(3)]  # images 0-39, 40-79, 80-119
    fids = [d["fid"] for d in draws]
    assert q["fid_draws"] == pytest.approx(fids, rel=1e-12) and len(set(fids)) == 3
    assert q["fid"] == pytest.approx(sum(fids) / 3, rel=1e-12)
    assert q["fid_std"] == pytest.approx(statistics.stdev(fids), rel=1e-9)
    assert q["accuracy"] == pytest.approx(sum(d["accuracy"] for d in draws) / 3, rel=1e-12)
    assert (q["seeds"], q["samples"]) == (3, 40)
    with pytest.raises(ValueError, match="seeds must be an integer >= 1"):
        evaluate_generator_seeds(gen, n=40, seeds=0)


def test_marginal_verdict_is_judged_on_paired_draws():
    band = QualityBand()
    ref = {"fid": 0.2, "fid_draws": [0.2, 0.22, 0.18], "accuracy": 0.98}
    # Ratios 0.26/0.2, 0.28/0.22, 0.24/0.18 = 1.3, 1.2727, 1.3333: mean 1.3020, sd 0.0304, se 0.0175;
    # 1.25 is 0.052 below the mean, more than 2 se: clearly outside the band although the FIDs overlap.
    outside = {"fid": 0.26, "fid_draws": [0.26, 0.28, 0.24], "accuracy": 0.98}
    assert band.marginal(outside, ref) is False and band.matched(outside, ref) is False
    # Ratios 1.3, 1.2, 1.2778: mean 1.2593, sd 0.0525, se 0.0303: 1.25 is within 2 se.
    near = {"fid": 0.25, "fid_draws": [0.26, 0.264, 0.23], "accuracy": 0.98}
    assert band.marginal(near, ref) is True
    assert band.marginal({"fid": 0.26, "accuracy": 0.98}, ref) is None  # one draw: no spread to judge by
    assert band.marginal({**near, "fid_draws": [0.26, 0.264]}, ref) is None  # draws not paired


# --- sensitivity on the shipped teacher --------------------------------------------------------


@functools.cache
def sd_quality(steps: int, n: int = 200) -> dict:
    from un0_bench.harness.core.stack import make_generator

    return evaluate_generator(make_generator(f"sd:steps={steps}", DigitsBackbone()), n=n)


def test_fid_ranks_noise_above_few_step_above_more_steps():
    backbone = DigitsBackbone()
    noise = evaluate_generator(build_noise(backbone), n=200)
    real = evaluate_generator(build_real(backbone), n=200)
    two, ten = sd_quality(2), sd_quality(10)
    # Measured at n=1000 (seed 500,000): noise 24.7, sd:steps=2 5.2, sd:steps=10 0.27, real 0.003.
    assert noise["fid"] > 3 * two["fid"]
    assert two["fid"] > 5 * ten["fid"]
    assert ten["fid"] < 0.1 * noise["fid"] and ten["fid"] < 1.0
    assert ten["fid"] > real["fid"]
    # Accuracy moves far less than FID: FID is the sharper gate.
    assert ten["accuracy"] >= 0.95 and two["accuracy"] >= 0.6


@pytest.mark.slow
def test_full_sampler_is_near_real():
    # 200 images x 50 steps of the teacher: slow on a shared CPU.
    real = evaluate_generator(build_real(DigitsBackbone()), n=200)
    full, ten = sd_quality(50), sd_quality(10)
    assert full["fid"] < 1.25 * ten["fid"] and full["fid"] < 1.0
    assert full["accuracy"] >= real["accuracy"] - 0.03
