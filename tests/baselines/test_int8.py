import functools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from un0_bench.backbones.digits import DigitsBackbone, load_data
from un0_bench.baselines.diffusion import DiffusionGenerator
from un0_bench.baselines.quantized import (
    INT8_SCHEME,
    Int8Conv2d,
    Int8DiffusionGenerator,
    Int8Linear,
    LowPrecisionGenerator,
    TimestepBucket,
    build_int8,
    calibrate_activations,
    calibrate_int8,
    calibration_batches,
    int8_config,
    quantize_unet,
    quantize_weight,
)
from un0_bench.harness.counters.ops import OpCounter
from un0_bench.harness.counters.records import Counts
from un0_bench.harness.errors import CheckpointError, UserError
from un0_bench.harness.generator import GenerationRequest
from un0_bench.harness.meters.proxy import get_profile, proxy_energy
from tests.baselines.test_diffusion import tiny_unet
from tests.contract import GeneratorContract


def tiny_int8(steps: int = 2, n_buckets: int = 2) -> tuple[Int8DiffusionGenerator, nn.Module]:
    """The tiny UNet calibrated in memory on 4 batches of 8 real digits, one bucket per 500 timesteps."""
    unet = tiny_unet()
    data = load_data()
    bucket = TimestepBucket(n_buckets)
    batches = calibration_batches(data.train_images[:64], data.train_labels[:64], [900, 400], batches=4,
                                  batch_size=8, seed=0)
    scales = calibrate_activations(unet, batches, bucket)
    return Int8DiffusionGenerator(quantize_unet(unet, scales, bucket), bucket, steps=steps), unet


class TestBf16Contract(GeneratorContract):
    # NB: bfloat16 kernels may block a batch differently by size; a bf16 ulp at 1.0 is 2^-7.
    batch_atol = 1e-2

    @pytest.fixture
    def generator(self):
        return LowPrecisionGenerator(tiny_unet(), steps=2, metadata=None, dtype=torch.bfloat16)


@functools.cache
def _shared_tiny_int8() -> Int8DiffusionGenerator:
    return tiny_int8()[0]


class TestInt8Contract(GeneratorContract):
    @pytest.fixture
    def generator(self):
        return _shared_tiny_int8()  # calibrated once: the contract only reads it


# -- numerics ----------------------------------------------------------------------------------


def _fake_quant_reference(layer: nn.Module, x: torch.Tensor, act_scale: float) -> torch.Tensor:
    """The same layer with both operands rounded to the int8 grid, computed in float64."""
    qw, sw = quantize_weight(layer.weight)
    w = qw.double() * sw.double().reshape(-1, *([1] * (qw.dim() - 1)))
    xq = torch.round(x.double() / act_scale).clamp(-127, 127) * act_scale
    b = layer.bias.double()
    if isinstance(layer, nn.Conv2d):
        return F.conv2d(xq, w, b, stride=layer.stride, padding=layer.padding)
    return F.linear(xq, w, b)


@pytest.mark.parametrize("kernel,stride,padding", [(3, 1, 1), (3, 2, 1), (1, 1, 0)])
def test_int8_conv_matches_float_conv(kernel, stride, padding):
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 16, kernel, stride=stride, padding=padding)
    x = torch.randn(2, 8, 9, 9)  # odd size: the stride-2 output keeps a border column
    act_scale = float(x.abs().max()) / 127  # hand-set: no clipping
    q = Int8Conv2d.from_float(conv, torch.tensor([act_scale]), TimestepBucket(1))
    with torch.no_grad():
        y, ref = q(x), conv(x)
        fake = _fake_quant_reference(conv, x, act_scale)
    assert y.shape == ref.shape and y.dtype == torch.float32
    # Integer accumulation is exact: only the final float32 rescale rounds.
    torch.testing.assert_close(y.double(), fake, atol=1e-5, rtol=1e-5)
    # Against the float conv: int8 rounding of both operands costs well under 2% of the output scale.
    assert float((y - ref).abs().max()) < 0.02 * float(ref.abs().max())


def test_int8_linear_matches_float_linear():
    torch.manual_seed(0)
    lin = nn.Linear(24, 40)
    x = torch.randn(3, 5, 24)
    act_scale = float(x.abs().max()) / 127
    q = Int8Linear.from_float(lin, torch.tensor([act_scale]), TimestepBucket(1))
    with torch.no_grad():
        y, ref = q(x), lin(x)
    assert y.shape == (3, 5, 40)
    torch.testing.assert_close(y.double(), _fake_quant_reference(lin, x, act_scale), atol=1e-5, rtol=1e-5)
    assert float((y - ref).abs().max()) < 0.02 * float(ref.abs().max())


