"""The operator's dashboard in a real browser: headless Chromium over the scheduler's Bokeh server.

One in-process cluster (trust on, a perturbing volunteer "bad0" among three honest workers, a
model loaded and generating, then honest worker "1" killed), then each /neuro/* page and Dask's
own /status: rendered by Bokeh, showing its key content, screenshotted once drawn (not a white
image), with no JavaScript errors in the browser console, no "NaN", no header or cell cut off,
the crash on the trust page, and the overview's figures equal to the scheduler's state.
Set NEURO_SCREENSHOTS=folder to keep a copy of the screenshots.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from browser_support import (
    CRASHED,
    PAGES,
    _poll,
    body_text,
    browser_unavailable,
    check_page,
    chromium,
    clipped,
    dashboard_scenario,
    headers,
    ink_fraction,
    links,
    model_text,
    page_url,
    screenshot_pages,
    wait_for_any_text,
    wait_for_bokeh,
    wait_for_text,
)

from neuro_dask.dashboard import views


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
    assert ink_fraction(shot) > 0.002, f"/neuro/{page}: the screenshot is (nearly) white"
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
    wait_for_text(browser, "request ")  # the caught result's cause in words, naming its request


def test_the_trust_page_shows_the_killed_worker_crashed(browser, scenario):
    browser.get(page_url(scenario, "trust"))
    wait_for_bokeh(browser)
    text = wait_for_text(browser, "crashed")
    assert f"crashed {CRASHED} " in text, f"no crash of worker {CRASHED}: {text[:1500]}"
    assert "without a goodbye" in text


@pytest.mark.parametrize("page", PAGES)
def test_no_nan_and_no_cut_off_header_or_cell(browser, scenario, page):
    browser.get(page_url(scenario, page))
    wait_for_bokeh(browser)
    check_page(browser, page, scenario)
    text = body_text(browser)
    assert "NaN" not in text, f"/neuro/{page} shows NaN: {text[:1500]}"
    shown = headers(browser)
    assert all(
        h
        in {
            views.title(c)
            for c in (
                *views.NETWORK_COLUMNS,
                *views.EVENT_COLUMNS,
                *views.CALL_COLUMNS,
                *views.VERSION_COLUMNS,
                *views.PROPOSAL_COLUMNS,
            )
        }
        | {"provider", "neuro", "rank", "worker", "owner", "units", ""}
        for h in shown
    ), shown
    assert not clipped(browser), f"/neuro/{page}: cut-off headers or cells: {clipped(browser)}"


def test_the_overview_figures_match_the_schedulers_state(browser, scenario):
    plugin = scenario["plugin"]
    browser.get(page_url(scenario, "overview"))
    wait_for_bokeh(browser)
    check_page(browser, "overview", scenario)

    def expected():  # from the scheduler's own state, as neuro_status and the routes report it
        status = scenario["client"].sync(scenario["client"].scheduler.neuro_status)
        model = next(iter(status["models"]))
        total = status["models"][model]["experts"]
        pending = plugin.coordinator.routes(model).pending
        serving = sum(1 for w in plugin.dashboard_view().workers if w.status == "serving")
        return {
            "overview-experts": f"<b>{total - len(pending)} / {total}</b>",
            "overview-workers": f"<b>{serving} / {len(status['workers'])}</b>",
            "overview-caught": f"<b>{plugin.feed.counts.get('quorum_caught', 0)}</b>",
            "overview-speculation": f"<b>{_tokens_per_pass(plugin)}</b>",
        }

    def matches():  # placement may still be moving the killed worker's experts: poll until both agree
        want = expected()
        return all(v in model_text(browser, k) for k, v in want.items()) and want == expected()

    _poll(matches, 60, f"the overview to show {expected()}")
    assert f"/ {len(scenario['client'].scheduler_info()['workers'])}</b>" in model_text(browser, "overview-workers")


def _tokens_per_pass(plugin) -> str:
    """The overview card's figure, from the feed: speculative passes over the last 60 s."""
    import time

    from neuro_dask.dashboard import views

    o = views.overview(plugin.dashboard_view(), plugin.feed, time.time())
    return "-" if o.tokens_per_pass is None else f"{o.tokens_per_pass:.2f}"


def test_dask_own_status_page_still_renders(browser, scenario, tmp_path):
    errors = _shoot(browser, scenario, "status", tmp_path)
    assert not errors, f"/status: JavaScript errors in the browser console: {errors}"


def test_navigation_links_stay_on_the_dashboard(browser, scenario):
    """Each page links to the other five and to Dask's /status, and /status links to ours."""
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
    assert f"{base}/neuro/overview" in links(browser), "the stock dashboard's navigation bar has no link to ours"


def _documented_quick_check() -> str:
    """The one-line `chromium --headless --screenshot` check docs/dashboard.md gives operators."""
    docs = (Path(__file__).resolve().parents[2] / "docs" / "dashboard.md").read_text()
    lines = [line.strip() for line in docs.splitlines() if line.strip().startswith("chromium --headless")]
    assert len(lines) == 1, f"docs/dashboard.md should give one chromium quick check, found {lines}"
    return lines[0]


@pytest.mark.parametrize("page", ["overview", "trust"])
def test_the_documented_chromium_quick_check_gives_a_drawn_page(scenario, page, tmp_path):
    """Exactly the command docs/dashboard.md documents (the scheduler's address and the page put
    in), run as a shell would: its PNG shows the drawn page, not the white image a bare
    `--screenshot` took before the pages held their load event until Bokeh had drawn."""
    import shlex
    import subprocess

    from browser_support import chromium_binary

    binary = chromium_binary()
    if binary is None:
        pytest.skip("no chromium binary")
    argv = shlex.split(_documented_quick_check().replace("http://SCHEDULER:8787", scenario["dashboard"]))
    argv = [binary, *[a.replace("/neuro/overview", f"/neuro/{page}") for a in argv[1:]]]
    shot = next(a.split("=", 1)[1] for a in argv if a.startswith("--screenshot="))
    done = subprocess.run(argv, cwd=tmp_path, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    png = tmp_path / shot
    assert png.exists(), f"no {shot}: {done.stderr[-2000:]}"
    assert ink_fraction(png) > 0.02, f"/neuro/{page}: the quick check's screenshot is (nearly) white"
