"""The verdict logic on hand-made records: one plain sentence per class of evidence, the headline first.

Fixture CIs are [0.9 e, 1.1 e] for every measured figure (the net of idle too, when no net CI is given);
the proxy's CI is zero width. The reference sd: proxy compute 1.0 J; device meters 5.0 J gross, 2.0 J net
of idle (net CI [1.8, 2.2]).

A factor's interval is on the log scale: each side's half-width is the larger side of its interval in
log units, ln(1 / 0.9) = 0.1053605 for every fixture, added in quadrature: 0.1053605 x sqrt(2) =
0.1490023, so a factor F has the interval F x [exp(-0.1490023), exp(0.1490023)] = F x [0.861567, 1.160676].
"""

import math

import pytest
from un0_bench.reports.build import with_ledgers
from un0_bench.reports.claims import (
    CANNOT_TELL,
    COUNTED,
    ESTIMATE,
    FAILS,
    HOLDS,
    MEASURED,
    cell_status,
    evaluate_claims,
    evidence,
    factor_ci,
    is_reference,
)
from un0_bench.reports.plots import generator_front

from tests.reports.fixtures import proxy, record

CLAIM = {"claim": "Un-0 uses 1,000x less energy", "source": "test", "models": ["un0*"], "measure": "energy",
         "boundary": "compute", "claimed_low": 1000.0, "claimed_high": 1000.0}
EST = {"estimate": True}
LO, HI = 0.861567, 1.160676  # the fixture's factor interval, as a multiple of the factor (module docstring)


def sd_records(*meters: str):
    out = [proxy("sd", compute=1.0, fid=4.0)]
    for m in meters:
        out.append(record("sd", m, 5.0, meter_details=EST if m == "codecarbon" else {}, energy_net_j_per_image=2.0))
    return out


def un0(meter: str, net: float, gross: float | None = None, **kw):
    return record("un0", meter, gross or net, meter_details=EST if meter == "codecarbon" else {},
                  energy_net_j_per_image=net, **kw)


def verdict(records, claims=(CLAIM,)):
    return evaluate_claims(with_ledgers(records, "sd", pue=1.0, lifetime_images=1_000_000), "sd", list(claims))[0]


def cells(row, meter):
    return next(t for t in row["table"] if t["meter"] == meter)["cells"]


def test_factor_ci_is_a_ratio_interval_on_the_log_scale():
    mine = {"e": 0.001, "lo": 0.0009, "hi": 0.0011}
    ref = {"e": 2.0, "lo": 1.8, "hi": 2.2}
    # 2.0 / 0.001 = 2,000x; x [0.861567, 1.160676] = [1,723.13, 2,321.35]
    lo, hi = factor_ci(mine, ref)
    assert lo == pytest.approx(2000 * LO, rel=1e-6) and hi == pytest.approx(2000 * HI, rel=1e-6)
    # A wide interval still has two positive ends: ref [0.2, 3.8] around 2.0 -> ln(2 / 0.2) = 2.302585 on the
    # log scale; with the model's 0.1053605 in quadrature 2.304994 -> 2,000 x exp(-2.304994) = 199.52.
    lo, hi = factor_ci(mine, {"e": 2.0, "lo": 0.2, "hi": 3.8})
    assert lo == pytest.approx(199.52, rel=1e-4) and hi == pytest.approx(20048.2, rel=1e-4) and lo > 0
    # One window, no interval: unbounded, so it decides nothing.
    assert factor_ci({"e": 0.001, "lo": None, "hi": None}, ref) == (0.0, math.inf)


def test_cell_status_rule():
    assert cell_status(1000.0, (1000.0, 1000.0), 1000.0) == HOLDS
    assert cell_status(999.0, (999.0, 999.0), 1000.0) == FAILS
    assert cell_status(1100.0, (900.0, 1300.0), 1000.0) == CANNOT_TELL  # interval spans the claim
    assert cell_status(950.0, (700.0, 1300.0), 1000.0) == CANNOT_TELL  # below, but the interval contains it
    assert cell_status(950.0, (700.0, 999.0), 1000.0) == FAILS  # point and whole interval below
    assert cell_status(1200.0, (0.0, math.inf), 1000.0) == CANNOT_TELL  # no interval
    assert cell_status(1500.0, None, 1000.0, bound="at least") == HOLDS
    assert cell_status(800.0, None, 1000.0, bound="at least") == CANNOT_TELL
    assert cell_status(800.0, None, 1000.0, bound="at most") == FAILS
    assert cell_status(1500.0, None, 1000.0, bound="at most") == CANNOT_TELL


