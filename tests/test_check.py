"""The CI energy gate fails when a model gets more expensive, and says which."""

from __future__ import annotations

import json

from tests.test_cli import needs_teacher
from un0_bench import check
from un0_bench.cli import main


def test_compare_flags_regressions_and_improvements():
    base = {"a": {"proxy_j_per_image": 1.0, "flops_per_image": 100.0},
            "b": {"proxy_j_per_image": 1.0, "flops_per_image": 100.0},
            "gone": {"proxy_j_per_image": 1.0, "flops_per_image": 1.0}}
    cur = {"a": {"proxy_j_per_image": 1.005, "flops_per_image": 100.0},  # +0.5%: within 1%
           "b": {"proxy_j_per_image": 0.5, "flops_per_image": 120.0},    # cheaper J, +20% FLOPs
           "new": {"proxy_j_per_image": 1.0, "flops_per_image": 1.0}}
    regressions, improvements, notes = check.compare(base, cur, tolerance=0.01)
    assert [(c.model, c.metric) for c in regressions] == [("b", "flops_per_image"),
                                                          ("gone", "missing from the current suite")]
    assert [(c.model, c.metric, c.ratio) for c in improvements] == [("b", "proxy_j_per_image", 0.5)]
    assert notes == ["new: new model, not in the baseline (run with --update to add it)"]


@needs_teacher
def test_gate_passes_unchanged_and_fails_when_a_model_costs_more(tmp_path, capsys):
    baseline = tmp_path / "baseline.json"
    assert main(["check", "--baseline", str(baseline), "--models", "sd:steps=2", "--update"]) == 0
    assert main(["check", "--baseline", str(baseline), "--models", "sd:steps=2"]) == 0
    assert "energy gate passed" in capsys.readouterr().out
    # Pretend the committed baseline came from a 1-step teacher: today's 2-step run costs ~2x more.
    data = json.loads(baseline.read_text())
    for k in ("proxy_j_per_image", "flops_per_image"):
        data["models"]["sd:steps=2"][k] /= 2
    baseline.write_text(json.dumps(data))
    assert main(["check", "--baseline", str(baseline), "--models", "sd:steps=2"]) == 1
    err = capsys.readouterr().err
    assert "FAILED: 2 regression(s)" in err and "sd:steps=2" in err


def test_missing_or_foreign_baseline_is_a_clear_error(tmp_path, capsys):
    assert main(["check", "--baseline", str(tmp_path / "none.json"), "--models", "sd"]) == 2
    assert "does not exist" in capsys.readouterr().err
    bad = tmp_path / "b.json"
    bad.write_text(json.dumps({"protocol": {"images": 3}, "models": {}}))
    assert main(["check", "--baseline", str(bad), "--models", "sd"]) == 2
    assert "another protocol" in capsys.readouterr().err


