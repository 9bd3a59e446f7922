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
    DataRange1d,
    DataTable,
    DatetimeTickFormatter,
    Div,
    HoverTool,
    HTMLTemplateFormatter,
    Label,
    LinearColorMapper,
    MultiChoice,
    NumberFormatter,
    Range1d,
    TableColumn,
)
from bokeh.palettes import Blues256, Category10_10
from bokeh.plotting import figure

from neuro_dask.dashboard import views

PAGES = ("overview", "network", "experts", "calls", "trust", "economy")
# One palette for every heatmap, light to dark: more (load, replicas) is darker. Its palest
# tones are left out so that a cell of zero still shows against the white page.
HEAT = tuple(Blues256[::-1][32:])


def nav(current: str, prefix: str = "/") -> Div:
    links = [f'<a href="{prefix}status">Dask</a>'] + [
        f"<b>{p.title()}</b>" if p == current else f'<a href="{prefix}neuro/{p}">{p.title()}</a>' for p in PAGES
    ]
    return Div(
        text="neuro_dask &nbsp;|&nbsp; " + " &nbsp; ".join(links), styles={"font-size": "15px"}, name="neuro-nav"
    )


def _table(
    columns: dict,
    names: tuple[str, ...],
    height: int = 500,
    name: str | None = None,
    numbers: tuple[str, ...] = (),
    formatters: dict | None = None,
    **widths,
) -> tuple[ColumnDataSource, DataTable]:
    """A fixed-width table whose columns fit their header and values (views.fit_widths): a
    stretched one squeezes them until "correctness" reads "correctnes". Call `_fit` on update."""
    source = ColumnDataSource(columns)
    fit = views.fit_widths(columns, names) | widths
    cols = []
    for c in names:
        extra = {"formatter": NumberFormatter(format="0,0.[000]")} if c in numbers else {}
        if formatters and c in formatters:
            extra = {"formatter": formatters[c]}
        cols.append(TableColumn(field=c, title=views.header(c), width=fit[c], **extra))
    # (BokehJS 3.9's "fit_columns" autosizing throws while rendering: not used.)
    table = DataTable(
        source=source,
        columns=cols,
        height=height,
        name=name,
        index_position=None,
        autosize_mode="none",
        width=sum(fit.values()) + 20,
    )
    table.tags = [height]  # its tallest: _fit shrinks it to its rows, so no blank box under a short table
    return source, table


def _fit(table: DataTable, data: dict, **fixed) -> None:
    """Widen the columns to the data now shown (never narrower than their header)."""
    fit = views.fit_widths(data, [c.field for c in table.columns]) | fixed
    for c in table.columns:
        if c.width != fit[c.field]:
            c.width = fit[c.field]
    width = sum(fit.values()) + 20
    if table.width != width:
        table.width = width
    rows = len(next(iter(data.values()), ()))
    # 17 px for the horizontal scrollbar a table wider than the window gets (long relay:// addresses):
    # without it the last row hides under the bar
    height = max(90, min(table.tags[0], 32 + 25 * rows + 17))
    if table.height != height:
        table.height = height


def _over_time(title: str, name: str, height: int):
    """A figure of values over wall-clock time, as wide as the page."""
    fig = figure(
        title=title,
        x_axis_type="datetime",
        height=height,
        sizing_mode="stretch_width",
        tools="save,reset,xwheel_zoom,xpan",
        name=name,
    )
    _time_axis(fig)
    return fig


def _time_axis(fig, min_span_s: float = 60.0) -> None:
    """A clock on the x axis (values: ms since the epoch) that reads well with one point, a few
    or hours of them: never narrower than `min_span_s` (one point alone would make Bokeh zoom to
    a millisecond and print "999000us"), and HH:MM:SS or HH:MM at every zoom."""
    fig.x_range = DataRange1d(min_interval=1000 * min_span_s, range_padding=0.05)
    clock, short = "%H:%M:%S", "%H:%M"
    fig.xaxis.formatter = DatetimeTickFormatter(
        microseconds=clock,
        milliseconds=clock,
        seconds=clock,
        minsec=clock,
        minutes=short,
        hourmin=short,
        hours=short,
        days="%b %d",
        months="%b %Y",
        years="%Y",
    )


