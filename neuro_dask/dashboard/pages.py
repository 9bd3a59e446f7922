"""The five pages under `/neuro/` on the Dask scheduler's own Bokeh server, and the link to them
from the stock dashboard's navigation bar.

`register()` runs when the `neuro_scheduler` preload module is imported, which Dask does before
it starts the dashboard's server, so the pages are served on the same port as `/status`.
"""

from __future__ import annotations

from bokeh.layouts import column
from bokeh.models import Div

from neuro_dask.dashboard import charts

REFRESH_MS = {"network": 1000, "experts": 1000, "calls": 500, "trust": 1000, "economy": 2000}


def _charts(page: str, plugin) -> list:
    return {
        "network": lambda: [charts.NetworkTable(plugin)],
        "experts": lambda: [charts.ExpertHeatmap(plugin), charts.VersionTable(plugin)],
        "calls": lambda: [charts.CallStream(plugin), charts.LatencyHistograms(plugin)],
        "trust": lambda: [charts.TrustFeed(plugin), charts.ReputationChart(plugin)],
        "economy": lambda: [charts.Economy(plugin)],
    }[page]()


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
        doc.template = Template('{% extends base %}{% block preamble %}<base href="{{ prefix }}">{% endblock %}')
        doc.template_variables["prefix"] = prefix
        doc.theme = BOKEH_THEME
        if plugin is None:
            doc.add_root(column(charts.nav(page, prefix), Div(
                text="this scheduler does not run the neuro_scheduler preload (--preload neuro_scheduler)")))
            return
        parts = _charts(page, plugin)
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
        if "neuro/network" not in variables["pages"]:
            variables["pages"].append("neuro/network")  # the stock navigation bar's link to ours
        return variables

    with_neuro.__neuro__ = True
    dashboard.template_variables = with_neuro
