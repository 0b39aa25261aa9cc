"""The protocol end to end on a generator and meters whose numbers are known by hand."""

from __future__ import annotations

import dataclasses
import re
from typing import Any

import pytest
from un0_bench.harness.core.backbone import Backbone
from un0_bench.harness.errors import UserError
from un0_bench.harness.meters.base import Meter, Reading
from un0_bench.harness.registry import Registry
from un0_bench.harness.running.results import ResultStore
from un0_bench.harness.running.runner import RunConfig, Runner

from tests.conftest import MatmulGenerator, SequenceMeter


class TinyBackbone(Backbone):
    kind = "tiny"

    def __init__(self, arg=None, **options):
        self.name = "tiny"

    def check_prompt(self, prompt):
        pass

    def default_prompts(self, n):
        return [f"p{i}" for i in range(n)]

    def describe(self) -> dict[str, Any]:
        return {"backbone": "tiny"}


class Unavailable(Meter):
    name = "broken"

    def probe(self):
        return "unavailable: no such hardware here"

    def _start(self):
        raise AssertionError("never started")

    def _stop(self) -> Reading:
        raise AssertionError("never stopped")


def registries(built: list[str], interrupt_on: str | None = None):
    gens = Registry("generator")

    def factory(name):
        def build(backbone):
            built.append(name)
            if name == interrupt_on:
                raise KeyboardInterrupt
            return MatmulGenerator()
        build.params = {}
        return build

    gens.register("mm", factory("mm"))
    gens.register("mm2", factory("mm2"))
    meters = Registry("meter")
    # Idle before the cell: 0 -> 2 J over 0 -> 1 s (2 W). Each of three windows: +12 J over 2 s. Idle
    # after the cell: 70 -> 73 J over 40 -> 41 s (3 W).
    seq = SequenceMeter(energy_j=[0, 2, 10, 22, 30, 42, 50, 62, 70, 73],
                        times_s=[0, 1, 10, 12, 20, 22, 30, 32, 40, 41])
    meters.register("seq", lambda: seq)
    meters.register("wall", "un0_bench.harness.meters.wall:WallMeter")
    meters.register("broken", Unavailable)
    backbones = Registry("backbone")
    backbones.register("tiny", TinyBackbone)
    return dict(generators=gens, meters=meters, backbones=backbones)


def config(tmp_path, models, meters=("seq", "wall", "broken"), **kw):
    kw.setdefault("reference", models[0])
    base = dict(models=list(models), out=tmp_path / "out", backbone="tiny", meters=list(meters), images=4,
                batch_sizes=[2], min_repeats=3, max_repeats=3, min_duration_s=0.0, idle_s=0.01,
                quality_samples=0)
    base.update(kw)
    return RunConfig.of(**base)


def test_exact_joules_idle_and_unavailable(tmp_path):
    built: list[str] = []
    records = Runner(config(tmp_path, ["mm"]), **registries(built)).run()
    by_meter = {r["meter"]: r for r in records}
    seq = by_meter["seq"]
    # Each window: 12 J for 4 images = 3 J/image; idle (2 W + 3 W) / 2 = 2.5 W x 2 s = 5 J
    # -> (12 - 5) / 4 = 1.75 J/image, uncertainty 0.5 W x 6 s / 12 images = 0.25 J.
    assert seq["energy_j_per_image"] == 3.0
    assert seq["energy_ci95_j"] == [3.0, 3.0]
    assert (seq["idle_power_before_w"], seq["idle_power_after_w"], seq["idle_power_w"]) == (2.0, 3.0, 2.5)
    assert seq["energy_net_j_per_image"] == 1.75
    assert seq["energy_net_ci95_j"] == [1.5, 2.0] and seq["energy_net_below_detection_limit"] is False
    assert seq["energy_j_per_image_by_domain"] == {"package-0": 3.0}
    assert seq["repeats"] == 3
    # The unavailable meter is recorded with its reason and null energy, never 0 J.
    assert by_meter["broken"]["status"] == "unavailable: no such hardware here"
    assert by_meter["broken"]["energy_j_per_image"] is None
    # Wall measures time only: no energy.
    assert by_meter["wall"]["energy_j_per_image"] is None and by_meter["wall"]["duration_s_per_image"] > 0
    # Per image: one (1, 16) @ (16, 16) matmul = 2 * 16 * 16 = 512 FLOPs, counted in the counting pass.
    assert seq["flops_per_image_by_dtype"]["float32"] >= 512
    assert (tmp_path / "out" / "samples" / "mm.png").is_file()
    # The record names the stack it measured; the ledger is the reports' job, not the runner's.
    assert seq["model_canonical"] == "mm" and seq["stack"] == [{"name": "mm", "params": {}}]
    assert "ledger" not in seq
    assert seq["quality"] is None and seq["quality_note"] == "not measured (--quality-samples 0)"