def _no_data(fig, text: str, x: float, y: float) -> Label:
    """A note on an empty figure saying why it is empty (screen pixels from its bottom left)."""
    label = Label(
        x=x,
        y=y,
        x_units="screen",
        y_units="screen",
        text=text,
        text_color="#666666",
        text_font_size="15px",
        text_align="center",
        name=f"{fig.name}-empty",
    )
    fig.add_layout(label)
    return label


class NetworkTable:
    """Every worker: status, trust, reputation and its components, hardware, stake, experts, calls, latency."""

    def __init__(self, plugin):
        self.plugin = plugin
        self.totals = Div(text="", name="network-totals")
        self.source, self.table = _table(
            {c: [] for c in views.NETWORK_COLUMNS}, views.NETWORK_COLUMNS, 600, "network-table", numbers=("stake",)
        )
        self.root = column(self.totals, self.table, sizing_mode="stretch_width")

    def update(self) -> None:
        view = self.plugin.dashboard_view()
        data = views.network_columns(view, self.plugin.feed)
        _fit(self.table, data)
        self.source.data = data
        t = views.network_totals(view)
        self.totals.text = (
            f"<b>{t['workers']}</b> workers: <b>{t['serving']}</b> serving, {t['paused']} paused, "
            f"{t['out_of_routing']} out of routing; <b>{t['owners']}</b> owners, {t['trusted']} "
            f"operator-trusted; <b>{t['gpus']}</b> GPUs; {t['memory_gib']} GiB RAM, "
            f"{t['vram_gib']} GiB VRAM, {t['expert_memory_gib']} GiB given to experts"
            + (f"; {t['relayed']} behind a NAT, reached through a relay" if t["relayed"] else "")
            + (f"<br>{relay}" if (relay := views.relay_summary(view)) else "")
        )


class ExpertHeatmap:
    """Layer x expert: serving replicas and recent load (x the mean), the placement target beside it."""

    def __init__(self, plugin):
        self.plugin = plugin
        self.source = ColumnDataSource({k: [] for k in views.HEATMAP_COLUMNS})
        self.title = Div(text="", name="experts-title")
        self.load_map = LinearColorMapper(palette=HEAT, low=0, high=2)
        self.load = self._figure(
            "expert-heatmap",
            "Recent load (x the mean; darker: hotter), serving replicas written in",
            "heat",
            self.load_map,
            "replicas",
            "ink_heat",
        )
        self.target_map = LinearColorMapper(palette=HEAT, low=0, high=3)
        self.target = self._figure(
            "expert-target",
            "Placement target (replicas planned; darker: more)",
            "target",
            self.target_map,
            "target",
            "ink_target",
        )
        self.root = column(self.title, row(self.load, self.target), sizing_mode="stretch_width")

    def _figure(self, name: str, title: str, field: str, mapper: LinearColorMapper, label: str, ink: str):
        fig = figure(
            title=title,
            name=name,
            x_axis_label="expert",
            y_axis_label="layer",
            height=520,
            width=620,
            tools="hover,save,reset,box_zoom,wheel_zoom",
            x_range=Range1d(-0.5, 0.5),
            y_range=Range1d(-0.5, 0.5),
            toolbar_location="above",
        )
        fig.rect(
            x="x",
            y="y",
            width=0.95,
            height=0.95,
            source=self.source,
            fill_color={"field": field, "transform": mapper},
            line_color=None,
        )
        fig.text(
            x="x",
            y="y",
            text=label,
            source=self.source,
            text_align="center",
            name=f"{name}-labels",
            text_baseline="middle",
            text_font_size="9px",
            text_color=ink,
        )
        fig.add_layout(ColorBar(color_mapper=mapper, ticker=BasicTicker(), width=10), "right")
        fig.select_one(HoverTool).tooltips = [
            ("layer", "@layer"),
            ("expert", "@expert"),
            ("replicas", "@replicas"),
            ("target", "@target"),
            ("load x mean", "@load"),
        ]
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
        self.load_map.high, self.target_map.high = views.heat_scales(data)
        self.source.data = data
        short = sum(1 for s in data["short"] if s)
        self.title.text = (
            f"model <b>{view.model or 'none published'}</b>: {view.layers} layers x {view.experts} "
            f"experts; {short} experts below their placement target"
        )


