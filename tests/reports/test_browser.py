"""Open the report in headless Chromium: the first screen answers the claim (1280 px and 390 px), nothing overflows
a phone.

Screenshots (desktop, mobile) are kept in test-artifacts/.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from un0_bench.reports.build import build_report

from tests.reports.fixtures import CODECARBON_TDP, record, write
from tests.reports.test_build import suite

ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync"]


def browser_suite():
    # un0 holds on the proxy (1.0 / 0.0005 = 2,000x at active compute) but codecarbon (a time-based estimate
    # here) gives 2.0 J net / 0.01 J = 200x: the claim's headline must read as failing on it.
    return [*suite(), record("un0", "codecarbon", 0.01, meter_details=CODECARBON_TDP, energy_net_j_per_image=0.01),
            record("noise", "codecarbon", 1e-6, meter_details=CODECARBON_TDP, energy_net_j_per_image=1e-7,
                   fid=200.0, matched=False),
            record("sd", "wall", None),  # time only: a blank energy cell
            record("real", "proxy", 1e-9, fid=0.01, parts={"compute": 0.0, "gating": 0.0, "memory": 1e-9,
                                                           "gating_memory": 0.0})]


@pytest.mark.browser
@pytest.mark.skipif(CHROMIUM is None, reason="Debian chromium is not installed (make browser installs it)")
def test_report_first_screen_in_chromium(tmp_path):
    playwright = pytest.importorskip("playwright.sync_api", reason="playwright (dev extra) is not installed")
    write(tmp_path / "run", browser_suite())
    report = build_report(tmp_path / "run")
    errors: list[str] = []
    ARTIFACTS.mkdir(exist_ok=True)
    with playwright.sync_playwright() as p:
        # Chromium's own flags plus a fresh profile folder; playwright downloads nothing here.
        browser = p.chromium.launch_persistent_context(
            str(tmp_path / "profile"), executable_path=CHROMIUM, headless=True, args=FLAGS,
            viewport={"width": 1280, "height": 900})
        try:
            page = browser.new_page()
            page.set_viewport_size({"width": 1280, "height": 900})
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(report.as_uri())
            page.wait_for_load_state("load")
            images = page.evaluate("Array.from(document.images).map(i => [i.alt, i.complete, i.naturalWidth])")
            headings = page.evaluate("Array.from(document.querySelectorAll('h2')).map(h => h.textContent)")
            # The headline and the sentences beneath it end on the first screen, above every table.
            first_screen = ("(() => { const h = document.querySelector('#verdict .beneath') || "
                            "document.querySelector('#verdict .verdict'); const t = document.querySelector('table');"
                            " return [h.getBoundingClientRect().bottom, t.getBoundingClientRect().top]; })()")
            desktop_first = page.evaluate(first_screen)
            verdict = page.inner_text("#verdict .verdict")
            beneath = page.inner_text("#verdict .beneath")
            glossary = page.inner_text("#glossary")
            question = page.inner_text("#question")
            frontier = page.inner_text(".frontier")
            page.screenshot(path=str(ARTIFACTS / "report-desktop.png"))
            # Sort the (collapsed) results table by energy with a click: ascending, then descending.
            page.evaluate("document.querySelector('#results + details').open = true")
            header = page.locator("#results + details th", has_text="energy / image")
            energies = ("Array.from(document.querySelectorAll('#results + details tr')).slice(1)"
                        ".map(tr => tr.children[4].dataset.sort)")
            header.click()
            ascending = page.evaluate(energies)
            header.click()
            descending = page.evaluate(energies)
            # Printed on A4 (794 px at 96 dpi): the first screen does not overflow.
            page.emulate_media(media="print")
            page.set_viewport_size({"width": 794, "height": 1123})
            page.wait_for_timeout(100)
            print_widths = page.evaluate(
                "[document.documentElement.scrollWidth, document.querySelector('#verdict').scrollWidth]")
            page.pdf(path=str(ARTIFACTS / "report.pdf"))
            page.emulate_media(media="screen")
            page.set_viewport_size({"width": 390, "height": 844})
            page.wait_for_timeout(100)
            widths = page.evaluate("[document.documentElement.scrollWidth, document.body.scrollWidth]")
            page.evaluate("window.scrollTo(0, 0)")  # the sorting clicks above scrolled the page
            mobile_first = page.evaluate(first_screen)
            page.screenshot(path=str(ARTIFACTS / "report-mobile.png"))
        finally:
            browser.close()
    assert errors == []
    assert len(images) >= 3
    assert all(complete and width > 0 for _, complete, width in images), images
    assert headings[:3] == ["Claims versus measured", "Summary", "Ledger: energy per image at each accounting boundary"]
    assert 0 < desktop_first[0] <= 900 and desktop_first[0] <= desktop_first[1], desktop_first
    assert 0 < mobile_first[0] <= 844 and mobile_first[0] <= mobile_first[1], mobile_first
    assert "Un-0 uses 1,000x less energy" in question and "sd" in question and "Test CPU" in question
    # 200x x [0.861567, 1.160676] = 172-232x (test_verdicts)
    assert verdict == "Fails on time-based estimate (codecarbon) at net of idle: 200x (95% CI 172–232x) < 1,000x"
    assert beneath == "Holds on counted work at active compute: 2,000x ≥ 1,000x"
    assert "On this host codecarbon is a time-based estimate: no RAPL counter and no NVML GPU readable here" in glossary
    # References are bounds: on neither frontier, though noise is cheapest on both meters and real best in FID.
    assert "noise" not in frontier and "real" not in frontier and "un0" in frontier
    assert max(widths) <= 390, widths
    assert max(print_widths) <= 794, print_widths
    # Numbers sort as numbers (blanks, e.g. wall's energy, last either way).
    values = [float(v) for v in ascending if v]
    assert values == sorted(values) and len(values) >= 8
    assert [float(v) for v in descending if v] == sorted(values, reverse=True)
    assert ascending[-1] == "" and descending[-1] == ""
    for name in ("report-desktop.png", "report-mobile.png"):
        assert (ARTIFACTS / name).stat().st_size > 10_000
