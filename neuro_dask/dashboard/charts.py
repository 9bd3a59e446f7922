"""One class per chart: `root` is its Bokeh layout, `update()` refreshes it from the plugin.

Every `update()` reads only the plugin (`dashboard_view()`, `feed`) and the pure columns of
views.py, so a chart can be built and updated in a test with nothing but a plugin's state.
"""

from __future__ import annotations

from bokeh.layouts import column, row
from bokeh.models import (
    BasicTicker,
    ColorBar,
    ColumnDataSource,
    DataTable,
    DatetimeTickFormatter,
    Div,
    HoverTool,
    LinearColorMapper,
    MultiChoice,
    NumberFormatter,
    Range1d,
    TableColumn,
)
from bokeh.palettes import Category10_10, Viridis256
from bokeh.plotting import figure

from neuro_dask.dashboard import views

PAGES = ("network", "experts", "calls", "trust", "economy")


def nav(current: str, prefix: str = "/") -> Div:
    links = [f'<a href="{prefix}status">Dask</a>'] + [
        f"<b>{p.title()}</b>" if p == current else f'<a href="{prefix}neuro/{p}">{p.title()}</a>' for p in PAGES]
    return Div(text="neuro_dask &nbsp;|&nbsp; " + " &nbsp; ".join(links), styles={"font-size": "15px"},
               name="neuro-nav")


WIDE = {"address": 200, "workers": 320, "hardware": 110, "model": 200, "channel": 120, "role": 200, "cause": 120,
        "provider": 160, "worker": 200, "owner": 140, "param": 150}


def _table(columns: dict, names: tuple[str, ...], height: int = 500, name: str | None = None,
           numbers: tuple[str, ...] = (), width: int | None = None) -> tuple[ColumnDataSource, DataTable]:
    source = ColumnDataSource(columns)
    cols = []
    for c in names:
        extra = {"formatter": NumberFormatter(format="0,0.[000]")} if c in numbers else {}
        cols.append(TableColumn(field=c, title=c.replace("_", " "), width=WIDE.get(c, 70), **extra))
    # Fixed-width tables keep their column widths; the others stretch them to the page
    # (BokehJS 3.9's "fit_columns" autosizing throws while rendering: not used).
    sizing = {"width": width, "autosize_mode": "none"} if width else {"sizing_mode": "stretch_width"}
    return source, DataTable(source=source, columns=cols, height=height, name=name, index_position=None, **sizing)


class NetworkTable:
    """Every worker: owner, hardware, status, reputation and its components, stake, experts, calls, latency."""

    def __init__(self, plugin):
        self.plugin = plugin
        self.totals = Div(text="", name="network-totals")
        self.source, self.table = _table({c: [] for c in views.NETWORK_COLUMNS}, views.NETWORK_COLUMNS, 600,
                                         "network-table", numbers=("stake",))
        self.root = column(self.totals, self.table, sizing_mode="stretch_width")

    def update(self) -> None:
        view = self.plugin.dashboard_view()
        self.source.data = views.network_columns(view, self.plugin.feed)
        t = views.network_totals(view)
        self.totals.text = (f"<b>{t['workers']}</b> workers ({t['serving']} serving) of <b>{t['owners']}</b> owners, "
                            f"{t['trusted']} operator-trusted; <b>{t['gpus']}</b> GPUs; {t['memory_gib']} GiB RAM, "
                            f"{t['vram_gib']} GiB VRAM, {t['expert_memory_gib']} GiB given to experts")