@pytest.mark.parametrize(("meter", "on"), [("rapl", "measured energy (rapl)"),
                                           ("codecarbon", "time-based estimate (codecarbon)")])
def test_holds_fails_and_cannot_tell_for_each_device_class(meter, on):
    # holds: net 0.001 -> 2.0 / 0.001 = 2,000x, CI 1,723-2,321x
    row = verdict([*sd_records(meter), proxy("un0", compute=0.0005, fid=4.2), un0(meter, 0.001)])
    assert row["overall"] == HOLDS and row["model"] == "un0"
    assert row["headline"] == f"Holds on {on} at net of idle: 2,000x (95% CI 1,723–2,321x) ≥ 1,000x"
    assert cells(row, meter)["memory"]["ci"] == pytest.approx((2000 * LO, 2000 * HI), rel=1e-6)
    # fails: net 0.01 -> 200x, CI 172-232x; the counted 2,000x beneath it does not rescue it
    row = verdict([*sd_records(meter), proxy("un0", compute=0.0005, fid=4.2), un0(meter, 0.01)])
    assert row["overall"] == FAILS
    assert row["headline"] == f"Fails on {on} at net of idle: 200x (95% CI 172–232x) < 1,000x"
    assert row["others"] == ["Holds on counted work at active compute: 2,000x ≥ 1,000x"]
    # cannot tell: net 0.0019 -> 1,052.6x, CI 906.9-1,221.8x spans 1,000x
    row = verdict([*sd_records(meter), proxy("un0", compute=0.0005, fid=4.2), un0(meter, 0.0019)])
    assert row["overall"] == CANNOT_TELL
    assert row["headline"] == f"Cannot tell on {on} at net of idle: 1,053x, but CI 907–1,222x spans 1,000x"


def test_counted_work_holds_or_fails_and_is_exact():
    # Counted work has no interval: 1.0 / 0.001 = 1,000x holds at the claim exactly; 1.0 / 0.0011 = 909x fails.
    row = verdict([*sd_records(), proxy("un0", compute=0.001, fid=4.2)])
    assert row["headline"] == "Holds on counted work at active compute: 1,000x ≥ 1,000x"
    assert cells(row, "proxy")["compute"]["ci"] == (1000.0, 1000.0)
    row = verdict([*sd_records(), proxy("un0", compute=0.0011, fid=4.2)])
    assert row["overall"] == FAILS and row["headline"] == "Fails on counted work at active compute: 909x < 1,000x"
    assert [t["kind"] for t in row["table"]] == [COUNTED]


def test_a_measured_factor_below_the_claim_never_holds_and_cannot_tell_when_its_interval_contains_it():
    # net 0.0022 -> 2.0 / 0.0022 = 909.1x, CI 783.2-1,055.2x: the point is below the claim but the
    # interval contains it, so it cannot tell (never "holds").
    row = verdict([*sd_records("rapl"), proxy("un0", compute=0.0001, fid=4.2), un0("rapl", 0.0022)])
    assert row["overall"] == CANNOT_TELL
    assert row["headline"] == ("Cannot tell on measured energy (rapl) at net of idle: "
                               "909x, but CI 783–1,055x spans 1,000x")


def test_the_headline_is_the_most_demanding_class():
    # counted 10,000x holds; codecarbon net 0.001 -> 2,000x holds; rapl net 0.01 -> 200x fails: measured leads,
    # then the time-based estimate, then counted work.
    row = verdict([*sd_records("codecarbon", "rapl"), proxy("un0", compute=0.0001, fid=4.2),
                   un0("codecarbon", 0.001), un0("rapl", 0.01)])
    assert [s["evidence"] for s in row["sentences"]] == [MEASURED, ESTIMATE, COUNTED]
    assert row["overall"] == FAILS
    assert row["headline"] == "Fails on measured energy (rapl) at net of idle: 200x (95% CI 172–232x) < 1,000x"
    assert row["others"] == [
        "Holds on time-based estimate (codecarbon) at net of idle: 2,000x (95% CI 1,723–2,321x) ≥ 1,000x",
        "Holds on counted work at active compute: 10,000x ≥ 1,000x"]


