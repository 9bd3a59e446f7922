"""The `neuro_*` Prometheus series (neuro_dask/dashboard/metrics.py): the collector on fake
plugins, then a real scheduler's /metrics, then two schedulers alive in one process."""

from __future__ import annotations

import math
import time
import urllib.request
from types import SimpleNamespace
from urllib.parse import urlsplit

import dask
import prometheus_client
import pytest
from distributed import Client
from polling import poll_until
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

import neuro_dask as nd
from neuro_dask.client.cluster import local_cluster
from neuro_dask.dashboard import metrics
from neuro_dask.trust.reputation import Reputation

COMPONENTS = ("score", "correctness", "timeliness", "speed", "uptime")


def parse(text: str) -> list[tuple[str, dict[str, str], float]]:
    """The neuro_* samples of an exposition: (name, labels, value)."""
    return [
        (s.name, dict(s.labels), s.value)
        for f in text_string_to_metric_families(text)
        for s in f.samples
        if s.name.startswith("neuro_")
    ]


def value(samples, name, **labels) -> float:
    found = [v for n, lab, v in samples if n == name and all(lab.get(k) == x for k, x in labels.items())]
    assert len(found) == 1, (name, labels, found)
    return found[0]


def exposition(*plugins) -> str:
    """What /metrics would write for these plugins (a private registry: nothing global touched)."""
    registry = CollectorRegistry()
    registry.register(metrics.NeuroCollector(lambda: plugins))
    return generate_latest(registry).decode()


class FakePlugin(SimpleNamespace):
    """Stands in for NeuroSchedulerPlugin (a subclass: SimpleNamespace takes no weak references)."""


def fake_plugin(address="tcp://10.0.0.1:8786", **extra):
    reputation = Reputation()
    reputation.join("alice", "owner-a", trusted=True, now=0.0)
    reputation.join("bob", "owner-b", now=0.0)
    reputation.invalid("bob", "call-1", 1.0)
    plugin = FakePlugin(
        scheduler=SimpleNamespace(address=address),
        identity={"tcp://w1:1": "alice", "tcp://w2:2": "bob"},
        reputation=reputation,
        coordinator=SimpleNamespace(
            workers={"tcp://w1:1": None, "tcp://w2:2": None},
            serving={"tcp://w1:1": {("m", 0, 0), ("m", 0, 1), ("m", 1, 3)}, "tcp://w2:2": set()},
        ),
        ledger=None,
    )
    for k, v in extra.items():
        setattr(plugin, k, v)
    return plugin


# ---- the collector, no cluster -----------------------------------------------------------------


