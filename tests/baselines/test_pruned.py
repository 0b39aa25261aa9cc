import json
from collections import defaultdict

import pytest
import torch
from un0_bench.backbones.ddim import DigitsSampler
from un0_bench.backbones.digits import DigitsBackbone
from un0_bench.backbones.teacher import UNET_CONFIG
from un0_bench.baselines.pruned import (
    load_pruned,
    magnitude_prune_,
    prune_channels,
    pruned_config,
    weight_sparsity,
)
from un0_bench.harness.core.generator import GenerationRequest
from un0_bench.harness.core.model import Model
from un0_bench.harness.core.stack import make_generator, resolve
from un0_bench.harness.counters.ops import OpCounter
from un0_bench.harness.errors import CheckpointError, SpecError, StackError
from un0_bench.harness.weights.checkpoints import save_checkpoint

from tests.baselines.test_diffusion import TINY, tiny, tiny_unet
from tests.contract import GeneratorContract

# Two images at two timesteps, one conditioning label each.
X = torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(0))  # (B, C, H, W)
T = torch.tensor([10, 500])
Y = torch.tensor([3, 7])


def _count(unet):
    with torch.no_grad(), OpCounter() as c:
        out = unet(X, T, class_labels=Y).sample
    counts = c.counts(images=2)
    by_module = defaultdict(int)
    for s in counts.stats:
        by_module[s.module.removeprefix("UNet2DModel.")] += s.flops
    return out, counts, by_module


class TestStructuredContract(GeneratorContract):
    @pytest.fixture
    def generator(self):
        # The pruned tiny network (untrained) in the digits sampler: the contract is about the plumbing.
        return DigitsSampler(Model(denoiser=prune_channels(tiny_unet()), steps=2))


class TestUnstructuredContract(GeneratorContract):
    @pytest.fixture
    def generator(self):
        return tiny("sd:steps=2+pruned-unstructured")


def test_structured_pruning_quarters_conv_flops_and_still_runs():
    dense_out, dense, dense_by = _count(tiny_unet())
    pruned = prune_channels(tiny_unet())
    out, counts, by = _count(pruned)
    assert out.shape == dense_out.shape == (2, 1, 16, 16) and torch.isfinite(out).all()
    # A conv costs 2 * C_out * C_in * k * k * H_out * W_out FLOPs. Halving both C_in and C_out
    # divides it by exactly 4. conv_in reads the 1-channel image and conv_out writes the 1-channel
    # noise, so only one side of each is halved: exactly / 2.
    convs = [n for n, m in tiny_unet().named_modules() if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) > 10
    for name in convs:
        expected = 2 if name in ("conv_in", "conv_out") else 4
        assert dense_by[name] == expected * by[name], name
    # Whole network: convs and linears dominate and shrink 4x; attention's QK^T and PV (sequence
    # length fixed, head dim halved), norms and pointwise ops shrink 2x. Measured: 0.287.
    assert 0.25 < counts.flops() / dense.flops() < 0.30
    # Half of each GroupNorm's channels went, group-aligned, so num_groups still divides them.
    for m in pruned.modules():
        if isinstance(m, torch.nn.GroupNorm):
            assert m.num_channels % m.num_groups == 0
    # Attention keeps its heads; each head lost half of its dimensions.
    attn = pruned.mid_block.attentions[0]
    assert attn.heads == 2 and attn.to_q.out_features == attn.to_k.out_features == 8


def test_frozen_network_is_pruned_and_stays_frozen():
    # A loaded teacher has requires_grad=False; the pruner's graph tracing must still see it.
    frozen = prune_channels(tiny_unet().requires_grad_(False))
    plain = prune_channels(tiny_unet())
    assert all(not p.requires_grad for p in frozen.parameters())
    for (name, a), b in zip(frozen.state_dict().items(), plain.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)


def test_pruned_shapes_do_not_depend_on_weights():
    a = {k: v.shape for k, v in prune_channels(tiny_unet(seed=1)).state_dict().items()}
    b = {k: v.shape for k, v in prune_channels(tiny_unet(seed=2)).state_dict().items()}
    assert a == b


