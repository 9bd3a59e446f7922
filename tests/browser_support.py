"""A real browser for the dashboard tests: headless Chromium driven by selenium.

Debian's `chromium` and `chromium-driver` packages provide the browser and its driver. Where they
are missing and the tests run as root, `ensure_browser()` installs them once with apt-get; only
where that cannot be done does `browser_unavailable()` give a reason to skip.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess

from polling import poll_until

CHROMIUM_ARGS = [
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--window-size=1400,1000",
]
PACKAGES = ["chromium", "chromium-driver"]

_install_tried: str | None = None  # None: not tried yet; "" tried and it worked; else why it failed


def _find(env: str, *names: str) -> str | None:
    if os.environ.get(env):
        return os.environ[env] if os.access(os.environ[env], os.X_OK) else None
    for name in names:
        path = shutil.which(name) or (name if os.path.isabs(name) and os.access(name, os.X_OK) else None)
        if path:
            return path
    return None


def chromium_binary() -> str | None:
    return _find("NEURO_CHROMIUM", "chromium", "chromium-browser", "/usr/lib/chromium/chromium")


def chromedriver_binary() -> str | None:
    return _find("NEURO_CHROMEDRIVER", "chromedriver", "/usr/lib/chromium/chromedriver")


def _can_install() -> str | None:
    """Why apt-get cannot install the packages here (None when it can)."""
    if not shutil.which("apt-get"):
        return "no apt-get on this machine"
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return "not running as root, so apt-get cannot install them"
    return None


def ensure_browser() -> str | None:
    """Install Debian's chromium and chromium-driver once if they are missing and we are root.

    Returns why the install was not possible or failed, None when the binaries are there.
    """
    global _install_tried
    if chromium_binary() and chromedriver_binary():
        return None
    if _install_tried is not None:
        return _install_tried or None
    _install_tried = _can_install() or ""
    if _install_tried:
        return _install_tried
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    # Another apt-get (a set-up step) may hold the dpkg lock: wait for it rather than fail.
    install = ["apt-get", "-o", "DPkg::Lock::Timeout=900", "install", "-y", *PACKAGES]

    def apt(args, timeout):
        return subprocess.run(args, check=False, capture_output=True, text=True, env=env, timeout=timeout)

    try:
        done = apt(install, 1200)
        if done.returncode != 0:  # stale package lists: update once, then try again
            apt(["apt-get", "-o", "DPkg::Lock::Timeout=900", "update"], 600)
            done = apt(install, 1200)
    except (OSError, subprocess.SubprocessError) as e:
        _install_tried = f"apt-get install {' '.join(PACKAGES)} failed: {e}"
        return _install_tried
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
        _install_tried = f"apt-get install {' '.join(PACKAGES)} failed (exit {done.returncode}): {' '.join(tail)}"
    elif not (chromium_binary() and chromedriver_binary()):
        _install_tried = f"apt-get installed {' '.join(PACKAGES)}, yet no chromium and chromedriver are on PATH"
    return _install_tried or None


def browser_unavailable() -> str | None:
    """Why no headless Chromium can run here, or None when one can (installing it if we may)."""
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (pip install selenium)"
    if chromium_binary() and chromedriver_binary():
        return None
    failure = ensure_browser()
    if chromium_binary() and chromedriver_binary():
        return None
    missing = [
        p for p, found in (("chromium", chromium_binary()), ("chromedriver", chromedriver_binary())) if not found
    ]
    return (
        f"no {' or '.join(missing)} binary, and Debian's {' and '.join(PACKAGES)} packages "
        f"cannot be installed here: {failure}"
    )


@contextlib.contextmanager
def chromium(page_load_timeout: float = 60):
    """A headless Chromium webdriver whose browser console is readable with driver.get_log("browser")."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    reason = browser_unavailable()
    if reason:
        raise RuntimeError(reason)
    options = webdriver.ChromeOptions()
    options.binary_location = chromium_binary()
    for arg in CHROMIUM_ARGS:
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    # An explicit driver path: selenium then never runs Selenium Manager (which would download one).
    driver = webdriver.Chrome(options=options, service=Service(executable_path=chromedriver_binary()))
    try:
        driver.set_page_load_timeout(page_load_timeout)
        yield driver
    finally:
        driver.quit()


