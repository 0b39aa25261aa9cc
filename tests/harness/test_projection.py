"""The projection: profiles refuse a missing field; the per-operator roofline charges each launch by its
kernel class, dtype and math flags (by hand); the calibration fits two factors and predicts each point
unseen (leave-one-out); projected records carry the flags, the kernel classes and an error band."""

from __future__ import annotations

import json

import pytest
from un0_bench.harness.errors import UserError
from un0_bench.harness.projection.roofline import (
    MathFlags,
    fit_calibration,
    get_gpu_profile,
    leave_one_out,
    load_calibration,
    load_gpu_profiles,
    parse_flags,
    project,
    projected_record,
)

HEADER = "profile,quantity,dtype,value,unit,source\n"
FULL = {
    ("peak_flops", "fp16"): "100,TFLOPS", ("peak_flops", "fp32"): "10,TFLOPS", ("peak_flops", "tf32"): "50,TFLOPS",
    ("memory_bandwidth", ""): "1,TB/s", ("board_power", ""): "300,W", ("idle_power", ""): "50,W",
    ("kernel_launch", ""): "10,us", ("kernel_latency", ""): "1,us", ("memory_efficiency", ""): "0.5,fraction",
    ("wait_power", ""): "100,W",
}
REQUIRED_ROWS = [k for k in FULL if k != ("peak_flops", "tf32")]


def _csv(tmp_path, rows, name="toy-gpu"):
    text = HEADER + "".join(f"{name},{q},{d},{v},test\n" for (q, d), v in rows.items())
    path = tmp_path / "gpus.csv"
    path.write_text(text)
    return path


def test_builtin_gpu_profiles_have_every_field_with_a_source():
    profiles = load_gpu_profiles()
    assert {"a100-sxm4-40gb", "h100-sxm5", "h200", "l4"} <= set(profiles)
    a100 = profiles["a100-sxm4-40gb"]
    # Dense datasheet figures (not the 2:4 sparsity ones): 312 TFLOP/s fp16, 156 TF32, 1,555 GB/s, 400 W.
    assert a100.peak_flops["fp16"] == 312e12 and a100.peak_flops["tf32"] == 156e12
    assert a100.memory_bandwidth_b_per_s == 1555e9 and a100.board_power_w == 400.0 and 0 < a100.idle_power_w < 400
    assert a100.kernel_launch_s == pytest.approx(30e-6) and a100.kernel_latency_s == pytest.approx(5e-6)
    for p in profiles.values():
        assert "tf32" in p.peak_flops  # every shipped GPU can take the TF32 path of a float32 convolution
        assert all(src.strip() for src in p.sources.values())


@pytest.mark.parametrize("missing", REQUIRED_ROWS)
def test_a_profile_missing_a_field_is_refused_naming_profile_and_field(tmp_path, missing):
    rows = {k: v for k, v in FULL.items() if k != missing}
    with pytest.raises(UserError, match=rf"GPU profile 'toy-gpu' .*has no {missing[0]}"):
        load_gpu_profiles(_csv(tmp_path, rows))


def test_unknown_gpu_profile_suggests():
    with pytest.raises(UserError, match="Did you mean 'h100-sxm5'"):
        get_gpu_profile("h100-sxm")


def test_flags_parse_and_refuse():
    assert parse_flags(None) == MathFlags(cudnn_allow_tf32=True, matmul_allow_tf32=False, sdpa="auto")
    assert parse_flags("cudnn_allow_tf32=0,sdpa=math") == MathFlags(cudnn_allow_tf32=False, sdpa="math")
    with pytest.raises(UserError, match="expected key=value"):
        parse_flags("allow_tf32=1")
    with pytest.raises(UserError, match="expected 1 or 0"):
        parse_flags("matmul_allow_tf32=yes")


