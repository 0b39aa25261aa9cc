"""The verdict logic on hand-made records: a claim's verdict names meter and boundary.

Fixture CIs are [0.9 e, 1.1 e] for every measured figure; the proxy's CI is zero width. The
reference sd: proxy compute 1.0 J; codecarbon 5.0 J gross, 2.0 J net of idle (net CI [1.8, 2.2]).
"""

import pytest
from un0_bench.reports.build import with_ledgers
from un0_bench.reports.claims import FAILS, HOLDS, WITHIN, cell_status, evaluate_claims, factor_ci, is_reference
from un0_bench.reports.plots import generator_front

from tests.reports.fixtures import proxy, record

CLAIM = {"claim": "Un-0 uses 1,000x less energy", "source": "test", "models": ["un0*"], "measure": "energy",
         "boundary": "compute", "claimed_low": 1000.0, "claimed_high": 1000.0}
EST = {"estimate": True}


def sd_records(measured: bool = True):
    out = [proxy("sd", compute=1.0, fid=4.0)]
    if measured:
        out.append(record("sd", "codecarbon", 5.0, meter_details=EST, energy_net_j_per_image=2.0))
    return out


def verdict(records, claims=(CLAIM,)):
    with_ledgers(records, "sd", pue=1.0, lifetime_images=1_000_000)
    return evaluate_claims(records, "sd", list(claims))[0]


def cells(row, meter):
    return next(t for t in row["table"] if t["meter"] == meter)["cells"]


def test_factor_ci_and_cell_status():
    # ref [1.8, 2.2] / model [0.0009, 0.0011]: lo 1.8 / 0.0011 = 1636.36..., hi 2.2 / 0.0009 = 2444.44...
    lo, hi = factor_ci((0.0009, 0.0011), (1.8, 2.2))
    assert lo == pytest.approx(1636.3636, rel=1e-6) and hi == pytest.approx(2444.4444, rel=1e-6)
    assert cell_status((1000.0, 1000.0), 1000.0) == HOLDS
    assert cell_status((999.0, 999.0), 1000.0) == FAILS
    assert cell_status((818.0, 1222.0), 1000.0) == WITHIN


def test_holds_everywhere():
    # un0: proxy 0.0005 J -> 1.0 / 0.0005 = 2,000x; codecarbon net 0.001 -> 2.0 / 0.001 = 2,000x
    # (CI 1.8/0.0011 = 1,636x to 2.2/0.0009 = 2,444x); gross 5.0 / 0.001 = 5,000x (CI 4.5/0.0011 = 4,091x to
    # 5.5/0.0009 = 6,111x).
    row = verdict([*sd_records(), proxy("un0", compute=0.0005, fid=4.2),
                   record("un0", "codecarbon", 0.001, meter_details=EST, energy_net_j_per_image=0.001)])
    assert row["model"] == "un0" and row["overall"] == HOLDS
    p, cc = cells(row, "proxy"), cells(row, "codecarbon")
    assert p["compute"]["factor"] == 2000.0 and p["compute"]["ci"] == (2000.0, 2000.0)  # the proxy's CI is 0
    assert cc["compute"]["factor"] is None and cc["memory"]["factor"] == 2000.0
    assert cc["memory"]["ci"] == pytest.approx((1636.3636, 2444.4444), rel=1e-6)
    assert cc["idle"]["factor"] == 5000.0 and cc["idle"]["ci"] == pytest.approx((4090.909, 6111.111), rel=1e-6)
    assert [t["kind"] for t in row["table"]] == ["counted", "measured"]
    assert row["table"][1]["estimate"] is True
    assert row["verdict"] == (
        "Holds: holds at boundary 1 (active compute) on the op-count proxy (2,000x), at boundary 3 (+ memory) on the"
        " measured codecarbon energy (estimate) (2,000x, 95% CI 1,636x–2,444x), at the widest boundary 6"
        " (+ amortised training) on the op-count proxy (2,000x) and on the measured codecarbon energy (estimate)"
        " (5,000x, 95% CI 4,091x–6,111x)")
    assert "fails" not in row["verdict"]


def test_holds_only_on_the_proxy_reads_as_failing():
    # codecarbon net 0.01 -> 2.0 / 0.01 = 200x (CI 1.8/0.011 = 164x to 2.2/0.009 = 244x); gross 5/0.01 = 500x
    row = verdict([*sd_records(), proxy("un0", compute=0.0005, fid=4.2),
                   record("un0", "codecarbon", 0.01, meter_details=EST, energy_net_j_per_image=0.01)])
    assert row["overall"] == FAILS
    assert row["verdict"].startswith("Fails: holds at boundary 1 (active compute) on the op-count proxy (2,000x)")
    assert ("fails at boundary 3 (+ memory) on the measured codecarbon energy (estimate) (200x, 95% CI 164x–244x)"
            ", at the widest boundary 6 (+ amortised training) on the measured codecarbon energy (estimate)"
            " (500x, 95% CI 409x–611x)") in row["verdict"]


