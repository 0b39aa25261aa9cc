import json
from collections import defaultdict

import pytest
import torch

from un0_bench.baselines.pruned import (
    PrunedGenerator,
    UnstructuredGenerator,
    load_pruned,
    magnitude_prune_,
    prune_channels,
    pruned_architecture,
    pruned_config,
    unstructured_derivation,
    weight_sparsity,
)
from un0_bench.harness.checkpoints import save_checkpoint
from un0_bench.harness.counters.ops import OpCounter
from un0_bench.harness.errors import CheckpointError
from tests.baselines.test_diffusion import TINY, tiny_unet
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
        return PrunedGenerator(prune_channels(tiny_unet()), steps=2, base_parameters=1)


class TestUnstructuredContract(GeneratorContract):
    @pytest.fixture
    def generator(self):
        unet = tiny_unet()
        magnitude_prune_(unet)
        return UnstructuredGenerator(unet, steps=2, metadata=unstructured_derivation({"energy": {}}))


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


def test_structured_describe():
    d = PrunedGenerator(prune_channels(tiny_unet()), steps=2, base_parameters=1000).describe()
    assert d["technique"] == "structured-pruning" and d["pruning"]["ratio"] == 0.5
    assert d["block_out_channels"] == [4, 8]  # TINY's (8, 16), halved
    assert d["parameters_vs_teacher"] == d["parameters"] / 1000


def test_pruned_shapes_do_not_depend_on_weights():
    a = {k: v.shape for k, v in prune_channels(tiny_unet(seed=1)).state_dict().items()}
    b = {k: v.shape for k, v in pruned_architecture(TINY).state_dict().items()}
    assert a == b


def test_pruned_checkpoint_round_trip_and_refusals(tmp_path):
    unet = prune_channels(tiny_unet()).eval()
    path = tmp_path / "p.safetensors"
    save_checkpoint(path, unet.state_dict(), {"config": pruned_config(TINY), "energy": {}})
    loaded, _ = load_pruned(path, base_config=TINY)
    with torch.no_grad():
        torch.testing.assert_close(loaded(X, T, class_labels=Y).sample, unet(X, T, class_labels=Y).sample)
    # The default expects the teacher's config: a file pruned from another network is refused.
    with pytest.raises(CheckpointError, match="config does not match"):
        load_pruned(path)
    # So is a file with another pruning ratio.
    with pytest.raises(CheckpointError, match="config does not match"):
        load_pruned(path, base_config=TINY, pruning={**json.loads(json.dumps(pruned_config(TINY)))["pruning"],
                                                    "ratio": 0.25})
    # And tensors that do not fit the pruned shapes, even under the right config.
    bad = tmp_path / "bad.safetensors"
    save_checkpoint(bad, tiny_unet().state_dict(), {"config": pruned_config(TINY), "energy": {}})
    with pytest.raises(CheckpointError, match="do not fit the pruned architecture"):
        load_pruned(bad, base_config=TINY)


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


def test_unstructured_describe_and_derivation():
    unet = tiny_unet()
    magnitude_prune_(unet)
    teacher_energy = {"wall": {"status": "ok", "energy_j": None, "duration_s": 12.0}}
    gen = UnstructuredGenerator(unet, steps=2, metadata=unstructured_derivation({"energy": teacher_energy}))
    d = gen.describe()
    assert d["technique"] == "unstructured-pruning"
    assert d["weight_sparsity"] == pytest.approx(0.5, abs=1e-3)
    assert gen.derivation()["energy"] == {"includes": {"teacher": teacher_energy}}


@pytest.mark.slow
def test_shipped_sd_pruned_is_a_quarter_of_sd():
    from un0_bench.backbones.digits import DigitsBackbone
    from un0_bench.baselines.diffusion import build
    from un0_bench.baselines.pruned import PRUNED_FILE, build_structured
    from un0_bench.harness.generator import GenerationRequest

    if not PRUNED_FILE.is_file():
        pytest.skip("sd-pruned weights not shipped")
    req = GenerationRequest(("digit 3",), seed=0, batch_size=1)
    flops = {}
    for name, factory in (("sd", build), ("sd-pruned", build_structured)):
        gen = factory(DigitsBackbone(), steps=2)
        with OpCounter() as c:
            gen.generate(req)
        flops[name] = c.counts(images=1).flops()
    # Measured 0.259 on the digits teacher (convs / 4; conv_in, conv_out, attention scores / 2).
    assert flops["sd-pruned"] / flops["sd"] == pytest.approx(0.259, abs=0.005)
