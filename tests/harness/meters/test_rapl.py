"""RAPL meter against a fake powercap sysfs tree in tmp_path (this host has no RAPL)."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
from un0_bench.harness.meters import rapl
from un0_bench.harness.meters.base import MeterUnavailable
from un0_bench.harness.meters.rapl import RaplMeter, counter_delta_uj

# A typical Intel range: 0xFFFFFFFF x 61.035 uJ (energy unit 2^-14 J), as the kernel reports it.
MAX_RANGE_UJ = 262_143_328_850


def write_zone(path: Path, name: str, energy_uj: int, max_range_uj: int = MAX_RANGE_UJ) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "name").write_text(f"{name}\n")
    (path / "energy_uj").write_text(f"{energy_uj}\n")
    (path / "max_energy_range_uj").write_text(f"{max_range_uj}\n")
    return path


def set_uj(zone: Path, energy_uj: int) -> None:
    (zone / "energy_uj").write_text(f"{energy_uj}\n")


@pytest.fixture
def tree(tmp_path: Path) -> dict[str, Path]:
    """One socket: package-0 with core, uncore and dram subzones, plus the symlink sysfs adds at top level."""
    root = tmp_path / "powercap"
    root.mkdir()
    (root / "intel-rapl").mkdir()  # the control-type directory: no counter, must be ignored
    pkg = write_zone(root / "intel-rapl:0", "package-0", 1_000_000)
    core = write_zone(pkg / "intel-rapl:0:0", "core", 500_000)
    write_zone(pkg / "intel-rapl:0:1", "uncore", 40_000)
    dram = write_zone(pkg / "intel-rapl:0:2", "dram", 2_000_000, max_range_uj=65_532_610_987)
    # Real sysfs links every subzone at the top level too; it is the same counter.
    (root / "intel-rapl:0:2").symlink_to(dram, target_is_directory=True)
    return {"root": root, "pkg": pkg, "core": core, "dram": dram}


class FakeClock:
    """A monotonic clock that returns the scripted times, one per call."""

    def __init__(self, *times_s: float) -> None:
        self._times = iter(times_s)

    def __call__(self) -> float:
        return next(self._times)


def test_package_and_dram_energy_exact(tree: dict[str, Path]) -> None:
    meter = RaplMeter(sysfs_root=tree["root"], clock=FakeClock(10.0, 12.5))
    assert meter.probe() == "ok"
    meter.start()
    set_uj(tree["pkg"], 38_500_000)
    set_uj(tree["dram"], 4_250_000)
    set_uj(tree["core"], 30_000_000)  # must not appear: core is inside package
    reading = meter.stop()

    assert reading.ok
    # package: (38_500_000 - 1_000_000) uJ = 37_500_000 uJ = 37.5 J
    # dram:    (4_250_000 - 2_000_000) uJ = 2_250_000 uJ = 2.25 J
    assert reading.energy_j == {"package-0": 37.5, "dram-0": 2.25}
    assert reading.total_energy_j == 39.75
    assert reading.duration_s == 2.5  # 12.5 - 10.0
    assert reading.details["zones"] == {"package-0": "intel-rapl:0", "dram-0": "intel-rapl:0:2"}
    assert reading.details["wraps"] == {"package-0": 0, "dram-0": 0}
    assert reading.details["possible_extra_wraps"] == []
    assert RaplMeter.sees_whole_device is True


def test_wrap_around_uses_max_range_plus_one(tree: dict[str, Path]) -> None:
    set_uj(tree["pkg"], MAX_RANGE_UJ - 2_000_000)
    meter = RaplMeter(sysfs_root=tree["root"], clock=FakeClock(0.0, 1.0))
    meter.start()
    set_uj(tree["pkg"], 3_000_000)  # wrapped through 0
    set_uj(tree["dram"], 2_500_000)
    reading = meter.stop()

    # The counter shows 0..MAX_RANGE inclusive, so it counts modulo MAX_RANGE + 1:
    # (MAX_RANGE - (MAX_RANGE - 2_000_000)) + 1 + 3_000_000 = 5_000_001 uJ = 5.000001 J
    assert reading.energy_j["package-0"] == 5.000001
    assert reading.energy_j["dram-0"] == 0.5  # 2_500_000 - 2_000_000 uJ
    assert reading.details["wraps"] == {"package-0": 1, "dram-0": 0}


def test_counter_delta_edges() -> None:
    assert counter_delta_uj(100, 350, 1000) == 250
    assert counter_delta_uj(1000, 0, 1000) == 1  # last value -> 0 is one step
    assert counter_delta_uj(900, 99, 1000) == 200  # 100 to the top (1000 + 1 - 900 = 101) + 99
    assert counter_delta_uj(5, 5, 1000) == 0


def test_poll_accumulates_across_two_wraps(tree: dict[str, Path]) -> None:
    # Small range so two wraps fit in one window; poll() in between keeps each interval to one wrap.
    max_range = 999_999  # modulus 1_000_000 uJ
    write_zone(tree["pkg"], "package-0", 900_000, max_range_uj=max_range)
    meter = RaplMeter(sysfs_root=tree["root"], clock=FakeClock(0.0, 1.0, 2.0))
    meter.start()
    set_uj(tree["pkg"], 400_000)  # +500_000 (through 0)
    meter.poll()
    set_uj(tree["pkg"], 100_000)  # +700_000 (through 0 again)
    reading = meter.stop()

    # 500_000 + 700_000 = 1_200_000 uJ = 1.2 J
    assert reading.energy_j["package-0"] == 1.2
    assert reading.details["wraps"]["package-0"] == 2
    assert reading.details["reads"] == 3
    assert reading.details["longest_read_gap_s"] == 1.0


def test_long_gap_flags_possible_extra_wrap(tree: dict[str, Path]) -> None:
    # No power limit files in the fake zone, so the meter falls back to the 60 s worst-case period.
    meter = RaplMeter(sysfs_root=tree["root"], clock=FakeClock(0.0, 90.0))
    meter.start()
    set_uj(tree["pkg"], 2_000_000)
    reading = meter.stop()
    assert reading.ok
    assert reading.energy_j["package-0"] == 1.0
    assert reading.details["possible_extra_wraps"] == ["dram-0", "package-0"]
    assert reading.details["longest_read_gap_s"] == 90.0


def test_power_limit_lengthens_wrap_period(tree: dict[str, Path]) -> None:
    # PL1 100 W, PL2 200 W: the bound is 200 W. Package wrap period 262_143.33 J / 200 W / 2 = 655 s
    # (halved for margin); DRAM (65_532.61 J, package bound) 163.8 s. A 120 s gap flags neither.
    (tree["pkg"] / "constraint_0_power_limit_uw").write_text("100000000\n")
    (tree["pkg"] / "constraint_1_power_limit_uw").write_text("200000000\n")
    (tree["pkg"] / "constraint_0_max_power_uw").write_text("0\n")  # 0 means "not reported"
    meter = RaplMeter(sysfs_root=tree["root"], clock=FakeClock(0.0, 120.0, 120.0, 300.0))
    meter.start()
    set_uj(tree["pkg"], 2_000_000)
    reading = meter.stop()
    assert reading.details["possible_extra_wraps"] == []
    # A 180 s gap exceeds DRAM's 163.8 s but not the package's 655 s.
    meter.start()
    set_uj(tree["pkg"], 3_000_000)
    reading = meter.stop()
    assert reading.details["possible_extra_wraps"] == ["dram-0"]


def test_two_sockets_and_psys_skipped(tree: dict[str, Path]) -> None:
    root = tree["root"]
    pkg1 = write_zone(root / "intel-rapl:1", "package-1", 0)
    dram1 = write_zone(pkg1 / "intel-rapl:1:0", "dram", 0)
    write_zone(root / "intel-rapl:2", "psys", 0)  # platform domain overlaps packages: skipped
    write_zone(root / "intel-rapl-mmio:0", "package-0", 0)  # same counter via MMIO: not matched
    meter = RaplMeter(sysfs_root=root, clock=itertools.count().__next__)
    meter.start()
    set_uj(tree["pkg"], 1_500_000)
    set_uj(pkg1, 7_000_000)
    set_uj(dram1, 125_000)
    reading = meter.stop()
    assert reading.energy_j == {"package-0": 0.5, "dram-0": 0.0, "package-1": 7.0, "dram-1": 0.125}


def test_a_package_counter_that_did_not_advance_is_not_a_measurement(tree: dict[str, Path]) -> None:
    meter = RaplMeter(sysfs_root=tree["root"], clock=FakeClock(0.0, 0.5))
    meter.start()
    reading = meter.stop()  # nothing moved in 0.5 s: a frozen or virtualised counter, not 0 J
    assert reading.status == "unavailable: package-0 energy counter did not advance in 0.5 s: no measurement"
    assert reading.energy_j == {}


def dies(root: Path, socket: int, start_uj: list[int]) -> list[tuple[Path, Path]]:
    """One socket with one zone per die (``package-S-die-D``), each with a DRAM subzone."""
    out = []
    for d, uj in enumerate(start_uj):
        index = 2 * socket + d
        pkg = write_zone(root / f"intel-rapl:{index}", f"package-{socket}-die-{d}", uj)
        dram = write_zone(pkg / f"intel-rapl:{index}:0", "dram", 1_000 * (index + 1))
        out.append((pkg, dram))
    return out


def test_mirrored_dies_are_counted_once(tmp_path: Path) -> None:
    # AMD Zen: both dies of socket 0 show the socket's one counter (codecarbon #1274: 68 W + 68 W
    # reported as 137 W). Same start value, same advance: one counter, recorded once as package-0.
    (d0, dram0), (d1, dram1) = dies(tmp_path, 0, [5_000_000, 5_000_000])
    meter = RaplMeter(sysfs_root=tmp_path, clock=FakeClock(0.0, 2.0))
    meter.start()
    set_uj(d0, 141_000_000)
    set_uj(d1, 141_000_000)
    set_uj(dram0, 3_001_000)
    set_uj(dram1, 4_002_000)
    reading = meter.stop()
    # package: (141_000_000 - 5_000_000) uJ = 136 J once, not 272 J; DRAM dies are independent:
    # 3_001_000 - 1_000 = 3 J and 4_002_000 - 2_000 = 4 J, keyed by socket and die.
    assert reading.energy_j == {"package-0": 136.0, "dram-0-die-0": 3.0, "dram-0-die-1": 4.0}
    assert reading.details["mirrored_dies"] == {"package-0": ["package-0-die-0", "package-0-die-1"]}


def test_independent_dies_and_two_sockets_are_summed_under_distinct_keys(tmp_path: Path) -> None:
    (a0, adram0), (a1, _) = dies(tmp_path, 0, [5_000_000, 9_000_000])
    (b0, _), (b1, bdram1) = dies(tmp_path, 1, [2_000_000, 2_000_000])
    meter = RaplMeter(sysfs_root=tmp_path, clock=FakeClock(0.0, 2.0))
    meter.start()
    set_uj(a0, 25_000_000)  # +20 J
    set_uj(a1, 39_000_000)  # +30 J: another counter
    set_uj(b0, 12_000_000)  # +10 J
    set_uj(b1, 17_000_000)  # +15 J: same start, different advance, so not a mirror
    set_uj(adram0, 1_001_000)  # +1 J
    set_uj(bdram1, 2_004_000)  # +2 J (its start: 1_000 x (2 x 1 + 1 + 1) = 4_000 uJ)
    reading = meter.stop()
    assert reading.energy_j == {
        "package-0-die-0": 20.0, "dram-0-die-0": 1.0, "package-0-die-1": 30.0, "dram-0-die-1": 0.0,
        "package-1-die-0": 10.0, "dram-1-die-0": 0.0, "package-1-die-1": 15.0, "dram-1-die-1": 2.0,
    }
    assert reading.details["mirrored_dies"] == {}
    assert len(reading.energy_j) == 8  # no two sockets' or dies' DRAM share a key


def test_amd_rapl_prefix(tmp_path: Path) -> None:
    pkg = write_zone(tmp_path / "amd-rapl:0", "package-0", 10)
    meter = RaplMeter(sysfs_root=tmp_path, clock=FakeClock(0.0, 1.0))
    meter.start()
    set_uj(pkg, 1_000_010)
    assert meter.stop().energy_j == {"package-0": 1.0}


def test_permission_denied_names_cve_and_fix(tree: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    # Tests run as root here, so chmod 000 would not deny; make the single reader raise instead,
    # as it does for a non-root user: energy_uj is 0400 root, max_energy_range_uj stays 0444.
    real_read = rapl._read_uj

    def read_as_user(path: Path) -> int:
        if Path(path).name == "energy_uj":
            raise PermissionError(13, "Permission denied", str(path))
        return real_read(path)

    monkeypatch.setattr(rapl, "_read_uj", read_as_user)
    meter = RaplMeter(sysfs_root=tree["root"])
    status = meter.probe()
    assert status.startswith("unavailable: cannot read ")
    assert str(tree["pkg"] / "energy_uj") in status
    assert "CVE-2020-8694" in status
    assert "chmod o+r" in status and "root" in status
    with pytest.raises(MeterUnavailable, match="CVE-2020-8694"):
        meter.start()
    with pytest.raises(RuntimeError, match="was not started"):
        meter.stop()  # a failed start leaves no window open


def test_permission_lost_mid_window_gives_unavailable_reading(
    tree: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    meter = RaplMeter(sysfs_root=tree["root"], clock=FakeClock(0.0, 4.0))
    meter.start()

    def denied(path: Path) -> int:
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(rapl, "_read_uj", denied)
    reading = meter.stop()
    assert not reading.ok
    assert reading.status.startswith("unavailable: ") and "CVE-2020-8694" in reading.status
    assert reading.energy_j == {}  # never a silent 0 J
    assert reading.total_energy_j is None
    assert reading.duration_s == 4.0


def test_missing_root(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-dir"
    meter = RaplMeter(sysfs_root=missing)
    assert meter.probe() == (f"unavailable: no powercap sysfs at {missing}; RAPL needs Linux on Intel/AMD CPUs")
    with pytest.raises(MeterUnavailable, match="no powercap sysfs"):
        meter.start()


def test_root_without_zones(tmp_path: Path) -> None:
    (tmp_path / "intel-rapl").mkdir()
    status = RaplMeter(sysfs_root=tmp_path).probe()
    assert status.startswith("unavailable: no RAPL package zones (intel-rapl:N) under ")


def test_garbage_counter_is_unavailable_not_a_crash(tree: dict[str, Path]) -> None:
    (tree["dram"] / "energy_uj").write_text("not a number\n")
    status = RaplMeter(sysfs_root=tree["root"]).probe()
    assert status.startswith("unavailable: cannot read RAPL energy_uj under ")
    assert "not a number" in status


def test_default_construction_probe_on_this_host() -> None:
    meter = RaplMeter()
    assert meter.sysfs_root == Path("/sys/class/powercap")
    status = meter.probe()  # must not raise, whatever the host
    if not Path("/sys/class/powercap").exists():
        assert status == ("unavailable: no powercap sysfs at /sys/class/powercap; RAPL needs Linux on Intel/AMD CPUs")
    else:
        assert status == "ok" or status.startswith("unavailable: ")
