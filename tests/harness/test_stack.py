"""Stacks: a base and techniques applied left to right, refused before any work when they cannot work."""

from __future__ import annotations

import pytest
from un0_bench.backbones.digits import DigitsBackbone
from un0_bench.harness.core.generator import GenerationRequest
from un0_bench.harness.core.stack import make_generator, resolve
from un0_bench.harness.counters.ops import OpCounter
from un0_bench.harness.errors import SpecError, StackError
from un0_bench.harness.registry import UnknownNameError

PROMPTS = ("digit 3", "digit 7")


@pytest.fixture
def digits(monkeypatch):
    """The digits backbone, and a list of the base models it was asked to load."""
    backbone = DigitsBackbone()
    loads: list[int | None] = []
    real = DigitsBackbone.base_model

    def counting(self, steps):
        loads.append(steps)
        return real(self, steps)

    monkeypatch.setattr(DigitsBackbone, "base_model", counting)
    return backbone, loads


def _counts(gen):
    with OpCounter() as counter:
        gen.generate(GenerationRequest(PROMPTS, seed=0, batch_size=2))
    return counter.counts(images=2)


def test_distilled_plus_int8_counts_the_students_flops_as_int8(digits):
    backbone, _ = digits
    student = _counts(make_generator("sd-distilled", backbone))
    stacked = make_generator("sd-distilled+int8", backbone)
    counts = _counts(stacked)
    by_dtype = counts.flops_by_dtype()
    # The student's linears run as int8 (torchao), its convolutions stay float32: the int8 FLOPs are
    # the student's linear FLOPs; the total is the student's plus the (de)quantisation, a few percent.
    linear_flops = sum(s.flops for s in student.stats if s.op in ("aten.addmm.default", "aten.mm.default",
                                                                  "aten.bmm.default"))
    assert by_dtype["int8"] == linear_flops > 0
    assert student.flops() <= counts.flops() < 1.1 * student.flops()
    assert student.flops_by_dtype().get("int8", 0) == 0
    d = stacked.describe()
    assert d["steps"] == 4 and [lay["technique"] for lay in d["layers"]] == ["distilled", "int8"]


@pytest.mark.parametrize(("text", "reason"), [
    ("sd-distilled:steps=1+cached", "makes 1 call per image, so there is nothing to reuse"),
    ("sd:steps=1+cached", "makes 1 call per image"),
    ("sd+cached+cached", "cached appears twice"),
    ("un0+int8", "un0 has none"),
    ("sd+int8+distilled", "must come right after sd, not after sd\\+int8"),
    ("sd-pruned+int8:scales=static", "runs other weights: use int8 \\(dynamic scales\\)"),
    ("sd:steps=10+distilled", "would be ignored: write sd-distilled:steps=K"),
    ("sd+un0", "un0 is a model, not a technique"),
])
def test_impossible_stacks_are_refused_before_any_model_loads(digits, text, reason):
    backbone, loads = digits
    with pytest.raises(StackError, match=reason):
        resolve(text, backbone)
    assert loads == []


def test_unknown_technique_gets_did_you_mean(digits):
    backbone, _ = digits
    with pytest.raises(UnknownNameError, match="Did you mean 'cached'"):
        resolve("sd+cachd", backbone)
    with pytest.raises(SpecError, match="expected BASE\\+TECHNIQUE"):
        resolve("sd++int8", backbone)
    with pytest.raises(SpecError, match="interval=0 is out of range"):
        resolve("sd+cached:interval=0", backbone)


def test_aliases_route_their_parameters_and_have_one_canonical_text(digits):
    backbone, _ = digits
    assert resolve("sd", backbone).canonical == resolve("sd:steps=50", backbone).canonical == "sd:steps=50"
    assert resolve("sd-cached:steps=20,interval=3", backbone).canonical == "sd:steps=20+cached:interval=3"
    assert resolve("sd:steps=20+cached:interval=3", backbone).canonical == "sd:steps=20+cached:interval=3"
    # steps is taken by both sd and distilled; an alias gives it to the last layer that takes it.
    assert resolve("sd-distilled:steps=1", backbone).canonical == "sd:steps=50+distilled:steps=1"
    assert resolve("sd-int8", backbone).canonical == "sd:steps=50+int8:mode=w8a8,scales=static"
    assert resolve("sd-int8+cached", backbone).canonical == "sd:steps=50+int8:mode=w8a8,scales=static+cached:interval=3"
    with pytest.raises(SpecError, match="unknown parameter 'keep'; sd-cached accepts: interval, steps"):
        resolve("sd-cached:keep=0.1", backbone)
    stack = resolve("sd-pruned+int8+cached:interval=2", backbone)
    assert stack.describe() == [{"name": "sd", "params": {"steps": 50}}, {"name": "pruned", "params": {}},
                                {"name": "int8", "params": {"mode": "w8a8", "scales": "dynamic"}},
                                {"name": "cached", "params": {"interval": 2}}]
    assert stack.plan.steps == 50 and stack.plan.weights == "sd-pruned"


def test_a_stack_is_its_layers_applied_in_order(digits):
    backbone, loads = digits
    gen = make_generator("sd:steps=4+cached:interval=2", backbone)
    assert loads == [4]
    assert gen.spec == "sd:steps=4+cached:interval=2"
    # 4 calls at interval 2: calls 0 and 2 are full, 1 and 3 reuse the deep feature.
    assert gen.describe()["layers"][0]["full_calls_per_image"] == 2
    cached, plain = _counts(gen), _counts(make_generator("sd:steps=4", backbone))
    assert cached.flops() < plain.flops()


def test_proxy_energy_by_layer_group_adds_up_to_the_whole(digits):
    from un0_bench.harness.measuring.protocol import counts_fields, module_groups
    from un0_bench.harness.meters.proxy import proxy_energy

    backbone, _ = digits
    counts = _counts(make_generator("sd:steps=2", backbone))
    groups = module_groups(counts)
    # The teacher's layer groups: its blocks by index, the embeddings, the head, and the sampler's
    # update outside any module.
    assert {"UNet2DModel.down_blocks.0", "UNet2DModel.mid_block.attentions", "UNet2DModel.up_blocks.2",
            "UNet2DModel.conv_out", "(outside modules)"} <= set(groups)
    assert sum(g.flops() for g in groups.values()) == counts.flops()
    by_module = counts_fields(counts, "horowitz-45nm")["proxy_j_per_image_by_module"]
    whole = proxy_energy(counts, "horowitz-45nm").total_j / 2
    assert sum(by_module.values()) == pytest.approx(whole, rel=1e-12)
