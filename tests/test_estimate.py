"""``un0-bench estimate`` writes projected-marked records and a report that labels them; ``make bench-scale``'s
table (factor, analog break-even) from records; absolute claims judged by projection."""

from __future__ import annotations

import json

import pytest
from un0_bench.harness.projection.roofline import fit_calibration, get_gpu_profile
from un0_bench.reports.claims import evaluate_claims
from un0_bench.reports.projected import scale_rows, validation_rows

from un0_bench import estimate, scale
from un0_bench.cli import main


def fake_count_arch(arch, *, steps=None, resolution=None, batch_size=1, guidance=None, dtype=None):
    """A stand-in for backbones.archs.count_arch with a latent-diffusion scaling (no architecture built)."""
    steps = steps or 50
    resolution = resolution or 512
    passes = 2 if (guidance if guidance is not None else 7.5) > 1 else 1
    flops = 1e9 * (resolution // 8) ** 2 * steps * passes
    rec = {"model": arch, "backbone": f"arch:{arch}", "batch_size": batch_size, "images": batch_size,
           "status": "counted", "meter": "counter", "flops_per_image": flops,
           "flops_per_image_by_dtype": {"float16": flops}, "bytes_per_image": flops / 1000,
           "energy_j_per_image": None, "energy_ci95_j": None, "duration_s_per_image": None, "uncounted_ops": {},
           "config": {"steps": steps, "resolution": resolution, "guidance": guidance, "dtype": dtype},
           "environment": {}}
    if arch.startswith("un0-"):
        n = int(arch.rsplit("-", 1)[1])
        # Oscillator part 4e6 FLOPs per oscillator, decoder 1e9 FLOPs; 10 Euler steps.
        rec.update(flops_per_image=4e6 * n + 1e9, flops_per_image_by_dtype={"float16": 4e6 * n + 1e9},
                   bytes_per_image=1e7, oscillators=n, steps=10, published_fid50k=10.0 - n / 4096,
                   phases={"oscillate": {"flops": 4e6 * n * batch_size, "bytes": 5e6 * batch_size},
                           "decode": {"flops": 1e9 * batch_size, "bytes": 5e6 * batch_size}})
    if arch.startswith("adm-"):
        rec.update(flops_per_image=2.5e14, flops_per_image_by_dtype={"float16": 2.5e14}, bytes_per_image=1e12,
                   published_fid50k=2.07)
    return rec


@pytest.fixture
def toy_cal(tmp_path, monkeypatch):
    monkeypatch.setattr(estimate, "_count_arch", lambda: fake_count_arch)
    counted = estimate.count("sd21", steps=50, resolution=768, guidance=7.5, dtype="fp16")
    point = {"id": "toy-sd21", "source": "test", "setting": {"arch": "sd21"},
             "measured": {"time_s_per_image": 2.29279, "energy_j_per_image": 871.094}}
    cal = fit_calibration([(point, counted, get_gpu_profile("a100-sxm4-40gb"))], name="toy-cal")
    path = tmp_path / "cal.json"
    path.write_text(json.dumps(cal.to_dict()))
    return cal, path


def test_estimate_cli_writes_projected_records_and_a_report_that_says_so(tmp_path, toy_cal, capsys):
    _, cal_path = toy_cal
    out = tmp_path / "est"
    code = main(["estimate", "--arch", "sdxl", "--profile", "a100-sxm4-40gb,h100-sxm5", "--steps", "30",
                 "--resolution", "1024", "--calibration", str(cal_path), "--out", str(out),
                 "--flags", "cudnn_allow_tf32=0"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "PROJECTED, not measured" in printed and "calibration: toy-cal" in printed
    records = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert [r["meter"] for r in records] == ["projection:a100-sxm4-40gb", "projection:h100-sxm5"]
    assert all(r["status"] == "projected" and r["projection"]["label"] == "projected, not measured" for r in records)
    # The run's math flags are recorded with every projection: the one given, torch's defaults for the rest.
    assert records[0]["projection"]["flags"] == {"cudnn_allow_tf32": False, "matmul_allow_tf32": False, "sdpa": "auto"}
    assert "math flags: cudnn_allow_tf32=False" in printed and "no error band" in printed
    # 1e9 * 128^2 * 30 steps * 2 passes = 9.8304e14 FLOPs per image, counted, not projected.
    assert records[0]["flops_per_image"] == 1e9 * 128**2 * 30 * 2
    html = (out / "report.html").read_text()
    assert "This report contains\nprojections, not measurements" in html and "Projected (not measured)" in html
    assert "(projected, not measured)" in (out / "summary.md").read_text() or "projection:" in html


def test_estimate_refuses_an_unknown_gpu_profile_before_counting(tmp_path, toy_cal, capsys):
    _, cal_path = toy_cal
    assert main(["estimate", "--arch", "sdxl", "--profile", "a100", "--calibration", str(cal_path),
                 "--out", str(tmp_path / "x")]) == 2
    assert "unknown GPU profile 'a100'" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_scale_table_factor_and_break_even(tmp_path, toy_cal, monkeypatch):
    cal, _ = toy_cal
    monkeypatch.setattr(scale, "load_calibration", lambda: cal)
    records = scale.run(tmp_path / "scale", count_fn=fake_count_arch, report=True)
    rows = {r["model"]: r for r in scale_rows(records)["rows"]}
    adm, un0 = rows["adm-imagenet64"], rows["un0-imagenet64-16384"]
    assert un0["reference"] == "adm-imagenet64" and un0["factor"] == pytest.approx(adm["energy_j"] / un0["energy_j"])
    # 16,384 oscillators x 10 steps; digital part = the decoder's 1e9 of the 4e6 * 16384 + 1e9 FLOPs, alone.
    assert un0["oscillator_steps"] == 163840
    assert un0["break_even_j"] == pytest.approx((adm["energy_j"] / 1000 - un0["decoder_j"]) / 163840)
    assert un0["ceiling"] == pytest.approx(adm["energy_j"] / un0["decoder_j"])
    assert rows["un0-cifar10-1024"]["factor"] is None  # no diffusion model of CIFAR-10 in the table
    v = {(x["id"], x["quantity"]): x for x in validation_rows(records)}
    # The calibration point: the toy calibration was fitted on the same toy counts, so the ratio is 1.
    assert v[("ml-energy-sd21-50steps-bs1", "energy (J)")]["ratio"] == pytest.approx(1.0, rel=1e-9)
    assert v[("ml-energy-sd21-50steps-bs1", "time (s)")]["ratio"] == pytest.approx(1.0, rel=1e-9)
    assert v[("ml-energy-sd21-50steps-bs1", "energy (J)")]["role"] == "calibration"
    # Every ML.ENERGY A100 point of SD 1.5, SD 2.1 and SDXL at batch 1 and 8, 30 and 50 steps is in the table.
    assert sum(1 for (pid, q) in v if pid.startswith("ml-energy-") and q == "energy (J)") == 12
    claims = {c["claim"][:20]: c for c in evaluate_claims(records, "sd")}
    api = next(c for k, c in claims.items() if k.startswith("Image-generation"))
    assert api["settings"] and all(s["unit"] == "J" for s in api["settings"])
    assert api["verdict"].split(" (projected")[0] in ("Consistent", "Not consistent", "Depends on the setting")
    html = (tmp_path / "scale" / "report.html").read_text()
    assert "Validation: published measurements vs projection" in html and "analog break-even" in html
