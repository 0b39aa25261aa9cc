import pytest
from un0_bench.backbones.digits import load_data
from un0_bench.baselines.int8 import TimestepBucket
from un0_bench.harness.errors import UserError
from un0_bench.training.int8_calibration import calibrate_activations, calibrate_int8, calibration_batches

from tests.baselines.test_diffusion import tiny_unet


def test_calibration_must_cover_every_bucket():
    data = load_data()
    batches = calibration_batches(data.train_images[:8], data.train_labels[:8], [900], batches=1, batch_size=4,
                                  seed=0)
    with pytest.raises(ValueError, match=r"no batch in timestep buckets \[0\]"):
        calibrate_activations(tiny_unet(), batches, TimestepBucket(2))


def test_calibration_with_too_few_batches_is_refused_before_it_runs(tmp_path):
    # The 50 DDIM timesteps run 981, 961, ..., 1 and fall 5 to a bucket of 100 (10 buckets); bucket 0
    # (timesteps 0..99) first comes at index 45, so 46 batches are the fewest that reach all ten.
    out = tmp_path / "int8.safetensors"
    with pytest.raises(UserError, match=r"at least 46 batches .* 10 timestep buckets .*; got 45"):
        calibrate_int8(steps=45, out=out)
    assert not out.exists()


