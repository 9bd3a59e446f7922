"""The dashboard's pure parts: the feed the plugin keeps, and the columns each chart shows."""

from __future__ import annotations

import pytest
from dashboard_helpers import worker

from neuro_dask.dashboard import views
from neuro_dask.dashboard.feed import LATENCY_BUCKETS, CallRecord, Feed


def call(seconds: float, workers=("tcp://a:1",), transport="direct", outcome="ok", hedges=0, t=0.0) -> CallRecord:
    return CallRecord(t, "m", 1, 2, tuple(workers), seconds, 2, hedges, outcome, transport)


def test_network_columns_rank_by_reputation_and_name_the_trust_tier():
    feed = Feed()
    feed.add_calls([call(0.010, ["tcp://b:1"]), call(0.030, ["tcp://b:1"]), call(0.020, ["tcp://b:1"])])
    view = views.NetworkView(
        workers=[
            worker("a", score=0.2, routable=False),
            worker("b", score=0.9, trusted=True, gpus=2, vram=48 * views.GiB),
            worker("c", score=0.6, established=True, owner="carol", stake=5 * 10**9),
        ]
    )
    cols = views.network_columns(view, feed)
    assert cols["name"] == ["b", "c", "a"]
    assert cols["trust"] == ["trusted", "established", "out of routing"]
    assert cols["hardware"][0] == "4 CPU, 2 GPU" and cols["vram_gib"][0] == 48.0
    assert cols["owner"] == ["b", "carol", "a"]  # no owner: its own
    assert cols["stake"][1] == 5.0
    assert cols["p50_ms"][0] == "20.00" and cols["p95_ms"][0] == "30.00"
    assert cols["p50_ms"][2] == cols["p95_ms"][2] == "-"  # no calls: no latency (and never NaN)
    totals = views.network_totals(view)
    assert totals == {
        "workers": 3,
        "serving": 3,
        "paused": 0,
        "out_of_routing": 0,
        "gpus": 2,
        "memory_gib": 24.0,
        "vram_gib": 48.0,
        "expert_memory_gib": 12.0,
        "owners": 3,
        "trusted": 1,
        "relayed": 0,
    }


def test_the_heatmap_shows_load_against_the_mean_and_experts_short_of_their_target():
    view = views.NetworkView(
        layers=1,
        experts=3,
        replicas={(0, 0): 2, (0, 1): 1, (0, 2): 0},
        target={(0, 0): 2, (0, 1): 2, (0, 2): 2},
        load={(0, 0): 30.0, (0, 1): 0.0, (0, 2): 0.0},
    )
    cols = views.heatmap_columns(view)
    assert cols["expert"] == ["0", "1", "2"] and cols["layer"] == ["0", "0", "0"]
    assert cols["load"] == [3.0, 0.0, 0.0]  # 30 against a mean of 10: a hot expert
    assert cols["short"] == [0, 1, 2]


def test_calls_newest_first_and_bounded():
    feed = Feed(max_calls=5)
    feed.add_calls([call(0.001 * i, t=float(i)) for i in range(8)])
    assert len(feed.calls) == 5
    cols = views.calls_columns(feed, limit=3)
    assert cols["ms"] == [7.0, 6.0, 5.0]


def test_latency_counts_are_cumulative_prometheus_buckets():
    feed = Feed()
    feed.add_calls([call(0.0005), call(0.003), call(0.003), call(30.0, hedges=2)])
    buckets = feed.latency_buckets()
    assert buckets[0] == (LATENCY_BUCKETS[0], 1)
    assert dict(buckets)[0.005] == 3 and buckets[-1] == (float("inf"), 4)
    assert feed.latency_count == 4 and feed.latency_sum == pytest.approx(30.0065)
    assert feed.counts["hedges"] == 2


def test_the_latency_histogram_counts_each_call_of_its_transport_once():
    feed = Feed()
    feed.add_calls([call(s) for s in (0.001, 0.002, 0.004, 0.05)] + [call(0.2, transport="futures")])
    hist = views.latency_histogram(feed, "direct", bins=5)
    assert sum(hist["count"]) == 4 and len(hist["left"]) == 5
    assert hist["left"][0] == pytest.approx(1.0) and hist["right"][-1] == pytest.approx(50.0)
    assert views.latency_histogram(feed, "nothing") == {"left": [], "right": [], "count": []}


