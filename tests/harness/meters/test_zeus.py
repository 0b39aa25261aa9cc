"""The zeus meter on a patched ZeusMonitor: exact joules from a deterministic energy sequence."""

from __future__ import annotations

from unittest import mock

import pytest

zeus_energy = pytest.importorskip("zeus.monitor.energy")

from un0_bench.harness.meters.zeus import ZeusMeter  # noqa: E402


def monitor_with(windows: list[tuple[float, dict[int, float], dict[int, float] | None]], gpus=(0,), cpus=(0,)):
    """A ZeusMonitor (autospec) whose end_window returns the given (time, gpu J, cpu J) windows in order."""
    patcher = mock.patch("zeus.monitor.ZeusMonitor", autospec=True)
    cls = patcher.start()
    monitor = cls.return_value
    monitor.gpu_indices, monitor.cpu_indices, monitor.soc_is_present = list(gpus), list(cpus), False
    monitor.end_window.side_effect = [zeus_energy.Measurement(time=t, gpu_energy=g, cpu_energy=c)
                                      for t, g, c in windows]
    return patcher, cls, monitor


def test_two_windows_give_exact_joules_per_domain():
    patcher, cls, monitor = monitor_with([(0.5, {0: 12.5}, {0: 3.0}), (0.25, {0: 1.0}, None)])
    try:
        meter = ZeusMeter()
        assert meter.probe() == "ok"
        meter.start()
        first = meter.stop()
        meter.start()
        second = meter.stop()
    finally:
        patcher.stop()
    assert first.energy_j == {"gpu:0": 12.5, "cpu:0": 3.0} and first.total_energy_j == 15.5
    assert first.duration_s == 0.5
    assert second.energy_j == {"gpu:0": 1.0} and second.total_energy_j == 1.0
    # One Zeus window per meter window, each under its own key, never synchronised twice.
    keys = [c.args[0] for c in monitor.begin_window.call_args_list]
    assert keys == ["un0-bench-0", "un0-bench-1"]
    assert [c.args[0] for c in monitor.end_window.call_args_list] == keys
    assert all(c.kwargs == {"sync_execution": False} for c in monitor.end_window.call_args_list)
    cls.assert_called_once_with(sync_execution_with="torch")


def test_no_energy_source_is_unavailable_with_the_reason():
    patcher, _, _ = monitor_with([], gpus=(), cpus=())
    try:
        status = ZeusMeter().probe()
    finally:
        patcher.stop()
    assert status == ("unavailable: zeus sees no energy source here (no NVML or AMD GPU, no readable RAPL, "
                      "no Apple SoC)")


def test_missing_zeus_says_how_to_install_it():
    with mock.patch.dict("sys.modules", {"zeus": None, "zeus.monitor": None}):
        status = ZeusMeter().probe()
    assert status.startswith("unavailable: zeus is not installed (pip install 'un0-bench[zeus]'")


def test_list_says_how_to_install_zeus_when_it_is_missing(capsys):
    from un0_bench.cli import main

    with mock.patch.dict("sys.modules", {"zeus": None, "zeus.monitor": None}):
        assert main(["list"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "unavailable: zeus is not installed (pip install 'un0-bench[zeus]';" in out.replace("│ │", "")
