"""The projection: profiles refuse a missing field, the calibration point is reproduced exactly, and the
projected figures move with steps, resolution and batch as the model says."""

from __future__ import annotations

import json

import pytest
from un0_bench.harness.errors import UserError
from un0_bench.harness.projection import (
    fit_calibration,
    get_gpu_profile,
    load_calibration,
    load_gpu_profiles,
    project,
    projected_record,
)

HEADER = "profile,quantity,dtype,value,unit,source\n"
FULL = {
    ("peak_flops", "fp16"): "100,TFLOPS", ("peak_flops", "fp32"): "10,TFLOPS", ("memory_bandwidth", ""): "1,TB/s",
    ("board_power", ""): "300,W", ("idle_power", ""): "50,W",
}


def _csv(tmp_path, rows, name="toy-gpu"):
    text = HEADER + "".join(f"{name},{q},{d},{v},test\n" for (q, d), v in rows.items())
    path = tmp_path / "gpus.csv"
    path.write_text(text)
    return path


def test_builtin_gpu_profiles_have_every_field_with_a_source():
    profiles = load_gpu_profiles()
    assert {"a100-sxm4-40gb", "h100-sxm5", "h200", "l4"} <= set(profiles)
    a100 = profiles["a100-sxm4-40gb"]
    # Dense datasheet figures (not the 2:4 sparsity ones): 312 TFLOP/s fp16, 1,555 GB/s, 400 W.
    assert a100.peak_flops["fp16"] == 312e12 and a100.memory_bandwidth_b_per_s == 1555e9
    assert a100.board_power_w == 400.0 and 0 < a100.idle_power_w < 400
    for p in profiles.values():
        assert all(src.strip() for src in p.sources.values())


@pytest.mark.parametrize("missing", list(FULL))
def test_a_profile_missing_a_field_is_refused_naming_profile_and_field(tmp_path, missing):
    rows = {k: v for k, v in FULL.items() if k != missing}
    with pytest.raises(UserError, match=rf"GPU profile 'toy-gpu' .*has no {missing[0]}"):
        load_gpu_profiles(_csv(tmp_path, rows))


def test_unknown_gpu_profile_suggests():
    with pytest.raises(UserError, match="Did you mean 'h100-sxm5'"):
        get_gpu_profile("h100-sxm")


def _record(flops16=1e15, flops32=0.0, nbytes=1e11, **extra):
    by = {"float16": flops16}
    if flops32:
        by["float32"] = flops32
    return {"model": "toy", "flops_per_image": flops16 + flops32, "flops_per_image_by_dtype": by,
            "bytes_per_image": nbytes, **extra}


def test_toy_roofline_by_hand(tmp_path):
    gpu = load_gpu_profiles(_csv(tmp_path, FULL))["toy-gpu"]
    cal = fit_calibration(_record(), gpu, time_s=20.0, energy_j=4000.0, name="toy", source="test", setting={})
    # Roofline: 1e15 / 100e12 = 10 s compute vs 1e11 / 1e12 = 0.1 s memory -> 10 s; 20 s measured -> efficiency 0.5.
    assert cal.efficiency == pytest.approx(0.5)
    # 4000 J / 20 s = 200 W = 50 + f * (300 - 50) -> f = 0.6.
    assert cal.power_fraction == pytest.approx(0.6)
    # Add 1e14 fp32 FLOPs (1e14 / 10e12 = 10 s more): 20 s at peak / 0.5 = 40 s at 200 W = 8000 J.
    p = project(_record(flops32=1e14), gpu, cal)
    assert p["time_s_per_image"] == pytest.approx(40.0) and p["energy_j_per_image"] == pytest.approx(8000.0)
    # Memory-bound: 1e14 bytes / 1e12 B/s = 100 s at peak > 10 s compute -> 200 s.
    p = project(_record(nbytes=1e14), gpu, cal)
    assert p["bound"] == "memory" and p["time_s_per_image"] == pytest.approx(200.0)