def test_pruned_checkpoint_round_trip_and_refusals(tmp_path):
    unet = prune_channels(tiny_unet()).eval()
    path = tmp_path / "p.safetensors"
    save_checkpoint(path, unet.state_dict(), {"config": pruned_config(TINY), "energy": {}})
    loaded, _ = load_pruned(path, tiny_unet(seed=5), TINY)  # another base: its weights are replaced
    with torch.no_grad():
        torch.testing.assert_close(loaded(X, T, class_labels=Y).sample, unet(X, T, class_labels=Y).sample)
    # Under the teacher's config, a file pruned from another network is refused.
    with pytest.raises(CheckpointError, match="config does not match"):
        load_pruned(path, tiny_unet(), UNET_CONFIG)
    # So is a file with another pruning ratio.
    with pytest.raises(CheckpointError, match="config does not match"):
        load_pruned(path, tiny_unet(), TINY, pruning={**json.loads(json.dumps(pruned_config(TINY)))["pruning"],
                                                    "ratio": 0.25})
    # And tensors that do not fit the pruned shapes, even under the right config.
    bad = tmp_path / "bad.safetensors"
    save_checkpoint(bad, tiny_unet().state_dict(), {"config": pruned_config(TINY), "energy": {}})
    with pytest.raises(CheckpointError, match="do not fit the pruned architecture"):
        load_pruned(bad, tiny_unet(), TINY)


def test_sd_pruned_is_the_shipped_pruned_network():
    from un0_bench.backbones.teacher import build_unet, load_teacher

    backbone = DigitsBackbone()
    gen = make_generator("sd-pruned:steps=2", backbone)
    shipped, meta = load_pruned(backbone.weights("sd-pruned"), build_unet(), UNET_CONFIG)
    for (name, a), b in zip(gen.model.denoiser.state_dict().items(), shipped.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    d = gen.describe()
    assert json.loads(json.dumps(d)) == d
    assert d["technique"] == "pruned" and d["steps"] == 2
    (layer,) = d["layers"]
    assert layer["pruning"]["ratio"] == 0.5 and layer["kernels"] == "dense, on smaller tensors"
    assert layer["block_out_channels"] == [16, 32, 32]  # the teacher's (32, 64, 64), halved
    teacher, _ = load_teacher(backbone.weights("teacher"))
    assert layer["parameters_vs_teacher"] == d["parameters"] / sum(p.numel() for p in teacher.parameters())
    # Its derivation is the fine-tuning run, which includes the teacher's training.
    assert gen.derivation() == meta and meta["kind"] == "digits-pruned"
    assert "teacher" in meta["energy"]["includes"]


def test_structured_pruning_must_come_right_after_sd():
    backbone = DigitsBackbone()
    assert resolve("sd-pruned", backbone).canonical == "sd:steps=50+pruned"
    for text in ("sd:steps=4+bf16+pruned", "sd-distilled+pruned", "sd-pruned-unstructured+pruned"):
        with pytest.raises(StackError, match="must come right after sd"):
            resolve(text, backbone)
    with pytest.raises(SpecError, match="unknown parameter 'ratio'"):
        resolve("sd+pruned:ratio=0.3", backbone)


def test_unstructured_zeros_half_of_every_layer_and_saves_no_flops():
    dense_unet = tiny_unet()
    pruned_unet = tiny_unet()
    sparsity = magnitude_prune_(pruned_unet)
    layers = {n: m for n, m in dense_unet.named_modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))}
    assert set(sparsity) == set(layers)
    pruned_layers = dict(pruned_unet.named_modules())
    for name, m in layers.items():
        w, wp = m.weight, pruned_layers[name].weight
        n = w.numel()
        assert int((w == 0).sum()) == 0  # a fresh init has no exact zeros...
        assert int((wp == 0).sum()) == n // 2  # ...so exactly floor(n / 2) were zeroed
        kept = wp != 0
        # The smallest magnitudes went: every kept weight is at least as large as every dropped one.
        assert w[kept].abs().min() >= w[~kept].abs().max()
        torch.testing.assert_close(wp[kept], w[kept], rtol=0, atol=0)
    assert weight_sparsity(pruned_unet) == pytest.approx(0.5, abs=1e-3)
    dense_out, dense, _ = _count(dense_unet)
    out, counts, _ = _count(pruned_unet)
    assert not torch.allclose(out, dense_out)  # the zeros change the output...
    # ...but not the work: the counter charges each op by its shapes, as a dense kernel executes
    # the multiplications by zero too.
    assert counts.flops() == dense.flops()
    assert counts.bytes_moved() == dense.bytes_moved()


