"""The dashboard's overview figures, worker lifecycle events, readable causes and table widths:
pure functions, no Bokeh, no Dask."""

from __future__ import annotations

from dashboard_helpers import worker

from neuro_dask.dashboard import views
from neuro_dask.dashboard.feed import CallRecord, Feed
from neuro_dask.trust.lifecycle import LIFECYCLE, departure, lifecycle_action


def call(t: float, layer: int = 0, seconds: float = 0.01, outcome: str = "ok") -> CallRecord:
    return CallRecord(t, "m", layer, 2, ("tcp://a:1",), seconds, 2, 0, outcome, "direct")


# ---- lifecycle -----------------------------------------------------------------------------


def test_a_worker_that_closed_itself_left():
    events = [
        {"action": "add-worker"},
        {"action": "worker-status-change", "status": "closing"},
        {"action": "remove-worker", "expected": False, "stimulus_id": "handle-worker-cleanup-1"},
    ]
    assert departure(events) == "left"


def test_a_retired_worker_left():
    assert departure([{"action": "add-worker"}, {"action": "remove-worker", "expected": True}]) == "left"
    assert departure([{"action": "remove-worker", "stimulus_id": "nanny-close-12.5"}]) == "left"


def test_a_worker_whose_connection_broke_without_a_goodbye_crashed():
    events = [
        {"action": "add-worker"},
        {"action": "worker-status-change", "status": "running"},
        {"action": "remove-worker", "expected": False, "stimulus_id": "handle-worker-cleanup-1"},
    ]
    assert departure(events) == "crashed"
    assert departure([]) == "crashed"


def test_an_earlier_worker_at_the_same_address_does_not_count():
    events = [
        {"action": "add-worker"},
        {"action": "closing-worker"},
        {"action": "remove-worker", "expected": False},
        {"action": "add-worker"},
        {"action": "remove-worker", "expected": False},
    ]
    assert departure(events) == "crashed"


def test_the_lifecycle_vocabulary():
    named = [lifecycle_action({"action": a}) for a in ("joined", "pause", "resume", "left", "crashed", "slash")]
    assert tuple(named) == LIFECYCLE
    assert lifecycle_action({"action": "invalid"}) is None


# ---- the trust feed's words ------------------------------------------------------------------


def test_a_proven_wrong_result_reads_as_its_request_layer_expert_and_referee():
    events = [
        {
            "time": 1.0,
            "action": "dispute-proven",
            "name": "bad0",
            "request": "4ae619962f8a43df",
            "why": "the accused's answer disagrees with every trusted referee (0)",
        },
        {
            "time": 1.0,
            "action": "invalid",
            "worker": "tcp://h:9",
            "name": "bad0",
            "reputation": 0.25,
            "cause_id": "dispute:4ae619962f8a43df:bad0",
            "request": "4ae619962f8a43df",
            "referees": ["0"],
            "slashable": True,
            "layer": 1,
            "expert": 3,
        },
    ]
    cols = views.trust_event_columns(views.NetworkView(events=events))
    assert cols["action"] == ["invalid"]  # the verdict's own event is folded into the result's
    # the referee by name, as a worker (a bare "(0)" read as a count), and where the call was
    assert cols["cause"] == [
        "request 4ae61996, layer 1, expert 3: result proven wrong: recomputed by "
        "operator-trusted worker 0, whose answer differs"
    ]
    assert (cols["layer"], cols["expert"]) == (["1"], ["3"])
    # its calls: the disputed request's, in the disputed layer (the caught call is among them)
    assert cols["calls_link"] == ["neuro/calls?request=4ae619962f8a43df&layer=1"]


def test_a_verdict_by_two_untrusted_referees_and_an_older_event_without_names():
    two = views.describe(
        {"action": "invalid", "cause_id": "dispute:abcdef0123:bad0", "referees": ["2", "x"], "slashable": False}
    )
    assert (
        two
        == "request abcdef01: result proven wrong: recomputed by workers 2, x, whose answers agree, and differ from it"
    )
    bare = views.describe({"action": "invalid", "cause_id": "dispute:abcdef0123:bad0"})
    assert bare == "request abcdef01: result proven wrong by recomputation"
    assert (
        views.calls_link({"action": "invalid", "cause_id": "dispute:abcdef0123:bad0"})
        == "neuro/calls?request=abcdef0123"
    )


