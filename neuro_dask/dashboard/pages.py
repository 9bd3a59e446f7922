"""The six pages under `/neuro/` on the Dask scheduler's own Bokeh server, and the link to them
from the stock dashboard's navigation bar.

`register()` runs when the `neuro_scheduler` preload module is imported, which Dask does before
it starts the dashboard's server, so the pages are served on the same port as `/status`.
"""

from __future__ import annotations

from bokeh.layouts import column
from bokeh.models import Div

from neuro_dask.dashboard import charts, views

# A headless Chromium's `--screenshot` (and `--print-to-pdf`, `--dump-dom`) acts at the page's
# load event, but these pages draw only after BokehJS has pulled the document over its websocket,
# seconds later: the operator's quick check was a white image. In a headless browser only (its
# user agent says "HeadlessChrome"), a chain of 1-pixel image loads (an image being loaded delays
# the load event) holds the load event until Bokeh has drawn every root, plus half a second for
# the canvases to paint, at most 20 s. Any other browser is left alone.
HOLD_LOAD = """(function () {
  if (!/HeadlessChrome/.test(navigator.userAgent)) return;
  var t0 = Date.now(), drawnAt = 0, n = 0, px = "data:image/gif;base64,R0lGODlhAQABAAAAACw=";
  var drawn = function () {
    var B = window.Bokeh;
    if (!B || !B.documents || !B.documents.length || !B.index) return false;
    var roots = [].concat.apply([], B.documents.map(function (d) { return d.roots(); }));
    return roots.length > 0 && roots.every(function (r) { return B.index[r.id] !== undefined; });
  };
  var img = new Image();
  img.onload = img.onerror = function () {
    var now = Date.now();
    if (!drawnAt && drawn()) drawnAt = now;
    if (now - t0 < 20000 && (!drawnAt || now - drawnAt < 500)) img.src = px + "#" + (++n);
  };
  img.src = px;
})();"""

REFRESH_MS = {"overview": 1000, "network": 1000, "experts": 1000, "calls": 500, "trust": 1000, "economy": 2000}


def _charts(page: str, plugin, args: dict[str, str] | None = None) -> list:
    args = args or {}
    return {
        "overview": lambda: [charts.Overview(plugin)],
        "network": lambda: [charts.NetworkTable(plugin)],
        "experts": lambda: [charts.ExpertHeatmap(plugin), charts.VersionTable(plugin)],
        "calls": lambda: [
            charts.CallStream(plugin, **{k: args.get(k, "") for k in views.CALL_FILTERS}),
            charts.LatencyHistograms(plugin),
        ],
        "trust": lambda: [
            charts.TrustFeed(
                plugin,
                heading="<b>events</b>, newest first: lifecycle, wrong results "
                "proven, late calls, trust changes; each cause in words, with its calls",
            ),
            charts.ReputationChart(plugin),
        ],
        "economy": lambda: [charts.Economy(plugin)],
    }[page]()


def _args(doc) -> dict[str, str]:
    """The page's query arguments (/neuro/calls?worker=...&outcome=...), first value of each."""
    try:
        raw = doc.session_context.request.arguments
    except AttributeError:  # no request behind this document (a test)
        return {}
    return {
        k: (v[0].decode(errors="replace") if isinstance(v[0], bytes) else str(v[0]))[:200] for k, v in raw.items() if v
    }


def _doc(page: str):
    def make(scheduler, extra, doc) -> None:
        from distributed.dashboard.components import add_periodic_callback
        from distributed.dashboard.components.scheduler import BOKEH_THEME
        from jinja2 import Template

        # Dask passes "//" for no prefix; our pages sit one level deeper than Dask's, so the
        # relative script paths Dask's Bokeh server writes need a <base> at the server's root.
        prefix = "/" + (extra.get("prefix") or "").strip("/") + "/"
        prefix = "/" if prefix == "//" else prefix
        plugin = scheduler.extensions.get("neuro")
        doc.title = f"neuro_dask: {page}"
        doc.template = Template(
            '{% extends base %}{% block preamble %}<base href="{{ prefix }}">'
            "<script>" + HOLD_LOAD + "</script>{% endblock %}"
        )
        doc.template_variables["prefix"] = prefix
        doc.theme = BOKEH_THEME
        if plugin is None:
            doc.add_root(
                column(
                    charts.nav(page, prefix),
                    Div(text="this scheduler does not run the neuro_scheduler preload (--preload neuro_scheduler)"),
                )
            )
            return
        parts = _charts(page, plugin, _args(doc))
        for part in parts:
            part.update()
            add_periodic_callback(doc, part, REFRESH_MS[page])
        doc.add_root(column(charts.nav(page, prefix), *[p.root for p in parts], sizing_mode="stretch_width"))

    return make


def register() -> None:
    """Add the pages to Dask's scheduler dashboard (idempotent)."""
    from distributed.dashboard import scheduler as dashboard

    for page in charts.PAGES:
        dashboard.applications.setdefault(f"/neuro/{page}", _doc(page))
    stock = dashboard.template_variables
    if getattr(stock, "__neuro__", False):
        return

    def with_neuro(scheduler):
        variables = stock(scheduler)
        if "neuro/overview" not in variables["pages"]:
            variables["pages"].append("neuro/overview")  # the stock navigation bar's link to ours
        return variables

    with_neuro.__neuro__ = True
    dashboard.template_variables = with_neuro