def body_text(driver) -> str:
    """The page's visible text, including what Bokeh renders inside shadow roots."""
    text = (
        driver.execute_script("""
        const parts = [];
        const walk = (node) => {
            if (node.shadowRoot) walk(node.shadowRoot);
            for (const child of node.childNodes) {
                if (child.nodeType === Node.TEXT_NODE) parts.push(child.textContent);
                else if (child.nodeType === Node.ELEMENT_NODE || child.nodeType === Node.DOCUMENT_FRAGMENT_NODE) {
                    if (!['SCRIPT', 'STYLE'].includes(child.tagName)) walk(child);
                }
            }
        };
        walk(document.body);
        return parts.join(' ');
    """)
        or ""
    )
    return " ".join(text.split())


class PageError(AssertionError):
    """The server answered with an error page (Tornado's "500: Internal Server Error", a 404...)."""


def _poll(check, timeout: float, what: str, interval: float = 0.2):
    # a page mid-load can make a script throw: retry, unless the server answered with an error page
    return poll_until(check, timeout, what, interval=interval, retry_on=lambda e: not isinstance(e, PageError))


def wait_for_text(driver, text: str, timeout: float = 30) -> str:
    """Wait until `text` appears in the page's text (shadow DOM included); returns that text."""
    return wait_for_any_text(driver, [text], timeout)


def wait_for_any_text(driver, texts, timeout: float = 30) -> str:
    """Wait until one of `texts` appears in the page's text; returns that page text."""
    texts = list(texts)
    seen = {"text": ""}

    def check():
        seen["text"] = body_text(driver)
        return seen["text"] if any(t in seen["text"] for t in texts) else None

    try:
        return _poll(check, timeout, f"{' or '.join(map(repr, texts))} on {driver.current_url}")
    except TimeoutError as e:
        raise TimeoutError(f"{e}; the page said: {seen['text'][:1500]!r}") from None


BOKEH_READY = """
    const B = window.Bokeh;
    if (!B || !B.documents || B.documents.length === 0) return 0;
    const roots = B.documents.flatMap(d => d.roots());
    if (roots.length === 0) return 0;
    // Rendered: each root has its view in Bokeh's index of root views (keyed by model id).
    if (B.index && !roots.every(r => B.index[r.id] !== undefined)) return 0;
    return roots.length;
"""


def _bokeh_ready(driver) -> int:
    title, state, loaded = driver.execute_script(
        "return [document.title, document.readyState, typeof window.Bokeh !== 'undefined']"
    )
    if (title or "")[:3].isdigit() and title[3:5] == ": ":
        raise PageError(f"{driver.current_url} answered {title!r}")
    if state == "complete" and not loaded:  # BokehJS loads in <head>, synchronously: it never will
        raise PageError(f"{driver.current_url} loaded without BokehJS (its <script> failed to load?)")
    return driver.execute_script(BOKEH_READY)


def wait_for_bokeh(driver, timeout: float = 30) -> int:
    """Wait until Bokeh has a document with rendered roots; returns how many roots it has.
    Raises PageError at once where the server answered with an error page."""
    return _poll(lambda: _bokeh_ready(driver), timeout, f"Bokeh roots on {driver.current_url}")


def bokeh_model_exists(driver, name: str) -> bool:
    """Whether any Bokeh document on the page has a model called `name`."""
    return bool(
        driver.execute_script(
            "return (window.Bokeh && Bokeh.documents || []).some(d => d.get_model_by_name(arguments[0]) !== null);",
            name,
        )
    )


def browser_errors(driver) -> list[dict]:
    """SEVERE browser console entries (JavaScript errors, failed loads), favicon 404s left out."""
    return [
        e for e in driver.get_log("browser") if e.get("level") == "SEVERE" and "favicon" not in e.get("message", "")
    ]


# --- The dashboard scenario: shared by tests/e2e/test_dashboard_browser.py and
# --- scripts/screenshot_dashboard.py (the README's screenshots).