class VersionTable:
    """Model versions on channels: current, candidate, retiring (requests still running), retired."""

    def __init__(self, plugin):
        self.plugin = plugin
        self.title = Div(text="", name="versions-title")
        self.source, self.table = _table(
            {c: [] for c in views.VERSION_COLUMNS}, views.VERSION_COLUMNS, 200, "versions-table"
        )
        self.root = column(self.title, self.table, sizing_mode="stretch_width")

    def update(self) -> None:
        view = self.plugin.dashboard_view()
        self.source.data = views.version_columns(view)
        adoption = (view.versions or {}).get("adoption", "operator")
        self.title.text = (
            f"<b>Model versions</b> (adopted by {'governance vote' if adoption == 'vote' else 'the operator'}"
            "; `neuro-dask publish --channel`, `neuro-dask adopt`)"
        )


class CallStream:
    """The latest expert calls clients reported, newest first; `worker`, `outcome`, `request` and
    `layer` (the page's query arguments, as the trust page links them) keep only the matching calls."""

    def __init__(self, plugin, worker: str = "", outcome: str = "", request: str = "", layer: str = ""):
        self.plugin = plugin
        self.filters = {"worker": worker, "outcome": outcome, "request": request, "layer": layer}
        self.note = Div(text="", name="calls-note")
        self.source, self.table = _table(
            {c: [] for c in views.CALL_COLUMNS}, views.CALL_COLUMNS, 450, "calls-table", workers=320
        )
        self.root = column(self.note, self.table, sizing_mode="stretch_width")

    def update(self) -> None:
        import html

        view = self.plugin.dashboard_view()
        names = {w.address: w.name for w in view.workers}
        data = views.calls_columns(self.plugin.feed, names=names, **self.filters)
        _fit(self.table, data, workers=320)
        self.source.data = data
        shown = len(data["time"])
        f = {k: html.escape(v) for k, v in self.filters.items()}  # the query's words: never markup
        if any(f.values()):
            what = ", ".join(
                x
                for x in (
                    f"of request <b>{f['request']}</b>" if f["request"] else "",
                    f"in layer <b>{f['layer']}</b>" if f["layer"] else "",
                    f"of <b>{html.escape(names.get(self.filters['worker'], self.filters['worker']))}</b>"
                    if f["worker"]
                    else "",
                    f"with outcome <b>{f['outcome']}</b>" if f["outcome"] else "",
                )
                if x
            )
            gone = "" if shown else f" (the feed keeps the latest {self.plugin.feed.max_calls:,} calls)"
            self.note.text = f'{shown} recent calls {what}{gone} (<a href="neuro/calls">all calls</a>)'
        else:
            self.note.text = (
                f"{shown} most recent layer calls, newest first"
                if shown
                else "<b>no calls yet</b>: clients report their calls every 2 s while they generate"
            )