def test_net_energy_below_the_detection_limit_gives_a_bound_never_a_negative_end():
    # un0's net 0.0001 J within its ±0.001 J: net CI [-0.0009, 0.0011]. Its energy is at most 0.0011 J, so the
    # factor is at least sd's net low end / that: 1.8 / 0.0011 = 1,636x >= 1,000x: holds.
    below = {"energy_net_ci95_j": [-0.0009, 0.0011], "energy_net_detection_limit_j": 0.001,
             "energy_net_below_detection_limit": True}
    row = verdict([*sd_records("rapl"), proxy("un0", compute=0.0001, fid=4.2), un0("rapl", 0.0001, 0.3, **below)])
    assert row["overall"] == HOLDS
    assert row["headline"] == ("Holds on measured energy (rapl) at net of idle: at least 1,636x ≥ 1,000x: un0's net "
                               "energy is below the detection limit of 0.001 J/image (at most 0.0011 J/image)")
    cell = cells(row, "rapl")["memory"]
    assert cell["bound"] == "at least" and cell["factor"] == pytest.approx(1636.3636, rel=1e-6)
    # With sd's net at 1.0 J (CI 0.9-1.1) the bound is 0.9 / 0.0011 = 818x: it cannot decide.
    sd = [proxy("sd", compute=1.0, fid=4.0), record("sd", "rapl", 5.0, energy_net_j_per_image=1.0)]
    row = verdict([*sd, proxy("un0", compute=0.0001, fid=4.2), un0("rapl", 0.0001, 0.3, **below)])
    assert row["overall"] == CANNOT_TELL and row["headline"].startswith(
        "Cannot tell on measured energy (rapl) at net of idle: at least 818x against 1,000x: un0's net energy")
    assert "-" not in row["headline"].replace("un0", "").replace("net of idle", "")


def test_one_window_cannot_tell():
    row = verdict([*sd_records("rapl"), proxy("un0", compute=0.0001, fid=4.2),
                   un0("rapl", 0.001, energy_ci95_j=None)])
    # 2.0 / 0.001 = 2,000x but no interval
    assert row["overall"] == CANNOT_TELL
    assert row["headline"] == ("Cannot tell on measured energy (rapl) at net of idle: 2,000x ≥ 1,000x, but one "
                               "window gives no interval")


def test_a_range_claim_is_judged_against_its_low_end():
    claim = {**CLAIM, "claim": "Quantization saves 2-4x", "models": ["sd-int8"], "claimed_low": 2.0,
             "claimed_high": 4.0}
    # 1.0 / 0.4 = 2.5x; 1.0 / 0.2 = 5x (above the range, still holds); 1.0 / 0.8 = 1.25x fails
    row = verdict([*sd_records(), proxy("sd-int8", compute=0.4, fid=4.1)], [claim])
    assert row["headline"] == "Holds on counted work at active compute: 2.5x ≥ 2x (the low end of the claimed 2–4x)"
    row = verdict([*sd_records(), proxy("sd-int8", compute=0.2, fid=4.1)], [claim])
    assert row["headline"] == ("Holds on counted work at active compute: 5x ≥ 2x (the low end of the claimed 2–4x), "
                               "above the claimed range")
    row = verdict([*sd_records(), proxy("sd-int8", compute=0.8, fid=4.1)], [claim])
    assert row["overall"] == FAILS and row["headline"].startswith("Fails on counted work at active compute: 1.25x < 2x")


def test_smaller_models_are_judged_on_parameters_only_for_a_smaller_model():
    claim = {"claim": "Distillation gives 10-50x smaller models", "source": "test", "models": ["sd-distilled*"],
             "measure": "parameters", "boundary": "", "claimed_low": 10.0, "claimed_high": 50.0}
    steps = {"generator": {"technique": "distilled", "parameters": 1000, "steps": 4}}
    sd = proxy("sd", compute=1.0, fid=4.0, config={"generator": {"technique": "diffusion", "parameters": 1000,
                                                                 "steps": 50}})
    # A step-distilled student keeps the teacher's 1,000 parameters: not an answer; its steps and energy are named.
    row = verdict([sd, proxy("sd-distilled", compute=0.08, fid=4.1, config=steps)], [claim])
    assert row["model"] is None and row["overall"] == "not measured"
    assert row["headline"] == ("Not measured: no size-distilled student (sd-distilled keeps sd's 1,000 parameters: "
                               "it distils steps, 4 vs 50, for 12.5x less counted energy per image)")
    # A student with 40 parameters: 1,000 / 40 = 25x fewer, within the claimed 10-50x.
    small = {"generator": {"technique": "distilled", "parameters": 40, "steps": 4}}
    row = verdict([sd, proxy("sd-distilled-small", compute=0.01, fid=4.1, config=small)], [claim])
    assert row["overall"] == HOLDS
    assert row["headline"] == ("Holds on counted parameters: sd-distilled-small has 25x fewer parameters than sd "
                               "≥ 10x (the low end of the claimed 10–50x)")