class ExpertHeatmap:
    """Layer x expert: serving replicas and recent load (x the mean), the placement target beside it."""

    def __init__(self, plugin):
        self.plugin = plugin
        self.source = ColumnDataSource({k: [] for k in views.HEATMAP_COLUMNS})
        self.title = Div(text="", name="experts-title")
        self.load_map = LinearColorMapper(palette=Viridis256, low=0, high=2)
        self.load = self._figure("expert-heatmap", "Recent load (x the mean) and serving replicas", "heat",
                                 self.load_map, "replicas")
        self.target_map = LinearColorMapper(palette=Viridis256[::-1], low=0, high=3)
        self.target = self._figure("expert-target", "Placement target (replicas planned)", "target",
                                   self.target_map, "target")
        self.root = column(self.title, row(self.load, self.target), sizing_mode="stretch_width")

    def _figure(self, name: str, title: str, field: str, mapper: LinearColorMapper, label: str):
        fig = figure(title=title, name=name, x_axis_label="expert", y_axis_label="layer", height=520, width=620,
                     tools="hover,save,reset,box_zoom,wheel_zoom", x_range=Range1d(-0.5, 0.5),
                     y_range=Range1d(-0.5, 0.5), toolbar_location="above")
        fig.rect(x="x", y="y", width=0.95, height=0.95, source=self.source,
                 fill_color={"field": field, "transform": mapper}, line_color=None)
        fig.text(x="x", y="y", text=label, source=self.source, text_align="center", name=f"{name}-labels",
                 text_baseline="middle", text_font_size="9px", text_color="white")
        fig.add_layout(ColorBar(color_mapper=mapper, ticker=BasicTicker(), width=10), "right")
        fig.select_one(HoverTool).tooltips = [("layer", "@layer"), ("expert", "@expert"), ("replicas", "@replicas"),
                                              ("target", "@target"), ("load x mean", "@load")]
        fig.grid.visible = False
        return fig

    def update(self) -> None:
        view = self.plugin.dashboard_view()
        data = views.heatmap_columns(view)
        width, height = views.heatmap_size(view.experts, view.layers)
        for fig in (self.load, self.target):
            if (fig.x_range.end, fig.y_range.end) != (view.experts - 0.5, view.layers - 0.5):
                fig.x_range.update(start=-0.5, end=max(view.experts, 1) - 0.5)
                fig.y_range.update(start=-0.5, end=max(view.layers, 1) - 0.5)
                fig.width, fig.height = width, height
            # hundreds of experts: the cells carry colour and a tooltip, no number
            fig.select_one({"name": f"{fig.name}-labels"}).visible = view.experts <= views.LABELLED_EXPERTS
        self.load_map.high = max([2.0] + data["heat"])
        self.target_map.high = max([1] + data["target"])
        self.source.data = data
        short = sum(1 for s in data["short"] if s)
        self.title.text = (f"model <b>{view.model or 'none published'}</b>: {view.layers} layers x {view.experts} "
                           f"experts; {short} experts below their placement target")


class VersionTable:
    """Model versions on channels: current, candidate, retiring (requests still running), retired."""

    def __init__(self, plugin):
        self.plugin = plugin
        self.title = Div(text="", name="versions-title")
        self.source, self.table = _table({c: [] for c in views.VERSION_COLUMNS}, views.VERSION_COLUMNS, 200,
                                         "versions-table")
        self.root = column(self.title, self.table, sizing_mode="stretch_width")

    def update(self) -> None:
        view = self.plugin.dashboard_view()
        self.source.data = views.version_columns(view)
        adoption = (view.versions or {}).get("adoption", "operator")
        self.title.text = (f"<b>Model versions</b> (adopted by {'governance vote' if adoption == 'vote' else 'the operator'}"
                           "; `neuro-dask publish --channel`, `neuro-dask adopt`)")


class CallStream:
    """The latest expert calls clients reported, newest first."""

    def __init__(self, plugin):
        self.plugin = plugin
        self.source, self.table = _table({c: [] for c in views.CALL_COLUMNS}, views.CALL_COLUMNS, 450, "calls-table")
        self.root = self.table

    def update(self) -> None:
        self.source.data = views.calls_columns(self.plugin.feed)


class LatencyHistograms:
    """Layer-call latency per transport, log-spaced bins."""

    def __init__(self, plugin, transports: tuple[str, ...] = ("direct", "futures")):
        self.plugin = plugin
        self.sources = {t: ColumnDataSource({"left": [], "right": [], "count": []}) for t in transports}
        figs = []
        for t, source in self.sources.items():
            fig = figure(title=f"{t} transport: layer-call latency (ms)", x_axis_type="log", height=260, width=560,
                         tools="save,reset", name=f"latency-{t}")
            fig.quad(left="left", right="right", bottom=0, top="count", source=source, fill_alpha=0.7)
            figs.append(fig)
        self.root = row(*figs)

    def update(self) -> None:
        for t, source in self.sources.items():
            source.data = views.latency_histogram(self.plugin.feed, t)


class TrustFeed:
    """Invalid results, late calls, crashes, slashes, and trust changes, newest first."""

    def __init__(self, plugin):
        self.plugin = plugin
        self.source, self.table = _table({c: [] for c in views.EVENT_COLUMNS}, views.EVENT_COLUMNS, 400,
                                         "trust-events")
        self.root = self.table

    def update(self) -> None:
        self.source.data = views.trust_event_columns(self.plugin.dashboard_view())