def test_resume_skips_finished_cells(tmp_path):
    built: list[str] = []
    cfg = config(tmp_path, ["mm", "mm2"], meters=["wall"])
    Runner(cfg, **registries(built)).run()
    assert built == ["mm", "mm2"]
    again = Runner(cfg, **registries(built)).run()
    assert again == [] and built == ["mm", "mm2"]  # nothing rebuilt, nothing re-measured
    assert len(ResultStore(cfg.output.out).load()) == 2


def test_interrupt_keeps_finished_cells_and_rerun_completes(tmp_path):
    built: list[str] = []
    cfg = config(tmp_path, ["mm", "mm2"], meters=["wall"])
    with pytest.raises(KeyboardInterrupt):
        Runner(cfg, **registries(built, interrupt_on="mm2")).run()
    assert [r["model"] for r in ResultStore(cfg.output.out).load()] == ["mm"]
    Runner(cfg, **registries(built)).run()
    assert built == ["mm", "mm2", "mm2"]  # only the unfinished model was built again
    assert sorted(r["model"] for r in ResultStore(cfg.output.out).load()) == ["mm", "mm2"]


def test_bad_names_fail_before_any_work(tmp_path):
    from un0_bench.harness.registry import UnknownNameError

    built: list[str] = []
    with pytest.raises(UnknownNameError, match="Did you mean 'mm'"):
        Runner(config(tmp_path, ["mn"]), **registries(built))
    with pytest.raises(UnknownNameError, match="unknown meter"):
        Runner(config(tmp_path, ["mm"], meters=["seqq"]), **registries(built))
    # A stack that cannot work is refused too (mm2 is a model, not a technique).
    from un0_bench.harness.errors import StackError

    with pytest.raises(StackError, match="mm2 is a model, not a technique"):
        Runner(config(tmp_path, ["mm+mm2"]), **registries(built))
    assert built == [] and not (tmp_path / "out" / "results.jsonl").exists()


@pytest.mark.parametrize(("images", "batch"), [(4, 4), (16, 16), (64, 16)])
def test_default_batch_is_16_or_the_whole_window(tmp_path, images, batch):
    cfg = RunConfig.of(models=["sd"], out=tmp_path, images=images)
    cfg.validate()
    assert cfg.protocol.batches() == (batch,)


def test_batch_larger_than_the_window_is_refused(tmp_path):
    cfg = RunConfig.of(models=["sd"], out=tmp_path, images=4, batch_sizes=[2, 8, 16])
    with pytest.raises(UserError, match=r"^--batch-size 8,16 is larger than --images 4: a window generates"):
        cfg.validate()


@pytest.mark.parametrize(("kw", "message"), [
    ({"quality_seeds": 0}, "--quality-seeds must be a positive integer, got 0"),
    ({"fid_ratio": 0.9}, "--fid-ratio >= 1"),
])
def test_quality_options_refused(tmp_path, kw, message):
    with pytest.raises(UserError, match=re.escape(message)):
        RunConfig.of(models=["sd"], out=tmp_path, **kw).validate()


def test_backbone_refuses_its_quality_options_before_any_work(tmp_path):
    # The runner asks the backbone (its check_quality_options) in its pre-flight, before any cell.
    class OneDraw(TinyBackbone):
        def check_quality_options(self, options):
            if options.seeds > 1:
                raise UserError(f"tiny: one draw only, got {options.seeds}")

    built: list[str] = []
    regs = registries(built)
    regs["backbones"] = Registry("backbone")
    regs["backbones"].register("tiny", OneDraw)
    with pytest.raises(UserError, match="tiny: one draw only, got 2"):
        Runner(config(tmp_path, ["mm"], quality_seeds=2), **regs)
    assert built == [] and not (tmp_path / "out").exists()
    Runner(config(tmp_path, ["mm"], quality_seeds=1), **regs)  # one draw is accepted