def test_the_trust_feed_keeps_what_an_operator_must_see_newest_first():
    events = [
        {"time": 1.0, "action": "validated", "worker": "a"},
        {"time": 2.0, "action": "invalid", "worker": "b", "reputation": 0.25, "cause_id": "c1"},
        {"time": 3.0, "action": "slash", "worker": "b"},
    ]
    cols = views.trust_event_columns(views.NetworkView(events=events))
    assert cols["action"] == ["slashed", "invalid"]
    assert cols["reputation"] == ["-", "0.250"]  # no NaN where an event has no reputation
    assert cols["expert"] == ["-", "-"]


def test_the_trust_feed_shows_hardened_mode_refusals_with_their_peer():
    events = [
        {"time": 1.0, "action": "security:pickle", "worker": "worker:mallory", "cause": "io.open"},
        {"time": 2.0, "action": "security", "name": "mallory", "reputation": 0.1},
        {"time": 3.0, "action": "validated", "worker": "a"},
    ]
    cols = views.trust_event_columns(views.NetworkView(events=events))
    assert cols["action"] == ["security", "security:pickle"]
    assert cols["worker"] == ["mallory", "worker:mallory"] and cols["cause"][1] == "io.open"


def test_reputation_and_economy_over_time():
    feed = Feed(max_samples=2)
    for t in (1.0, 2.0, 3.0):
        feed.sample_reputation({"a": t / 10}, t)
        feed.sample_economy({"treasury": int(t * 1e9), "burned": 0}, t)
    assert views.reputation_series(feed, ["a", "z"]) == {
        "a": {"time": [2000.0, 3000.0], "score": [0.2, 0.3]},
        "z": {"time": [], "score": []},
    }
    series = views.economy_series(feed)
    assert series["treasury"] == [2.0, 3.0] and series["time"] == [2000.0, 3000.0]


def test_a_malformed_call_report_is_refused():
    with pytest.raises(ValueError):
        CallRecord.from_report([1, 2, ["w"], "slow", 1, 0, "ok", "direct"], "m", 0.0)
    with pytest.raises(ValueError):
        CallRecord.from_report([1, 2], "m", 0.0)


def test_version_rows_show_each_channels_versions_newest_first():
    from neuro_dask.scheduler.versions import ModelChannels

    c = ModelChannels(adoption="vote", drain_seconds=0)
    for model in ("v1", "v2"):
        c.publish("adder", model, 0)
    c.adopt("adder", "v2", True, 1, by_vote=True)
    c.begin("v2", "r", 1)
    c.publish("adder", "v3", 2)
    c.approve("adder", "v3")
    c.begin("v1", "old-request", 1)
    cols = views.version_columns(views.NetworkView(versions=c.status(3)))
    assert list(zip(cols["model"], cols["role"], cols["requests"], strict=True)) == [
        ("v3", "candidate (approved by vote)", ""),
        ("v2", "current", ""),
        ("v1", "retiring", 1),
    ]
    c.end("old-request")
    c.retirable(4)
    assert views.version_columns(views.NetworkView(versions=c.status(4)))["role"][-1] == "retired"
    assert views.version_columns(views.NetworkView()) == {k: [] for k in views.VERSION_COLUMNS}


def test_call_reports_carry_rows_and_request_as_checked_plain_data():
    r = CallRecord.from_report([1, 2, ["tcp://w:1"], 0.01, 2, 0, "ok", "direct", 12, "5a53df92aa"], "m", 7.0)
    assert (r.rows, r.request, r.time) == (12, "5a53df92aa", 7.0)
    old = CallRecord.from_report([1, 2, ["tcp://w:1"], 0.01, 2, 0, "ok", "direct"], "m", 7.0)
    assert (old.rows, old.request) == (-1, "")  # an older client: no rows, no request
    for bad in (
        [1, 2, ["w"], 0.01, 2, 0, "ok", "direct", 1 << 30, "r"],  # rows out of bounds
        [1, 2, ["w"], 0.01, 2, 0, "ok", "direct", True, "r"],  # a bool is no count
        [1, 2, ["w"], 0.01, 2, 0, "ok", "direct", 3, "<script>"],  # no id
        [1, 2, ["w"], 0.01, 2, 0, "ok", "direct", 3, "r" * 65],
        [1, 2, ["w"], 0.01, 2, 0, "ok", "direct", 3],  # 9 fields
        ["1", 2, ["w"], 0.01, 2, 0, "ok", "direct"],  # a layer must be an int
        [1, 2, "w", 0.01, 2, 0, "ok", "direct"],  # workers must be a list
        [1, 2, ["w"], -1.0, 2, 0, "ok", "direct"],
        {"layer": 1},
    ):
        with pytest.raises(ValueError):
            CallRecord.from_report(bad, "m", 0.0)