#: One toy batch of one image: [phase, kernel class, dtype, launches, FLOPs per launch, bytes per launch].
KERNELS = [
    ["denoise_step", "conv", "float16", 10, 1e9, 1e6],
    ["denoise_step", "elementwise", "float16", 100, 1e3, 1e6],
    ["vae_decode", "conv", "float32", 1, 1e10, 0.0],
]


def _counted(kernels=KERNELS):
    return {"model": "toy", "images": 1, "kernels": kernels, "flops_per_image": 0, "bytes_per_image": 0}


def _point(pid, time_s, energy_j):
    return {"id": pid, "source": "test", "setting": {}, "measured": {"time_s_per_image": time_s,
                                                                      "energy_j_per_image": energy_j}}


def _toy_times(efficiency=0.5):
    """By hand, on FULL at efficiency 0.5 (launch 10 us, latency 1 us, bandwidth 0.5 x 1 TB/s):

    conv fp16: 1e9 / (0.5 x 100e12) = 20 us, bytes 1e6 / 0.5e12 = 2 us -> 1 + 20 = 21 us > 10: 10 x 21 = 210 us;
    element-wise: bytes 2 us (FLOPs 1e3 / 10e12 ~ 0) -> 3 us GPU, launch-bound at 10 us: 100 x 10 = 1000 us
    (busy 300 us); conv fp32 with cudnn TF32: 1e10 / (0.5 x 50e12) = 400 us -> 401 us.
    Time 1611 us, busy 911 us.
    """
    assert efficiency == 0.5
    return 1611e-6, 911e-6


def test_toy_per_operator_roofline_by_hand(tmp_path):
    gpu = load_gpu_profiles(_csv(tmp_path, FULL))["toy-gpu"]
    t, busy = _toy_times()
    # Busy power at fraction 0.6: 50 + 0.6 x (300 - 50) = 200 W; wait 100 W: E = 100 t + (200 - 100) busy.
    e = 100 * t + 100 * busy
    cal = fit_calibration([(_point("p", t, e), _counted(), gpu)], name="toy")
    assert cal.efficiency == pytest.approx(0.5, rel=1e-9) and cal.power_fraction == pytest.approx(0.6, rel=1e-9)
    assert cal.error_band is None and cal.leave_one_out == []  # one point: nothing left to predict it from
    p = project(_counted(), gpu, cal)
    assert p["time_s_per_image"] == pytest.approx(t, rel=1e-9) and p["energy_j_per_image"] == pytest.approx(e)
    assert p["busy_s_per_image"] == pytest.approx(busy, rel=1e-9)
    c = p["kernel_classes"]
    assert c["conv"]["launches"] == 11 and c["conv"]["paths"] == ["float16->fp16", "float32->tf32"]
    assert c["elementwise"]["time_s"] == pytest.approx(1000e-6) and p["bound_s"]["launch"] == pytest.approx(1000e-6)
    assert p["bound"] == "launch" and p["flags"]["cudnn_allow_tf32"] is True
    # cuDNN without TF32: the fp32 conv runs at 0.5 x 10e12: 1e10 / 5e12 = 2000 us + 1 -> 1600 us more.
    off = project(_counted(), gpu, cal, MathFlags(cudnn_allow_tf32=False))
    assert off["time_s_per_image"] == pytest.approx(t + 1600e-6, rel=1e-9)
    assert off["kernel_classes"]["conv"]["paths"] == ["float16->fp16", "float32->fp32"]