def test_pipeline_backbone_refuses_quality_seeds():
    from un0_bench.backbones.pipeline import PipelineBackbone
    from un0_bench.harness.core.backbone import QualityOptions

    # The rule needs no pipeline folder; an instance without one is enough to ask it.
    backbone = PipelineBackbone.__new__(PipelineBackbone)
    with pytest.raises(UserError, match=re.escape("--quality-seeds applies to the digits backbone")):
        backbone.check_quality_options(QualityOptions(samples=16, seeds=2, fid_ratio=1.25, accuracy_drop=0.03))
    backbone.check_quality_options(QualityOptions(samples=16, seeds=1, fid_ratio=1.25, accuracy_drop=0.03))


class ScoredBackbone(TinyBackbone):
    """Quality by a made-up score per model; matched when within accuracy_drop of the reference's."""

    evaluated: list[str] = []

    def evaluate_quality(self, generator, measured, options):
        ScoredBackbone.evaluated.append(generator.spec)
        return {"score": {"mm": 1.0, "mm2": 0.5}[generator.spec], "images": len(measured.prompts),
                "samples": options.samples}

    def quality_band(self, q, ref, options):
        return q["score"] >= ref["score"] - options.accuracy_drop, None


def test_quality_comes_from_the_backbone_once_per_folder(tmp_path):
    built: list[str] = []
    regs = registries(built)
    regs["backbones"] = Registry("backbone")
    regs["backbones"].register("tiny", ScoredBackbone)
    ScoredBackbone.evaluated = []
    cfg = config(tmp_path, ["mm2", "mm"], meters=["wall"], reference="mm", quality_samples=4, accuracy_drop=0.1)
    records = Runner(cfg, **regs).run()
    # Cells run in a seeded shuffled order, here mm2 before the reference: mm2's records wait for the
    # reference's quality, so they are written after it and judged by it.
    assert [r["cell_order"]["position"] for r in records] == [1, 0]
    assert [r["model"] for r in records] == ["mm", "mm2"] and ScoredBackbone.evaluated == ["mm2", "mm"]
    by_model = {r["model"]: r for r in records}
    assert by_model["mm"]["quality"] == {"score": 1.0, "images": 4, "samples": 4}
    assert by_model["mm"]["quality_matched"] is True
    assert by_model["mm2"]["quality_matched"] is False  # 0.5 < 1.0 - 0.1
    assert by_model["mm2"]["quality_band"] == {"reference": "mm", "fid_ratio": 1.25, "accuracy_drop": 0.1}
    lines = (cfg.output.out / "quality.jsonl").read_text().splitlines()
    assert len(lines) == 2
    # Another batch size in the same folder: quality is read back, not evaluated again.
    again = Runner(config(tmp_path, ["mm2", "mm"], meters=["wall"], reference="mm", quality_samples=4,
                          accuracy_drop=0.1, batch_sizes=[4]), **regs).run()
    assert ScoredBackbone.evaluated == ["mm2", "mm"] and len(again) == 2
    assert {r["model"]: r["quality_matched"] for r in again} == {"mm": True, "mm2": False}
    assert len((cfg.output.out / "quality.jsonl").read_text().splitlines()) == 2


def test_a_second_writer_refuses_before_any_work_and_names_the_holder(tmp_path):
    import os

    built: list[str] = []
    cfg = config(tmp_path, ["mm"], meters=["wall"])
    cfg.output.out.mkdir()
    (cfg.output.out / ".lock").write_text(f"{os.getppid()}\n")
    with pytest.raises(UserError, match=rf"being written by another run \(process {os.getppid()}, lock "):
        Runner(cfg, **registries(built))  # pre-flight
    (cfg.output.out / ".lock").unlink()
    runner = Runner(cfg, **registries(built))
    (cfg.output.out / ".lock").write_text(f"{os.getppid()}\n")  # taken between pre-flight and the run
    with pytest.raises(UserError, match=rf"being written by another run \(process {os.getppid()}, lock "):
        runner.run()
    assert built == [] and not (cfg.output.out / "results.jsonl").exists()


def test_resume_after_a_torn_write_loses_no_record(tmp_path):
    built: list[str] = []
    cfg = config(tmp_path, ["mm", "mm2"], meters=["wall"])
    Runner(config(tmp_path, ["mm"], meters=["wall"]), **registries(built)).run()
    with (cfg.output.out / "results.jsonl").open("a") as f:
        f.write('{"model": "mm2", "backbone": "ti')  # SIGKILL mid-write
    Runner(cfg, **registries(built)).run()
    assert built == ["mm", "mm2"]
    assert [r["model"] for r in ResultStore(cfg.output.out).load()] == ["mm", "mm2"]
    assert not (cfg.output.out / ".lock").exists()


