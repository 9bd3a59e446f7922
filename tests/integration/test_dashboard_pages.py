"""The operator dashboard: each chart built on a scheduler with plugin state, and each page served.

One in-process cluster with a dashboard runs a generation with trust on and a perturbing worker,
so that every page has something to show: workers, placement and load, calls, caught results.
"""

from __future__ import annotations

import json
import urllib.request

import dask
import pytest
from cluster_helpers import add_worker
from polling import poll_until

import neuro_dask as nd
from neuro_dask.client.cluster import local_cluster
from neuro_dask.dashboard import charts, views

TRUST = {"neuro.scheduler.trusted": ["0"], "neuro.client.trust": True, "neuro.client.seed": 0}


@pytest.fixture(scope="module")
def network(sharded, tmp_path_factory):
    from distributed import Client

    cache = tmp_path_factory.mktemp("dash-cache")
    with (
        dask.config.set({**TRUST, "neuro.worker.cache-dir": str(cache)}),
        local_cluster(
            3, processes=False, worker_args=["--neuro-no-benchmark"], dashboard_address="127.0.0.1:0"
        ) as cluster,
        Client(cluster) as client,
    ):
        bad = add_worker(
            client,
            cluster.scheduler_address,
            "bad0",
            "--neuro-adversary",
            json.dumps({"mode": "perturb", "seed": 1}),
            "--neuro-owner",
            "mallory",
        )
        client.wait_for_workers(4)
        with nd.load(sharded("mixtral"), client=client) as model:
            model.generate([[5 + i, 6, 7, 8] for i in range(6)], max_new_tokens=12)
        plugin = cluster.scheduler.extensions["neuro"]
        # calls served arrive with the workers' heartbeats
        poll_until(
            lambda: sum(w.calls_served for w in plugin.dashboard_view().workers) > 0,
            60,
            "calls served to reach the dashboard",
            interval=0.1,
        )
        yield plugin, client.dashboard_link.rsplit("/", 1)[0], bad.address
        client.sync(bad.close)


def test_the_network_table_lists_every_worker_with_its_standing(network):
    plugin, _, bad = network
    table = charts.NetworkTable(plugin)
    table.update()
    data = table.source.data
    assert sorted(data["name"]) == ["0", "1", "2", "bad0"]
    row = data["address"].index(bad)
    assert data["owner"][row] == "mallory" and data["trust"][row] == "out of routing"
    assert data["status"][row] == "out of routing"  # it holds experts, but no client is routed to it
    assert data["trust"][data["name"].index("0")] == "trusted"
    assert all(int(h.split()[0]) > 0 for h in data["hosted"]) and sum(data["calls"]) > 0
    assert "nan" not in repr(data).lower()
    assert "4</b> workers" in table.totals.text


def test_the_heatmap_has_a_cell_per_expert_with_replicas_and_target(network):
    plugin, _, _ = network
    heat = charts.ExpertHeatmap(plugin)
    heat.update()
    data = heat.source.data
    view = plugin.dashboard_view()
    assert len(data["layer"]) == view.layers * view.experts == 3 * 8
    assert all(r >= 1 for r in data["replicas"]) and all(t >= 1 for t in data["target"])
    assert sum(data["load"]) > 0  # the generation's load was reported
    assert (heat.load.x_range.start, heat.load.x_range.end) == (-0.5, 7.5)
    assert heat.load.select_one({"name": "expert-heatmap-labels"}).visible  # 8 experts: numbered cells


def test_the_heatmap_scales_to_hundreds_of_experts_per_layer():
    """A DeepSeek-V3-shaped network: 61 layers x 256 experts, one cell each, no per-cell numbers."""
    from types import SimpleNamespace

    cells = {(layer, e): 1 for layer in range(61) for e in range(256)}
    view = views.NetworkView(
        layers=61,
        experts=256,
        replicas=cells,
        target=cells,
        load={c: float(c[1] % 7) for c in cells},
        model="deepseek_v3-x",
    )
    heat = charts.ExpertHeatmap(SimpleNamespace(dashboard_view=lambda: view))
    heat.update()
    assert len(heat.source.data["x"]) == 61 * 256
    assert (heat.load.x_range.end, heat.load.y_range.end) == (255.5, 60.5)
    assert not heat.load.select_one({"name": "expert-heatmap-labels"}).visible
    assert heat.load.width >= 5 * 256  # a few pixels per expert


