"""``un0-bench check --run DIR``: the energy gate on a user's own generator's records."""

from __future__ import annotations

import json

import torch

import un0_bench
from un0_bench.cli import main

FAST = {"min_repeats": 2, "min_duration_s": 0.0, "warmup": 1, "idle_s": 0.0}


def matmuls(k: int):
    """2 images a call, ``k`` (2, 8) @ (8, 8) matmuls: 2 * 2 * 8 * 8 = 256 FLOPs each, 128k FLOPs an image."""
    weight = torch.eye(8)

    def make() -> torch.Tensor:
        z = torch.ones(2, 8)
        for _ in range(k):
            z = z @ weight
        return z.reshape(2, 1, 2, 4)

    return make


def test_baseline_from_a_run_folder_passes_itself_and_catches_a_regression(tmp_path, capsys):
    un0_bench.measure(matmuls(1), images_per_call=2, out=tmp_path / "before", meters="proxy,wall", **FAST)
    baseline = tmp_path / "my-baseline.json"
    assert main(["check", "--run", str(tmp_path / "before"), "--baseline", str(baseline), "--update"]) == 0
    figures = json.loads(baseline.read_text())["models"]["mine"]
    assert figures["flops_per_image"] == 128.0
    assert set(figures) == {"proxy_j_per_image", "flops_per_image", "wall_s_per_image"}
    assert main(["check", "--run", str(tmp_path / "before"), "--baseline", str(baseline)]) == 0
    assert "energy gate passed: 1 models" in capsys.readouterr().out

    un0_bench.measure(matmuls(3), images_per_call=2, out=tmp_path / "after", meters="proxy", **FAST)
    assert main(["check", "--run", str(tmp_path / "after"), "--baseline", str(baseline)]) == 1
    err = capsys.readouterr().err
    assert "FAILED" in err
    row = next(line.split() for line in err.splitlines() if "flops_per_image" in line)
    assert row[0] == "mine" and float(row[2]) == 128.0 and float(row[3]) == 384.0 and row[4] == "3.0000"
    # The wall figure is missing from the second run (proxy only): a regression too, named.
    assert "wall_s_per_image missing from the current run" in err


def test_a_run_baseline_is_not_the_suites(tmp_path, capsys):
    un0_bench.measure(matmuls(1), images_per_call=2, out=tmp_path / "run", meters="proxy", **FAST)
    assert main(["check", "--run", str(tmp_path / "run"), "--baseline", "bench/baseline.json"]) == 2
    assert "was made with another protocol" in capsys.readouterr().err
