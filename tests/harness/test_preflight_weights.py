"""Pre-flight of weights files and their identity in resume keys (issue 12, parts 2 and 5).

Every weights file a run will load is opened (header, metadata, config) before the first cell, so a
truncated or foreign file is refused in one line with nothing measured and no folder made; each
record names the files its model loaded by their SHA-256, and a rerun into a folder measured with
other weights is refused with the difference listed.
"""

from __future__ import annotations

import hashlib
import json
import shutil

import pytest
from safetensors.torch import load_file, save_file
from un0_bench.backbones.digits import WEIGHTS_DIR
from un0_bench.harness.errors import CheckpointError, UserError
from un0_bench.harness.running.results import ResultStore
from un0_bench.harness.running.runner import RunConfig, Runner

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture
def weights_dir(tmp_path):
    """A copy of the shipped digits weights the test may damage."""
    out = tmp_path / "weights"
    shutil.copytree(WEIGHTS_DIR, out)
    return out


def _config(tmp_path, weights_dir, models, **kw) -> RunConfig:
    base = dict(models=models, out=tmp_path / "out", meters=["proxy"], images=2, batch_sizes=[2], warmup=0,
                min_repeats=1, min_duration_s=0.0, idle_s=0.0, quality_samples=0, reference=models[0],
                backbone_options={"weights_dir": weights_dir})
    return RunConfig.of(**{**base, **kw})