class LatencyHistograms:
    """Layer-call latency per transport, log-spaced bins."""

    def __init__(self, plugin, transports: tuple[str, ...] = ("direct", "futures")):
        self.plugin = plugin
        self.sources = {t: ColumnDataSource({"left": [], "right": [], "count": []}) for t in transports}
        self.empty = {}
        figs = []
        for t, source in self.sources.items():
            fig = figure(
                title=f"{t} transport: layer-call latency (ms)",
                x_axis_type="log",
                height=260,
                width=560,
                tools="save,reset",
                name=f"latency-{t}",
            )
            fig.quad(left="left", right="right", bottom=0, top="count", source=source, fill_alpha=0.7)
            self.empty[t] = _no_data(fig, f"no {t} calls yet", 270, 110)
            figs.append(fig)
        self.root = row(*figs)

    def update(self) -> None:
        for t, source in self.sources.items():
            source.data = views.latency_histogram(self.plugin.feed, t)
            self.empty[t].visible = not source.data["count"]


class TrustFeed:
    """Lifecycle (joined, paused, resumed, left, crashed, slashed), wrong results, late calls and
    trust changes, newest first, each with its cause in words and a link to its calls."""

    LINK = '<% if (value) { %><a href="<%= value %>">calls</a><% } %>'

    def __init__(
        self,
        plugin,
        limit: int = 300,
        name: str = "trust-events",
        actions=views.TRUST_ACTIONS,
        height: int = 400,
        heading: str = "",
    ):
        self.plugin, self.limit, self.actions = plugin, limit, actions
        self.source, self.table = _table(
            {c: [] for c in views.EVENT_COLUMNS},
            views.EVENT_COLUMNS,
            height,
            name,
            formatters={"calls_link": HTMLTemplateFormatter(template=self.LINK)},
            calls_link=60,
        )
        self.root = column(Div(text=heading), self.table) if heading else self.table

    def update(self) -> None:
        data = views.trust_event_columns(self.plugin.dashboard_view(), self.limit, self.actions)
        _fit(self.table, data, calls_link=60)
        self.source.data = data


class ReputationChart:
    """Reputation over time for the workers the operator picks (the five lowest by default)."""

    def __init__(self, plugin, lines: int = 10):
        self.plugin = plugin
        # Empty: the five lowest scores are charted (the placeholder says so); picking workers
        # charts those instead.
        self.picker = MultiChoice(
            title="workers charted (reputation over time)",
            options=[],
            value=[],
            width=600,
            placeholder="the five lowest scores; pick workers to chart them instead",
            name="reputation-picker",
        )
        self.fig = figure(
            title="reputation score",
            x_axis_type="datetime",
            height=320,
            sizing_mode="stretch_width",
            y_range=(0, 1.05),
            tools="save,reset,xwheel_zoom,xpan",
            name="reputation-chart",
        )
        _time_axis(self.fig)
        self.sources = [ColumnDataSource({"time": [], "score": []}) for _ in range(lines)]
        for i, source in enumerate(self.sources):
            self.fig.line(
                "time", "score", source=source, color=Category10_10[i % 10], line_width=2, legend_label=f"#{i + 1}"
            )
        self.fig.legend.location = "bottom_left"
        self.root = column(self.fig, self.picker, sizing_mode="stretch_width")

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
                self.fig.legend.items[i].update(label={"value": picked[i]}, visible=True)
            else:
                source.data = {"time": [], "score": []}
                # an unused line: no empty row in the legend's box
                self.fig.legend.items[i].update(label={"value": ""}, visible=False)


