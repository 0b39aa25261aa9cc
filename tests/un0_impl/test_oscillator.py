import json
import math

import pytest
import torch
from un0_bench.backbones.digits import DigitsBackbone
from un0_bench.harness.core.generator import GenerationRequest
from un0_bench.harness.core.stack import make_generator
from un0_bench.harness.counters.ops import OpCounter
from un0_bench.harness.errors import SpecError
from un0_bench.harness.meters.proxy import load_profiles, proxy_energy
from un0_bench.training.oscillator import symmetrize_
from un0_bench.un0_impl.oscillator import (
    DIGITAL_MODULES,
    OscillatorConfig,
    OscillatorGenerator,
    OscillatorNet,
    _unpack_state,
    digital_counts,
    load_oscillator,
    naive_coupling,
    pack_state,
)

from tests.contract import GeneratorContract

# n=256 oscillators (one channel on the 16x16 grid), 4 conditioning oscillators of rank 2, decoder 4 wide.
TINY = OscillatorConfig(n=256, cond_oscillators=4, cond_rank=2, decoder_channels=4)


def tiny_net(seed: int = 0) -> OscillatorNet:
    torch.manual_seed(seed)
    net = OscillatorNet(TINY)
    with torch.no_grad():  # non-zero frequencies and phase bias, so every term of the step is exercised
        net.dynamics.omega.normal_()
        net.encoder.phase_bias.normal_()
    return net


class TestOscillatorContract(GeneratorContract):
    @pytest.fixture
    def generator(self):
        return OscillatorGenerator(tiny_net(), steps=3)


def test_two_matvec_coupling_equals_naive_sine_sum():
    torch.manual_seed(1)
    dyn = tiny_net().dynamics
    theta = torch.rand(3, TINY.n) * 2 * math.pi - math.pi  # (B, N) random phases
    with torch.no_grad():
        dyn.omega.zero_()
        fast = dyn.velocity(theta, torch.zeros(6, TINY.n))
    torch.testing.assert_close(fast, naive_coupling(theta, dyn.coupling.detach()), atol=1e-5, rtol=1e-5)


def test_conditioning_field_equals_naive_low_rank_coupling():
    # sum_m C_im sin(phi_m - theta_i) with C = U V^T (N x M), phases phi of each image's class.
    dyn = tiny_net().dynamics.requires_grad_(False)
    labels = torch.tensor([0, 7])
    theta = torch.rand(2, TINY.n) * 2 * math.pi
    h_re, h_im = dyn.drive(labels).chunk(2)
    fast = torch.cos(theta) * h_im - torch.sin(theta) * h_re  # Im(e^{-i theta} C e^{i phi})
    c = dyn.cond_u @ dyn.cond_v.T  # (N, M)
    phi = dyn.cond_phase[labels]  # (B, M)
    naive = (c[None] * torch.sin(phi[:, None, :] - theta[:, :, None])).sum(-1)
    torch.testing.assert_close(fast, naive, atol=1e-5, rtol=1e-5)


def test_one_step_flops_match_hand_count():
    dyn = tiny_net().dynamics.requires_grad_(False)
    b, n = 2, TINY.n
    theta, field = torch.rand(b, n), torch.zeros(2 * b, n)
    with OpCounter() as counter:
        dyn.step(theta, field, 0.1)
    # Per image: two matrix-vector products with K, as one addmm (2B, N) @ (N, N) = 2 x 2*N*N =
    # 4*256*256 = 262,144 (its bias add is not charged, as in torch; cat and slices are 0 FLOPs);
    # pointwise, 1 FLOP per element: cos, sin, addcmul, mul (s*a), sub, add(alpha=dt) = 6*256 = 1,536.
    # 262,144 + 1,536 = 263,680 per image, x 2 images = 527,360.
    assert counter.counts(images=b).flops() == b * (4 * n * n + 6 * n) == 527_360