def test_shipped_calibration_reproduces_its_published_point_exactly():
    cal = load_calibration()
    assert cal.setting["arch"] == "sd21" and cal.setting["profile"] == "a100-sxm4-40gb"
    assert cal.setting["steps"] == 50 and cal.setting["resolution"] == 768 and cal.setting["guidance"] == 7.5
    assert cal.measured == {"time_s_per_image": 2.29, "energy_j_per_image": 871.0}
    p = project(cal.counted, get_gpu_profile("a100-sxm4-40gb"), cal)
    assert p["time_s_per_image"] == pytest.approx(2.29, rel=1e-12)
    assert p["energy_j_per_image"] == pytest.approx(871.0, rel=1e-12)
    assert 0 < cal.efficiency <= 1 and 0 < cal.power_fraction <= 1
    # The refit from the stored counted work gives the stored factors.
    again = fit_calibration(cal.counted, get_gpu_profile("a100-sxm4-40gb"), time_s=2.29, energy_j=871.0,
                            name=cal.name, source=cal.source, setting=cal.setting)
    assert again.efficiency == cal.efficiency and again.power_fraction == cal.power_fraction


def _toy_count(steps=50, resolution=512, batch_size=1, guidance=7.5):
    """A toy counted record with the scaling of a latent diffusion pipeline: denoiser FLOPs ~ steps x
    passes x latent pixels; weights (1e9 bytes) read once per batch and shared by its images."""
    passes = 2 if guidance > 1 else 1
    latent = (resolution // 8) ** 2
    flops = 1e9 * latent * steps * passes
    nbytes = 1e9 * steps * passes / batch_size + 1e5 * latent * steps * passes
    return _record(flops16=flops, nbytes=nbytes)


@pytest.mark.parametrize("gpu", ["a100-sxm4-40gb", "h100-sxm5", "h200", "l4"])
def test_projection_is_monotone_in_steps_resolution_and_batch(gpu):
    cal, prof = load_calibration(), get_gpu_profile(gpu)

    def e(**kw):
        p = project(_toy_count(**kw), prof, cal)
        return p["time_s_per_image"], p["energy_j_per_image"]

    assert e(steps=10) < e(steps=20) < e(steps=50)
    assert e(resolution=256) < e(resolution=512) < e(resolution=1024)
    # Per image, a larger batch never costs more: compute per image is the same, shared weight bytes fall.
    assert e(batch_size=1) >= e(batch_size=4) >= e(batch_size=16)
    assert e(guidance=1.0) < e(guidance=7.5)


def test_projected_record_is_marked_projected_never_measured():
    rec = projected_record(_record(meter="proxy", status="ok", backbone="arch:toy", batch_size=1, images=1),
                           get_gpu_profile("h100-sxm5"), load_calibration())
    assert rec["status"] == "projected" and rec["meter"] == "projection:h100-sxm5"
    assert rec["projection"]["label"] == "projected, not measured"
    assert rec["projection"]["assumes"] and rec["projection"]["leaves_out"]
    assert rec["projection"]["calibration"]["name"] == "ml-energy-sd2.1-a100"
    json.dumps(rec)  # a result record: JSON all the way down


def test_shipped_calibration_counts_are_what_count_arch_gives_today():
    """The calibration's counted work is the current count of its setting (else rerun its command)."""
    from un0_bench.backbones.archs import count_arch

    cal = load_calibration()
    s = cal.setting
    rec = count_arch(s["arch"], steps=s["steps"], resolution=s["resolution"], batch_size=s["batch_size"],
                     guidance=s["guidance"], dtype=s["dtype"])
    assert rec["flops_per_image"] == cal.counted["flops_per_image"], f"stale: run `{cal.command}`"
    assert rec["bytes_per_image"] == cal.counted["bytes_per_image"], f"stale: run `{cal.command}`"
