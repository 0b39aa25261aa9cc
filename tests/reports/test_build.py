import re

from un0_bench.reports.build import build_report
from un0_bench.reports.claims import evaluate_claims
from un0_bench.reports.plots import pareto_front

from tests.reports.fixtures import CODECARBON_TDP, proxy, record, write

TEACHER = {"proxy": {"energy_j": 1000.0}}


def suite():
    return [
        proxy("sd", compute=1.0, memory=1.0, fid=4.0, derivation=TEACHER),
        record("sd", "codecarbon", 5.0, meter_details=CODECARBON_TDP, energy_net_j_per_image=2.0),
        record("sd", "rapl", None, status="unavailable: no powercap sysfs"),
        proxy("un0", compute=0.0005, gating=0.0001, memory=0.01, fid=4.5),
        proxy("sd-int8", compute=0.4, memory=0.3, fid=4.2),
        proxy("noise", compute=1e-6, fid=200.0, matched=False),
        proxy("<script>alert('x')</script>", compute=0.1, fid=9.0),
    ]


def test_report_is_self_contained_escaped_and_complete(tmp_path):
    write(tmp_path, suite())
    html = build_report(tmp_path, {"pue": 1.1}).read_text()
    # All user text escaped: the model name appears only in escaped form.
    assert "<script>alert" not in html and "&lt;script&gt;alert" in html
    # Self-contained: every image is a data URI, nothing is fetched from elsewhere.
    srcs = re.findall(r'src="([^"]*)"', html)
    assert srcs and all(s.startswith("data:image/png;base64,") for s in srcs)
    assert "http://" not in html and "https://" not in html
    for section in ("Summary", "Ledger", "Claims versus measured", "Plots", "Environment", "Meters", "Configuration"):
        assert section in html
    # An unavailable meter's reason appears once (the meters table), not as a column or row per model.
    assert html.count("unavailable: no powercap sysfs") == 1 and "J/image rapl" not in html
    # The ledger's device-meter reason is a numbered note under its table, once per meter, not per cell.
    assert html.count("codecarbon sees the whole device and cannot split compute, gating and memory") == 1
    assert "J/image codecarbon (time-based estimate)" in html and "J/image proxy (counted)" in html
    # Headline: un0 vs sd at the compute boundary, 1.0 / 0.0005 = 2,000x.
    assert "2,000x" in html
    assert (tmp_path / "results.csv").read_text().count("\n") == len(suite()) + 1


def test_csv_carries_quality_beside_energy(tmp_path):
    import pandas as pd

    write(tmp_path, [*suite(), record("sd:steps=2", "wall", None, fid=None, matched=None)])
    build_report(tmp_path)
    csv = pd.read_csv(tmp_path / "results.csv").set_index(["model", "meter"])
    un0 = csv.loc[("un0", "proxy")]
    assert (un0["fid"], un0["kid"], un0["kid_std"], un0["quality_samples"]) == (4.5, 0.01, 0.001, 100)
    assert bool(un0["quality_matched"]) is True
    assert bool(csv.loc[("noise", "proxy")]["quality_matched"]) is False
    assert pd.isna(un0["fid_std"]) and pd.isna(un0["quality_marginal"])
    # A record without quality leaves the cells empty, not 0.
    unmeasured = csv.loc[("sd:steps=2", "wall")]
    assert pd.isna(unmeasured["fid"]) and pd.isna(unmeasured["accuracy"]) and pd.isna(unmeasured["quality_matched"])


def test_claims_pick_the_best_quality_matched_model():
    records = suite()
    from un0_bench.reports.build import with_ledgers

    records = with_ledgers(records, "sd", pue=1.0, lifetime_images=1_000_000)
    rows = {r["claim"].split()[0]: r for r in evaluate_claims(records, "sd")}
    un0 = rows["Un-0"]
    # 1.0 / 0.0005 = 2,000x at active compute; at the widest boundary sd is 2.0 J + 1,000 J / 1e6 images
    # = 2.001 J against un0's 0.0106 J: 188.77x. Only the proxy measured un0, so the proxy decides.
    assert un0["model"] == "un0" and un0["factor"] == 1.0 / 0.0005 and un0["overall"] == "holds"
    assert un0["headline"] == "Holds on counted work at active compute: 2,000x ≥ 1,000x" and un0["others"] == []
    q = rows["Quantization"]
    # int8: 1.0 / 0.4 = 2.5x at the compute boundary, inside the claimed 2-4x: judged against its low end
    assert q["model"] == "sd-int8" and q["factor"] == 2.5 and q["overall"] == "holds"
    assert q["headline"] == "Holds on counted work at active compute: 2.5x ≥ 2x (the low end of the claimed 2–4x)"
    assert rows["Pruning"]["verdict"] == "Not measured in this run" and rows["Pruning"]["overall"] == "not measured"


def test_pareto_front():
    pts = [(1.0, 10.0, "a"), (2.0, 5.0, "b"), (3.0, 6.0, "c"), (0.5, 50.0, "d")]
    assert [p[2] for p in pareto_front(pts)] == ["d", "a", "b"]  # c is dominated by b


