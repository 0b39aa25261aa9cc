"""Open the report in headless Chromium: every image loads, no console error, a screenshot is kept."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from un0_bench.reports.build import build_report

from tests.reports.fixtures import write
from tests.reports.test_build import suite

ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync"]


@pytest.mark.browser
@pytest.mark.skipif(CHROMIUM is None, reason="Debian chromium is not installed (make browser installs it)")
def test_report_renders_in_chromium(tmp_path):
    playwright = pytest.importorskip("playwright.sync_api", reason="playwright (dev extra) is not installed")
    write(tmp_path / "run", suite())
    report = build_report(tmp_path / "run")
    errors: list[str] = []
    with playwright.sync_playwright() as p:
        # Chromium's own flags plus a fresh profile folder; playwright downloads nothing here.
        browser = p.chromium.launch_persistent_context(
            str(tmp_path / "profile"), executable_path=CHROMIUM, headless=True, args=FLAGS)
        try:
            page = browser.new_page()
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(report.as_uri())
            page.wait_for_load_state("load")
            images = page.evaluate("Array.from(document.images).map(i => [i.alt, i.complete, i.naturalWidth])")
            headings = page.evaluate("Array.from(document.querySelectorAll('h2')).map(h => h.textContent)")
            ARTIFACTS.mkdir(exist_ok=True)
            page.screenshot(path=str(ARTIFACTS / "report.png"), full_page=True)
        finally:
            browser.close()
    assert errors == []
    assert len(images) >= 3
    assert all(complete and width > 0 for _, complete, width in images), images
    assert headings[:3] == ["Summary", "Ledger: energy per image at each accounting boundary", "Claims versus measured"]
    assert (ARTIFACTS / "report.png").stat().st_size > 10_000
