"""``contextual`` (``un0`` on ``diffusers:PATH``): per-prompt gated feed-forward units of a pipeline's denoiser.

The pieces (compact feed-forward, gated layer, ridge gate) are checked on small diffusers
``FeedForward`` blocks; the technique itself on the tiny pipeline: calibration, the gate phase and
its attribution to gating, the per-prompt cache (hits, misses, evictions) and the stack rules.
"""

from __future__ import annotations

import pytest
import torch
import un0_bench.harness.weights.derivation
from un0_bench.backbones.hf import diffusers_class
from un0_bench.backbones.pipeline import CALIBRATION_PROMPTS, PipelineBackbone
from un0_bench.backbones.tiny_pipeline import IMAGE_SIZE
from un0_bench.harness.core.generator import GenerationRequest
from un0_bench.harness.core.stack import make_generator, resolve
from un0_bench.harness.counters.ops import OpCounter
from un0_bench.harness.errors import PromptError, SpecError, StackError, UserError
from un0_bench.harness.measuring.protocol import count_ops, measure_phases
from un0_bench.harness.meters.proxy import ProxyMeter
from un0_bench.harness.meters.wall import WallMeter
from un0_bench.harness.registry import TECHNIQUES, Registry
from un0_bench.un0_impl.contextual import (
    CALIBRATION_SEED,
    CompactFeedForward,
    ContextualLayer,
    ContextualSparsity,
    FeedForwardSpec,
    GatedFeedForward,
    RidgeGate,
)

from tests.contract import GeneratorContract

#: The tiny pipeline's ops are too small to share between threads (see conftest.one_torch_thread).
pytestmark = pytest.mark.usefixtures("one_torch_thread")

STEPS = 2
PROMPTS = ("a cat", "a red bicycle", "a lighthouse at dusk")
#: Two batches (2 + 1 prompts): the gate runs once per batch, on that batch's new prompts.
REQUEST = GenerationRequest(PROMPTS, seed=0, batch_size=2)
ONE = GenerationRequest(("a cat",), seed=0)
#: Six calibration prompts: two calibration batches (CALIBRATION_BATCH is 4).
CALIBRATION = CALIBRATION_PROMPTS[:6]
UN0 = f"un0:steps={STEPS},keep=0.25"


# -- the pieces, on small feed-forward blocks ---------------------------------------------------------


def _feed_forward(activation="geglu", seed=0):
    torch.manual_seed(seed)
    return diffusers_class("FeedForward")(8, mult=4, activation_fn=activation).eval()


@pytest.mark.parametrize("activation", ["geglu", "gelu"])
def test_compact_feed_forward_runs_exactly_the_kept_units(activation):
    ff = _feed_forward(activation)
    spec = FeedForwardSpec("ff", ff)
    assert spec.inner == 32 and spec.glu == (activation == "geglu")
    x = torch.randn(2, 5, 8)
    with torch.no_grad():
        torch.testing.assert_close(CompactFeedForward(spec, torch.arange(spec.inner))(x), ff(x), atol=1e-6, rtol=0)
        keep = torch.tensor([1, 4, 7, 20, 31])
        compact = CompactFeedForward(spec, keep)
        mask = torch.zeros(spec.inner)
        mask[keep] = 1.0
        dense_masked = ff.net[2](ff.net[0](x) * mask)  # the dense layer with every other unit zeroed
        torch.testing.assert_close(compact(x), dense_masked, atol=1e-6, rtol=0)
    assert compact.units == 5
    rows = 2 * 5 if spec.glu else 5  # GLU: a-rows and g-rows of each kept unit
    assert compact.nbytes == 4 * (rows * 8 + rows + 8 * 5)  # w_in, b_in, w_out in float32


def test_feed_forward_without_a_supported_activation_is_refused():
    ff = _feed_forward()
    ff.net[0] = torch.nn.Identity()
    with pytest.raises(UserError, match="has no input and output projection to gate"):
        FeedForwardSpec("down_blocks.0.ff", ff)