def test_within_uncertainty():
    # net 0.002 -> 2.0 / 0.002 = 1,000x, CI 1.8/0.0022 = 818x to 2.2/0.0018 = 1,222x; gross 0.005 the same
    row = verdict([*sd_records(), proxy("un0", compute=0.0005, fid=4.2),
                   record("un0", "codecarbon", 0.005, meter_details=EST, energy_net_j_per_image=0.002)])
    assert row["overall"] == WITHIN
    assert row["verdict"].startswith("Within uncertainty:")
    assert "within uncertainty at boundary 3 (+ memory) on the measured codecarbon energy (estimate)" \
        " (1,000x, 95% CI 818x–1,222x)" in row["verdict"]


def test_not_quality_matched_is_said_and_matched_wins():
    recs = [*sd_records(measured=False), proxy("un0", compute=0.0001, fid=40.0, matched=False)]
    row = verdict(list(recs))
    # 1.0 / 0.0001 = 10,000x, but un0 is not quality-matched
    assert row["model"] == "un0" and row["quality_matched"] is False and row["overall"] == HOLDS
    assert row["verdict"] == ("Holds: holds at boundary 1 (active compute) on the op-count proxy (10,000x), at"
                              " the widest boundary 6 (+ amortised training) on the op-count proxy (10,000x)"
                              " — un0 is not quality-matched")
    # A matched model is preferred over a better unmatched one: 1.0 / 0.002 = 500x, which fails.
    row = verdict([*recs, proxy("un0:steps=2", compute=0.002, fid=4.1)])
    assert row["model"] == "un0:steps=2" and row["overall"] == FAILS and row["quality_matched"] is True


def test_no_measured_meter_uses_the_proxy():
    row = verdict([*sd_records(measured=False), proxy("un0", compute=0.002, fid=4.2)])
    # 1.0 / 0.002 = 500x < 1,000x; only the proxy measured it
    assert [t["meter"] for t in row["table"]] == ["proxy"]
    assert row["overall"] == FAILS and row["verdict"].startswith("Fails: fails at boundary 1 (active compute)")


def test_references_never_win_nor_sit_on_the_frontier():
    claim = {**CLAIM, "models": ["*"]}
    recs = [*sd_records(), proxy("noise", compute=1e-9, fid=20.0, matched=False),
            proxy("real", compute=1e-9, fid=0.01, config={"generator": {"technique": "reference", "parameters": 0}}),
            proxy("sd-int8", compute=0.4, fid=4.1)]
    row = verdict(recs, [claim])
    # noise and real would give 1e9x; sd-int8 is the only generator: 1.0 / 0.4 = 2.5x
    assert row["model"] == "sd-int8" and row["factor"] == 2.5
    noise = next(r for r in recs if r["model"] == "noise")
    assert all(e["factor_vs_reference"] is None for e in noise["ledger"].values())
    assert noise["ledger"]["compute"]["energy_j_per_image"] == 1e-9
    # Without the bounds, sd (1.0 J, FID 4.0) and sd-int8 (0.4 J, FID 4.1) are both on the frontier.
    assert [p[2] for p in generator_front(recs, "proxy", is_reference)] == ["sd-int8", "sd"]


def test_where_the_joules_go_per_image_by_phase_and_part():
    from un0_bench.reports.plots import joules_stacked, where_the_joules_go

    phases = {"denoise_step": {"energy_j": {"proxy": 0.8, "codecarbon": 3.0}},
              "decode": {"energy_j": {"proxy": 0.16}}, "other": {"energy_j": {"proxy": None}}}
    recs = [proxy("sd", compute=0.1, gating=0.02, memory=0.0, phases=phases),  # images = 8 in the fixture
            proxy("noise", compute=1e-9, fid=20.0, phases=phases)]
    recs[0]["proxy_j_per_image_by_part"]["gating_memory"] = 0.005
    split = where_the_joules_go(recs, is_reference)
    # 0.8 J / 8 images = 0.1 J; 0.16 / 8 = 0.02 J; a phase the proxy did not window is left out.
    assert list(split) == ["sd"]  # noise is a bound
    assert split["sd"]["phase"] == pytest.approx({"denoise_step": 0.1, "decode": 0.02})
    # memory 0.0 + gating_memory 0.005 = 0.005 J; zero parts are dropped
    assert split["sd"]["part"] == pytest.approx({"compute": 0.1, "gating": 0.02, "memory": 0.005})
    assert joules_stacked(split)[:8] == b"\x89PNG\r\n\x1a\n"
    assert joules_stacked({}) is None