def test_magnitude_pruning_breaks_ties_by_position():
    lin = torch.nn.Linear(5, 1, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[0.5, -0.5, 0.5, 2.0, -0.5]]))
    magnitude_prune_(lin, 0.5)  # floor(0.5 * 5) = 2 of the four tied 0.5s go: the first two
    assert lin.weight.tolist() == [[0.0, 0.0, 0.5, 2.0, -0.5]]


def test_unstructured_describe_and_derivation():
    teacher_meta = {"energy": {"wall": {"status": "ok", "energy_j": None, "duration_s": 12.0}}}
    gen = tiny("sd-pruned-unstructured:steps=2", derivation=teacher_meta)
    d = gen.describe()
    assert d["technique"] == "pruned-unstructured"
    (layer,) = d["layers"]
    assert layer["params"] == {"sparsity": 0.5} and layer["weight_sparsity"] == pytest.approx(0.5, abs=1e-3)
    assert layer["pruned_layers"] == sum(isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))
                                         for m in tiny_unet().modules())
    assert weight_sparsity(gen.model.denoiser) == layer["weight_sparsity"]
    # No training: zeroing weights is free, so the derivation is the base model's, unchanged.
    assert gen.derivation() == teacher_meta
    sparser = tiny("sd:steps=2+pruned-unstructured:sparsity=0.3").describe()["layers"][0]
    assert sparser["weight_sparsity"] == pytest.approx(0.3, abs=1e-3)


def test_unstructured_sparsity_is_checked():
    backbone = DigitsBackbone()
    with pytest.raises(StackError, match="would zero every weight"):
        resolve("sd+pruned-unstructured:sparsity=1", backbone)
    with pytest.raises(SpecError, match="sparsity must be a number >= 0 and <= 1"):
        resolve("sd+pruned-unstructured:sparsity=1.5", backbone)
    # Any denoiser can be pruned this way, after any technique.
    assert resolve("sd-distilled+pruned-unstructured", backbone).plan.layers == ["sd", "distilled",
                                                                                 "pruned-unstructured"]


def test_unstructured_teacher_does_the_work_of_sd():
    backbone = DigitsBackbone()
    req = GenerationRequest(("5",), seed=0, batch_size=1)
    counts = {}
    for text in ("sd:steps=1", "sd-pruned-unstructured:steps=1"):
        gen = make_generator(text, backbone)  # built outside the counter: zeroing the weights is not the work
        with OpCounter() as c:
            gen.generate(req)
        counts[text] = c.counts(images=1)
    assert counts["sd-pruned-unstructured:steps=1"].flops() == counts["sd:steps=1"].flops()


def test_shipped_sd_pruned_is_a_quarter_of_sd():
    backbone = DigitsBackbone()
    if not backbone.weights("sd-pruned").is_file():
        pytest.skip("sd-pruned weights not shipped")
    req = GenerationRequest(("digit 3",), seed=0, batch_size=1)
    flops = {}
    for text in ("sd:steps=2", "sd-pruned:steps=2"):
        gen = make_generator(text, backbone)
        with OpCounter() as c:
            gen.generate(req)
        flops[text] = c.counts(images=1).flops()
    # Measured 0.259 on the digits teacher (convs / 4; conv_in, conv_out, attention scores / 2).
    assert flops["sd-pruned:steps=2"] / flops["sd:steps=2"] == pytest.approx(0.259, abs=0.005)