def test_steps_scale_the_dynamics_only():
    req = GenerationRequest(("1", "2"), seed=0, batch_size=2)
    flops = {}
    for steps in (2, 5):
        with OpCounter() as c:
            OscillatorGenerator(tiny_net(), steps=steps).generate(req)
        flops[steps] = c.counts(images=2).flops()
    # Three more steps for 2 images: 3 x 2 x (4 N^2 + 6 N) = 3 x 527,360.
    assert flops[5] - flops[2] == 3 * 527_360


def test_digital_counts_hold_only_encoder_and_decoder():
    gen = OscillatorGenerator(tiny_net(), steps=2)
    with OpCounter() as c:
        gen.generate(GenerationRequest(("1", "2"), seed=0, batch_size=2))
    counts = c.counts(images=2)
    digital = digital_counts(counts)
    assert digital.stats and all(any(m in s.module.split(".") for m in DIGITAL_MODULES) for s in digital.stats)
    n, d, px = TINY.n, TINY.decoder_channels, 256
    # Per image. Encoder: conv 1->1 3x3 on 16x16 = 2*9*256 = 4,608, + phase bias add 256.
    # Decoder: cos + sin 2*256; conv 2->4: 2*9*2*4*256 = 36,864; silu 4*256; conv 4->4: 2*9*4*4*256 =
    # 73,728; silu 4*256; conv 4->1: 2*9*4*256 = 18,432; tanh 256 (conv biases not charged, as torch).
    hand = (2 * 9 * px + n) + (2 * n + 2 * 9 * 2 * d * px + d * px + 2 * 9 * d * d * px + d * px
                               + 2 * 9 * d * px + px)
    assert digital.flops() == 2 * hand
    # The rest is the dynamics: drive (2 small matmuls + cos, sin) and 2 steps.
    assert counts.flops() - digital.flops() >= 2 * 2 * (4 * n * n + 6 * n)


def test_phases_encode_oscillate_decode_split_the_counted_work():
    from un0_bench.harness.measuring.protocol import count_ops, measure_phases

    gen = OscillatorGenerator(tiny_net(), steps=2)
    assert gen.phases() == ("encode", "oscillate", "decode")
    events = []
    gen.phase_hook = lambda kind, phase: events.append((kind, phase))
    req = GenerationRequest(("1", "2", "3"), seed=0, batch_size=2)  # two batches
    gen.generate(req)
    gen.phase_hook = None
    one = [(k, p) for p in ("encode", "oscillate", "decode") for k in ("begin", "end")]
    assert events == one * 2
    counts = count_ops(gen, req)
    phases = measure_phases(gen, req, {})
    assert all(phases[p]["calls"] == 2 for p in gen.phases())
    # The digital parts are exactly the encode and decode phases; the dynamics are the oscillate phase.
    assert phases["encode"]["flops"] + phases["decode"]["flops"] == digital_counts(counts).flops() > 0
    assert phases["oscillate"]["flops"] >= 3 * 2 * (4 * TINY.n**2 + 6 * TINY.n)  # 3 images x 2 steps
    assert sum(phases[p]["flops"] for p in (*gen.phases(), "other")) == counts.flops()


def test_registry_declares_un0_osc_digits_only():
    from un0_bench.harness.core.stack import resolve
    from un0_bench.harness.errors import StackError

    class PipelineKind:
        kind = "diffusers"

    with pytest.raises(StackError, match="un0-osc is not available on diffusers backbones: .*no counterpart"):
        resolve("un0-osc", PipelineKind())


