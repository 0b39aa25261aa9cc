"""The CLI as a user meets it: one clear line and exit 2 for bad input; real runs end to end."""

from __future__ import annotations

import json

import pytest

from un0_bench.backbones.digits import WEIGHTS_DIR
from un0_bench.cli import main

needs_teacher = pytest.mark.skipif(not (WEIGHTS_DIR / "teacher.safetensors").exists(), reason="teacher not trained")


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize(
    "argv, message",
    [
        (["compare", "--models", "sdd"], "unknown generator 'sdd'. Did you mean 'sd'"),
        (["compare", "--models", "sd", "--meters", "rapel"], "unknown meter 'rapel'. Did you mean 'rapl'"),
        (["compare", "--models", "sd", "--backbone", "digit"], "unknown backbone 'digit'. Did you mean 'digits'"),
        (["compare", "--models", "sd:steps=0"], "steps must be an integer >= 1"),
        (["train", "teachr"], "Did you mean 'teacher'"),
    ],
)
def test_bad_names_one_line_exit_2(capsys, tmp_path, argv, message):
    code, out, err = run(capsys, *argv, *(["--out", str(tmp_path / "o")] if argv[0] == "compare" else []))
    assert code == 2
    assert message in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


@pytest.mark.parametrize("flag, value", [("--images", "0"), ("--images", "-3"), ("--batch-size", "0")])
def test_non_positive_counts_are_refused(capsys, flag, value):
    with pytest.raises(SystemExit) as e:
        main(["compare", "--models", "sd", flag, value])
    assert e.value.code == 2
    assert "expected a positive integer" in capsys.readouterr().err


def test_unwritable_output_checked_before_work(capsys, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    code, _, err = run(capsys, "compare", "--models", "sd", "--out", str(blocker / "sub"))
    assert code == 2 and "cannot write to output folder" in err


def test_list_shows_meter_reasons(capsys):
    code, out, _ = run(capsys, "list")
    assert code == 0
    for name in ("sd", "digits", "proxy", "rapl", "nvml", "codecarbon", "teacher"):
        assert name in out
    assert "unavailable" in out  # rapl and nvml have no hardware here


def test_models_with_parameter_commas():
    from un0_bench.harness.config import models_list as _models

    assert _models("un0-osc:n=1024,steps=32,sd") == ["un0-osc:n=1024,steps=32", "sd"]


def proxy_j(out_dir, model):
    recs = [json.loads(line) for line in (out_dir / "results.jsonl").read_text().splitlines()]
    return next(r["energy_j_per_image"] for r in recs if r["model"] == model and r["meter"] == "proxy")


@needs_teacher
def test_proxy_is_bit_identical_and_scales_with_steps(capsys, tmp_path):
    common = ["--meters", "proxy,wall", "--images", "8", "--batch-size", "8", "--quality-samples", "0",
              "--min-repeats", "1", "--min-duration", "0", "--idle", "0", "--no-report"]
    for out in ("a", "b"):
        code, _, err = run(capsys, "compare", "--models", "sd,sd:steps=10", "--out", str(tmp_path / out), *common)
        assert code == 0, err
    assert proxy_j(tmp_path / "a", "sd") == proxy_j(tmp_path / "b", "sd")
    # The UNet forward dominates and runs once per step: 50 / 10 steps -> 5x the energy.
    assert proxy_j(tmp_path / "a", "sd") / proxy_j(tmp_path / "a", "sd:steps=10") == pytest.approx(5.0, rel=0.01)
