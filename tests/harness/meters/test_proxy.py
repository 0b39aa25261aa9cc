import random

import pytest
from un0_bench.harness.counters.records import Counts, OpStat
from un0_bench.harness.errors import UserError
from un0_bench.harness.meters.proxy import (
    PROFILES_ENV,
    ProxyMeter,
    get_profile,
    load_profiles,
    proxy_energy,
)


def _stat(flops=0, read=0, written=0, dtype="float32", role="compute", op="aten.mm.default", module=""):
    return OpStat(op=op, dtype=dtype, role=role, module=module, calls=1, flops=flops,
                  bytes_read=read, bytes_written=written)


def test_exact_joules_for_hand_made_counts():
    counts = Counts(images=1, stats=[_stat(flops=1000, read=64, written=32)])
    b = proxy_energy(counts, "horowitz-45nm")
    # 1000 fp32 FLOPs x (0.9 + 3.7) / 2 pJ = 1000 x 2.3 pJ = 2.3e-9 J
    assert b.compute_j == pytest.approx(2.3e-9, rel=1e-12)
    # (64 + 32) bytes x 10 pJ / 8 bytes (SRAM, 64-bit read) = 96 x 1.25 pJ = 1.2e-10 J
    assert b.memory_j == pytest.approx(1.2e-10, rel=1e-12)
    assert (b.gating_j, b.gating_memory_j, b.static_j) == (0.0, 0.0, 0.0)
    assert b.total_j == pytest.approx(2.42e-9, rel=1e-12)


def test_dram_profile_charges_the_midpoint():
    counts = Counts(images=1, stats=[_stat(read=8)])
    # 8 bytes = one 64-bit access at (1.3 + 2.6) / 2 = 1.95 nJ
    assert proxy_energy(counts, "horowitz-45nm-dram").memory_j == pytest.approx(1.95e-9, rel=1e-12)


def test_int8_is_cheaper_than_fp32_by_the_table_ratio():
    fp32 = proxy_energy(Counts(images=1, stats=[_stat(flops=10**6)]), "horowitz-45nm").compute_j
    int8 = proxy_energy(Counts(images=1, stats=[_stat(flops=10**6, dtype="int8")]), "horowitz-45nm").compute_j
    # (0.9 + 3.7) / (0.03 + 0.2) = 4.6 / 0.23 = 20
    assert fp32 / int8 == pytest.approx(20.0, rel=1e-12)


def test_dtype_fallbacks():
    p = get_profile("horowitz-45nm")
    assert p.energy_per_flop_j("bfloat16") == p.energy_per_flop_j("float16")  # assumed equal to fp16
    assert p.energy_per_flop_j("int64") == p.energy_per_flop_j("int32") == pytest.approx(1.6e-12)  # (0.1+3.1)/2
    assert p.energy_per_flop_j("bool") == p.energy_per_flop_j("uint8") == pytest.approx(0.115e-12)
    assert p.energy_per_flop_j("float64") == pytest.approx((1.8 + 14.8) / 2 * 1e-12)  # assumed, see CSV
    with pytest.raises(UserError, match="complex64"):
        p.energy_per_flop_j("complex64")
    assert "assumed equal to fp16" in p.sources[("add", "bf16")]
    assert all("Horowitz, ISSCC 2014" in s for s in p.sources.values())


def test_same_counts_give_bit_identical_energy():
    stats = [_stat(flops=f, read=r, written=w, dtype=d, role=role, module=str(i))
             for i, (f, r, w, d, role) in enumerate([
                 (123457, 4096, 1024, "float32", "compute"), (999, 77, 13, "int8", "gating"),
                 (31, 1, 2, "bfloat16", "compute"), (10**9 + 7, 3, 5, "float32", "gating")])]
    shuffled = stats[:]
    random.Random(0).shuffle(shuffled)
    a = proxy_energy(Counts(images=1, stats=stats), "horowitz-45nm")
    b = proxy_energy(Counts(images=1, stats=stats), "horowitz-45nm")
    c = proxy_energy(Counts(images=1, stats=shuffled), "horowitz-45nm")
    assert a == b == c


def test_gating_is_split_out():
    counts = Counts(images=1, stats=[_stat(flops=100, read=8), _stat(flops=40, written=16, role="gating")])
    b = proxy_energy(counts, "horowitz-45nm")
    assert b.compute_j == pytest.approx(100 * 2.3e-12, rel=1e-12)
    assert b.gating_j == pytest.approx(40 * 2.3e-12, rel=1e-12)
    assert b.memory_j == pytest.approx(8 * 1.25e-12, rel=1e-12)
    assert b.gating_memory_j == pytest.approx(16 * 1.25e-12, rel=1e-12)


def test_unknown_profile_suggests_close_names():
    with pytest.raises(UserError) as e:
        get_profile("horowitz-45")
    msg = str(e.value)
    assert "Did you mean 'horowitz-45nm'" in msg
    assert "analog-oscillator, horowitz-45nm, horowitz-45nm-dram" in msg
    with pytest.raises(UserError, match="unknown energy profile"):
        ProxyMeter(profile="nope")


def test_analog_profile_is_parsed():
    p = get_profile("analog-oscillator")
    assert p.quantity("oscillator_step") == pytest.approx(1e-15)  # 1 fJ
    assert "assumption, not measured" in p.sources[("oscillator_step", "")]
    assert p.static_power_w is None