def test_gated_feed_forward_maps_rows_to_prompts_as_guidance_lays_them_out():
    ff = _feed_forward()
    spec = FeedForwardSpec("ff", ff)
    a, b = CompactFeedForward(spec, torch.arange(0, 8)), CompactFeedForward(spec, torch.arange(8, 16))
    gated = GatedFeedForward(ff, spec)
    x = torch.randn(4, 3, 8)  # classifier-free guidance of 2 prompts: [uncond 0, uncond 1, cond 0, cond 1]
    with pytest.raises(RuntimeError, match="called before the gate chose its units"):
        gated(x)
    gated.active = [a, b]
    with torch.no_grad(), OpCounter() as counter:
        out = gated(x)
    assert torch.equal(out[0::2], a(x[0::2])) and torch.equal(out[1::2], b(x[1::2]))
    counts = counter.counts(images=2)
    assert counts.flops("gating") == 0 and counts.bytes_moved("gating") > 0  # the split and merge are gating's
    with pytest.raises(RuntimeError, match="3 rows for 2 prompts"):
        gated(x[:3])
    gated.active = [a]
    assert torch.equal(gated(x), a(x))  # one prompt: no split


def test_ridge_gate_fits_the_calibration_importances_in_closed_form():
    g = torch.Generator().manual_seed(0)
    features = torch.randn(5, 8, generator=g)  # 5 calibration prompts, 8-wide text features
    targets = [torch.rand(5, 3, generator=g), torch.rand(5, 7, generator=g)]
    tight = RidgeGate(features, targets, ridge=1e-9)
    assert tight.project.out_features == 5 and [h.out_features for h in tight.heads] == [3, 7]
    with torch.no_grad(), OpCounter() as counter:
        scores = tight(features)
    # With almost no ridge the kernel fit interpolates the calibration prompts...
    for s, y in zip(scores, targets, strict=True):
        torch.testing.assert_close(s, y, atol=1e-3, rtol=0)
    # ...and every op of the gate is gating work.
    counts = counter.counts(images=5)
    assert counts.flops("gating") == counts.flops() > 0
    # With a huge ridge every prompt gets the mean importances.
    with torch.no_grad():
        flat = RidgeGate(features, targets, ridge=1e9)(torch.randn(2, 8, generator=g))
    for s, y in zip(flat, targets, strict=True):
        torch.testing.assert_close(s, y.mean(0).expand_as(s), atol=1e-4, rtol=0)


# -- the technique on the tiny pipeline -----------------------------------------------------------------


@pytest.fixture(scope="module")
def backbone(tiny_dir):
    return PipelineBackbone(str(tiny_dir))


def build_un0(backbone, spec=UN0, **options):
    """``spec`` built through the stack, with a contextual technique given test options."""
    settings = {"calibration_prompts": CALIBRATION, "meter_calibration": False, **options}

    class Configured(ContextualSparsity):  # a registry holds technique classes: this one has the test options
        def __init__(self) -> None:
            super().__init__(**settings)

    techniques = Registry("technique", "un0_bench.harness.core.technique:Technique")
    techniques.register("contextual", Configured)
    return make_generator(spec, backbone, techniques=techniques)


@pytest.fixture(scope="module")
def sd(backbone):
    return make_generator(f"sd:steps={STEPS}", backbone)


@pytest.fixture(scope="module")
def sd_images(sd):
    return sd.generate(REQUEST).images


@pytest.fixture(scope="module")
def un0(backbone):
    return build_un0(backbone)


def _layer(gen) -> ContextualLayer:
    (layer,) = gen.layers
    assert isinstance(layer, ContextualLayer)
    return layer


def flops(generator, request=REQUEST):
    return count_ops(generator, request)


class TestUn0Contract(GeneratorContract):
    image_shape = (3, IMAGE_SIZE, IMAGE_SIZE)
    prompts = PROMPTS
    bad_prompt = ""

    @pytest.fixture
    def generator(self, un0):
        return un0


def test_un0_is_sd_plus_contextual_and_stacks_only_on_the_pipeline(backbone, monkeypatch):
    monkeypatch.setattr(type(backbone), "load_pipeline", lambda self, dtype=None: pytest.fail("a pipeline loaded"))
    assert resolve("un0", backbone).canonical == "sd:steps=50+contextual:keep=0.1"
    assert resolve(UN0, backbone).canonical == f"sd:steps={STEPS}+contextual:keep=0.25"
    with pytest.raises(StackError, match="calibrates its gates on the pipeline's own feed-forward") as e:
        resolve("sd+int8+contextual", backbone)
    assert "right after sd" in str(e.value) and "int8" in str(e.value)
    for spec in ("un0:keep=0", "un0:keep=1.5", "sd+contextual:keep=-1"):
        with pytest.raises(SpecError, match="keep must be a number > 0 and <= 1"):
            resolve(spec, backbone)

    class Digits:
        kind, name = "digits", "digits"

    why = TECHNIQUES.entry("contextual").why_not("digits")
    with pytest.raises(StackError) as e:
        resolve("sd+contextual", Digits())
    assert str(e.value) == f"sd+contextual: contextual is not available on digits backbones: {why}"


