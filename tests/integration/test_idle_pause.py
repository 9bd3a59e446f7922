"""Idle-only volunteering on a cluster: a worker whose owner gets busy pauses mid-generation, is
routed around at once (its refused calls re-sent elsewhere, no token lost), and serves again once
the machine is idle. The machine's load is driven from the test (neuro_dask.volunteer.idle.register_sampler)."""

from __future__ import annotations

import dask
import torch
from cluster_helpers import neuro_cluster
from polling import poll_until
from tiny_models import padded_batch

import neuro_dask as nd
from neuro_dask.protocol.messages import Routes
from neuro_dask.protocol.wire import encode_request
from neuro_dask.volunteer.idle import register_sampler
from neuro_dask.volunteer.idle_policy import IdleSignals

QUIET = IdleSignals(cpu=2.0, gpu=None, input_idle=3600.0)
BUSY = IdleSignals(cpu=95.0, gpu=None, input_idle=3600.0)

IDLE_CONFIG = {
    "neuro.worker.idle-interval": 0.02,
    "neuro.worker.idle-busy-samples": 1,
    "neuro.worker.idle-resume-samples": 1,
    "neuro.worker.idle-min-pause": 0.0,
    # in-process workers share the test's process: leave its priority and threads alone
    "neuro.worker.nice": 0,
    "neuro.worker.max-threads": None,
    "neuro.worker.vram-fraction": None,
    # the client keeps the routes it loaded with, so its calls meet the paused worker and are re-sent
    "neuro.client.routes-refresh": 3600.0,
}


def _worker_events(client, address):
    return [e for _, e in client.get_events("neuro") if e.get("worker") == address]


def _direct_call(client, address, model_id, layer, expert, hidden):
    msg = encode_request(model_id, layer, {expert: torch.ones(2, hidden)})
    return client.sync(client.rpc(address).neuro_expert, **msg)


def test_busy_worker_pauses_is_routed_around_and_resumes(sharded, tmp_path):
    ids, mask = padded_batch((5, 9, 13), seed=5)
    expected = nd.load(sharded("mixtral")).generate(ids, mask, max_new_tokens=40)
    undo_all = register_sampler("*", lambda: QUIET)
    try:
        with (
            dask.config.set(IDLE_CONFIG),
            neuro_cluster(3, tmp_path=tmp_path, worker_args=["--neuro-idle-only"]) as (cluster, client),
            nd.load(sharded("mixtral"), client=client) as model,
        ):
            plugin = cluster.scheduler.extensions["neuro"]
            (model_id,) = plugin.coordinator.models
            # the victim: the worker hosting the most experts, so the client's routes surely use it
            victim = max(cluster.workers.values(), key=lambda w: len(plugin.coordinator.serving.get(w.address, ())))
            address, adapter = victim.address, victim.extensions["neuro"]
            assert adapter.idle is not None
            hosted = adapter.host.hosted()[model_id]
            layer, expert = hosted[0]
            hidden = model.config.hidden_size
            load = {"signals": QUIET}
            undo = register_sampler(victim.name, lambda: load["signals"])
            steps = []
            for i, token in enumerate(model.stream(ids, mask, max_new_tokens=40)):
                steps.append(token)
                if i == 5:
                    load["signals"] = BUSY
                    poll_until(lambda: address in plugin.paused, 60, "the busy worker to pause")
            out = torch.cat([expected[:, : ids.shape[1]], torch.stack(steps, 1)], 1)
            assert torch.equal(out, expected)  # no token lost, none changed

            # paused: a scheduler event, no routes, calls refused with `paused: ...`
            events = _worker_events(client, address)
            # a probe of the paused worker (the client reported its refusals) may come after the
            # pause event: it must pass, a paused worker is not an unreachable one
            assert all(e["ok"] for e in events if e["action"] == "probe")
            assert not [e for e in events if e["action"] == "unreachable"]
            (last,) = [e for e in events if e["action"] in ("pause", "resume")][-1:]
            assert last["action"] == "pause" and "CPU" in last["reason"]
            routes = plugin.routes(Routes(model_id))["routes"]
            assert all(address not in workers for _, _, workers in routes)
            assert all(workers for _, _, workers in routes)  # every expert still has a replica
            refused = _direct_call(client, address, model_id, layer, expert, hidden)
            assert refused["status"] == "error" and refused["message"].startswith("paused: ")
            # the client's routes still named it: its calls met the refusal and were re-sent
            # elsewhere; its report of them is probed by the scheduler, which finds the worker
            # paused, not gone: it keeps its experts (routes already leave it out while paused)
            assert plugin.coordinator.serving[address] >= {(model_id, layer, e) for layer, e in hosted}

            # idle again: it resumes, is routed to and serves
            load["signals"] = QUIET
            poll_until(lambda: address not in plugin.paused, 60, "the worker to resume")
            poll_until(
                lambda: plugin.coordinator.serving[address] >= {(model_id, l, e) for l, e in hosted},
                60,
                "the resumed worker's experts to be routed again",
            )
            assert any(address in workers for _, _, workers in plugin.routes(Routes(model_id))["routes"])
            events = _worker_events(client, address)
            assert [e for e in events if e["action"] in ("pause", "resume")][-1]["action"] == "resume"
            answer = _direct_call(client, address, model_id, layer, expert, hidden)
            assert answer["status"] == "OK"
            assert torch.equal(model.generate(ids, mask, max_new_tokens=40), expected)
            undo()
    finally:
        undo_all()