USER_CSV = """profile,quantity,dtype,value,unit,source
# a comment line
my-gpu,add,fp32,0.5,pJ,made up for the test
my-gpu,mult,fp32,1.5,pJ,made up for the test
my-gpu,memory_access_64bit,,80,pJ,made up for the test
my-gpu,static_power,,2,W,made up for the test
"""


def test_user_profile_file_by_argument_and_env(tmp_path, monkeypatch):
    path = tmp_path / "mine.csv"
    path.write_text(USER_CSV)
    p = get_profile("my-gpu", path)
    assert p.energy_per_flop_j("float32") == pytest.approx(1e-12)  # (0.5 + 1.5) / 2 pJ
    assert p.energy_per_byte_j == pytest.approx(10e-12)  # 80 pJ / 8 bytes
    assert p.static_power_w == 2.0
    b = proxy_energy(Counts(images=1, stats=[_stat(flops=1000)]), p, duration_s=0.5)
    assert b.static_j == 1.0  # 2 W x 0.5 s
    assert b.compute_j == pytest.approx(1e-9, rel=1e-12)

    monkeypatch.setenv(PROFILES_ENV, str(path))
    assert "my-gpu" in load_profiles()
    assert "horowitz-45nm" in load_profiles()  # built-ins stay
    monkeypatch.delenv(PROFILES_ENV)
    assert "my-gpu" not in load_profiles()


def test_bad_user_profile_files(tmp_path):
    dup = tmp_path / "dup.csv"
    dup.write_text("profile,quantity,dtype,value,unit,source\nhorowitz-45nm,add,fp32,1,pJ,x\n")
    with pytest.raises(UserError, match="already defined"):
        load_profiles(dup)
    unit = tmp_path / "unit.csv"
    unit.write_text("profile,quantity,dtype,value,unit,source\nx,add,fp32,1,furlongs,x\n")
    with pytest.raises(UserError, match="unit 'furlongs'"):
        load_profiles(unit)
    with pytest.raises(UserError, match="does not exist"):
        load_profiles(tmp_path / "missing.csv")


def test_meter_window_prices_recorded_work():
    counts = Counts(images=2, stats=[_stat(flops=1000, read=64, written=32),
                                     _stat(flops=200, read=8, role="gating", op="aten.index_select.default")])
    meter = ProxyMeter()
    with meter:
        meter.record_work(counts)
    r = meter.reading
    assert r.ok and r.meter == "proxy"
    assert set(r.energy_j) == {"compute", "memory"}  # no static power in the default profile
    assert r.energy_j["compute"] == pytest.approx(1200 * 2.3e-12, rel=1e-12)  # 1000 + 200 FLOPs
    assert r.energy_j["memory"] == pytest.approx(104 * 1.25e-12, rel=1e-12)  # 96 + 8 bytes
    assert r.details["profile"] == "horowitz-45nm"
    assert r.details["compute_j_by_role"]["gating"] == pytest.approx(200 * 2.3e-12, rel=1e-12)
    assert r.details["memory_j_by_role"]["compute"] == pytest.approx(96 * 1.25e-12, rel=1e-12)
    assert (r.details["flops"], r.details["bytes"]) == (1200, 104)

    again = ProxyMeter()
    again.start()
    again.record_work(counts)
    assert again.stop().energy_j == r.energy_j  # bit-identical


def test_meter_without_work_is_unavailable_not_zero():
    meter = ProxyMeter()
    meter.start()
    r = meter.stop()
    assert r.status.startswith("unavailable: no work recorded")
    assert r.total_energy_j is None
    with pytest.raises(RuntimeError, match="outside"):
        meter.record_work(Counts(images=1))


def test_meter_with_static_power(tmp_path):
    path = tmp_path / "mine.csv"
    path.write_text(USER_CSV)
    meter = ProxyMeter(profile="my-gpu", profiles_path=path)
    meter.start()
    meter.record_work(Counts(images=1, stats=[_stat(flops=10)]))
    r = meter.stop()
    assert r.energy_j["static"] == 2.0 * r.duration_s  # 2 W x the window


def test_memory_level_is_named_and_the_dram_priced_figure_sits_beside_it():
    from un0_bench.harness.measuring.protocol import counts_fields
    from un0_bench.harness.meters.proxy import MEMORY_CAVEAT

    assert get_profile("horowitz-45nm").memory_level == "SRAM 8 KB"
    assert get_profile("horowitz-45nm-dram").memory_level == "DRAM"
    assert get_profile("analog-oscillator").memory_level == "unstated"
    counts = Counts(images=2, stats=[_stat(flops=1000, read=64, written=32)])
    f = counts_fields(counts, "horowitz-45nm")
    assert f["proxy_memory_level"] == "SRAM 8 KB" and f["proxy_memory_caveat"] == MEMORY_CAVEAT
    assert "neither an upper nor a lower bound" in MEMORY_CAVEAT
    # 96 bytes = 12 accesses: SRAM 12 x 10 pJ = 120 pJ, DRAM 12 x 1.95 nJ = 23.4 nJ; per image (2) half that.
    assert f["proxy_j_per_image_by_part"]["memory"] == pytest.approx(60e-12, rel=1e-12)
    assert f["proxy_dram_j_per_image_by_part"]["memory"] == pytest.approx(11.7e-9, rel=1e-12)
    assert f["proxy_dram_j_per_image_by_part"]["compute"] == f["proxy_j_per_image_by_part"]["compute"]
    assert "proxy_dram_j_per_image_by_part" not in counts_fields(counts, "horowitz-45nm-dram")
