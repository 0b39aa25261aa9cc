import json

import pytest
import torch
from un0_bench.backbones.digits import DigitsBackbone
from un0_bench.harness.core.generator import GenerationRequest, image_noise
from un0_bench.harness.core.stack import resolve
from un0_bench.harness.counters.ops import OpCounter
from un0_bench.harness.errors import SpecError
from un0_bench.un0_impl.gated import UN0_FILE, Un0Generator, Un0Net, build, pack_state, unpack_state

from tests.contract import GeneratorContract

TINY = dict(image_dim=256, dim=16, hidden=64, blocks=2, embed=8, classes=10, max_steps=4)


def tiny_net(seed: int = 0) -> Un0Net:
    torch.manual_seed(seed)
    net = Un0Net.from_config(TINY)
    with torch.no_grad():
        net.mlp.w2t.mul_(20.0)  # far from the identity, so a wrong unit or group would show
        net.step_bias.normal_()
    return net


class TestUn0Contract(GeneratorContract):
    @pytest.fixture
    def generator(self):
        return Un0Generator(tiny_net(), keep=0.1, steps=2)


@pytest.mark.parametrize(("keep", "steps"), [(1.0, 1), (0.1, 1), (0.1, 4), (0.02, 3)])
def test_compact_subnet_equals_dense_masked(keep, steps):
    net = tiny_net()
    z = torch.randn(6, 256)
    labels = torch.tensor([3, 3, 7, 1, 7, 0])
    with torch.no_grad():
        ref = net.forward_masked(z, labels, keep, steps)
        gen = Un0Generator(net, keep=keep, steps=steps)
        got = torch.cat([gen.subnet(int(lab))(z[i : i + 1], steps) for i, lab in enumerate(labels)])
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)


def test_keep_selects_per_prompt_units():
    gen = Un0Generator(tiny_net(), keep=0.1)
    a, b = gen.subnet(3), gen.subnet(7)
    assert a.kept == 6  # round(0.1 * 64)
    assert a.mlp.index.shape == (2, 6)
    assert not torch.equal(a.mlp.index, b.mlp.index)  # different prompts, different units


def test_cache_hits_misses_and_cold_vs_warm_gating():
    gen = Un0Generator(tiny_net(), keep=0.1, steps=1)
    req = GenerationRequest(("3", "7", "digit 3", "1"), seed=0, batch_size=4)
    with OpCounter() as c:
        cold = gen.generate(req)
    cold_counts = c.counts(images=4)
    assert cold.info["cache_misses"] == 3 and cold.info["cache_hits"] == 0
    assert cold_counts.flops("gating") > 0 and cold_counts.bytes_moved("gating") > 0
    with OpCounter() as c:
        warm = gen.generate(req)
    warm_counts = c.counts(images=4)
    assert warm.info["cache_misses"] == 0 and warm.info["cache_hits"] == 3
    # A hit is a dict lookup: no op runs in the gating role.
    assert warm_counts.flops("gating") == 0 and warm_counts.bytes_moved("gating") == 0
    assert warm_counts.flops("compute") == cold_counts.flops("compute")
    stats = gen.cache_stats()
    assert (stats["hits"], stats["misses"], stats["entries"]) == (3, 3, 3)
    # Per entry, 2 blocks x k=6 units: w1 and w2t rows of 16 floats, b1, plus the int64 index
    # (2 x 6 x 8 B) and the (4, 16) folded biases: 2*(6*16*4*2 + 6*4) + 96 + 256 = 1936 bytes.
    assert stats["bytes"] == 3 * 1936
    gen.reset_cache()
    assert gen.cache_stats()["entries"] == 0
    with OpCounter() as c:
        again = gen.generate(req)
    assert again.info["cache_misses"] == 3 and c.counts(images=4).flops("gating") == cold_counts.flops("gating")
    torch.testing.assert_close(again.images, cold.images, rtol=0, atol=0)


def test_mixed_prompt_batch_is_grouped_by_prompt():
    gen = Un0Generator(tiny_net(), keep=0.1, steps=2)
    prompts = ("3", "7", "3", "1", "7", "3")
    with OpCounter() as c:
        mixed = gen.generate(GenerationRequest(prompts, seed=5, batch_size=6)).images
    # One compact sub-network call per distinct prompt: one noise projection (mm) per group.
    mm_calls = sum(s.calls for s in c.counts(images=6).stats if s.op == "aten.mm.default")
    assert mm_calls == 3
    # Each image equals the image of its prompt generated alone (image i uses seed + i).
    for i, p in enumerate(prompts):
        alone = gen.generate(GenerationRequest((p,), seed=5 + i, batch_size=1)).images[0]
        torch.testing.assert_close(mixed[i], alone, rtol=0, atol=1e-5)


def test_steps_scale_the_compute():
    net = tiny_net()
    req = GenerationRequest(("2",), seed=0, batch_size=1)
    flops = {}
    for steps in (1, 2, 4):
        gen = Un0Generator(net, keep=0.5, steps=steps)
        gen.generate(req)  # warm the cache: count compute only
        with OpCounter() as c:
            gen.generate(req)
        flops[steps] = c.counts(images=1).flops("compute")
    # Step 1 skips the x projection (2 * 256 * 16 = 8192 FLOPs) and its add; later steps pay them.
    step_cost = flops[2] - flops[1]
    assert flops[4] - flops[2] == 2 * step_cost
    assert step_cost > flops[1] - flops[1] // 2  # a later step costs more than half of the first