def test_a_reference_not_among_the_models_is_added_saying_so(tmp_path):
    built: list[str] = []
    notes: list[str] = []
    cfg = config(tmp_path, ["mm"], meters=["wall"], reference="mm2")
    runner = Runner(cfg, on_event=lambda kind, info: notes.append(info["text"]) if kind == "note" else None,
                    **registries(built))
    assert notes == ["--reference mm2 is not among --models: added to the run (its energy is 1x and its quality "
                     "sets the band)"]
    assert runner.notes == notes and runner.plan.models == ("mm", "mm2") and cfg.sweep.models == ("mm",)
    runner.run()
    assert sorted(built) == ["mm", "mm2"]  # the added reference is measured too (in the run's shuffled order)
    assert sorted(r["model"] for r in ResultStore(cfg.output.out).load()) == ["mm", "mm2"]


def test_an_unknown_reference_is_refused_like_a_model_name(tmp_path):
    from un0_bench.harness.registry import UnknownNameError

    with pytest.raises(UnknownNameError, match="unknown generator 'mm3'. Did you mean 'mm'"):
        Runner(config(tmp_path, ["mm"], reference="mm3"), **registries([]))
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("field, value, message", [
    ("pue", float("nan"), "--pue must be a finite number, got nan"),
    ("pue", float("inf"), "--pue must be a finite number, got inf"),
    ("fid_ratio", float("nan"), "--fid-ratio must be a finite number, got nan"),
    ("accuracy_drop", float("-inf"), "--accuracy-drop must be a finite number, got -inf"),
    ("min_duration_s", float("inf"), "--min-duration must be a finite number, got inf"),
    ("idle_s", float("nan"), "--idle must be a finite number, got nan"),
    ("images", 2.5, "--images must be an integer, got 2.5"),
    ("warmup", True, "--warmup must be an integer, got True"),
    ("seed", -1, "--seed must be from 0 to 4294967291 (image i uses seed + i), got -1"),
    ("seed", 2**40, "--seed must be from 0 to 4294967291 (image i uses seed + i), got 1099511627776"),
])
def test_every_number_is_finite_and_in_range(tmp_path, field, value, message):
    with pytest.raises(UserError) as e:
        Runner(config(tmp_path, ["mm"], **{field: value}), **registries([]))
    assert str(e.value) == message


@pytest.mark.parametrize("changed, listed", [
    ({"images": 8}, "--images 4 there, 8 now"),
    ({"seed": 7}, "--seed 0 there, 7 now"),
    ({"min_repeats": 2}, "--min-repeats 3 there, 2 now"),
    ({"warmup": 0, "idle_s": 0.5}, "--warmup 1 there, 0 now; --idle 0.01 there, 0.5 now"),
    ({"backbone_options": {"dtype": "fp16"}},
     'backbone options (--device, --dtype, --prompts) {} there, {"dtype": "fp16"} now'),
])
def test_a_folder_made_with_another_configuration_is_refused_with_the_differences(tmp_path, changed, listed):
    built: list[str] = []
    Runner(config(tmp_path, ["mm"], meters=["wall"]), **registries(built)).run()
    cfg = config(tmp_path, ["mm"], meters=["wall"], **changed)
    with pytest.raises(UserError) as e:
        Runner(cfg, **registries(built))
    assert str(e.value) == (f"{cfg.output.out} holds results measured with another configuration ({listed}); run "
                            f"with the folder's options to resume it, another --out, or --fresh to start it over")
    assert built == ["mm"]


def test_fresh_starts_the_folder_over_and_keeps_the_earlier_files_aside(tmp_path):
    built: list[str] = []
    Runner(config(tmp_path, ["mm"], meters=["wall"]), **registries(built)).run()
    cfg = config(tmp_path, ["mm"], meters=["wall"], seed=7, fresh=True)
    notes: list[str] = []
    Runner(cfg, on_event=lambda kind, info: notes.append(info["text"]) if kind == "note" else None,
           **registries(built)).run()
    assert built == ["mm", "mm"]  # measured again with the new seed
    (record,) = ResultStore(cfg.output.out).load()
    assert record["config"]["run"]["seed"] == 7
    (aside,) = cfg.output.out.glob("replaced-*")
    assert notes == [f"--fresh: moved the folder's earlier results.jsonl, samples to {aside}"]
    assert [r["config"]["run"]["seed"] for r in ResultStore(aside).load()] == [0]
    # Resuming with the new options now finds the cell done.
    cfg = dataclasses.replace(cfg, output=dataclasses.replace(cfg.output, fresh=False))
    assert Runner(cfg, **registries(built)).run() == [] and built == ["mm", "mm"]