def test_building_replaces_every_feed_forward_and_leaves_no_calibration_behind(un0):
    from un0_bench.backbones.pipeline import feed_forward_layers

    denoiser = un0.model.denoiser
    gated = [m for m in denoiser.modules() if isinstance(m, GatedFeedForward)]
    assert len(gated) == 4 and _layer(un0).gated == gated
    # Only the dense copies are left, inside the gated layers (kept in the module tree, never called).
    assert [p for p, _ in feed_forward_layers(denoiser)] == [f"{s.path}.dense" for s in _layer(un0).specs]
    # Calibration ran its own sampler and hooks on the same denoiser: all gone, settings restored.
    assert len(denoiser._forward_pre_hooks) == len(denoiser._forward_hooks) == 1  # this sampler's
    assert not any(s.act_module._forward_hooks for s in _layer(un0).specs)
    assert un0.model.steps == STEPS and [layer.technique for layer in un0.layers] == ["contextual"]
    assert all(g.active is None for g in gated)  # no batch running


def test_gate_phase_opens_before_the_first_denoiser_call_of_each_batch(un0):
    assert un0.phases() == ("text_encoder", "gate", "denoise_step", "vae_decode")
    un0.reset_cache()
    expected = [("begin", "text_encoder"), ("end", "text_encoder")] * 2 + [("begin", "gate"), ("end", "gate")] + \
        [("begin", "denoise_step"), ("end", "denoise_step")] * STEPS + [("begin", "vae_decode"), ("end", "vae_decode")]
    events: list[tuple[str, str]] = []
    un0.phase_hook = lambda kind, phase: events.append((kind, phase))
    try:
        for _ in ("cold", "warm"):  # a cached prompt still opens its (empty) gate window
            events.clear()
            un0.generate(ONE)
            assert events == expected
    finally:
        un0.phase_hook = None


def test_gating_is_counted_as_gating_and_the_cache_counts_exactly(un0, sd):
    un0.reset_cache()
    cold = flops(un0)
    assert cold.flops("gating") > 0 and cold.bytes_moved("gating") > 0
    stats = un0.cache_stats()
    assert {k: stats[k] for k in ("hits", "misses", "evictions", "entries")} == \
        {"hits": 0, "misses": 3, "evictions": 0, "entries": 3}
    warm = flops(un0)  # every prompt cached: no gate, no gather
    assert warm.flops("gating") == 0
    assert flops(un0, ONE).flops() < flops(sd, ONE).flops()
    stats = un0.cache_stats()
    assert {k: stats[k] for k in ("hits", "misses", "evictions", "entries")} == \
        {"hits": len(PROMPTS) + 1, "misses": 3, "evictions": 0, "entries": 3}
    assert stats["bytes"] > 0 and stats["limit_bytes"] == 2**30
    un0.reset_cache()
    assert {k: un0.cache_stats()[k] for k in ("hits", "misses", "entries", "bytes")} == \
        {"hits": 0, "misses": 0, "entries": 0, "bytes": 0}


def test_a_prompt_repeated_in_a_batch_is_gated_once(un0):
    un0.reset_cache()
    un0.generate(GenerationRequest(("a cat", "a cat"), seed=0, batch_size=2))
    stats = un0.cache_stats()
    assert (stats["misses"], stats["hits"], stats["entries"]) == (1, 1, 1)


def test_keep_sets_depend_on_the_prompt(un0):
    un0.reset_cache()
    un0.generate(REQUEST)
    layer = _layer(un0)
    assert layer.keep_units == [max(1, round(0.25 * s.inner)) for s in layer.specs]
    subs = [layer.cache.lookup(p) for p in PROMPTS]
    assert all([s.units for s in sub] == layer.keep_units for sub in subs)
    assert any(not torch.equal(a.w_out, b.w_out) for a, b in zip(subs[0], subs[1], strict=True))
    d = un0.describe()["layers"][0]
    assert d["technique"] == "contextual" and d["params"] == {"keep": 0.25}
    assert d["gated_layers"] == 4 and d["activations"] == ["GEGLU"]
    assert d["hidden_units"] == sum(s.inner for s in layer.specs)
    assert d["kept_units"] == sum(layer.keep_units)
    assert d["kept_units"] == pytest.approx(0.25 * d["hidden_units"], abs=d["gated_layers"])