def test_the_class_of_evidence_comes_from_what_the_meter_recorded():
    reason = "no RAPL counter and no NVML GPU readable here: ..."
    recs = [record("a", "codecarbon", 1.0, meter_details={"evidence": ESTIMATE, "evidence_reason": reason}),
            record("a", "rapl", 1.0, meter_details={}),
            record("a", "zeus", 1.0, meter_details={"estimate": True}),
            # codecarbon with RAPL recorded before `evidence` existed: its methods decide (the RAM rule aside).
            record("a", "cc-old", 1.0, meter_details={"estimate": True,
                                                      "methods": {"cpu": "RAPL", "ram": "size model"}}),
            record("a", "cc-tdp", 1.0, meter_details={"estimate": True, "methods": {"cpu": "TDP x load",
                                                                                  "ram": "size model"}, "tdp_w": 8.0})]
    assert evidence(recs, "codecarbon") == {"meter": "codecarbon", "kind": ESTIMATE,
                                            "label": "codecarbon (time-based estimate)", "reason": reason}
    assert evidence(recs, "rapl")["kind"] == MEASURED
    assert evidence(recs, "zeus")["kind"] == ESTIMATE
    assert evidence(recs, "cc-old")["kind"] == MEASURED
    assert evidence(recs, "cc-tdp")["reason"].startswith("no RAPL counter and no NVML GPU readable here: "
                                                         "codecarbon's CPU joules are its assumed TDP (8 W) x CPU load")
    assert evidence(recs, "proxy")["kind"] == COUNTED


def test_not_quality_matched_is_said_and_matched_wins():
    recs = [*sd_records(), proxy("un0", compute=0.0001, fid=40.0, matched=False)]
    row = verdict(list(recs))
    # 1.0 / 0.0001 = 10,000x, but un0 is not quality-matched
    assert row["model"] == "un0" and row["quality_matched"] is False and row["overall"] == HOLDS
    assert row["headline"] == "Holds on counted work at active compute: 10,000x ≥ 1,000x — un0 is not quality-matched"
    # A matched model is preferred over a better unmatched one: 1.0 / 0.002 = 500x, which fails.
    row = verdict([*recs, proxy("un0:steps=2", compute=0.002, fid=4.1)])
    assert row["model"] == "un0:steps=2" and row["overall"] == FAILS and row["quality_matched"] is True


def test_references_never_win_nor_sit_on_the_frontier():
    claim = {**CLAIM, "models": ["*"]}
    recs = [*sd_records("codecarbon"), proxy("noise", compute=1e-9, fid=20.0, matched=False),
            proxy("real", compute=1e-9, fid=0.01, config={"generator": {"technique": "reference", "parameters": 0}}),
            proxy("sd-int8", compute=0.4, fid=4.1)]
    row = verdict(recs, [claim])
    # noise and real would give 1e9x; sd-int8 is the only generator: 1.0 / 0.4 = 2.5x
    assert row["model"] == "sd-int8" and row["factor"] == 2.5
    noise = next(r for r in with_ledgers(recs, "sd", pue=1.0, lifetime_images=1_000_000) if r["model"] == "noise")
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

    # Eight groups of 8, 7, ..., 1 J: the six costliest by name, the last two (2 + 1 J) as "other modules".
    rec = proxy("sd", compute=0.1, proxy_j_per_image_by_module={f"UNet2DModel.g{k}": float(k) for k in range(1, 9)})
    split = where_the_joules_go([rec], is_reference)
    assert split["sd"]["module"] == {**{f"UNet2DModel.g{k}": float(k) for k in range(8, 2, -1)}, "other modules": 3.0}
    assert joules_stacked(split)[:8] == b"\x89PNG\r\n\x1a\n"


def test_ladder_plots_every_meter_that_has_a_factor():
    from un0_bench.reports.ledger import BOUNDARIES, BOUNDARY_LABELS
    from un0_bench.reports.plots import ladder

    row = verdict([*sd_records("codecarbon"), proxy("un0", compute=0.0005, fid=4.2), un0("codecarbon", 0.01)])
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