def test_a_judged_call_names_its_layer_and_expert_and_never_minus_one():
    cause = views.describe(
        {"action": "invalid", "cause_id": "abc12345ffff", "layer": 3, "expert": 5, "request": "r0123456789"}
    )
    assert cause == "request r0123456, call abc12345, layer 3, expert 5: result differed from quorum"
    cols = views.trust_event_columns(
        views.NetworkView(
            events=[
                {
                    "time": 1.0,
                    "action": "timeout",
                    "name": "w",
                    "layer": -1,
                    "expert": -1,
                    "cause": "probe",
                    "why": "no route",
                }
            ]
        )
    )
    assert cols["layer"] == ["-"] and cols["expert"] == ["-"]
    assert cols["cause"] == ["the scheduler's probe got no answer: no route"]


def test_departures_and_pauses_show_on_the_trust_feed():
    events = [
        {"time": 1.0, "action": "joined", "worker": "w1", "reputation": 0.5, "cause_id": ""},
        {"time": 2.0, "action": "pause", "worker": "tcp://w1:1", "name": "w1", "reason": "gpu busy"},
        {"time": 3.0, "action": "resume", "worker": "tcp://w1:1", "name": "w1", "reason": ""},
        {"time": 4.0, "action": "crashed", "worker": "tcp://w1:1", "name": "w1", "experts": 8},
        {"time": 5.0, "action": "left", "worker": "tcp://w2:1", "name": "w2", "experts": 0},
        {"time": 6.0, "action": "slash", "worker": "w1", "cause": "dispute:feedbeef00:w1"},
    ]
    cols = views.trust_event_columns(views.NetworkView(events=events))
    assert cols["action"] == ["slashed", "left", "crashed", "resumed", "paused", "joined"]
    assert cols["worker"] == ["w1", "w2", "w1", "w1", "w1", "w1"]
    assert "8 experts" in cols["cause"][2] and "without a goodbye" in cols["cause"][2]
    assert cols["cause"][1] == "closed on purpose" and cols["cause"][4] == "gpu busy"
    assert cols["cause"][0] == "request feedbeef: stake slashed for a result proven wrong"
    assert cols["calls_link"][2] == "neuro/calls?worker=tcp%3A%2F%2Fw1%3A1"
    assert cols["calls_link"][0] == "neuro/calls?request=feedbeef00"  # the slash: the disputed request's calls
    assert "nan" not in repr(cols).lower()


# ---- the network table -----------------------------------------------------------------------


def test_the_status_says_serving_only_where_clients_are_routed():
    assert views.worker_state("running", False, True, 8, 8) == "serving"
    assert views.worker_state("running", False, False, 8, 8) == "out of routing"
    assert views.worker_state("running", True, True, 8, 8) == "paused"
    assert views.worker_state("paused", False, True, 8, 8) == "paused"
    assert views.worker_state("closing_gracefully", False, True, 8, 8) == "closing"
    assert views.worker_state("running", False, True, 0, 4) == "loading"
    assert views.worker_state("running", False, True, 0, 0) == "idle"


def test_the_experts_cell_shows_the_workers_own_figure_where_it_differs():
    assert views.experts_cell(8, None) == "8" and views.experts_cell(8, 8) == "8"
    assert views.experts_cell(4, 0) == "4 (worker: 0)"


def test_columns_are_as_wide_as_their_header_and_their_longest_value():
    cols = {"correctness": [0.5], "address": ["tcp://127.0.0.1:33107"], "p50_ms": ["-"]}
    widths = views.fit_widths(cols, ["correctness", "address", "p50_ms"], char_px=8, pad=20)
    assert widths["correctness"] == len("correct") * 8 + 20  # the short header, longer than "0.5"
    assert widths["address"] == len("tcp://127.0.0.1:33107") * 8 + 20
    assert widths["p50_ms"] == len("p50") * 8 + 20  # its tooltip says "ms"