def test_every_series_from_a_fake_plugin():
    plugin = fake_plugin(
        metrics_counts={"validated": 7, "invalid": 2, "hedges": 3, "quorum_accepted": 5, "quorum_exhausted": 1},
        latency_buckets=[(0.01, 1), (0.1, 4), (1.0, 6)],
        latency_sum=1.25,
        latency_count=7,
        ledger=object(),
        ledger_report={
            "minted": 100,
            "burned": 5,
            "treasury": 40,
            "staked_total": 30,
            "fees": 9,
            "rewards": 8,
            "slashed": 1,
            "accounts": 4,
            "entries": 12,
        },
    )
    s = parse(exposition(plugin))
    sched = "tcp://10.0.0.1:8786"

    for address, name in plugin.identity.items():
        rec = plugin.reputation.record(name)
        for c in COMPONENTS:
            assert value(
                s, "neuro_worker_reputation", scheduler=sched, worker=name, address=address, component=c
            ) == pytest.approx(getattr(rec, c))
        assert value(s, "neuro_worker_trusted", worker=name) == float(rec.trusted)
        assert value(s, "neuro_worker_established", worker=name) == float(rec.established)
        assert value(s, "neuro_worker_routable", worker=name) == float(rec.routable)
    assert len([1 for n, *_ in s if n == "neuro_worker_reputation"]) == 2 * len(COMPONENTS)
    assert value(s, "neuro_worker_trusted", worker="alice") == 1.0
    assert value(s, "neuro_worker_reputation", worker="bob", component="correctness") < 0.5  # the invalid result
    assert value(s, "neuro_worker_hosted_experts", worker="alice", address="tcp://w1:1") == 3
    assert value(s, "neuro_worker_hosted_experts", worker="bob") == 0

    assert {lab["kind"]: v for n, lab, v in s if n == "neuro_calls_total"} == {
        "validated": 7,
        "invalid": 2,
        "late": 0,
        "timeout": 0,
        "error": 0,
    }
    assert value(s, "neuro_hedges_total", scheduler=sched) == 3
    assert {lab["outcome"]: v for n, lab, v in s if n == "neuro_quorum_total"} == {"accepted": 5, "exhausted": 1}

    buckets = {lab["le"]: v for n, lab, v in s if n == "neuro_layer_latency_seconds_bucket"}
    assert buckets == {"0.01": 1, "0.1": 4, "1.0": 6, "+Inf": 7}  # +Inf added from latency_count
    assert value(s, "neuro_layer_latency_seconds_count") == 7
    assert value(s, "neuro_layer_latency_seconds_sum") == 1.25

    assert value(s, "neuro_ledger_enabled") == 1
    assert {lab["quantity"]: v for n, lab, v in s if n == "neuro_ledger_units"} == {
        "minted": 100,
        "burned": 5,
        "treasury": 40,
        "staked_total": 30,
        "fees": 9,
        "rewards": 8,
        "slashed": 1,
    }
    assert value(s, "neuro_ledger_accounts") == 4 and value(s, "neuro_ledger_entries") == 12
    assert all(lab["scheduler"] == sched for _, lab, _ in s)


def test_a_schedulers_relay_has_its_series_and_none_without_one():
    from neuro_dask.relay.server import RelayCounters

    counters = RelayCounters(volunteers=3, spliced_now=2, spliced_total=40, refused_total=5, bytes_total=123456)
    s = parse(exposition(fake_plugin(relay=SimpleNamespace(counters=counters)), fake_plugin("tcp://norelay:1")))
    sched = "tcp://10.0.0.1:8786"
    assert value(s, "neuro_relay_volunteers", scheduler=sched) == 3
    assert value(s, "neuro_relay_open_connections", scheduler=sched) == 2
    assert value(s, "neuro_relay_connections_total", scheduler=sched, outcome="spliced") == 40
    assert value(s, "neuro_relay_connections_total", scheduler=sched, outcome="refused") == 5
    assert value(s, "neuro_relay_bytes_total", scheduler=sched) == 123456
    assert not [lab for n, lab, _ in s if n.startswith("neuro_relay") and lab["scheduler"] == "tcp://norelay:1"]


def test_missing_or_failing_figures_empty_their_series_only():
    class Broken(FakePlugin):
        @property
        def metrics_counts(self):
            raise RuntimeError("not yet")

    bare = SimpleNamespace(scheduler=SimpleNamespace(address="tcp://bare:1"))
    broken = Broken(**vars(fake_plugin("tcp://broken:1")), latency_buckets=print, ledger_report=print)
    s = parse(exposition(bare, broken))
    assert {(n, lab["scheduler"]) for n, lab, _ in s} >= {
        ("neuro_ledger_enabled", "tcp://bare:1"),
        ("neuro_worker_reputation", "tcp://broken:1"),
    }
    assert not [n for n, *_ in s if n.startswith(("neuro_calls", "neuro_hedges", "neuro_layer", "neuro_ledger_units"))]
    assert not [lab for n, lab, _ in s if lab["scheduler"] == "tcp://bare:1" and n != "neuro_ledger_enabled"]

    # A plugin that cannot be read at all is skipped; the others still answer.
    unreadable = fake_plugin("tcp://unreadable:1")
    unreadable.reputation = SimpleNamespace(record=lambda name: 1 / 0)
    s = parse(exposition(unreadable, fake_plugin("tcp://fine:1")))
    assert {lab["scheduler"] for _, lab, _ in s} == {"tcp://fine:1"}


