"""The app in a real headless chromium (Playwright): sliders, outputs, heatmap, registry-built widgets."""
from __future__ import annotations

import os
from pathlib import Path

import pytest


CHROMIUM = "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run"]

pytestmark = [pytest.mark.browser,
              pytest.mark.skipif(not Path(CHROMIUM).exists(), reason=f"{CHROMIUM} is absent (apt-get install chromium)")]


def test_sliders_outputs_heatmap_and_aggregator_widgets(app_url, tmp_path):
    from playwright.sync_api import expect, sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.goto(app_url)
        page.wait_for_selector("#fm-table table", timeout=60_000)
        page.wait_for_function("document.querySelector('#fm-heat .js-plotly-plot') !== null", timeout=60_000)
        expect(page.locator("#fm-status")).to_contain_text("task_arithmetic", timeout=30_000)
        headers = page.locator("#fm-table thead").inner_text()
        assert "merged" in headers and "reverse" in headers
        heat_before = page.locator("#fm-heat").inner_text()
        status_before = page.locator("#fm-status").inner_text()

        # keyboard on the first coefficient slider: .change fires, the merge and its scores update
        slider = page.locator("#fm-w0 input[type=range]")
        slider.focus()
        slider.press("Home")  # w = -1: the merge now points away from that task vector
        page.wait_for_function("([a]) => document.querySelector('#fm-heat').innerText !== a", arg=[heat_before],
                               timeout=30_000)
        expect(page.locator("#fm-status")).not_to_have_text(status_before, timeout=30_000)
        table = page.locator("#fm-table").inner_text()  # the demo prompts with their marked outputs
        assert "reverse: planet=" in table and "tenalp" in table and ("✓" in table or "✗" in table)

        # λ by keyboard as well
        lam = page.locator("#fm-lambda input[type=range]")
        lam.focus()
        lam.press("ArrowLeft")
        from app import DEFAULT_LAMBDA

        expect(page.locator("#fm-status")).to_contain_text(f"λ = {DEFAULT_LAMBDA - 0.05:g}", timeout=30_000)

        # switching the aggregator shows its registry-built hyperparameter widgets
        assert not page.locator("#hp-fedgma-rho").is_visible()
        box = page.locator("#fm-method input")
        box.click()
        box.fill("fedgma")
        box.press("ArrowDown")
        box.press("Enter")
        expect(page.locator("#hp-fedgma-rho")).to_be_visible(timeout=15_000)
        expect(page.locator("#hp-fedgma-rho")).to_contain_text("rho")
        expect(page.locator("#fm-status")).to_contain_text("fedgma", timeout=30_000)

        shot = tmp_path / "app.png"
        page.screenshot(path=str(shot), full_page=True)
        assert shot.stat().st_size > 10_000
        if os.environ.get("FEDMERGE_SCREENSHOT"):
            page.screenshot(path=os.environ["FEDMERGE_SCREENSHOT"], full_page=False)
        browser.close()