def _sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("damage, message", [
    ("truncate", "truncated"),
    ("foreign", "checkpoint config does not match the model"),
    ("missing", "no such weights file"),
])
def test_a_bad_weights_file_is_refused_before_the_first_cell(tmp_path, weights_dir, damage, message):
    """un0's file damaged, sd listed first: the run stops at construction, nothing measured, no folder."""
    target = weights_dir / "un0.safetensors"
    if damage == "truncate":
        target.write_bytes(target.read_bytes()[: target.stat().st_size // 2])
    elif damage == "foreign":  # the teacher's file and metadata in un0's place
        shutil.copy(weights_dir / "teacher.safetensors", target)
        shutil.copy(weights_dir / "teacher.json", weights_dir / "un0.json")
    else:
        target.unlink()
    cfg = _config(tmp_path, weights_dir, ["sd:steps=1", "un0"])
    with pytest.raises(CheckpointError, match=message) as err:
        Runner(cfg)
    assert "un0.safetensors" in str(err.value)
    assert not cfg.output.out.exists()


def test_the_static_int8_calibration_is_checked_against_its_teacher(tmp_path, weights_dir):
    """sd-int8's file records the teacher's hash: another teacher makes it foreign, found before any cell."""
    teacher = weights_dir / "teacher.safetensors"
    state = load_file(str(teacher))
    key = sorted(state)[0]
    state[key] = state[key] + 1.0
    meta = json.loads(teacher.with_suffix(".json").read_text())
    save_file(state, str(teacher))
    teacher.with_suffix(".json").write_text(json.dumps(meta))  # config unchanged: the teacher itself passes
    with pytest.raises(CheckpointError, match="sd-int8.safetensors: checkpoint config does not match.*teacher_sha256"):
        Runner(_config(tmp_path, weights_dir, ["sd:steps=1", "sd-int8:steps=1"]))


def test_records_name_each_loaded_file_by_its_hash(tmp_path, weights_dir):
    Runner(_config(tmp_path, weights_dir, ["sd:steps=1", "sd-distilled:steps=1", "un0"])).run()
    by_model = {r["model"]: r for r in ResultStore(tmp_path / "out").load()}
    teacher, student, un0 = (_sha(weights_dir / f"{n}.safetensors") for n in ("teacher", "sd-distilled-1", "un0"))
    assert [layer.get("weights") for layer in by_model["sd:steps=1"]["stack"]] == [{"teacher.safetensors": teacher}]
    # the student's base layer loads the teacher (then replaced); the distilled layer its own file
    assert [layer.get("weights") for layer in by_model["sd-distilled:steps=1"]["stack"]] == [
        {"teacher.safetensors": teacher}, {"sd-distilled-1.safetensors": student}]
    assert by_model["un0"]["stack"][0]["weights"] == {"un0.safetensors": un0}


def test_a_rerun_with_other_weights_is_refused_with_the_file_named(tmp_path, weights_dir):
    models = ["sd:steps=1", "un0"]
    Runner(_config(tmp_path, weights_dir, models)).run()
    old = _sha(weights_dir / "un0.safetensors")
    # Same config and metadata, other tensor values: a retrained un0.
    path = weights_dir / "un0.safetensors"
    state = load_file(str(path))
    key = sorted(state)[-1]
    state[key] = state[key] * 0.5
    save_file(state, str(path))
    new = _sha(path)
    assert new != old
    with pytest.raises(UserError) as err:
        Runner(_config(tmp_path, weights_dir, models))
    assert f"weights: un0's un0.safetensors sha256 {old[:12]} there, sha256 {new[:12]} now" in str(err.value)
    assert "--fresh" in str(err.value)
    # --fresh measures it again with the new file; the earlier records are kept aside
    Runner(_config(tmp_path, weights_dir, models, fresh=True)).run()
    (rec,) = [r for r in ResultStore(tmp_path / "out").load() if r["model"] == "un0"]
    assert rec["stack"][0]["weights"] == {"un0.safetensors": new}


def test_records_without_weights_hashes_still_resume(tmp_path, weights_dir):
    """Schema-2 records made before weights were hashed carry none: resume trusts them (nothing re-measured)."""
    models = ["sd:steps=1"]
    Runner(_config(tmp_path, weights_dir, models)).run()
    results = tmp_path / "out" / "results.jsonl"
    lines = [json.loads(line) for line in results.read_text().splitlines()]
    for r in lines:
        for layer in r["stack"]:
            layer.pop("weights")
    results.write_text("".join(json.dumps(r) + "\n" for r in lines))
    assert Runner(_config(tmp_path, weights_dir, models)).run() == []


def test_a_pipelines_component_weights_are_opened_before_the_first_cell(tmp_path, tiny_dir):
    """A truncated UNet file in a pipeline folder: refused at construction, named by its place in the folder."""
    folder = tmp_path / "pipe"
    shutil.copytree(tiny_dir, folder)
    cfg = RunConfig.of(models=["sd:steps=2"], backbone=f"diffusers:{folder}", out=tmp_path / "out", meters=["proxy"],
                    images=1, batch_sizes=[1], warmup=0, min_repeats=1, min_duration_s=0.0, idle_s=0.0,
                    quality_samples=0, reference="sd:steps=2")
    stack = Runner(cfg).stacks["sd:steps=2"]
    names = stack.weights()
    unet = folder / "unet/diffusion_pytorch_model.safetensors"
    assert names["unet/diffusion_pytorch_model.safetensors"] == _sha(unet)
    unet.write_bytes(unet.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match="diffusion_pytorch_model.safetensors: truncated"):
        Runner(cfg)
    assert not cfg.output.out.exists()


def test_a_bad_meter_parameter_is_refused_before_the_folder_is_touched(tmp_path, weights_dir):
    """nvml:mig=bogus with --fresh: refused at construction; the earlier results are not moved aside."""
    Runner(_config(tmp_path, weights_dir, ["sd:steps=1"])).run()
    before = (tmp_path / "out" / "results.jsonl").read_text()
    cfg = _config(tmp_path, weights_dir, ["sd:steps=1"], fresh=True, meters=["proxy", "nvml:mig=bogus"])
    with pytest.raises(UserError, match="mig"):
        Runner(cfg)
    assert (tmp_path / "out" / "results.jsonl").read_text() == before
    assert not any(p.name.startswith("replaced-") for p in (tmp_path / "out").iterdir())


def test_resume_refuses_the_same_meter_with_other_parameters(tmp_path, weights_dir):
    """proxy priced with the SRAM profile there, the DRAM one now: not the same cells, refused with both specs."""
    cfg = _config(tmp_path, weights_dir, ["sd:steps=1"], meters=["proxy:profile=horowitz-45nm"])
    Runner(cfg).run()
    (rec,) = ResultStore(tmp_path / "out").load()
    assert rec["meter"] == "proxy" and rec["meter_spec"] == "proxy:profile=horowitz-45nm"
    again = _config(tmp_path, weights_dir, ["sd:steps=1"], meters=["proxy:profile=horowitz-45nm-dram"])
    listed = "--meters proxy:profile=horowitz-45nm there, proxy:profile=horowitz-45nm-dram now"
    with pytest.raises(UserError, match=listed):
        Runner(again)