PAGES = ("overview", "network", "experts", "calls", "trust", "economy")
CRASHED = "1"  # the honest worker the scenario kills
TRUST = {"neuro.scheduler.trusted": ["0"], "neuro.client.trust": True, "neuro.client.seed": 0}
ADVERSARY = {"mode": "perturb", "seed": 1}


@contextlib.contextmanager
def dashboard_scenario(sharded_model, cache_dir, prompts: int = 6, tokens: int = 16, rounds: int = 6):
    """A 3-worker in-process cluster with the dashboard on, trust on, one perturbing volunteer
    ("bad0", owner "mallory") and a model loaded and generating until the perturber was caught.

    Yields a dict: dashboard (the base URL), client, cluster, model, adversary (its address).
    The model stays loaded meanwhile, so that the pages show its placement.
    """
    import json

    import dask
    from cluster_helpers import add_worker, trust_events
    from distributed import Client
    from tiny_models import padded_batch

    import neuro_dask as nd
    from neuro_dask.client.cluster import local_cluster

    rows = [padded_batch((3 + i % 7,), seed=100 + i)[0][0].tolist() for i in range(prompts)]
    with (
        dask.config.set({**TRUST, "neuro.worker.cache-dir": str(cache_dir)}),
        local_cluster(
            n_workers=3, processes=False, worker_args=["--neuro-no-benchmark"], dashboard_address="127.0.0.1:0"
        ) as cluster,
        Client(cluster) as client,
    ):
        bad = add_worker(
            client,
            cluster.scheduler_address,
            "bad0",
            "--neuro-adversary",
            json.dumps(ADVERSARY),
            "--neuro-owner",
            "mallory",
        )
        try:
            client.wait_for_workers(4, timeout=120)
            with nd.load(sharded_model, client=client) as model:
                for i in range(rounds):  # two at least (load to show), then until the perturber was caught
                    # speculative: the overview's tokens-per-pass figure has passes to show
                    model.generate(rows, max_new_tokens=tokens, speculative="self")
                    if i >= 1 and any(e.get("action") == "invalid" for e in trust_events(client)):
                        break
                model.executor.flush_reports()  # calls, load and outcomes to the scheduler now
                crashed = crash_worker(cluster, CRASHED)
                yield {
                    "dashboard": client.dashboard_link.rsplit("/", 1)[0],
                    "client": client,
                    "cluster": cluster,
                    "model": model,
                    "adversary": bad.address,
                    "crashed": crashed,
                    "plugin": cluster.scheduler.extensions["neuro"],
                }
        finally:
            client.sync(bad.close)


def crash_worker(cluster, name: str, timeout: float = 60) -> str:
    """Kill the in-process worker called `name` as a crash looks to the scheduler: its connection
    breaks with no goodbye (no "closing" status, no retirement). Returns its address once the
    scheduler has removed it and the neuro plugin has recorded the departure."""
    worker = next(w for w in cluster.workers.values() if str(w.name) == name)
    address = worker.address
    cluster.loop.add_callback(worker.batched_stream.comm.abort)
    plugin = cluster.scheduler.extensions["neuro"]
    _poll(
        lambda: (
            address not in cluster.scheduler.workers
            and any(e.get("worker") == address and e.get("action") in ("left", "crashed") for e in list(plugin.events))
        ),
        timeout,
        f"the scheduler to remove worker {name}",
    )
    return address


SOURCE_ROWS = """
    // Rows in the data source of the model called arguments[0] (a DataTable, or a figure's first
    // glyph renderer); with no name, of the first DataTable that has any.
    const rows = (source) => {
        const data = source.data;
        const first = data instanceof Map ? data.values().next().value : Object.values(data)[0];
        return first ? first.length : 0;
    };
    for (const d of (window.Bokeh && Bokeh.documents) || []) {
        if (arguments[0]) {
            const m = d.get_model_by_name(arguments[0]);
            if (m === null) continue;
            if (m.source) return rows(m.source);
            const glyphs = (m.renderers || []).filter(r => r.data_source);
            return glyphs.length ? rows(glyphs[0].data_source) : 0;
        }
        for (const m of d.all_models) {
            if (m.type === 'DataTable' && m.source && rows(m.source) > 0) return rows(m.source);
        }
    }
    return 0;
"""