def test_leave_one_out_predicts_each_point_from_the_others(tmp_path):
    gpu = load_gpu_profiles(_csv(tmp_path, FULL))["toy-gpu"]
    t, busy = _toy_times()
    a = (_point("a", t, 100 * t + 100 * busy), _counted(), gpu)
    # b: the same work measured twice as slow and with twice the energy of a's fit.
    b = (_point("b", 2 * t, 2 * (100 * t + 100 * busy)), _counted(), gpu)
    rows = {r["id"]: r for r in leave_one_out([a, b])}
    assert rows["b"]["fitted_on"] == ["a"] and rows["a"]["fitted_on"] == ["b"]
    # Fitted on a alone (efficiency 0.5, fraction 0.6), b is projected at half its measured time and energy.
    assert rows["b"]["time_ratio"] == pytest.approx(0.5, rel=1e-9)
    assert rows["b"]["energy_ratio"] == pytest.approx(0.5, rel=1e-9)
    assert rows["a"]["time_ratio"] > 1  # fitted on the slow b, a is projected slower than measured
    cal = fit_calibration([a, b], name="ab")
    assert cal.error_band == pytest.approx(max(max(r["energy_ratio"], 1 / r["energy_ratio"]) for r in rows.values()))
    p = project(_counted(), gpu, cal)
    lo, hi = p["energy_band_j"]
    assert lo == pytest.approx(p["energy_j_per_image"] / cal.error_band) and hi == pytest.approx(
        p["energy_j_per_image"] * cal.error_band)


def _record(flops16=1e15, flops32=0.0, nbytes=1e11, **extra):
    by = {"float16": flops16}
    if flops32:
        by["float32"] = flops32
    return {"model": "toy", "flops_per_image": flops16 + flops32, "flops_per_image_by_dtype": by,
            "bytes_per_image": nbytes, **extra}


def _toy_count(steps=50, resolution=512, batch_size=1, guidance=7.5):
    """A toy counted record without kernels (charged coarsely) with the scaling of a latent diffusion
    pipeline: denoiser FLOPs ~ steps x passes x latent pixels; weights (1e9 bytes) read once per batch."""
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


def test_projected_record_is_marked_projected_and_names_flags_classes_and_band():
    rec = projected_record(_record(meter="proxy", status="ok", backbone="arch:toy", batch_size=1, images=1),
                           get_gpu_profile("h100-sxm5"), load_calibration())
    p = rec["projection"]
    assert rec["status"] == "projected" and rec["meter"] == "projection:h100-sxm5"
    assert p["label"] == "projected, not measured" and p["assumes"] and p["leaves_out"]
    assert p["calibration"]["name"] == "ml-energy-a100-sd21-bs1+sdxl-bs8"
    assert set(p["flags"]) == {"cudnn_allow_tf32", "matmul_allow_tf32", "sdpa"} and p["kernel_classes"]
    assert p["energy_band_j"][0] < p["energy_j_per_image"] < p["energy_band_j"][1]
    json.dumps(rec)  # a result record: JSON all the way down


def test_shipped_calibration_has_two_published_points_and_their_leave_one_out():
    cal = load_calibration()
    assert [p["id"] for p in cal.points] == ["ml-energy-sd21-50steps-bs1", "ml-energy-sdxl-50steps-bs8"]
    assert cal.points[0]["measured"] == {"time_s_per_image": 2.29279, "energy_j_per_image": 871.094}
    assert [r["fitted_on"] for r in cal.leave_one_out] == [["ml-energy-sdxl-50steps-bs8"],
                                                           ["ml-energy-sd21-50steps-bs1"]]
    assert cal.error_band == max(max(r["energy_ratio"], 1 / r["energy_ratio"]) for r in cal.leave_one_out) > 1
    assert 0 < cal.efficiency <= 1


def test_shipped_calibration_counts_are_what_count_arch_gives_today():
    """The calibration's counted work is the current count of its SD 2.1 point (else rerun its command)."""
    from un0_bench.backbones.archs import count_arch

    cal = load_calibration()
    pt = cal.points[0]
    s = {k: v for k, v in pt["setting"].items() if k not in ("arch", "profile")}
    rec = count_arch(pt["setting"]["arch"], **s)
    assert rec["flops_per_image"] == pt["counted"]["flops_per_image"], f"stale: run `{cal.command}`"
    assert rec["bytes_per_image"] == pt["counted"]["bytes_per_image"], f"stale: run `{cal.command}`"
    assert sum(k[3] for k in rec["kernels"]) == pt["counted"]["launches_per_image"], f"stale: run `{cal.command}`"