def test_keep_1_equals_the_pipeline_and_a_small_cache_evicts(backbone, sd_images):
    gen = build_un0(backbone, f"un0:steps={STEPS},keep=1", calibration_prompts=CALIBRATION[:2], cache_bytes=1)
    torch.testing.assert_close(gen.generate(REQUEST).images, sd_images, atol=1e-5, rtol=0)
    # A cache smaller than one entry keeps only the newest (never the entry just added is evicted).
    stats = gen.cache_stats()
    assert {k: stats[k] for k in ("hits", "misses", "evictions", "entries")} == \
        {"hits": 0, "misses": 3, "evictions": 2, "entries": 1}
    assert gen.describe()["layers"][0]["cache_limit_bytes"] == 1 == stats["limit_bytes"]
    assert flops(gen, ONE).flops("gating") > 0  # "a cat" was evicted: gated again
    assert (gen.cache_stats()["misses"], gen.cache_stats()["evictions"]) == (4, 3)


def test_calibration_is_deterministic(backbone, un0):
    again = build_un0(backbone)
    a, b = _layer(un0).gate.state_dict(), _layer(again).gate.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert {k: v for k, v in again.derivation().items() if k != "duration_s"} == \
        {k: v for k, v in un0.derivation().items() if k != "duration_s"}
    un0.reset_cache()
    assert torch.equal(again.generate(REQUEST).images, un0.generate(REQUEST).images)


def test_calibration_is_metered_into_its_derivation(backbone, monkeypatch):
    # Skip the slow whole-host meters.
    monkeypatch.setattr(un0_bench.harness.weights.derivation, "_TRAINING_METERS", ("wall",))
    gen = build_un0(backbone, calibration_prompts=CALIBRATION[:2], calibration_steps=1, meter_calibration=True)
    meta = gen.derivation()
    assert meta["kind"] == "un0-pipeline-calibration"
    assert (meta["calibration"]["prompts"], meta["calibration"]["steps"], meta["calibration"]["seed"]) == \
        (2, 1, CALIBRATION_SEED)
    assert meta["energy"]["wall"]["status"] == "ok"
    assert meta["energy"]["proxy"]["energy_j"] > 0 and meta["energy"]["proxy"]["flops"] > 0
    # The counted batch repeats the first: the gate is fitted on the 2 prompts once, not 4 rows.
    assert _layer(gen).gate.project.out_features == 2
    assert gen.model.steps == STEPS and meta["gate_parameters"] == sum(p.numel() for p in _layer(gen).gate.parameters())


def test_bad_calibration_settings_are_refused(backbone):
    with pytest.raises(UserError, match="calibration_steps must be an integer >= 1, got 0"):
        build_un0(backbone, calibration_steps=0)
    with pytest.raises(PromptError, match="accepted prompts"):
        build_un0(backbone, calibration_prompts=("a cat", " "))


# -- per-phase measurement -------------------------------------------------------------------------------


def test_measure_phases_un0_cold(un0):
    res = measure_phases(un0, REQUEST, [ProxyMeter(), WallMeter()], cold=True)
    assert set(res) == {"text_encoder", "gate", "denoise_step", "vae_decode", "other"}
    batches = len(REQUEST.batches())
    assert res["denoise_step"]["calls"] == STEPS * batches
    assert res["gate"]["calls"] == batches and res["vae_decode"]["calls"] == batches
    assert res["text_encoder"]["calls"] == 2 * batches
    for phase in un0.phases():
        assert res[phase]["energy_j"]["proxy"] > 0, phase
        assert res[phase]["energy_j"]["wall"] is None  # time only
        assert res[phase]["duration_s"] > 0
    assert res["gate"]["gating_flops"] == res["gate"]["flops"] > 0
    # Phases plus "other" account for exactly the counted work of the whole call.
    un0.reset_cache()
    total = flops(un0).flops()
    assert sum(r["flops"] for r in res.values()) == total