def test_describe_names_every_series_without_reading_a_plugin():
    def no_plugins_please():
        raise AssertionError("describe must not read plugins")

    names = {f.name for f in metrics.NeuroCollector(no_plugins_please).describe()}
    assert {
        "neuro_worker_reputation",
        "neuro_worker_hosted_experts",
        "neuro_calls",
        "neuro_hedges",
        "neuro_quorum",
        "neuro_layer_latency_seconds",
        "neuro_ledger_units",
    } <= names
    # Why there is exactly one collector: a second one with the same names is refused.
    registry = CollectorRegistry()
    registry.register(metrics.NeuroCollector(list))
    with pytest.raises(ValueError, match="Duplicated timeseries"):
        registry.register(metrics.NeuroCollector(list))


def test_register_is_idempotent_and_weak():
    plugin = fake_plugin("tcp://registered:1")
    metrics.register(plugin)
    metrics.register(plugin)
    owners = {
        prometheus_client.REGISTRY._names_to_collectors[n] for n in ("neuro_worker_reputation", "neuro_calls_total")
    }
    assert owners == {metrics._COLLECTOR}
    assert "tcp://registered:1" in {lab["scheduler"] for _, lab, _ in parse(generate_latest().decode())}
    del plugin  # the collector holds plugins weakly: a dropped plugin leaves /metrics
    assert "tcp://registered:1" not in {lab["scheduler"] for _, lab, _ in parse(generate_latest().decode())}


# ---- real schedulers ---------------------------------------------------------------------------


def scrape(client) -> tuple[int, str]:
    netloc = urlsplit(client.dashboard_link).netloc
    with urllib.request.urlopen(f"http://{netloc}/metrics", timeout=30) as response:
        return response.status, response.read().decode()


def neuro_samples(client) -> list:
    status, text = scrape(client)
    assert status == 200
    assert "dask_scheduler_workers" in text  # Dask's own series still answer next to ours
    return parse(text)


def dashboard_cluster(n_workers):
    return local_cluster(
        n_workers=n_workers, processes=False, worker_args=["--neuro-no-benchmark"], dashboard_address="127.0.0.1:0"
    )


def pin(monkeypatch, plugin, **values):
    """plugin.<name> reads `value` during the test, whether the plugin keeps it as an attribute or
    a property (a property on the class wins over both)."""
    for name, v in values.items():
        monkeypatch.setattr(type(plugin), name, property(lambda self, v=v: v), raising=False)


