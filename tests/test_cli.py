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
        (["train", "all", "--batch-size", "8"],
         "--batch-size does not apply to judge, sd-int8, sd-distilled, un0, un0-osc"),
        (["compare", "--models", "sd", "--reference", "sdd"], "unknown generator 'sdd'. Did you mean 'sd'"),
        (["compare", "--models", "sd", "--prompts", "p.txt"], "--prompts applies to diffusers:PATH backbones only"),
        (["compare", "--models", "sd", "--dtype", "fp16"], "--dtype applies to diffusers:PATH backbones only"),
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


@pytest.mark.parametrize("flag", ["--pue", "--fid-ratio", "--accuracy-drop", "--min-duration", "--idle",
                                  "--grid-gco2-per-kwh"])
@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "NaN"])
def test_non_finite_numbers_are_refused(capsys, flag, value):
    with pytest.raises(SystemExit) as e:
        main(["compare", "--models", "sd", f"{flag}={value}"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {flag}: expected a finite" in err and "Traceback" not in err


@pytest.mark.parametrize("flag, value, message", [
    ("--seed", "-1", "expected an integer from 0 to 4294967295, got -1"),
    ("--seed", "1e3", "expected an integer from 0 to 4294967295, got '1e3'"),
    ("--warmup", "-1", "expected a non-negative integer, got -1"),
    ("--quality-samples", "-5", "expected a non-negative integer, got -5"),
])
def test_integers_out_of_range_are_refused(capsys, flag, value, message):
    with pytest.raises(SystemExit) as e:
        main(["compare", "--models", "sd", flag, value])
    assert e.value.code == 2
    assert f"argument {flag}: {message}" in capsys.readouterr().err


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
    from un0_bench.harness.running.config import models_list as _models

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


def _report_contexts(monkeypatch) -> list[dict]:
    """Every context the report renders (the real render still runs)."""
    import un0_bench.reports.html as html

    seen: list[dict] = []
    real = html.render
    monkeypatch.setattr(html, "render", lambda ctx: seen.append(ctx) or real(ctx))
    return seen


def _compute_factors(context: dict) -> dict[str, float]:
    return {row["model"]: row["factors"]["compute"] for row in context["ledgers"]["proxy"]}


@needs_teacher
def test_report_keeps_the_runs_reference_unless_overridden(capsys, tmp_path, monkeypatch):
    out = tmp_path / "run"
    code, _, err = run(capsys, "compare", "--models", "un0,sd:steps=2", "--reference", "un0", "--out", str(out),
                       "--meters", "proxy", "--images", "4", "--batch-size", "4", "--quality-samples", "0",
                       "--min-repeats", "1", "--min-duration", "0", "--idle", "0", "--no-report")
    assert code == 0, err
    recs = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert {r["config"]["run"]["reference"] for r in recs} == {"un0"}
    compute = {r["model"]: r["proxy_j_per_image_by_part"]["compute"] for r in recs}
    seen = _report_contexts(monkeypatch)
    # `report DIR` reads the run's own reference: un0 stays 1x, sd:steps=2 is measured against it.
    code, _, err = run(capsys, "report", str(out))
    assert code == 0, err
    assert seen[-1]["options"]["reference"] == "un0"
    factors = _compute_factors(seen[-1])
    assert factors["un0"] == 1.0
    assert factors["sd:steps=2"] == pytest.approx(compute["un0"] / compute["sd:steps=2"]) and factors["sd:steps=2"] < 1
    # --reference overrides it.
    code, _, err = run(capsys, "report", str(out), "--reference", "sd:steps=2")
    assert code == 0, err
    factors = _compute_factors(seen[-1])
    assert seen[-1]["options"]["reference"] == "sd:steps=2" and factors["sd:steps=2"] == 1.0
    assert factors["un0"] == pytest.approx(compute["sd:steps=2"] / compute["un0"]) and factors["un0"] > 1


def test_report_overrides_of_run_settings(capsys, tmp_path, monkeypatch):
    from tests.reports.fixtures import proxy, write

    run_cfg = {"reference": "un0", "pue": 1.2, "lifetime_images": 1000}
    records = [proxy("sd", compute=1.0, memory=1.0, config={"run": run_cfg}),
               proxy("un0", compute=0.001, memory=0.01, config={"run": run_cfg})]
    write(tmp_path, records)
    seen = _report_contexts(monkeypatch)
    assert run(capsys, "report", str(tmp_path))[0] == 0
    opts = seen[-1]["options"]
    assert (opts["reference"], opts["pue"], opts["lifetime_images"]) == ("un0", 1.2, 1000)
    assert _compute_factors(seen[-1]) == {"sd": 0.001, "un0": 1.0}
    pue_rows = {row["model"]: row["energy"]["pue"] for row in seen[-1]["ledgers"]["proxy"]}
    assert pue_rows["un0"] == pytest.approx(0.011 * 1.2)
    # Each of --reference, --pue and --lifetime-images overrides the run's own setting.
    assert run(capsys, "report", str(tmp_path), "--reference", "sd", "--pue", "1.5")[0] == 0
    opts = seen[-1]["options"]
    assert (opts["reference"], opts["pue"], opts["lifetime_images"]) == ("sd", 1.5, 1000)
    assert _compute_factors(seen[-1]) == {"sd": 1.0, "un0": 1000.0}
    pue_rows = {row["model"]: row["energy"]["pue"] for row in seen[-1]["ledgers"]["proxy"]}
    assert pue_rows["un0"] == pytest.approx(0.011 * 1.5)
    assert run(capsys, "report", str(tmp_path), "--lifetime-images", "7")[0] == 0
    assert seen[-1]["options"]["lifetime_images"] == 7 and seen[-1]["options"]["reference"] == "un0"
    code, _, err = run(capsys, "report", str(tmp_path), "--pue", "0.5")
    assert code == 2 and "--pue must be >= 1" in err


def test_rerun_with_changed_options_is_refused_in_one_line(capsys, tmp_path):
    from un0_bench.harness.running.config import MEASUREMENT_FIELDS, RunConfig

    from tests.reports.fixtures import proxy, write

    run_options = {k: v for k, v in RunConfig.of(models=["sd"], out=tmp_path).flat().items() if k in MEASUREMENT_FIELDS}
    write(tmp_path, [proxy("sd", 2.0, config={"generator": {}, "run": {**run_options, "images": 4}})])
    code, _, err = run(capsys, "compare", "--models", "sd", "--images", "8", "--batch-size", "4", "--seed", "3",
                       "--out", str(tmp_path))
    assert code == 2
    assert err == (f"un0-bench: error: {tmp_path} holds results measured with another configuration (--images 4 "
                   f"there, 8 now; --seed 0 there, 3 now); run with the folder's options to resume it, another --out, "
                   f"or --fresh to start it over\n")


def test_bad_lines_of_a_results_file_are_reported_not_a_traceback(capsys, tmp_path):
    from tests.reports.fixtures import proxy, write

    write(tmp_path, [proxy("sd", 2.0), proxy("un0", 1.0)])
    with (tmp_path / "results.jsonl").open("ab") as f:
        f.write(b'{"model":"x"}\n[1,2,3]\n\xff\n' + b'{"model": "sd", "backbone": "digits", "batch_size": "8"}\n')
    code, out, err = run(capsys, "report", str(tmp_path))
    assert code == 0, err
    path = tmp_path / "results.jsonl"
    warned = [line for line in err.splitlines() if line.startswith("un0-bench: warning: ")]
    # Each bad line once, as file:line: field: problem (the field where one is at fault).
    lacks = ("energy_j_per_image, energy_ci95_j, flops_per_image, bytes_per_image, duration_s_per_image, "
             "uncounted_ops, config, environment")
    assert warned == [f"un0-bench: warning: {path}:{why}; skipped" for why in (
        f"3: backbone: missing (a record lacks backbone, batch_size, meter, status, images, {lacks})",
        "4: not a record (a JSON list, expected an object)",
        "5: not UTF-8 text (invalid start byte at byte 0)",
        f"6: meter: missing (a record lacks meter, status, images, {lacks})")]
    assert "Traceback" not in err and out.startswith("report: ")


def test_third_party_warnings_are_not_printed_ahead_of_our_error(capsys, monkeypatch):
    import warnings

    from un0_bench.harness.errors import UserError

    import un0_bench.cli as cli

    def refused(args):
        warnings.warn_explicit("an import-time deprecation", FutureWarning, "/x/site-packages/somelib/__init__.py", 3)
        raise UserError("no such thing")

    monkeypatch.setitem(cli.COMMANDS, "list", refused)
    code, out, err = run(capsys, "list")
    assert code == 2 and err == "un0-bench: error: no such thing\n"

    def fine(args):
        warnings.warn_explicit("an import-time deprecation", FutureWarning, "/x/site-packages/somelib/__init__.py", 3)
        print("listed")
        return 0

    monkeypatch.setitem(cli.COMMANDS, "list", fine)
    code, out, err = run(capsys, "list")
    assert code == 0 and out == "listed\n"
    assert "FutureWarning: an import-time deprecation" in err  # shown after the output, not lost

    def noisy(args):
        warnings.warn_explicit("__array__ copy keyword", DeprecationWarning, "/x/site-packages/somelib/sched.py", 9)
        warnings.warn_explicit("our own deprecation", DeprecationWarning, cli.__file__, 1)
        print("listed")
        return 0

    monkeypatch.setitem(cli.COMMANDS, "list", noisy)
    code, out, err = run(capsys, "list")
    # a library's deprecation notice is for its callers' authors: not printed; ours is
    assert code == 0 and "__array__ copy keyword" not in err and "DeprecationWarning: our own deprecation" in err


@pytest.mark.parametrize("argv", [["compare", "--models", "sd", "--out", ""], ["report", ""],
                                  ["make-tiny-pipeline", " "], ["train", "teacher", "--out", ""]])
def test_an_empty_path_is_refused(capsys, argv):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    assert "expected a path, got an empty one" in capsys.readouterr().err


def test_unwritable_outputs_of_every_command_fail_before_work(capsys, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    code, _, err = run(capsys, "train", "teacher", "--out", str(blocker / "w.safetensors"))
    assert (code, err) == (2, f"un0-bench: error: cannot write weights file {blocker / 'w.safetensors'}: {blocker} "
                              f"is not a folder\n")
    code, _, err = run(capsys, "train", "teacher", "--out", str(tmp_path))
    assert (code, err) == (2, f"un0-bench: error: weights file {tmp_path} is a folder; name a file\n")
    code, _, err = run(capsys, "make-tiny-pipeline", str(blocker / "pipe"))
    assert (code, err) == (2, f"un0-bench: error: cannot write to pipeline folder {blocker / 'pipe'}: {blocker} is "
                              f"not a folder\n")


def test_a_refused_run_leaves_no_empty_folders(capsys, tmp_path):
    out = tmp_path / "new" / "deep"
    code, _, err = run(capsys, "compare", "--models", "sd", "--reference", "sdd", "--out", str(out))
    assert code == 2 and "Did you mean 'sd'" in err
    assert not (tmp_path / "new").exists()