class Economy:
    """Supply, burned, treasury, fees and stakes over time; stakes; leaderboards; open proposals."""

    def __init__(self, plugin):
        self.plugin = plugin
        self.summary = Div(text="", name="economy-summary")
        self.series = ColumnDataSource({"time": []} | {k: [] for k in views.ECONOMY_SERIES})
        self.fig = figure(
            title="NEURO over time",
            x_axis_type="datetime",
            height=300,
            sizing_mode="stretch_width",
            tools="save,reset,xwheel_zoom,xpan",
            name="economy-chart",
        )
        _time_axis(self.fig)
        for i, key in enumerate(views.ECONOMY_SERIES):
            self.fig.line("time", key, source=self.series, color=Category10_10[i], legend_label=key, line_width=2)
        self.fig.legend.location = "top_left"
        self.stakes, stakes_table = _table(
            {"provider": [], "neuro": []}, ("provider", "neuro"), 260, "stakes", numbers=("neuro",), provider=250
        )
        self.workers, workers_table = _table(
            {"rank": [], "worker": [], "units": []}, ("rank", "worker", "units"), 260, "leaderboard-workers", worker=280
        )
        self.owners, owners_table = _table(
            {"rank": [], "owner": [], "units": []}, ("rank", "owner", "units"), 260, "leaderboard-owners", owner=220
        )
        self.proposals, proposals_table = _table(
            {c: [] for c in views.PROPOSAL_COLUMNS}, views.PROPOSAL_COLUMNS, 200, "proposals"
        )
        self.root = column(
            self.summary,
            self.fig,
            row(
                column(Div(text="<b>stakes</b>"), stakes_table),
                column(Div(text="<b>credits by worker</b>"), workers_table),
                column(Div(text="<b>credits by owner</b>"), owners_table),
            ),
            Div(text="<b>open governance proposals</b>"),
            proposals_table,
            sizing_mode="stretch_width",
        )

    def update(self) -> None:
        view = self.plugin.dashboard_view()
        # without a ledger there is nothing to chart: say why instead of empty axes and tables
        for part in self.root.children[1:]:
            part.visible = view.ledger is not None
        if view.ledger is None:
            self.summary.text = (
                "<b>no ledger configured</b>: start the scheduler with <code>--neuro-ledger URL</code> "
                "(or set <code>neuro.ledger.url</code>) to see the NEURO economy here: supply, "
                "burn, treasury, stakes, credits and governance proposals"
            )
            return
        s = views.ledger_summary(view)
        self.summary.text = " &nbsp; ".join(f"{k.replace('_', ' ')}: <b>{v}</b>" for k, v in s.items()) + " NEURO"
        self.series.data = views.economy_series(self.plugin.feed)
        self.stakes.data = views.stake_columns(view)
        self.workers.data = views.ranked_columns(view.ledger.get("leaderboard", []), "worker")
        self.owners.data = views.ranked_columns(view.ledger.get("owners", []), "owner")
        self.proposals.data = views.proposal_columns(view)


