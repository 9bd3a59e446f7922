"""The operator's dashboard in a real browser: headless Chromium over the scheduler's Bokeh server.

One in-process cluster (trust on, a perturbing volunteer "bad0" among three honest workers, a
model loaded and generating), then each /neuro/* page and Dask's own /status: rendered by Bokeh,
showing its key content, screenshotted, and with no JavaScript errors in the browser console.
Set NEURO_SCREENSHOTS=folder to keep a copy of the screenshots.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from browser_support import (
    PAGES,
    browser_unavailable,
    check_page,
    chromium,
    dashboard_scenario,
    links,
    page_url,
    screenshot_pages,
    wait_for_any_text,
    wait_for_bokeh,
)


@pytest.fixture(scope="module")
def browser():
    reason = browser_unavailable()  # installs Debian's chromium where it may
    if reason:
        pytest.skip(reason)
    with chromium() as driver:
        yield driver


@pytest.fixture(scope="module")
def scenario(sharded, tmp_path_factory, browser):
    with dashboard_scenario(sharded("mixtral"), tmp_path_factory.mktemp("cache")) as s:
        yield s


def _shoot(browser, scenario, page, tmp_path):
    errors = screenshot_pages(browser, scenario, tmp_path, pages=[page])[page]
    shot = tmp_path / f"neuro-{page}.png"
    assert shot.stat().st_size > 10_000, "a blank screenshot"
    if os.environ.get("NEURO_SCREENSHOTS"):
        keep = Path(os.environ["NEURO_SCREENSHOTS"])
        keep.mkdir(parents=True, exist_ok=True)
        shutil.copy(shot, keep / shot.name)
    return errors


@pytest.mark.parametrize("page", PAGES)
def test_page_renders_its_content_without_javascript_errors(browser, scenario, page, tmp_path):
    errors = _shoot(browser, scenario, page, tmp_path)
    assert not errors, f"/neuro/{page}: JavaScript errors in the browser console: {errors}"


def test_the_trust_page_names_the_caught_perturber(browser, scenario, tmp_path):
    browser.get(page_url(scenario, "trust"))
    wait_for_bokeh(browser)
    check_page(browser, "trust", scenario)
    wait_for_any_text(browser, [scenario["adversary"], "bad0"])


def test_dask_own_status_page_still_renders(browser, scenario, tmp_path):
    errors = _shoot(browser, scenario, "status", tmp_path)
    assert not errors, f"/status: JavaScript errors in the browser console: {errors}"


def test_navigation_links_stay_on_the_dashboard(browser, scenario):
    """Each page links to the other four and to Dask's /status, and /status links to ours."""
    base = scenario["dashboard"]
    for page in PAGES:
        browser.get(page_url(scenario, page))
        wait_for_bokeh(browser)
        wait_for_any_text(browser, ["Dask"])
        hrefs = set(links(browser))
        wanted = {f"{base}/neuro/{p}" for p in PAGES if p != page} | {f"{base}/status"}
        assert wanted <= hrefs, f"/neuro/{page}: missing links {sorted(wanted - hrefs)}; it links to {sorted(hrefs)}"
    browser.get(page_url(scenario, "status"))
    wait_for_bokeh(browser)
    assert f"{base}/neuro/network" in links(browser), "the stock dashboard's navigation bar has no link to ours"