def test_marginal_verdicts_are_marked(tmp_path):
    import pandas as pd

    q = {"fid": 0.26, "fid_std": 0.012, "seeds": 3, "kid": 0.0, "kid_std": 0.001, "accuracy": 0.98, "samples": 1000}
    records = [proxy("sd", compute=1.0, fid=0.2),
               proxy("un0", compute=0.001, fid=0.26, matched=False, quality=q, quality_marginal=True)]
    write(tmp_path, records)
    html = build_report(tmp_path).read_text()
    assert "no (marginal)" in html
    assert "within FID&#39;s draw-to-draw noise" in html or "within FID's draw-to-draw noise" in html
    assert "(sd 0.012 over 3 draws)" in html
    csv = pd.read_csv(tmp_path / "results.csv").set_index("model")
    assert (csv.loc["un0", "fid_std"], csv.loc["un0", "quality_seeds"]) == (0.012, 3)
    assert bool(csv.loc["un0", "quality_marginal"]) is True


def test_summary_md_carries_the_verdict_table(tmp_path):
    from tests.reports.test_browser import browser_suite

    write(tmp_path, browser_suite())
    build_report(tmp_path)
    md = (tmp_path / "summary.md").read_text()
    # un0 vs sd: proxy 1.0 / 0.0005 = 2,000x at compute; codecarbon net 2.0 / 0.01 = 200x, gross 5.0 / 0.01 =
    # 500x, each x [0.861567, 1.160676] on the log scale (test_verdicts): 172-232x and 431-580x.
    assert "| codecarbon (time-based estimate) | — | — | ❌ 200x (172–232x) | ❌ 500x (431–580x) |" in md
    assert "| proxy (counted) | ✅ 2,000x |" in md
    # The sentences lead, before any table: the time-based estimate heads the claim, counted work beneath it.
    lead = ("- **Un-0 uses 1,000x less energy per image than today&#x27;s diffusion models** — ❌ Fails on time-based"
            " estimate (codecarbon) at net of idle: 200x (95% CI 172–232x) &lt; 1,000x\n"
            "  - Holds on counted work at active compute: 2,000x ≥ 1,000x\n")
    assert lead.replace("&#x27;", "'") in md and md.index(lead.replace("&#x27;", "'")) < md.index("|")
    # Codecarbon's class is explained with this host's reason; each class and boundary has its line.
    assert ("- `codecarbon` on this host is a *time-based estimate*: no RAPL counter and no NVML GPU readable here: "
            "codecarbon's CPU joules are its assumed TDP (8 W) x CPU load") in md
    for line in ("- *counted*: ", "- *measured*: ", "- *time-based estimate*: ", "- boundary 1 active compute: ",
                 "- boundary 6 + amortised training: "):
        assert line in md
    # No interval with a negative end anywhere.
    assert not re.search(r"\d–-|CI -|\(-\d", md)
    # HTML in model names is shown as text; the unavailable rapl meter has no column.
    assert "<script>" not in md and "&lt;script&gt;" in md and "rapl" not in md
    # Main figures: 3 significant digits, counts with SI suffixes (1e9 FLOPs -> 1G, 1e8 bytes -> 100M).
    assert "| un0 | 8 | 0.0106 | 0.01 | 1G | 100M | 10 |" in md


def load_with_ledgers(out_dir):
    from un0_bench.reports.build import with_ledgers
    from un0_bench.reports.tables import load_records

    return with_ledgers(load_records(out_dir), "sd", pue=1.0, lifetime_images=1_000_000)


def test_net_within_its_uncertainty_is_below_detection_limit(tmp_path):
    # A whole-device meter whose net of idle came out below zero (old record: no verdict recorded), one
    # whose small positive net is within its recorded detection limit, and one well above it: the
    # table says "below detection limit" for the first two instead of printing joules.
    cc = {"meter_details": CODECARBON_TDP}
    low = record("un0", "codecarbon", 0.0005, energy_net_j_per_image=-0.0002743, **cc)
    within = record("un0-osc", "codecarbon", 0.0006, energy_net_j_per_image=0.0001,
                    energy_net_detection_limit_j=0.0004, energy_net_below_detection_limit=True, **cc)
    high = record("sd", "codecarbon", 19.5, energy_net_j_per_image=5.0, energy_net_detection_limit_j=0.5,
                  energy_net_below_detection_limit=False, **cc)
    write(tmp_path, [low, within, high, proxy("sd", compute=0.0157), proxy("un0", compute=2.6e-6),
                     proxy("un0-osc", compute=2.6e-6)])
    html = build_report(tmp_path).read_text()
    assert html.count(">below detection limit</span>") == 2
    assert "net of idle -0.000274 J" in html and "within its ±0.0004 J uncertainty" in html
    assert "-274 µJ" not in html and "5 J" in html  # no negative joules printed; the positive net is
    # The ledger's boundary 3 says the same, with the limit.
    assert "below detection limit: net of idle 0.0001 J (within ±0.0004 J)" in html
    assert "below the meter's resolution" not in html
    # The claim: un0's net is below zero with no interval, so no bound at all (cannot tell), never a negative end.
    claim = {"claim": "un0", "source": "t", "models": ["un0"], "measure": "energy", "boundary": "compute",
             "claimed_low": 1000.0, "claimed_high": 1000.0}
    row = evaluate_claims(load_with_ledgers(tmp_path), "sd", [claim])[0]
    assert row["headline"] == ("Cannot tell on time-based estimate (codecarbon) at net of idle: no bound: un0's net "
                               "energy is below the detection limit")
    # un0-osc's net 0.0001 ± 0.0004 J is at most 0.0005 J: at least sd's 5.0 x 0.9 / 0.0005 = 9,000x.
    row = evaluate_claims(load_with_ledgers(tmp_path), "sd", [{**claim, "models": ["un0-osc"]}])[0]
    assert row["headline"] == ("Holds on time-based estimate (codecarbon) at net of idle: at least 9,000x ≥ 1,000x: "
                               "un0-osc's net energy is below the detection limit of 0.0004 J/image (at most 0.0005 "
                               "J/image)")
    assert not re.search(r"\d–-|CI -", html)