def test_options_that_shape_only_the_ledger_do_not_block_resume(tmp_path):
    built: list[str] = []
    Runner(config(tmp_path, ["mm"], meters=["wall"]), **registries(built)).run()
    assert Runner(config(tmp_path, ["mm"], meters=["wall"], pue=1.2, lifetime_images=5),
                  **registries(built)).run() == []
    assert built == ["mm"]


def _with_param_model(regs, built):
    from un0_bench.harness.core.spec import Param

    def build(backbone, n=4):
        built.append(f"mmp:n={n}")
        return MatmulGenerator()
    build.params = {"n": Param(int, 4, low=1)}
    regs["generators"].register("mmp", build)
    return regs


def test_each_canonical_cell_is_measured_once_and_said_so(tmp_path):
    built: list[str] = []
    notes: list[str] = []
    cfg = config(tmp_path, ["mm", "mm", "mmp", "mmp:n=4", "mmp:n=2"], meters=["wall"], batch_sizes=[2, 2, 1])
    runner = Runner(cfg, on_event=lambda kind, info: notes.append(info["text"]) if kind == "note" else None,
                    **_with_param_model(registries(built), built))
    assert notes == ["--models gives mm twice: measured once",
                     "--models mmp:n=4 is the same model as mmp (mmp:n=4): measured once, as mmp",
                     "--batch-size gives 2 more than once: each measured once"]
    assert runner.plan.models == ("mm", "mmp", "mmp:n=2") and runner.plan.batch_sizes == (2, 1)
    runner.run()
    cells = sorted((r["model"], r["batch_size"]) for r in ResultStore(cfg.output.out).load())
    assert cells == [("mm", 1), ("mm", 2), ("mmp", 1), ("mmp", 2), ("mmp:n=2", 1), ("mmp:n=2", 2)]
    # A later run naming the same canonical model another way finds its cells done.
    later = config(tmp_path, ["mmp:n=4"], meters=["wall"], batch_sizes=[2, 1], reference="mm")
    assert Runner(later, **_with_param_model(registries(built), built)).pending() == []


def test_file_names_from_specs_are_bounded_and_unique():
    from un0_bench.harness.running.runner import slug

    assert slug("mm") == "mm" and slug("sd-int8") == "sd-int8"
    long = "sd:steps=10+cached:interval=2" + ",x=1" * 1000
    assert len(slug(long)) == 80 and slug(long) != slug(long + ",y=2")
    assert len({slug("sd:steps=10"), slug("sd_steps=10"), slug("sd_steps_10"), slug("sd steps 10")}) == 4
    assert slug("sd:steps=10").startswith("sd_steps_10-") and slug("../x") != slug("x")
    assert "/" not in slug("../../etc") and not slug("..").startswith(".")


def test_a_3000_character_spec_writes_its_sample_grid(tmp_path):
    built: list[str] = []
    regs = _with_param_model(registries(built), built)
    model = "mmp:n=" + "0" * 2990 + "3"
    Runner(config(tmp_path, [model], meters=["wall"]), **regs).run()
    (record,) = ResultStore(tmp_path / "out").load()
    assert len(record["sample_grid"]) == len("samples/") + 80 + len(".png")
    assert (tmp_path / "out" / record["sample_grid"]).is_file()


def test_a_meter_with_parameters_is_recorded_under_its_name_with_its_profile(tmp_path):
    """``--meters proxy:profile=NAME`` (e.g. a profile ``un0-bench calibrate`` fitted) measures as the proxy."""
    built: list[str] = []
    regs = registries(built)
    regs["meters"].register("proxy", "un0_bench.harness.meters.proxy:ProxyMeter")
    records = Runner(config(tmp_path, ["mm"], meters=["proxy:profile=horowitz-45nm-dram", "wall"]), **regs).run()
    proxy = next(r for r in records if r["meter"] == "proxy")
    assert proxy["status"] == "ok" and proxy["meter_details"]["profile"] == "horowitz-45nm-dram"
    assert proxy["proxy_profile"] == "horowitz-45nm-dram"
    # Priced by the DRAM profile, not the default one.
    assert proxy["energy_j_per_image"] > 0
    with pytest.raises(UserError, match="names 'proxy' twice"):
        Runner(config(tmp_path, ["mm"], meters=["proxy", "proxy:profile=horowitz-45nm-dram"]), **registries([]) | {
            "meters": regs["meters"]})