def test_a_schedulers_metrics_endpoint(sharded, tmp_path, monkeypatch):
    with (
        dask.config.set({"neuro.worker.cache-dir": str(tmp_path / "cache")}),
        dashboard_cluster(2) as cluster,
        Client(cluster) as client,
    ):
        client.wait_for_workers(2, timeout=60)
        plugin = cluster.scheduler.extensions["neuro"]
        metrics.register(plugin)  # the plugin registers itself; a second time is harmless
        sched = cluster.scheduler.address

        s = neuro_samples(client)
        assert {lab["scheduler"] for _, lab, _ in s} == {sched}
        assert set(plugin.identity) == {lab["address"] for n, lab, _ in s if n == "neuro_worker_reputation"}
        for address, name in plugin.identity.items():
            rec = plugin.reputation.record(name)
            for c in COMPONENTS:
                assert value(s, "neuro_worker_reputation", worker=name, address=address, component=c) == pytest.approx(
                    getattr(rec, c)
                )
            assert value(s, "neuro_worker_hosted_experts", address=address) == 0
        assert value(s, "neuro_ledger_enabled") == 0

        with nd.load(sharded("mixtral"), client=client):

            def hosted_matches_serving():
                s = neuro_samples(client)
                hosted = {lab["address"]: v for n, lab, v in s if n == "neuro_worker_hosted_experts"}
                serving = {a: len(plugin.coordinator.serving.get(a, ())) for a in plugin.identity}
                return (hosted, serving) if hosted == serving and sum(hosted.values()) > 0 else None

            hosted, serving = poll_until(
                hosted_matches_serving, 60, "the hosted-experts series to match the placement", interval=0.2
            )
            assert hosted == serving and sum(hosted.values()) > 0

            # Figures are read live: a proven wrong result (a dispute the scheduler upheld, which
            # is the only way reputation falls) shows on the next scrape.
            victim = sorted(plugin.identity)[0]
            plugin.reputation.invalid(plugin.identity[victim], "call-1", time.time())
            s = neuro_samples(client)
            rec = plugin.reputation.record(plugin.identity[victim])
            assert rec.invalid == 1
            assert value(s, "neuro_worker_reputation", address=victim, component="correctness") == pytest.approx(
                rec.correctness
            )
            assert value(s, "neuro_worker_reputation", address=victim, component="score") == pytest.approx(rec.score)

        pin(
            monkeypatch,
            plugin,
            metrics_counts={"validated": 11, "late": 2, "hedges": 4, "quorum_accepted": 9},
            latency_buckets=[(0.005, 3), (0.05, 10), (math.inf, 12)],
            latency_sum=0.5,
            latency_count=12,
            ledger_report={
                "minted": 1_000,
                "burned": 10,
                "treasury": 200,
                "staked_total": 300,
                "fees": 12,
                "rewards": 11,
                "slashed": 0,
                "accounts": 5,
                "entries": 40,
            },
        )
        s = neuro_samples(client)
        assert {lab["kind"]: v for n, lab, v in s if n == "neuro_calls_total"} == {
            "validated": 11,
            "invalid": 0,
            "late": 2,
            "timeout": 0,
            "error": 0,
        }
        assert value(s, "neuro_hedges_total") == 4
        assert value(s, "neuro_quorum_total", outcome="accepted") == 9
        assert {lab["le"]: v for n, lab, v in s if n == "neuro_layer_latency_seconds_bucket"} == {
            "0.005": 3,
            "0.05": 10,
            "+Inf": 12,
        }
        assert value(s, "neuro_layer_latency_seconds_count") == 12
        assert value(s, "neuro_layer_latency_seconds_sum") == 0.5
        assert {lab["quantity"]: v for n, lab, v in s if n == "neuro_ledger_units"} == {
            "minted": 1_000,
            "burned": 10,
            "treasury": 200,
            "staked_total": 300,
            "fees": 12,
            "rewards": 11,
            "slashed": 0,
        }
        assert value(s, "neuro_ledger_entries") == 40
        assert {lab["scheduler"] for _, lab, _ in s} == {sched}


def test_two_schedulers_in_one_process_each_show_their_own(tmp_path):
    with (
        dask.config.set({"neuro.worker.cache-dir": str(tmp_path / "cache")}),
        dashboard_cluster(1) as one,
        Client(one) as client_one,
    ):
        with dashboard_cluster(1) as two, Client(two) as client_two:
            for cluster, client in ((one, client_one), (two, client_two)):
                client.wait_for_workers(1, timeout=60)
                metrics.register(cluster.scheduler.extensions["neuro"])
            for _ in range(2):  # Dask's own collectors move to whichever scheduler was asked last
                for cluster, client in ((one, client_one), (two, client_two)):
                    s = neuro_samples(client)
                    assert {lab["scheduler"] for _, lab, _ in s} == {cluster.scheduler.address}
                    assert len([1 for n, *_ in s if n == "neuro_worker_reputation"]) == len(COMPONENTS)
            # Outside a request (a process-wide exporter), every live scheduler under its own label.
            everywhere = parse(generate_latest().decode())
            assert {one.scheduler.address, two.scheduler.address} <= {lab["scheduler"] for _, lab, _ in everywhere}
            gone = two.scheduler.address
        s = neuro_samples(client_one)  # the closed scheduler left no trace and broke nothing
        assert {lab["scheduler"] for _, lab, _ in s} == {one.scheduler.address}
        assert gone not in {lab["scheduler"] for _, lab, _ in parse(generate_latest().decode())}
