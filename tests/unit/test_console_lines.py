"""What the scheduler, a worker and `publish` tell people (neuro_dask/console.py,
neuro_dask/client/dispatch/routes.why_unserved): the pure text, and the logger's wiring."""

from __future__ import annotations

import logging

from neuro_dask import console
from neuro_dask.client.dispatch.executor import routine_refusal
from neuro_dask.client.dispatch.routes import ExpertUnavailableError, why_unserved
from neuro_dask.protocol.wire import WireFormatError


def test_the_scheduler_banner_says_where_how_to_join_and_how_to_publish():
    lines = console.scheduler_banner("tcp://10.0.0.5:8786", "http://127.0.0.1:8787", True, None, 2)
    assert lines[0] == (
        "neuro-dask scheduler at tcp://10.0.0.5:8786 (hardened, no TLS; 2 replica(s) per expert; ledger: none)"
    )
    assert lines[1] == "dashboard: http://127.0.0.1:8787/neuro/overview"
    assert "neuro-dask worker tcp://10.0.0.5:8786 " in lines[2] and "--tls" not in lines[2]
    assert lines[3] == "publish a model with:  neuro-dask publish MODEL_DIR --scheduler tcp://10.0.0.5:8786"
    tls = console.scheduler_banner("tls://h:8786", None, True, "sqlite:///l.db", 3)
    assert "mutual TLS" in tls[0] and "ledger: sqlite:///l.db" in tls[0]
    assert not any(line.startswith("dashboard") for line in tls)
    assert "neuro-dask worker tls://h:8786 --tls DIR" in tls[1]
    assert "certs issue" in tls[-1]


def test_worker_lines_name_the_worker_once_and_say_how_to_change_the_pause_policy():
    assert console.worker_banner(
        "tcp://1.2.3.4:5", "tcp://1.2.3.4:5", "tcp://s:8786", "cpu", 2**30, False, True
    ).startswith(
        "worker tcp://1.2.3.4:5 connected to tcp://s:8786: device cpu, "
        "expert budget 1.0 GiB, serving even while busy, hardened"
    )
    assert "worker alice (tcp://1.2.3.4:5)" in console.worker_banner(
        "alice", "tcp://1.2.3.4:5", "s", "cpu", 1, True, False
    )
    lines = console.loaded_line("m", 3, {(0, i): "sha256 mismatch" for i in range(7)}, 1.25, 3 * 2**20)
    assert lines[0] == "loaded 3 experts of m in 1.2 s (3 MiB of expert weights in memory); serving"
    assert lines[1] == "could not load expert 0 of layer 0: sha256 mismatch" and len(lines) == 7
    assert lines[-1] == "... and 2 more experts failed to load"
    pause = console.pause_line("other processes use 98% CPU")
    assert pause.startswith("paused: other processes use 98% CPU.") and "--no-idle-only" in pause
    assert console.resume_line("idle for 5 samples") == "resumed: idle for 5 samples; serving again"


def test_console_lines_go_to_the_stderr_of_the_moment_and_can_be_silenced(capsys):
    console.enable()
    console.enable()  # once per process: never two handlers
    assert sum(isinstance(h, console._Stderr) for h in console.CONSOLE.handlers) == 1
    console.say("hello %s", "operator")
    assert capsys.readouterr().err.rstrip().endswith(" hello operator")
    console.enable(False)
    console.say("quiet")
    assert "quiet" not in capsys.readouterr().err
    console.enable()
    assert console.CONSOLE.level == logging.INFO and not console.CONSOLE.propagate


def _worker(name, paused="", budget=2**30):
    return {"name": name, "paused": paused, "memory_budget": budget, "serving": []}


def test_why_unserved_names_the_reason_an_operator_can_act_on():
    assert "no worker has joined" in why_unserved({}, 10)
    every = why_unserved({"a": _worker("w1", "other processes use 98% CPU"), "b": _worker("w2", "input 3 s ago")}, 10)
    assert (
        every.startswith(
            "every worker (2) is paused because its machine is busy (w1: other processes use 98% "
            "CPU; w2: input 3 s ago)"
        )
        and "--no-idle-only" in every
    )
    small = why_unserved({"a": _worker("w1", budget=2**20)}, 10 * 2**20)
    assert "memory budgets total 1 MiB but the model's experts need 10 MiB" in small
    # A paused worker's budget does not count: it serves nothing.
    assert "memory budgets total 1 MiB" in why_unserved(
        {"a": _worker("w1", budget=2**20), "b": _worker("w2", "busy", budget=2**30)}, 10 * 2**20
    )
    assert "1 of 2 workers are paused" in why_unserved({"a": _worker("w1"), "b": _worker("w2", "busy")}, 10)
    assert why_unserved({"a": _worker("w1")}, 10) is None  # still loading: nothing stands out


def test_an_unavailable_expert_error_gives_the_networks_reason_when_it_has_one():
    assert "start more workers" in str(ExpertUnavailableError("m", 0, [1], 3.0))
    assert str(ExpertUnavailableError("m", 0, [1], 3.0, "every worker (1) is paused")).endswith(
        "(waited 3.0 s): every worker (1) is paused"
    )


def test_a_stale_route_or_a_pause_is_routine_and_anything_else_is_not():
    assert routine_refusal(
        WireFormatError(
            "worker refused the call: expert 1 of layer 1 of model 'm' is not hosted "
            "here; the client's routes are stale"
        )
    )
    assert routine_refusal(WireFormatError("worker refused the call: paused: other processes use 98% CPU"))
    assert not routine_refusal(WireFormatError("worker refused the call: ticket expired"))
    assert not routine_refusal(TimeoutError("no answer in 10 s"))