COUNT_ELEMENTS = """
    // Elements matching arguments[0], shadow roots included (Bokeh renders widgets in them).
    let n = 0;
    const walk = (root) => {
        n += root.querySelectorAll(arguments[0]).length;
        for (const el of root.querySelectorAll('*')) if (el.shadowRoot) walk(el.shadowRoot);
    };
    walk(document);
    return n;
"""


LINKS = """
    // Every link's resolved href, shadow roots included.
    const out = [];
    const walk = (root) => {
        for (const a of root.querySelectorAll('a[href]')) out.push(a.href);
        for (const el of root.querySelectorAll('*')) if (el.shadowRoot) walk(el.shadowRoot);
    };
    walk(document);
    return out;
"""


def links(driver) -> list[str]:
    """The page's links as the browser resolves them (absolute URLs)."""
    return list(driver.execute_script(LINKS) or [])


CLIPPED = """
    // Table headers and cells whose text is wider than the room its box leaves it (cut off, as
    // "correctnes" for "correctness"), shadow roots included: the text's own rendered width
    // (a Range over it) against the box's inner width.
    const out = [];
    const textWidth = (el) => { const r = document.createRange(); r.selectNodeContents(el);
                                return r.getBoundingClientRect().width; };
    const walk = (root) => {
        for (const el of root.querySelectorAll('.slick-header-column, .slick-cell')) {
            if (el.clientWidth === 0) continue;  // not shown (a hidden table)
            const text = el.querySelector('.slick-column-name') || el;
            const style = getComputedStyle(el);
            const room = el.clientWidth - parseFloat(style.paddingLeft) - parseFloat(style.paddingRight);
            if (text.textContent.trim() && textWidth(text) > room + 1) out.push(el.textContent.trim());
        }
        for (const el of root.querySelectorAll('*')) if (el.shadowRoot) walk(el.shadowRoot);
    };
    walk(document);
    return out;
"""

HEADERS = """
    // The text of every table header, shadow roots included.
    const out = [];
    const walk = (root) => {
        for (const el of root.querySelectorAll('.slick-header-column')) out.push(el.textContent.trim());
        for (const el of root.querySelectorAll('*')) if (el.shadowRoot) walk(el.shadowRoot);
    };
    walk(document);
    return out;
"""


def clipped(driver) -> list[str]:
    """Texts of table headers and cells that their column cuts off."""
    return list(driver.execute_script(CLIPPED) or [])


def headers(driver) -> list[str]:
    return list(driver.execute_script(HEADERS) or [])


def model_text(driver, name: str) -> str:
    """The text (HTML) of the Bokeh Div called `name`, as the browser's document holds it."""
    return str(
        driver.execute_script(
            "for (const d of (window.Bokeh && Bokeh.documents) || []) { const m = d.get_model_by_name(arguments[0]);"
            " if (m !== null) return m.text; } return '';",
            name,
        )
        or ""
    )


def ink_fraction(png) -> float:
    """The share of a screenshot's pixels that are not (near) white: a page that has not drawn
    yet is a white image."""
    import io

    from PIL import Image

    image = Image.open(io.BytesIO(png) if isinstance(png, bytes) else png).convert("L")
    histogram = image.histogram()
    return 1 - sum(histogram[245:]) / (image.width * image.height)


def source_rows(driver, name: str | None = None) -> int:
    """Rows in the data behind the Bokeh model called `name` (None: the first DataTable with any)."""
    return int(driver.execute_script(SOURCE_ROWS, name) or 0)


def count_elements(driver, selector: str) -> int:
    return int(driver.execute_script(COUNT_ELEMENTS, selector) or 0)