def test_memory_caveat_and_a_dram_priced_proxy_ledger_beside_the_proxys(tmp_path):
    sd = proxy("sd", compute=1.0, memory=0.5, proxy_memory_level="SRAM 8 KB",
               proxy_dram_j_per_image_by_part={"compute": 1.0, "gating": 0.0, "memory": 97.5, "gating_memory": 0.0})
    un0 = proxy("un0", compute=0.001, memory=0.5, proxy_memory_level="SRAM 8 KB",
                proxy_dram_j_per_image_by_part={"compute": 0.001, "gating": 0.0, "memory": 97.5,
                                                "gating_memory": 0.0})
    write(tmp_path, [sd, un0])
    html = build_report(tmp_path).read_text()
    assert "neither an upper nor a lower bound of real traffic" in html
    assert "prices memory as\nSRAM 8 KB" in html
    ledger = html[html.index('id="ledger"'):html.index('id="plots"')]
    assert ledger.index("<h3>proxy</h3>") < ledger.index("<h3>proxy-dram (the same counts")
    # At + memory: SRAM-priced 1.5 / 0.501 = 2.99x; DRAM-priced 98.5 / 97.501 = 1.01x.
    dram = ledger[ledger.index("<h3>proxy-dram"):]
    assert "1.01x" in dram and "2.99x" in ledger[:ledger.index("<h3>proxy-dram")]
    md = (tmp_path / "summary.md").read_text()
    assert "Boundary 3 (+ memory) of the proxy: The proxy counts every op's inputs and outputs" in md


def test_failed_cells_are_listed_apart_until_measured(tmp_path):
    lost = "failed: worker lost 3 times (nodes a, b, a); last: WorkerCrashedError: died"
    write(tmp_path, [*suite()[:2], record("un0", "proxy", None, status=lost, flops=0.0, fid=None, matched=None),
                     record("un0", "wall", None, status=lost, flops=0.0, fid=None, matched=None)])
    build_report(tmp_path)
    summary = (tmp_path / "summary.md").read_text()
    assert ("## Failed cells\n\nNot measured; the same command measures them again.\n\n- `un0` batch 8 (proxy, wall): "
            "worker lost 3 times (nodes a, b, a); last: WorkerCrashedError: died") in summary
    html = (tmp_path / "report.html").read_text()
    assert 'id="failed"' in html and "WorkerCrashedError" in html
    # The failed records are no figures: the results table and CSV hold the measured models only.
    assert "un0" not in (tmp_path / "results.csv").read_text()
    # Measured later (a rerun), a meter of the cell is no longer listed as failed; the other still is.
    write(tmp_path, [proxy("un0", compute=0.0005, fid=4.5)])
    build_report(tmp_path)
    assert "- `un0` batch 8 (wall): worker lost" in (tmp_path / "summary.md").read_text()
    write(tmp_path, [record("un0", "wall", None)])
    build_report(tmp_path)
    assert "Failed cells" not in (tmp_path / "summary.md").read_text()


def test_compare_prints_each_claims_verdict_with_its_factor(tmp_path, capsys):
    from un0_bench.commands.compare import print_verdicts

    write(tmp_path, suite())
    print_verdicts(tmp_path)
    out = capsys.readouterr().out
    # The Un-0 claim (1,000x) against sd: 1.0 / 0.0005 = 2,000x at active compute, by the proxy (the ledger's
    # factors, recomputed from the run's settings: a verdict without them would say "not measured").
    claim = next(block for block in out.split("claim: ")[1:] if block.startswith("Un-0"))
    assert "(un0 vs sd)" in claim and "2,000x" in claim and "not measured" not in claim.splitlines()[1]
