"""One technique contract, run on both the digits teacher and the tiny pipeline.

Each technique is written once, as a transform of a denoiser; on both backbones it must: count
what it claims relative to ``sd`` (int8 counts int8 ops, cached fewer FLOPs, unstructured pruning
exactly the same FLOPs, bf16 bfloat16 ops), reproduce its images from a seed, and be refused with
its reason where it cannot apply (before any model loads).
"""

from __future__ import annotations

import pytest
import torch
from un0_bench.backbones.digits import DigitsBackbone
from un0_bench.harness.core.generator import GenerationRequest
from un0_bench.harness.core.stack import make_generator, resolve
from un0_bench.harness.counters.ops import OpCounter
from un0_bench.harness.errors import StackError

#: The tiny pipeline's ops are too small to share between threads (see conftest.one_torch_thread).
pytestmark = pytest.mark.usefixtures("one_torch_thread")

#: Few steps keep each build and count fast; the relations hold at any step count.
BASE = {"digits": "sd:steps=3", "diffusers": "sd:steps=3"}


@pytest.fixture(scope="module", params=["digits", "diffusers"])
def world(request, tiny_dir):
    """``(backbone, prompts, counts of sd)`` for one backbone kind."""
    if request.param == "digits":
        backbone = DigitsBackbone()
    else:
        from un0_bench.backbones.pipeline import PipelineBackbone

        backbone = PipelineBackbone(str(tiny_dir))
    prompts = tuple(backbone.default_prompts(2))
    return backbone, prompts, _counts(make_generator(BASE[backbone.kind], backbone), prompts)


def _counts(generator, prompts):
    with OpCounter() as counter:
        generator.generate(GenerationRequest(prompts, seed=0, batch_size=2))
    return counter.counts(images=len(prompts))


def _images(generator, prompts, seed):
    return generator.generate(GenerationRequest(prompts, seed=seed, batch_size=2)).images


def _denoiser_flops(counts, dtype=None):
    """FLOPs counted inside the denoiser (module paths start with its class), optionally of one dtype."""
    return sum(s.flops for s in counts.stats if s.module.startswith(("UNet2DModel", "UNet2DConditionModel"))
               and (dtype is None or s.dtype == dtype))


def test_int8_counts_int8_work(world):
    backbone, prompts, sd = world
    c = _counts(make_generator(BASE[backbone.kind] + "+int8", backbone), prompts)
    # Every Linear of the denoiser runs as int8 x int8 -> int32 (torchao, torch._int_mm): exactly the
    # FLOPs of sd's float linears; convolutions, the text encoder and VAE of a pipeline stay float.
    linear_ops = ("aten.addmm.default", "aten.mm.default", "aten.bmm.default")
    linears = sum(s.flops for s in sd.stats if s.op in linear_ops
                  and s.module.startswith(("UNet2DModel", "UNet2DConditionModel")))
    assert _denoiser_flops(c, "int8") == linears > 0
    assert sd.flops_by_dtype().get("int8", 0) == 0


def test_cached_counts_fewer_flops(world):
    backbone, prompts, sd = world
    c = _counts(make_generator(BASE[backbone.kind] + "+cached:interval=2", backbone), prompts)
    # 3 calls: full, cached, full; a cached call skips every block but the shallowest.
    assert 0 < c.flops() < sd.flops()
    one = _counts(make_generator(BASE[backbone.kind] + "+cached:interval=1", backbone), prompts)
    assert one.flops() == sd.flops()  # interval 1: every call is full


def test_unstructured_pruning_counts_exactly_the_same_flops(world):
    backbone, prompts, sd = world
    gen = make_generator(BASE[backbone.kind] + "+pruned-unstructured", backbone)
    assert _counts(gen, prompts).flops() == sd.flops()  # dense kernels multiply the zeros too
    layer = gen.describe()["layers"][0]
    assert layer["technique"] == "pruned-unstructured" and 0.49 < layer["weight_sparsity"] <= 0.5


def test_bf16_counts_bfloat16_work(world):
    backbone, prompts, sd = world
    c = _counts(make_generator(BASE[backbone.kind] + "+bf16", backbone), prompts)
    assert c.flops_by_dtype().get("bfloat16", 0) > 0.5 * c.flops()


@pytest.mark.parametrize("technique", ["int8", "cached:interval=2", "bf16", "pruned-unstructured"])
def test_seed_reproduces_the_images(world, technique):
    backbone, prompts, _ = world
    gen = make_generator(f"{BASE[backbone.kind]}+{technique}", backbone)
    a, b = _images(gen, prompts, 5), _images(gen, prompts, 5)
    assert torch.equal(a, b)
    assert not torch.equal(a, _images(gen, prompts, 6))


def test_unsupported_technique_is_refused_with_its_reason(world, monkeypatch):
    backbone, _, _ = world
    # Nothing may load: a refused stack never builds its base.
    monkeypatch.setattr(type(backbone), "base_model", lambda self, steps: pytest.fail("a model was loaded"))
    if backbone.kind == "digits":
        with pytest.raises(StackError, match="no feed-forward layers"):
            resolve("sd+contextual", backbone)
    else:
        with pytest.raises(StackError, match="distillation needs a training run"):
            resolve("sd+distilled", backbone)
        with pytest.raises(StackError, match="structured pruning needs a training run"):
            resolve("sd-pruned", backbone)
        with pytest.raises(StackError, match="scales=static uses the activation scales calibrated for the digits"):
            resolve("sd+int8:scales=static", backbone)


def test_a_technique_records_what_it_changed(world):
    backbone, _, _ = world
    gen = make_generator(BASE[backbone.kind] + "+int8+cached:interval=2", backbone)
    layers = gen.describe()["layers"]
    assert [(lay["technique"], lay["params"]) for lay in layers] == [("int8", {"mode": "w8a8", "scales": "dynamic"}),
                                                                     ("cached", {"interval": 2})]
    assert layers[0]["int8_layers"] > 0 and layers[0]["library"].startswith("torchao ")
    assert layers[1]["full_calls_per_image"] == 2 and layers[1]["cached_calls_per_image"] == 1