def test_activation_scale_follows_the_timestep_bucket():
    lin = nn.Linear(4, 4)
    bucket = TimestepBucket(2)
    q = Int8Linear.from_float(lin, torch.tensor([1.0, 0.01]), bucket)
    x = torch.full((1, 4), 0.5)
    bucket.set(torch.tensor([700, 700]))  # bucket 1: scale 0.01, 0.5 is representable
    with torch.no_grad():
        fine = q(x)
        bucket.set(100)  # bucket 0: scale 1.0, 0.5 rounds to 0 or 1 (round half to even: 0)
        coarse = q(x)
    torch.testing.assert_close(fine, lin(x).detach(), atol=0.02, rtol=0)
    torch.testing.assert_close(coarse, lin.bias.detach().reshape(1, 4), atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="all timesteps must be equal"):
        bucket.set(torch.tensor([10, 20]))


def test_quantized_unet_tracks_the_float_unet():
    gen, unet = tiny_int8(steps=4)
    req = GenerationRequest(("1", "4", "7", "9"), seed=0, batch_size=4)
    a = gen.generate(req).images
    b = DiffusionGenerator(unet, steps=4).generate(req).images
    # Random tiny UNet, 4 DDIM steps, images in [0, 1]: int8 stays within a few percent on average.
    assert float((a - b).abs().mean()) < 0.03
    d = gen.describe()
    assert d["dtype"] == "int8" and d["int8_layers"] == sum(isinstance(m, (nn.Conv2d, nn.Linear))
                                                           for m in unet.modules())


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


# -- counting and the proxy --------------------------------------------------------------------


def test_counter_records_int8_matmul_with_hand_count():
    lin = nn.Linear(24, 40)
    q = Int8Linear.from_float(lin, torch.tensor([0.05]), TimestepBucket(1))
    conv = Int8Conv2d.from_float(nn.Conv2d(8, 16, 3, stride=2, padding=1), torch.tensor([0.05]), TimestepBucket(1))
    with torch.no_grad(), OpCounter() as c:
        q(torch.randn(3, 5, 24))
        conv(torch.randn(2, 8, 9, 9))
    mm = [s for s in c.counts(images=1).stats if s.op == "aten._int_mm.default"]
    assert {s.dtype for s in mm} == {"int8"}
    # Linear: M = 3*5 = 15 rows, K = 24, N = 40: 2 * 15 * 24 * 40 = 28,800.
    # Conv: output 5x5 ((9 + 2 - 3) // 2 + 1 = 5), M = 2*5*5 = 50, K = 8*3*3 = 72, N = 16:
    # 2 * 50 * 72 * 16 = 115,200.
    assert sorted(s.flops for s in mm) == [28_800, 115_200]
    assert sum(s.calls for s in mm) == 2


def test_proxy_charges_int8_matmul_less_by_the_table_ratio():
    torch.manual_seed(0)
    lin = nn.Linear(24, 40)
    q = Int8Linear.from_float(lin, torch.tensor([0.05]), TimestepBucket(1))
    x = torch.randn(15, 24)
    with torch.no_grad(), OpCounter() as ci:
        q(x)
    with torch.no_grad(), OpCounter() as cf:
        lin(x)
    int8_mm = [s for s in ci.counts(images=1).stats if s.op == "aten._int_mm.default"]
    fp32_mm = [s for s in cf.counts(images=1).stats if s.op == "aten.addmm.default"]
    assert int8_mm[0].flops == fp32_mm[0].flops == 2 * 15 * 24 * 40
    prof = get_profile("horowitz-45nm")
    e_int8 = proxy_energy(Counts(images=1, stats=int8_mm), prof).compute_j
    e_fp32 = proxy_energy(Counts(images=1, stats=fp32_mm), prof).compute_j
    # Horowitz 45 nm: (0.03 + 0.2) / (0.9 + 3.7) pJ = 0.23 / 4.6 = 0.05.
    assert e_int8 / e_fp32 == pytest.approx(0.05, rel=1e-9)