def test_where_the_joules_go_by_layer_group_keeps_the_six_costliest():
    from un0_bench.reports.plots import joules_stacked, where_the_joules_go

    rec = proxy("sd", compute=0.1)
    # Eight groups of 8, 7, ..., 1 J: the six costliest by name, the last two (2 + 1 J) as "other modules".
    rec["proxy_j_per_image_by_module"] = {f"UNet2DModel.g{k}": float(k) for k in range(1, 9)}
    split = where_the_joules_go([rec], is_reference)
    assert split["sd"]["module"] == {**{f"UNet2DModel.g{k}": float(k) for k in range(8, 2, -1)}, "other modules": 3.0}
    assert joules_stacked(split)[:8] == b"\x89PNG\r\n\x1a\n"


def test_ladder_plots_every_meter_that_has_a_factor():
    from un0_bench.harness.ledger import BOUNDARIES, BOUNDARY_LABELS
    from un0_bench.reports.plots import ladder

    row = verdict([*sd_records(), proxy("un0", compute=0.0005, fid=4.2),
                   record("un0", "codecarbon", 0.01, meter_details=EST, energy_net_j_per_image=0.01)])
    assert ladder(row["table"], list(BOUNDARIES), BOUNDARY_LABELS, 1000.0)[:8] == b"\x89PNG\r\n\x1a\n"
    empty = [{**t, "cells": {b: {**c, "factor": None} for b, c in t["cells"].items()}} for t in row["table"]]
    assert ladder(empty, list(BOUNDARIES), BOUNDARY_LABELS, 1000.0) is None


def test_proxy_against_measured_fit():
    from un0_bench.reports.plots import proxy_vs_measured

    recs = [proxy("sd", compute=1.0), record("sd", "codecarbon", 100.0),
            proxy("a", compute=0.1), record("a", "codecarbon", 10.0),
            proxy("b", compute=0.01), record("b", "codecarbon", 2.0),
            proxy("noise", compute=1e-9, fid=20.0), record("noise", "codecarbon", 1.0)]
    fit = proxy_vs_measured(recs, is_reference)["codecarbon"]
    # log10 points (0, 2), (-1, 1), (-2, 0.30103); noise is a bound and left out.
    # slope = cov/var: x mean -1, y mean 1.100343, dy = 0.899657, -0.100343, -0.799313;
    # sum dx*dy = 0.899657 + 0 + 0.799313 = 1.698970, sum dx^2 = 2 -> slope 0.849485. Ratios 100, 100, 200 -> 100.
    assert fit["n"] == 3 and fit["ratio"] == pytest.approx(100.0)
    assert fit["slope"] == pytest.approx(0.849485, rel=1e-5)
    # intercept = 1.100343 + 0.849485 = 1.949828; fitted 1.949828, 1.100343, 0.250858; residuals 0.050172,
    # -0.100343, 0.050172 -> SSres 0.015103; SStot 0.809383 + 0.010069 + 0.638901 = 1.458353 -> r² 0.989644
    assert fit["intercept"] == pytest.approx(1.949828, rel=1e-5)
    assert fit["r2"] == pytest.approx(0.989644, rel=1e-5)


def test_point_labels_do_not_overlap():
    import matplotlib.pyplot as plt
    from un0_bench.reports.plots import _place_labels

    fig, ax = plt.subplots(figsize=(4, 3))
    pts = [(1.0, 1.0, "sd-distilled+int8"), (1.0, 1.0, "sd-distilled:steps=1+int8"), (1.02, 1.0, "sd-int8"),
           (1.01, 1.01, "sd-pruned-unstructured")]
    ax.scatter([p[0] for p in pts], [p[1] for p in pts])
    ax.set_xlim(0.5, 2)
    ax.set_ylim(0.5, 2)
    _place_labels(ax, fig, pts)
    fig.canvas.draw()
    boxes = [t.get_window_extent() for t in ax.texts]
    assert len(boxes) == 4
    assert not any(a.overlaps(b) for i, a in enumerate(boxes) for b in boxes[i + 1:])
    plt.close(fig)


def test_a_measured_figure_without_an_interval_neither_holds_nor_fails():
    from un0_bench.reports.claims import energy_ci

    # One window: the record has no interval, so its figure is not treated as exact.
    one = record("un0", "codecarbon", 0.5, energy_ci95_j=None)
    one["ledger"] = {"idle": {"energy_j_per_image": 0.5}}
    assert energy_ci(one, "idle") == (0.0, float("inf"))