class Overview:
    """The network's health an operator reads in five seconds: experts at target, workers serving
    (paused, out of routing), throughput, caught wrong results, failures, latency over time, and
    the latest events."""

    FIGURES = ("experts", "workers", "tokens", "calls", "speculation", "caught", "errors")

    def __init__(self, plugin, window: float = 60.0):
        self.plugin, self.window = plugin, window
        self.cards = {
            k: Div(
                text="",
                name=f"overview-{k}",
                width=172,  # seven cards side by side within 1,366 px
                styles={"border": "1px solid #ddd", "border-radius": "6px", "padding": "8px", "margin": "4px"},
            )
            for k in self.FIGURES
        }
        self.latency = ColumnDataSource({"time": [], "p50": [], "p95": []})
        self.fig = _over_time("layer-call latency (ms): p50 and p95 per 5 s", "overview-latency", 260)
        self.fig.line("time", "p50", source=self.latency, color=Category10_10[0], line_width=2, legend_label="p50")
        self.fig.line("time", "p95", source=self.latency, color=Category10_10[1], line_width=2, legend_label="p95")
        # points too: calls arrive in batches, and one bin is one point, which no line draws
        self.fig.scatter("time", "p50", source=self.latency, color=Category10_10[0], size=7)
        self.fig.scatter("time", "p95", source=self.latency, color=Category10_10[1], size=7)
        self.fig.legend.location = "top_left"
        # No calls: a note in the chart's place, not empty axes around 1970.
        self.empty = Div(
            text="<b>layer-call latency</b>: no calls yet (clients report their layer calls every 2 s "
            "while they generate)",
            name="overview-latency-empty",
            visible=False,
            styles={
                "border": "1px solid #ddd",
                "border-radius": "6px",
                "padding": "16px",
                "margin": "4px",
                "color": "#666666",
            },
        )
        # Speculative decoding: tokens each pass over the layers yielded (1 = plain decoding).
        self.passes = ColumnDataSource({"time": [], "tokens_per_pass": [], "kept_share": []})
        title = "speculative decoding: tokens per pass over the layers, per 5 s (1 = plain decoding)"
        self.passes_fig = _over_time(title, "overview-passes", 200)
        self.passes_fig.visible = False
        self.passes_fig.line("time", "tokens_per_pass", source=self.passes, color=Category10_10[2], line_width=2)
        self.passes_fig.scatter("time", "tokens_per_pass", source=self.passes, color=Category10_10[2], size=7)
        self.events = TrustFeed(plugin, limit=12, name="overview-events", actions=views.RECENT_ACTIONS, height=330)
        self.root = column(
            row(*self.cards.values()),
            self.fig,
            self.empty,
            self.passes_fig,
            Div(text='<b>recent events</b> (all of them: <a href="neuro/trust">Trust</a>)'),
            self.events.root,
            sizing_mode="stretch_width",
        )

    def update(self) -> None:
        import time

        view = self.plugin.dashboard_view()
        o = views.overview(view, self.plugin.feed, time.time(), self.window)
        ok = o.experts_total and o.experts_at_target == o.experts_total
        figures = {
            "experts": (
                f"{o.experts_at_target} / {o.experts_total}",
                "experts at target replicas",
                "" if ok or not o.experts_total else "#b35806",
            ),
            "workers": (
                f"{o.serving} / {o.workers}",
                f"workers serving; {o.paused} paused, {o.out_of_routing} out of routing",
                "",
            ),
            "tokens": self._throughput(o),
            "calls": (f"{o.calls_per_s:g}", f"layer calls/s (last {self.window:g} s)", ""),
            "speculation": self._speculation(o),
            "caught": (
                f"{o.caught}",
                f"wrong results caught; {o.proven} proven by recomputation",
                "#b35806" if o.caught or o.proven else "",
            ),
            "errors": (
                f"{100 * o.error_rate:.1f}%",
                f"layer calls failed ({o.failed} of {o.layer_calls})",
                "#b2182b" if o.failed else "",
            ),
        }
        for key, (big, small, colour) in figures.items():
            style = f' style="color:{colour}"' if colour else ""
            self.cards[key].text = (
                f'<div{style}><span style="font-size:26px"><b>{big}</b></span><br>'
                f'<span style="font-size:12px">{small}</span></div>'
            )
        self.latency.data = views.latency_over_time(self.plugin.feed)
        self.empty.visible = not self.latency.data["time"]
        self.fig.visible = not self.empty.visible
        self.passes.data = views.tokens_per_pass_over_time(self.plugin.feed)
        self.passes_fig.visible = bool(self.passes.data["time"])
        self.events.update()

    def _speculation(self, o: views.Overview) -> tuple[str, str, str]:
        if o.tokens_per_pass is None:
            return "-", f"tokens per pass: no speculative decoding (last {self.window:g} s)", "#666666"
        return (
            f"{o.tokens_per_pass:.2f}",
            f"tokens per pass (speculative decoding: {o.speculative_passes} passes, last {self.window:g} s)",
            "",
        )

    def _throughput(self, o: views.Overview) -> tuple[str, str, str]:
        """Tokens/s where the clients' call records carry their rows (forward passes/s beside
        it), else forward passes/s alone: what the scheduler can count, labelled as such."""
        window = f"last {self.window:g} s"
        if o.tokens_per_s is None:
            return f"{o.passes_per_s:g}", f"forward passes/s ({window}; clients report no rows)", ""
        return (
            f"{o.tokens_per_s:g}",
            f"<span title=\"rows of each model's first MoE layer / experts per token, "
            f'as clients report them (a client can only inflate this figure)">tokens/s processed</span> '
            f"({window}); {o.passes_per_s:g} forward passes/s",
            "",
        )