def test_analog_projection_and_projected_energy():
    gen = OscillatorGenerator(tiny_net(), steps=3)
    e_osc = load_profiles()["analog-oscillator"].quantity("oscillator_step")
    p = gen.analog_projection(4)
    # (256 population + 4 conditioning oscillators) x 3 steps = 780 oscillator-steps per image.
    assert p["oscillator_steps"] == 780 and p["oscillator_steps_total"] == 3120
    assert p["analog_j_per_image"] == pytest.approx(780 * e_osc)
    assert p["assumption"] and p["profile"] == "analog-oscillator" and "digital" in p["decoder"]
    with OpCounter() as c:
        gen.generate(GenerationRequest(("1", "2", "3", "4"), seed=0, batch_size=4))
    counts = c.counts(images=4)
    proj = gen.analog_projection(counts)  # what the runner calls, with its counting pass
    digital_j = proxy_energy(digital_counts(counts), "horowitz-45nm").total_j / 4
    assert proj["projected_j_per_image"] == pytest.approx(780 * e_osc + digital_j)
    assert proj["digital_j_per_image"] < proxy_energy(counts, "horowitz-45nm").total_j / 4
    assert proj["oscillator_steps"] == 780 and proj["label"].startswith("projected")
    assert json.loads(json.dumps(proj)) == proj
    with pytest.raises(ValueError, match="positive number of images"):
        gen.analog_projection(0)


def test_weights_round_trip_keeps_k_symmetric(tmp_path):
    from un0_bench.harness.weights.checkpoints import save_checkpoint

    net = tiny_net()
    symmetrize_(net)
    state = pack_state(net)
    # Upper triangle in float16: N(N+1)/2 values.
    assert state["dynamics.coupling_triu_f16"].dtype == torch.float16
    assert state["dynamics.coupling_triu_f16"].numel() == TINY.n * (TINY.n + 1) // 2
    k = _unpack_state(state, TINY.n)["dynamics.coupling"]
    torch.testing.assert_close(k, k.T, atol=0, rtol=0)
    torch.testing.assert_close(k, net.dynamics.coupling.detach(), atol=1e-3, rtol=1e-3)
    save_checkpoint(tmp_path / "osc.safetensors", state, {"config": TINY.to_dict()})
    loaded, _ = load_oscillator(tmp_path / "osc.safetensors")
    assert loaded.cfg == TINY
    req = GenerationRequest(("5", "6"), seed=2, batch_size=2)
    a = OscillatorGenerator(net, steps=3).generate(req).images
    b = OscillatorGenerator(loaded, steps=3).generate(req).images
    torch.testing.assert_close(a, b, atol=2e-2, rtol=0)


@pytest.mark.parametrize("spec, match", [
    ("un0-osc:n=0", r"n=0 is out of range; n must be an integer >= 1"),
    ("un0-osc:n=x", r"n='x' is not valid; n must be an integer >= 1"),
    ("un0-osc:steps=0", r"steps=0 is out of range; steps must be an integer >= 1"),
    ("un0-osc:n=512", r"no trained model has 512 oscillators; n must be one of 1024"),
])
def test_bad_params_are_refused(spec, match, tmp_path):
    # An empty weights folder: every refusal happens before any weights are read.
    with pytest.raises(SpecError, match=match):
        make_generator(spec, DigitsBackbone(weights_dir=tmp_path))


def test_config_refuses_n_off_the_grid():
    with pytest.raises(ValueError, match="multiple of 256"):
        OscillatorConfig(n=300)
    with pytest.raises(ValueError, match="positive integer"):
        OscillatorGenerator(tiny_net(), steps=0)


def test_shipped_weights_load_and_generate():
    backbone = DigitsBackbone()
    path = backbone.weights("un0-osc")
    assert path.stat().st_size < 2_000_000  # K as a float16 upper triangle keeps it small
    gen = make_generator("un0-osc", backbone)
    d = gen.describe()
    assert d["oscillators"] == 1024 and d["steps"] == 32 and d["technique"] == "coupled-oscillators"
    assert gen.derivation()["energy"]["includes"]["teacher"]
    out = gen.generate(GenerationRequest(("0", "1", "7"), seed=0, batch_size=3)).images
    assert out.shape == (3, 1, 16, 16) and float(out.std()) > 0.1  # digits, not a flat image


@pytest.mark.slow
def test_shipped_model_draws_the_prompted_digits():
    from un0_bench.backbones.quality import evaluate_generator

    q = evaluate_generator(make_generator("un0-osc", DigitsBackbone()), n=200)
    # Measured at n=1000: accuracy 0.972, FID 0.366 (sd: 0.988, 0.207).
    assert q["accuracy"] >= 0.9 and q["fid"] < 1.0