def test_phases_gate_once_per_batch_and_one_refine_step_per_step_and_group():
    gen = Un0Generator(tiny_net(), keep=0.1, steps=2)
    assert gen.phases() == ("gate", "refine_step")
    events = []
    gen.phase_hook = lambda kind, phase: events.append((kind, phase))
    # Two batches: ("3", "7", "3") has two prompt groups, ("1",) one.
    gen.generate(GenerationRequest(("3", "7", "3", "1"), seed=0, batch_size=3))
    gen.phase_hook = None
    step = [("begin", "refine_step"), ("end", "refine_step")]
    gate = [("begin", "gate"), ("end", "gate")]
    assert events == gate + step * 4 + gate + step * 2


def test_measured_phases_split_the_counted_work():
    from un0_bench.harness.measuring.protocol import count_ops, measure_phases

    gen = Un0Generator(tiny_net(), keep=0.1, steps=3)
    req = GenerationRequest(("3", "7", "3", "1"), seed=0, batch_size=4)
    gen.reset_cache()
    cold = count_ops(gen, req)
    phases = measure_phases(gen, req, {}, cold=True)
    assert (phases["gate"]["calls"], phases["refine_step"]["calls"]) == (1, 3 * 3)
    # Cold, every gating op runs in the gate phase; the steps run no gating op.
    assert phases["gate"]["gating_flops"] == cold.flops("gating") > 0
    assert phases["refine_step"]["gating_flops"] == 0
    assert sum(phases[p]["flops"] for p in ("gate", "refine_step", "other")) == cold.flops()
    warm = measure_phases(gen, req, {})  # the cache is full: the gate is three dict lookups
    assert warm["gate"]["calls"] == 1 and warm["gate"]["flops"] == 0 and warm["gate"]["bytes"] == 0
    assert warm["refine_step"]["flops"] == phases["refine_step"]["flops"]


@pytest.mark.parametrize(("spec", "message"), [
    ("un0:keep=0", "keep must be a number > 0 and <= 1"),
    ("un0:keep=1.5", "keep must be a number > 0 and <= 1"),
    ("un0:keep=-0.1", "keep must be a number > 0 and <= 1"),
    ("un0:steps=0", "steps must be an integer >= 1 and <= 4"),
    ("un0:steps=5", "steps must be an integer >= 1 and <= 4"),
    ("un0:steps=1.5", "steps must be an integer >= 1 and <= 4"),
])
def test_bad_params_refused_with_valid_range(spec, message):
    with pytest.raises(SpecError, match=message):
        resolve(spec, DigitsBackbone())


def test_generator_refuses_bad_params_directly():
    with pytest.raises(ValueError, match="keep must be"):
        Un0Generator(tiny_net(), keep=0.0)
    with pytest.raises(ValueError, match="steps must be"):
        Un0Generator(tiny_net(), steps=0)


def test_describe():
    d = Un0Generator(tiny_net(), keep=0.1, steps=3).describe()
    assert json.loads(json.dumps(d)) == d
    assert (d["technique"], d["keep"], d["steps"], d["kept_units_per_block"]) == ("gated-sparse", 0.1, 3, 6)
    assert d["trained_keeps"] == [0.001, 0.01, 0.1] and "caveat" not in d


@pytest.mark.parametrize(("keep", "caveat"), [(0.001, False), (0.05, False), (0.2, True), (1.0, True), (0.0005, True)])
def test_keep_outside_the_trained_range_is_accepted_with_a_caveat(keep, caveat):
    # Accepted (the range is (0, 1]) but the record says the units were never trained there.
    net = Un0Net.from_config({**TINY, "hidden": 4096})
    d = Un0Generator(net, keep=keep, metadata={"train": {"keep_levels": [[0.1, 1.0], [0.001, 0.1]]}}).describe()
    assert d["trained_keeps"] == [0.001, 0.1]
    assert ("caveat" in d) == caveat
    if caveat:
        assert d["caveat"].startswith(f"keep={keep:g} is outside the keep fractions the gate and units were trained at")


def test_int8_rows_round_trip_within_half_a_step():
    net = tiny_net()
    state = net.state_dict()
    packed = pack_state(state)
    back = unpack_state(packed)
    assert set(back) == set(state)
    w = state["mlp.w1"]
    step = w.abs().amax(-1, keepdim=True) / 127  # one int8 step of each unit's row
    assert torch.all((back["mlp.w1"] - w).abs() <= step / 2 + 1e-7)
    assert packed["mlp.w1"].abs().amax(-1).eq(127).all()  # every row uses the full int8 range
    assert torch.equal(back["z_in.weight"], state["z_in.weight"])
    assert torch.equal(back["gate.score.weight"], state["gate.score.weight"].half().float())


@pytest.mark.skipif(not UN0_FILE.is_file(), reason="shipped un0 weights not trained yet")
def test_shipped_weights_build_and_generate():
    from un0_bench.backbones.digits import DigitsBackbone

    gen = build(DigitsBackbone(), keep=0.1, steps=1)
    assert gen.derivation()["energy"]["proxy"]["energy_j"] > 0
    out = gen.generate(GenerationRequest(("0", "5"), seed=0, batch_size=2))
    assert out.images.shape == (2, 1, 16, 16)
    z = image_noise(0, 0, 2, (1, 16, 16)).flatten(1)
    ref = gen.net.forward_masked(z, torch.tensor([0, 5]), 0.1, 1)
    torch.testing.assert_close(out.images.flatten(1), ((ref + 1) / 2).clamp(0, 1), rtol=1e-4, atol=1e-4)