class ReputationChart:
    """Reputation over time for the workers the operator picks (the five lowest by default)."""

    def __init__(self, plugin, lines: int = 10):
        self.plugin = plugin
        self.picker = MultiChoice(title="workers", options=[], value=[], width=600)
        self.fig = figure(title="reputation score", x_axis_type="datetime", height=320, sizing_mode="stretch_width",
                          y_range=(0, 1.05), tools="save,reset,xwheel_zoom,xpan", name="reputation-chart")
        self.fig.xaxis.formatter = DatetimeTickFormatter(seconds="%H:%M:%S", minsec="%H:%M:%S", minutes="%H:%M")
        self.sources = [ColumnDataSource({"time": [], "score": []}) for _ in range(lines)]
        for i, source in enumerate(self.sources):
            self.fig.line("time", "score", source=source, color=Category10_10[i % 10], line_width=2,
                          legend_label=f"#{i + 1}")
        self.fig.legend.location = "bottom_left"
        self.root = column(self.picker, self.fig, sizing_mode="stretch_width")

    def update(self) -> None:
        feed = self.plugin.feed
        names = sorted(feed.reputation)
        if list(self.picker.options) != names:
            self.picker.options = names
        picked = list(self.picker.value) or sorted(names, key=lambda n: feed.reputation[n][-1][1])[:5]
        series = views.reputation_series(feed, picked[: len(self.sources)])
        for i, source in enumerate(self.sources):
            if i < len(picked) and picked[i] in series:
                source.data = series[picked[i]]
                self.fig.legend.items[i].label = {"value": picked[i]}
            else:
                source.data = {"time": [], "score": []}
                self.fig.legend.items[i].label = {"value": ""}


class Economy:
    """Supply, burned, treasury, fees and stakes over time; stakes; leaderboards; open proposals."""

    def __init__(self, plugin):
        self.plugin = plugin
        self.summary = Div(text="", name="economy-summary")
        self.series = ColumnDataSource({"time": []} | {k: [] for k in views.ECONOMY_SERIES})
        self.fig = figure(title="NEURO over time", x_axis_type="datetime", height=300, sizing_mode="stretch_width",
                          tools="save,reset,xwheel_zoom,xpan", name="economy-chart")
        for i, key in enumerate(views.ECONOMY_SERIES):
            self.fig.line("time", key, source=self.series, color=Category10_10[i], legend_label=key, line_width=2)
        self.fig.legend.location = "top_left"
        self.stakes, stakes_table = _table({"provider": [], "neuro": []}, ("provider", "neuro"), 260, "stakes",
                                           numbers=("neuro",), width=330)
        self.workers, workers_table = _table({"rank": [], "worker": [], "units": []}, ("rank", "worker", "units"),
                                             260, "leaderboard-workers", width=390)
        self.owners, owners_table = _table({"rank": [], "owner": [], "units": []}, ("rank", "owner", "units"), 260,
                                           "leaderboard-owners", width=330)
        self.proposals, proposals_table = _table({c: [] for c in views.PROPOSAL_COLUMNS}, views.PROPOSAL_COLUMNS,
                                                 200, "proposals")
        self.root = column(self.summary, self.fig,
                           row(column(Div(text="<b>stakes</b>"), stakes_table),
                               column(Div(text="<b>credits by worker</b>"), workers_table),
                               column(Div(text="<b>credits by owner</b>"), owners_table)),
                           Div(text="<b>open governance proposals</b>"), proposals_table, sizing_mode="stretch_width")

    def update(self) -> None:
        view = self.plugin.dashboard_view()
        if view.ledger is None:
            self.summary.text = ("<b>no ledger</b> on this scheduler: start it with <code>--neuro-ledger URL</code> "
                                 "(or set <code>neuro.ledger.url</code>) to see the NEURO economy here")
            return
        s = views.ledger_summary(view)
        self.summary.text = " &nbsp; ".join(f"{k.replace('_', ' ')}: <b>{v}</b>" for k, v in s.items()) + " NEURO"
        self.series.data = views.economy_series(self.plugin.feed)
        self.stakes.data = views.stake_columns(view)
        self.workers.data = views.ranked_columns(view.ledger.get("leaderboard", []), "worker")
        self.owners.data = views.ranked_columns(view.ledger.get("owners", []), "owner")
        self.proposals.data = views.proposal_columns(view)