def wait_for_rows(driver, name: str | None = None, timeout: float = 30) -> int:
    """Wait until a Bokeh table (or figure) has data rows and a table row is drawn on the page."""
    rows = _poll(lambda: source_rows(driver, name), timeout, f"rows in {name or 'a table'} on {driver.current_url}")
    if name is None or driver.execute_script(
        "return Bokeh.documents.some(d => { const m = d.get_model_by_name(arguments[0]); "
        "return m !== null && m.type === 'DataTable'; })",
        name,
    ):
        _poll(lambda: count_elements(driver, ".slick-row"), timeout, f"a drawn table row on {driver.current_url}")
    return rows


def check_page(driver, page: str, scenario: dict, timeout: float = 30) -> None:
    """Wait until `page` shows its key content (the contract the dashboard pages keep)."""
    if page == "overview":  # the figures, and the incident among the recent events
        _poll(lambda: "/" in model_text(driver, "overview-experts"), timeout, "the overview's figures")
        wait_for_text(driver, "crashed", timeout)
    elif page == "network":  # every worker, the adversary included
        for address, info in scenario["client"].scheduler_info()["workers"].items():
            name = str(info.get("name", address))  # "0", "1": too short to look for on their own
            wait_for_any_text(driver, [address] + ([name] if not name.isdigit() else []), timeout)
        wait_for_text(driver, "bad0", timeout)
    elif page == "experts":  # the heatmap figure, with one cell per (layer, expert) of the loaded model
        _poll(lambda: bokeh_model_exists(driver, "expert-heatmap"), timeout, "the expert-heatmap figure")
        wait_for_rows(driver, "expert-heatmap", timeout)
    elif page == "calls":
        wait_for_rows(driver, None, timeout)
    elif page == "trust":  # the perturber's caught results and the killed worker's crash in the event table
        wait_for_text(driver, "invalid", timeout)
        wait_for_text(driver, "crashed", timeout)
    elif page == "economy":  # no ledger in this scenario
        wait_for_text(driver, "no ledger configured", timeout)
    elif page == "status":
        wait_for_text(driver, "Task Stream", timeout)
    else:
        raise ValueError(page)


def page_url(scenario: dict, page: str) -> str:
    return f"{scenario['dashboard']}/{'status' if page == 'status' else 'neuro/' + page}"


def wait_for_history(driver, page: str, timeout: float = 30, samples: int = 3) -> None:
    """For pictures: wait until the trust page's reputation chart has `samples` points per line
    (the scheduler samples every 2 s; one point draws no line)."""
    if page == "trust":
        _poll(lambda: source_rows(driver, "reputation-chart") >= samples, timeout, "reputation history")
    if page == "overview":
        _poll(lambda: source_rows(driver, "overview-latency") >= 1, timeout, "latency history")


def wait_for_ink(driver, timeout: float = 30, least: float = 0.002) -> bytes:
    """A screenshot taken once the page has drawn (some of its pixels are not white); returns its PNG."""
    return _poll(
        lambda: (lambda png: png if ink_fraction(png) >= least else None)(driver.get_screenshot_as_png()),
        timeout,
        f"a drawn (not white) page at {driver.current_url}",
    )


def screenshot_pages(driver, scenario: dict, folder, pages=PAGES, timeout: float = 30, settle: bool = False) -> dict:
    """Open each page, wait for Bokeh and its content, save folder/neuro-{page}.png.
    settle: also wait for the charts' history to fill in (for the README's pictures).

    Returns page -> SEVERE console entries seen on it (favicon 404s left out).
    """
    from pathlib import Path

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    errors = {}
    for page in pages:
        driver.get_log("browser")  # drain: what earlier pages logged is theirs
        driver.get(page_url(scenario, page))
        try:
            wait_for_bokeh(driver, timeout)
            check_page(driver, page, scenario, timeout)
            if settle:
                wait_for_history(driver, page, timeout)
        except (TimeoutError, PageError) as e:  # what the browser saw tells why
            driver.save_screenshot(str(folder / f"neuro-{page}.png"))
            raise type(e)(f"{e}\nbrowser console: {browser_errors(driver)}") from None
        (folder / f"neuro-{page}.png").write_bytes(wait_for_ink(driver, timeout))
        errors[page] = browser_errors(driver)
    return errors
