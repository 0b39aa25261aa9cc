"""The runner with quality on: the backbone's evaluator, the quality cache, the band, the CLIP rule.

A fake backbone scores images by a deterministic rule (its "CLIP score" is 100 x the mean pixel),
so the expected verdicts are known by hand; the band rule is the pipeline backbone's own.
"""

from __future__ import annotations

from typing import Any

import torch
from un0_bench.backbones.pipeline import PipelineBackbone
from un0_bench.harness.core.backbone import Backbone, QualityOptions
from un0_bench.harness.core.generator import GenerationRequest, GenerationResult, Generator
from un0_bench.harness.registry import Registry
from un0_bench.harness.running.results import ResultStore
from un0_bench.harness.running.runner import RunConfig, Runner


class Flat(Generator):
    """Images of one constant grey level."""

    def __init__(self, level: float) -> None:
        self.level = level

    def generate(self, request: GenerationRequest) -> GenerationResult:
        x = torch.full((len(request.prompts), 3, 2, 2), self.level)
        return GenerationResult(images=x @ torch.eye(2), prompts=request.prompts)  # one matmul: FLOPs > 0

    def describe(self) -> dict[str, Any]:
        return {"technique": "flat", "level": self.level}


class ScoredBackbone(Backbone):
    """Quality = 100 x mean pixel of the measured images, judged by the CLIP rule of pipelines."""

    kind = "scored"
    evaluated: list[str] = []

    def __init__(self, arg=None):
        self.name = "scored"

    def check_prompt(self, prompt):
        pass

    def default_prompts(self, n):
        return [f"p{i}" for i in range(n)]

    def describe(self):
        return {"backbone": "scored"}

    def evaluate_quality(self, generator, measured, options: QualityOptions):
        ScoredBackbone.evaluated.append(generator.describe()["level"])
        return {"clip_score": round(100 * float(measured.images.mean()), 3)}  # float32 levels: 0.79 -> 79.000002

    quality_band = PipelineBackbone.quality_band


def _registries():
    gens = Registry("generator")
    for name, level in (("ref", 0.80), ("close", 0.79), ("far", 0.70)):
        gens.register(name, lambda backbone, level=level: Flat(level))
    meters = Registry("meter")
    meters.register("wall", "un0_bench.harness.meters.wall:WallMeter")
    backbones = Registry("backbone")
    backbones.register("scored", ScoredBackbone)
    return {"generators": gens, "meters": meters, "backbones": backbones}


def _config(tmp_path, models, **kw):
    base = dict(models=models, out=tmp_path / "out", backbone="scored", meters=["wall"], images=2, batch_sizes=[2],
                min_repeats=1, max_repeats=1, min_duration_s=0.0, idle_s=0.0, quality_samples=2, reference="ref",
                accuracy_drop=0.03)
    return RunConfig.of(**{**base, **kw})


def test_quality_band_by_the_clip_rule_and_cached_per_folder(tmp_path):
    ScoredBackbone.evaluated = []
    Runner(_config(tmp_path, ["ref", "close", "far"]), **_registries()).run()
    records = {r["model"]: r for r in ResultStore(tmp_path / "out").load()}
    assert {m: r["quality"]["clip_score"] for m, r in records.items()} == {"ref": 80.0, "close": 79.0, "far": 70.0}
    # CLIP rule: matched when the score is at most 3% (relative) below the reference's: 80 x 0.97 = 77.6.
    assert {m: r["quality_matched"] for m, r in records.items()} == {"ref": True, "close": True, "far": False}
    assert records["far"]["quality_band"] == {"reference": "ref", "fid_ratio": 1.25, "accuracy_drop": 0.03}
    # Each model once, in the run's seeded shuffled order (not always the reference first).
    assert ScoredBackbone.evaluated == [0.80, 0.70, 0.79]
    # A second run into the folder with a new model reuses the cached reference quality.
    cfg = _config(tmp_path, ["far"], batch_sizes=[1])
    Runner(cfg, **_registries()).run()
    assert ScoredBackbone.evaluated == [0.80, 0.70, 0.79]
    lines = (tmp_path / "out" / "quality.jsonl").read_text().splitlines()
    assert len(lines) == 3


def test_a_tighter_band_changes_the_verdict(tmp_path):
    ScoredBackbone.evaluated = []
    cfg = _config(tmp_path, ["ref", "close"], accuracy_drop=0.01)  # 80 x 0.99 = 79.2 > 79
    Runner(cfg, **_registries()).run()
    records = {r["model"]: r["quality_matched"] for r in ResultStore(tmp_path / "out").load()}
    assert records == {"ref": True, "close": False}


def test_no_quality_says_why(tmp_path):
    cfg = _config(tmp_path, ["close"], reference="close", quality_samples=0)
    Runner(cfg, **_registries()).run()
    (record,) = ResultStore(tmp_path / "out").load()
    assert record["quality"] is None and record["quality_matched"] is None
    assert record["quality_note"] == "not measured (--quality-samples 0)"