def test_int8_unet_work_is_mostly_int8():
    gen, _ = tiny_int8()
    with OpCounter() as c:
        gen.generate(GenerationRequest(("1", "2"), seed=0, batch_size=2))
    by_dtype = c.counts(images=2).flops_by_dtype()
    # Convolutions and linears dominate even the tiny UNet; the rest (norms, SiLU, quantisation,
    # attention, DDIM update) stays float32.
    assert by_dtype["int8"] > by_dtype["float32"]
    assert "bfloat16" not in by_dtype


def test_bf16_ops_are_counted_as_bfloat16():
    gen = LowPrecisionGenerator(tiny_unet(), steps=2, metadata=None, dtype=torch.bfloat16)
    with OpCounter() as c:
        gen.generate(GenerationRequest(("1", "2"), seed=0, batch_size=2))
    stats = c.counts(images=2).stats
    convs = {s.dtype for s in stats if s.op == "aten.convolution.default"}
    assert convs == {"bfloat16"}
    by_dtype = c.counts(images=2).flops_by_dtype()
    # The UNet is bf16; only the DDIM update (a few elementwise ops on (2, 1, 16, 16)) is float32.
    assert by_dtype["bfloat16"] > 100 * by_dtype.get("float32", 0)
    assert gen.describe()["dtype"] == "bfloat16"


# -- the calibration file ----------------------------------------------------------------------


@pytest.fixture
def weights_dir(tmp_path):
    """A weights folder with a random full-size teacher and a matching sd-int8 file (unit scales)."""
    from un0_bench.backbones.teacher import UNET_CONFIG, build_unet
    from un0_bench.harness.checkpoints import save_checkpoint

    torch.manual_seed(0)
    teacher = build_unet().eval()
    save_checkpoint(tmp_path / "teacher.safetensors", teacher.state_dict(), {"config": UNET_CONFIG})
    bucket = TimestepBucket(INT8_SCHEME["timestep_buckets"])
    scales = {n: torch.full((bucket.n_buckets,), 0.05) for n, m in teacher.named_modules()
              if type(m) in (nn.Conv2d, nn.Linear)}
    qunet = quantize_unet(teacher, scales, bucket)
    save_checkpoint(tmp_path / "sd-int8.safetensors", qunet.state_dict(),
                    {"config": int8_config(tmp_path / "teacher.safetensors")})
    return tmp_path


def test_build_int8_loads_a_matching_file(weights_dir):
    gen = build_int8(DigitsBackbone(weights_dir=weights_dir), steps=2)
    assert isinstance(gen, Int8DiffusionGenerator)
    layer = gen.unet.conv_in
    assert isinstance(layer, Int8Conv2d) and layer.weight.dtype == torch.int8
    torch.testing.assert_close(layer.act_scale, torch.full((INT8_SCHEME["timestep_buckets"],), 0.05))


def test_build_int8_refuses_a_mismatched_calibration(weights_dir):
    import json

    meta_file = weights_dir / "sd-int8.json"
    meta = json.loads(meta_file.read_text())
    meta["config"]["scheme"]["timestep_buckets"] = 4
    meta_file.write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="config does not match"):
        build_int8(DigitsBackbone(weights_dir=weights_dir), steps=2)


def test_build_int8_refuses_a_calibration_of_another_teacher(weights_dir):
    from un0_bench.backbones.teacher import UNET_CONFIG, build_unet
    from un0_bench.harness.checkpoints import save_checkpoint

    torch.manual_seed(1)  # a different teacher file: its hash no longer matches the calibration
    save_checkpoint(weights_dir / "teacher.safetensors", build_unet().state_dict(), {"config": UNET_CONFIG})
    with pytest.raises(CheckpointError, match="teacher_sha256"):
        build_int8(DigitsBackbone(weights_dir=weights_dir), steps=2)


@pytest.mark.slow
def test_shipped_int8_stays_close_to_sd():
    from un0_bench.baselines.diffusion import build

    backbone = DigitsBackbone()
    if not backbone.weights("sd-int8").is_file():
        pytest.skip("sd-int8 is not calibrated yet (un0-bench train sd-int8)")
    req = GenerationRequest(tuple(str(i % 10) for i in range(20)), seed=0, batch_size=20)
    a = build_int8(backbone, steps=50).generate(req).images
    b = build(backbone, steps=50).generate(req).images
    assert float((a - b).abs().mean()) < 0.03