def test_abbreviated_headers_explain_themselves_in_a_tooltip():
    assert views.header("p50_ms") == '<span title="median latency of its recent layer calls, ms">p50</span>'
    assert views.header("name") == "name"  # plain where it says all


# ---- colour scales -----------------------------------------------------------------------------


def test_both_heatmaps_label_dark_cells_white_and_light_cells_black():
    view = views.NetworkView(
        layers=1,
        experts=2,
        replicas={(0, 0): 2, (0, 1): 1},
        target={(0, 0): 3, (0, 1): 1},
        load={(0, 0): 30.0, (0, 1): 0.0},
    )
    cols = views.heatmap_columns(view)
    assert views.heat_scales(cols) == (2.0, 3.0)
    assert cols["ink_heat"] == ["white", "black"] and cols["ink_target"] == ["white", "black"]


# ---- the overview ------------------------------------------------------------------------------


def test_the_overview_counts_experts_at_target_workers_and_throughput():
    view = views.NetworkView(
        workers=[worker("a"), worker("b", status="paused"), worker("c", status="out of routing")],
        replicas={(0, 0): 2, (0, 1): 1, (1, 0): 0},
        target={(0, 0): 2, (0, 1): 2, (1, 0): 2},
    )
    feed = Feed()
    feed.add_calls(
        [
            call(100.0, 0),
            call(100.0, 1),
            call(110.0, 0, outcome="caught"),
            call(115.0, 1, outcome="failed"),
            call(10.0, 0),
        ]
    )  # the last one is older than the window
    feed.count("invalid", 2)
    o = views.overview(view, feed, now=120.0, window=60.0)
    assert (o.experts_at_target, o.experts_total) == (1, 3)
    assert (o.workers, o.serving, o.paused, o.out_of_routing) == (3, 1, 1, 1)
    assert o.calls_per_s == round(4 / 60, 2) and o.passes_per_s == round(2 / 60, 2)
    assert (o.caught, o.proven, o.failed, o.layer_calls) == (1, 2, 1, 5)
    assert o.error_rate == 1 / 5


def test_tokens_per_second_are_the_first_moe_layers_rows_over_experts_per_token():
    feed = Feed()
    rows = lambda t, layer, n: CallRecord(t, "m", layer, 2, ("tcp://a:1",), 0.01, 2, 0, "ok", "direct", n, "r")  # noqa: E731
    feed.add_calls([rows(100.0, 1, 12), rows(100.0, 2, 12), rows(110.0, 1, 4)])  # 6 + 2 tokens, k = 2
    view = views.NetworkView(experts_per_token={"m": 2})
    assert views.overview(view, feed, now=120.0, window=60.0).tokens_per_s == round(8 / 60, 2)
    assert views.overview(views.NetworkView(), feed, now=120.0).tokens_per_s is None  # k unknown
    old = Feed()
    old.add_calls([call(100.0, 1)])  # an older client reports no rows: forward passes only
    assert views.overview(view, old, now=120.0).tokens_per_s is None
    assert views.overview(view, Feed(), now=120.0).tokens_per_s == 0.0


def test_an_empty_network_has_an_overview_of_zeros():
    o = views.overview(views.NetworkView(), Feed(), now=1.0)
    assert (o.experts_total, o.workers, o.calls_per_s, o.error_rate) == (0, 0, 0.0, 0.0)


def test_latency_over_time_has_p50_and_p95_per_bin():
    feed = Feed()
    feed.add_calls([call(100.0, seconds=s / 1000) for s in range(1, 21)] + [call(106.0, seconds=0.5)])
    cols = views.latency_over_time(feed, bin_seconds=5.0)
    assert cols["time"] == [100_000.0, 105_000.0]
    assert cols["p50"] == [11.0, 500.0] and cols["p95"] == [20.0, 500.0]
    assert views.latency_over_time(Feed()) == {"time": [], "p50": [], "p95": []}