def test_the_call_stream_and_histograms_show_the_generation(network):
    plugin, _, _ = network
    stream, hist = charts.CallStream(plugin), charts.LatencyHistograms(plugin)
    stream.update()
    hist.update()
    assert len(stream.source.data["layer"]) > 0
    assert "caught" in stream.source.data["outcome"]  # the perturber's wrong results were refuted
    assert sum(hist.sources["direct"].data["count"]) == sum(t == "direct" for t in stream.source.data["transport"])


def test_the_trust_page_shows_the_caught_results_and_reputation_over_time(network):
    plugin, _, bad = network
    feed, chart = charts.TrustFeed(plugin), charts.ReputationChart(plugin)
    plugin.feed.sample_reputation({n: plugin.reputation.score(n) for n in plugin.identity.values()}, 1e9)
    feed.update()
    chart.update()
    events = feed.source.data
    assert "invalid" in events["action"] and "bad0" in events["worker"]  # by name, as the network page shows it
    at = events["action"].index("invalid")
    caught = events["cause"][at]
    # words, not a hash: the request, where the wrong answer was, and who recomputed it
    assert caught.startswith("request ") and ", layer " in caught and ", expert " in caught
    assert "recomputed by operator-trusted worker 0" in caught
    assert events["layer"][at] != "-" and events["expert"][at] != "-"
    # its calls: the disputed request's, in that layer, which the clients' records carry
    link = events["calls_link"][at]
    assert link.startswith("neuro/calls?request=") and "&layer=" in link
    request = link.split("request=")[1].split("&")[0]
    assert any(r.request == request for r in plugin.feed.calls)
    assert "bad0" in chart.picker.options
    assert any(len(s.data["score"]) > 0 for s in chart.sources)


def test_the_economy_page_says_when_there_is_no_ledger(network):
    plugin, _, _ = network
    economy = charts.Economy(plugin)
    economy.update()
    assert "no ledger" in economy.summary.text
    assert not economy.fig.visible  # no empty chart (nor empty tables) under the note


def test_the_overview_matches_the_schedulers_state(network):
    plugin, _, _ = network
    overview = charts.Overview(plugin)
    overview.update()
    status = plugin.status()
    model = next(iter(status["models"]))
    pending = plugin.coordinator.routes(model).pending  # experts short of their planned replicas
    assert f"{24 - len(pending)} / 24" in overview.cards["experts"].text
    assert f"/ {len(status['workers'])}" in overview.cards["workers"].text
    assert f"<b>{plugin.feed.counts.get('quorum_caught', 0)}</b>" in overview.cards["caught"].text
    assert overview.latency.data["p50"] and not overview.empty.visible
    # tokens/s: the clients' records carry their rows and request, the scheduler knows k
    assert plugin.feed.calls and all(r.rows > 0 and r.request for r in plugin.feed.calls)
    assert plugin.dashboard_view().experts_per_token == {model: 2}
    first, last = min(r.layer for r in plugin.feed.calls), max(r.time for r in plugin.feed.calls)
    o = views.overview(plugin.dashboard_view(), plugin.feed, last, 60.0)
    rows = sum(r.rows for r in plugin.feed.calls if r.layer == first and r.time >= last - 60)
    assert o.tokens_per_s == round(rows / 2 / 60, 2) and o.tokens_per_s > 0


@pytest.mark.parametrize("page", charts.PAGES)
def test_each_page_is_served_on_the_schedulers_dashboard(network, page):
    _, base, _ = network
    with urllib.request.urlopen(f"{base}/neuro/{page}", timeout=30) as reply:
        html = reply.read().decode()
    assert reply.status == 200
    assert f"neuro_dask: {page}" in html and "Bokeh" in html


def test_the_stock_dashboard_links_to_the_overview_page(network):
    _, base, _ = network
    with urllib.request.urlopen(f"{base}/status", timeout=30) as reply:
        assert 'href="neuro/overview"' in reply.read().decode()


def test_metrics_carry_the_neuro_series(network):
    _, base, bad = network
    with urllib.request.urlopen(f"{base}/metrics", timeout=30) as reply:
        text = reply.read().decode()
    assert "neuro_worker_reputation" in text and "neuro_worker_hosted_experts" in text
    assert f'worker="{bad}"' in text or 'worker="bad0"' in text
