"""Techniques from their published packages on the tiny pipeline: tome (tomesd), deepcache (DeepCache), compiled."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from un0_bench.baselines.compiled import _CompiledLayer
from un0_bench.harness.core.generator import GenerationRequest
from un0_bench.harness.core.stack import make_generator, resolve
from un0_bench.harness.counters.ops import OpCounter
from un0_bench.harness.errors import StackError
from un0_bench.harness.measuring.protocol import count_ops
from un0_bench.harness.running.runner import load_backbone


@pytest.fixture(scope="module")
def tiny(tiny_dir, one_torch_thread):
    return load_backbone(f"diffusers:{tiny_dir}")


def _run(backbone, spec):
    g = make_generator(spec, backbone)
    req = GenerationRequest(tuple(backbone.default_prompts(2)), seed=0, batch_size=2)
    return g, g.generate(req).images, count_ops(g, req).flops()


def test_our_cached_is_deepcache_at_the_branch_after_the_first_down_blocks_resnets(tiny):
    # The tiny UNet has layers_per_block=1: cached recomputes down block 0's one resnet and the whole
    # last up block, which is DeepCache's branch 1 (block 0, layer 1: the downsampler is cached).
    _, ours, our_flops = _run(tiny, "sd:steps=4+cached:interval=2")
    g, theirs, their_flops = _run(tiny, "sd:steps=4+deepcache:interval=2,branch=1")
    _, plain, _ = _run(tiny, "sd:steps=4")
    assert torch.equal(ours, theirs)
    # DeepCache's wrapper finds each call's step index by comparing the timestep with the scheduler's
    # timesteps one by one (list(timesteps).index(t)): 1 + 2 + 3 + 4 tensor comparisons over 4 steps, 1 FLOP each.
    assert their_flops == our_flops + (1 + 2 + 3 + 4)
    assert not torch.equal(ours, plain)
    layer = g.describe()["layers"][0]
    assert (layer["library"], layer["library_version"]) == ("DeepCache", "0.1.1")


def test_deepcache_branch_0_recomputes_less_than_branch_1(tiny):
    _, _, b0 = _run(tiny, "sd:steps=4+deepcache:interval=2")
    _, _, b1 = _run(tiny, "sd:steps=4+deepcache:interval=2,branch=1")
    _, _, full = _run(tiny, "sd:steps=4+deepcache:interval=1")
    _, _, plain = _run(tiny, "sd:steps=4")
    assert b0 < b1 < plain
    assert full == plain + (1 + 2 + 3 + 4)  # interval 1: every step full; plus the step-index lookup above


def test_tome_merges_tokens_and_counts_less_work(tiny):
    g, merged, flops = _run(tiny, "sd:steps=2+tome:ratio=0.5")
    _, again, _ = _run(tiny, "sd:steps=2+tome:ratio=0.5")
    _, plain, plain_flops = _run(tiny, "sd:steps=2")
    assert torch.equal(merged, again)  # its generator is seeded per batch
    assert not torch.equal(merged, plain)
    assert flops < plain_flops
    layer = g.describe()["layers"][0]
    # The tiny UNet's transformer blocks: one in CrossAttnDownBlock2D, one in the mid block, two in CrossAttnUpBlock2D.
    assert (layer["library"], layer["library_version"], layer["patched_blocks"]) == ("tomesd", "0.1.3", 4)


def test_tome_and_deepcache_are_refused_on_digits_with_the_reason():
    digits = load_backbone("digits")
    with pytest.raises(StackError, match="AttnDownBlock2D's plain Attention"):
        resolve("sd+tome", digits)
    with pytest.raises(StackError, match="scheduler timesteps"):
        resolve("sd+deepcache", digits)


def test_tome_ratio_out_of_range_is_refused(tiny):
    with pytest.raises(Exception, match="<= 0.75"):
        resolve("sd+tome:ratio=0.9", tiny)


class _Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x).relu()


def test_compiled_gives_the_eager_output_records_compile_time_and_counts_the_eager_graph():
    torch.manual_seed(0)
    m = _Tiny()
    x = torch.randn(2, 4)
    want = m(x)
    layer = _CompiledLayer(m, "default")
    assert torch.allclose(m(x), want, atol=1e-6)
    m(x)
    assert layer.changes["compile_s"] > 0 and layer.changes["first_call_s"] >= layer.changes["compile_s"]
    with OpCounter() as c:
        m(x)
    # addmm 2 x 4 x 3 MACs = 48 FLOPs + bias 6 (torch's addmm formula counts 2*M*K*N only) ... plus relu 6:
    counts = c.counts(images=2)
    assert counts.flops() == 2 * 2 * 4 * 3 + 2 * 3


def test_compiled_runs_the_tiny_pipeline(tiny):
    # Inductor compiles the tiny UNet in about 20 s on 2 quiet cores (79 s when the cores were shared).
    g, compiled, flops = _run(tiny, "sd:steps=2+compiled")
    _, plain, plain_flops = _run(tiny, "sd:steps=2")
    assert torch.allclose(compiled, plain, atol=1e-4)
    assert flops == plain_flops
    assert g.describe()["layers"][0]["compile_s"] > 0