def test_the_calls_page_filters_by_request_and_layer():
    feed = Feed()
    feed.add_calls(
        [
            CallRecord(1.0, "m", layer, 2, ("tcp://a:1",), 0.01, 2, 0, "ok", "direct", 8, request)
            for layer, request in ((0, "aaaa1111"), (1, "aaaa1111"), (1, "bbbb2222"), (1, ""))
        ]
    )
    assert views.calls_columns(feed, request="aaaa1111")["layer"] == [1, 0]
    assert views.calls_columns(feed, request="aaaa", layer="1")["request"] == ["aaaa1111"]
    assert views.calls_columns(feed, layer="1")["request"] == ["-", "bbbb2222", "aaaa1111"]
    assert views.calls_columns(feed)["rows"] == [8, 8, 8, 8]


def test_tokens_per_pass_counts_the_kept_drafts_and_the_models_own_token():
    from neuro_dask.dashboard import views
    from neuro_dask.dashboard.feed import Feed
    from neuro_dask.protocol.records import PassReport

    feed = Feed()
    assert views.tokens_per_pass([]) is None
    feed.add_passes("m", [PassReport(4, 4), PassReport(4, 0)], now=100.0)
    feed.add_passes("m", [PassReport(2, 1)], now=107.0)
    assert views.tokens_per_pass(list(feed.passes)) == round((5 + 1 + 2) / 3, 2)
    cols = views.tokens_per_pass_over_time(feed, bin_seconds=5.0)
    assert cols["time"] == [100_000.0, 105_000.0]
    assert cols["tokens_per_pass"] == [3.0, 2.0] and cols["kept_share"] == [0.5, 0.5]
    assert feed.counts["speculative_passes"] == 3 and feed.counts["speculative_kept"] == 5


def test_the_network_table_says_which_workers_are_reached_through_a_relay():
    view = views.NetworkView(
        workers=[
            worker("home", score=0.5, address="relay://10.0.0.1:8788/abcdefghijklmnopqrst"),
            worker("lab", score=0.4),
        ],
        relay={"volunteers": 3, "spliced_now": 2, "spliced_total": 40, "refused_total": 1, "bytes_total": 3 * 2**20},
    )
    cols = views.network_columns(view, Feed())
    assert cols["path"] == ["relayed", "direct"]
    assert views.network_totals(view)["relayed"] == 1
    assert views.relay_summary(view) == (
        "relay: 3 volunteers registered, 2 connections open, 40 spliced and 1 refused so far, 3.0 MiB copied"
    )
    assert views.relay_summary(views.NetworkView()) == ""


def test_the_path_column_shows_how_the_clients_that_called_a_relayed_worker_reach_it():
    from neuro_dask.protocol.records import PathReport

    home = "relay://10.0.0.1:8788/abcdefghijklmnopqrst"
    view = views.NetworkView(workers=[worker("home", score=0.5, address=home), worker("lab", score=0.4)])
    feed = Feed()
    feed.add_paths("client:alice", [PathReport(home, "punched", 21.0)], now=1_000.0)
    feed.add_paths("10.0.0.9", [PathReport(home, "lan", 0.3)], now=1_000.0)
    feed.add_paths("10.0.0.7", [PathReport(home, "relayed", 40.0)], now=100.0)  # reported long ago
    feed.add_paths("client:alice", [PathReport(home, "punched", 19.0)], now=1_010.0)  # alice again: one client
    cols = views.network_columns(view, feed, now=1_020.0)
    assert cols["path"] == ["relayed: punched 1, lan 1", "direct"]
    assert feed.paths_to(home, now=1_020.0, window=10_000.0) == {"punched": 1, "lan": 1, "relayed": 1}


def test_path_reports_are_bounded_however_many_workers_and_clients_report():
    from neuro_dask.protocol.records import PathReport

    feed = Feed(max_path_workers=10, max_path_clients=3)
    for c in range(20):
        feed.add_paths(f"10.0.0.{c}", [PathReport(f"relay://r:1/{w:020d}", "relayed") for w in range(30)], now=c)
    assert len(feed.paths) == 10 and all(len(by_client) == 3 for by_client in feed.paths.values())
    # the newest clients are kept
    assert set(feed.paths["relay://r:1/" + f"{29:020d}"]) == {"10.0.0.17", "10.0.0.18", "10.0.0.19"}
