"""The baseline-strength table: speed-up and energy factor from records, next to the published figure."""

from __future__ import annotations

from un0_bench.reports.build import build_report
from un0_bench.reports.strength import published, strength_rows

from tests.reports.fixtures import proxy, record, write


def _records():
    sd = [proxy("sd", 4.0, duration_s_per_image=0.30, stack=[{"name": "sd"}]),
          record("sd", "wall", None, duration_s_per_image=0.30, stack=[{"name": "sd"}])]
    tome = [proxy("sd+tome", 2.5, duration_s_per_image=0.25, stack=[{"name": "sd"}, {"name": "tome"}]),
            record("sd+tome", "wall", None, duration_s_per_image=0.25, stack=[{"name": "sd"}, {"name": "tome"}])]
    plain = [proxy("sd:steps=10", 1.0, duration_s_per_image=0.06, stack=[{"name": "sd"}])]
    return sd + tome + plain


def test_rows_divide_the_reference_by_the_model_and_carry_the_published_figure():
    rows = strength_rows(_records(), "sd")
    assert len(rows) == 1  # sd:steps=10 uses no technique with a published figure
    row = rows[0]
    assert (row["model"], row["technique"]) == ("sd+tome", "tome")
    assert row["speedup"] == 0.30 / 0.25
    assert row["energy"] == {"proxy": 4.0 / 2.5}  # wall measures no energy
    assert row["published_speedup"] == "2.0" and "Bolya" in row["source"]


def test_every_published_row_names_its_hardware_and_source():
    rows = published()
    assert set(rows) == {"deepcache", "cached", "tome", "int8"}
    assert all(r["source"] and r["published_hardware"] and float(r["published_speedup"]) > 1 for r in rows.values())


def test_report_and_summary_show_the_table(tmp_path):
    write(tmp_path, _records())
    build_report(tmp_path)
    summary = (tmp_path / "summary.md").read_text()
    assert "## How strong are the baselines" in summary
    assert "| `sd+tome` | tome | 1.20x | proxy 1.60x | 2.0x" in summary
    assert "How strong are the baselines" in (tmp_path / "report.html").read_text()
