"""The first hour of each user, with the real commands as the README shows them.

An operator starts `neuro-dask scheduler` and reads where it listens and how workers join; two
volunteers start `neuro-dask worker` and read their connection and the experts they load; the
operator publishes the bundled model and watches it get served; a data scientist generates,
streams and scores on the network from the command line; everyone stops with Ctrl-C and no log
holds an ERROR, a traceback or a kill warning. A second network has one idle-only worker on a
busy machine: it says why it paused, and `publish` says that is why it cannot finish.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys

import pytest
from process_helpers import NEURO_DASK, Processes, free_port, run_cli

from neuro_dask.demo.addition import ASSET_DIR

# What a clean run's logs never hold.
UNCLEAN = ("ERROR", "Traceback", "CRITICAL", "still alive after", "killing")


def _stop(processes: Processes) -> None:
    """Ctrl-C, as a person at a terminal stops a command: SIGINT to each process group, the last
    started first (volunteers before their scheduler), each stopped before the next. Stopped all
    at once, a worker may hear its scheduler close before its own Ctrl-C and, as designed, start
    waiting for the scheduler to come back, its heartbeat failing (distributed logs that as an
    ERROR): a race, not what this checks."""
    for proc, _ in reversed(processes.procs):
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGINT)
            proc.wait(60)


def _wait_for_text(processes: Processes, proc, text: str, what: str, timeout: float = 120) -> str:
    """The process's log once it holds `text`."""
    return processes.wait_for(lambda: (log := processes.log(proc)) and text in log and log, timeout, what)


def _line(text: str, pattern: str) -> re.Match | None:
    return re.search(pattern, text, re.MULTILINE)


@pytest.fixture(scope="module")
def network(tmp_path_factory):
    """A scheduler and two volunteers' workers, started as the README shows; the model published."""
    folder = tmp_path_factory.mktemp("first-hour")
    port = free_port()
    address = f"tcp://127.0.0.1:{port}"
    processes = Processes(folder)
    scheduler = processes(
        *NEURO_DASK, "scheduler", "--host", "127.0.0.1", "--port", str(port), "--dashboard-address", "127.0.0.1:0"
    )
    processes.wait_for(lambda: "volunteers join with" in processes.log(scheduler), 120, "the scheduler's banner")
    # --no-idle-only: the test suite keeps this machine busy, which an idle-only worker yields to
    # (test_an_idle_only_worker_on_a_busy_machine_says_why below).
    workers = [
        processes(
            *NEURO_DASK,
            "worker",
            address,
            "--memory-budget",
            "512MiB",
            "--owner",
            f"owner{i}",
            "--name",
            f"volunteer-{i}",
            "--no-idle-only",
            "--no-dashboard",
            "--neuro-no-benchmark",
        )
        for i in range(2)
    ]
    for w in workers:
        processes.wait_for(lambda w=w: "connected to" in processes.log(w), 120, "a worker's connection line")
    published = run_cli("publish", str(ASSET_DIR), "--scheduler", address, timeout=300)
    try:
        yield {
            "address": address,
            "processes": processes,
            "scheduler": scheduler,
            "workers": workers,
            "published": published,
        }
    finally:
        processes.close()


def test_operator_reads_the_address_the_join_command_and_the_publish_progress(network):
    log = network["processes"].log(network["scheduler"])
    address = network["address"]
    assert _line(log, rf"neuro-dask scheduler at {re.escape(address)} \(hardened, no TLS; 2 replica"), log
    assert _line(log, r"dashboard: http://127\.0\.0\.1:\d+/neuro/overview"), log
    assert f"volunteers join with:  neuro-dask worker {address}" in log
    assert f"publish a model with:  neuro-dask publish MODEL_DIR --scheduler {address}" in log
    published = network["published"]
    assert published.returncode == 0, published.stdout
    assert "waiting until the workers serve 16 experts" in published.stdout
    assert _line(published.stdout, r"^  \d+/16 experts served"), published.stdout
    assert "every expert is served" in published.stdout


def test_volunteers_read_their_connection_and_the_experts_they_loaded(network):
    processes = network["processes"]
    loaded = 0
    for i, worker in enumerate(network["workers"]):
        log = _wait_for_text(processes, worker, "loaded", "a worker's loaded line")
        assert _line(
            log,
            rf"worker volunteer-{i} \(tcp://127\.0\.0\.1:\d+\) connected to {re.escape(network['address'])}: "
            r"device cpu, expert budget 512 MiB, serving even while busy, hardened",
        ), log
        match = _line(
            log,
            r"loaded (\d+) experts of mixtral-\w+ in [\d.]+ s \(\d+ MiB of expert weights in memory\); "
            r"serving",
        )
        assert match, log
        loaded += int(match.group(1))
    assert loaded == 2 * 16  # two replicas of each of the adder's 16 experts
    # Without --worker: every worker of this machine, not "pass --worker NAME".
    status = run_cli("worker-status", "--scheduler", network["address"])
    assert status.returncode == 0, status.stdout
    assert "worker volunteer-0 at" in status.stdout and "worker volunteer-1 at" in status.stdout
    assert status.stdout.count("hosts 16 experts of mixtral-") == 2


def test_data_scientist_generates_streams_and_scores_on_the_network(network):
    address = network["address"]
    generated = run_cli(
        "generate", str(ASSET_DIR), "12+34=", "250+250=", "--max-new-tokens", "5", "--scheduler", address, timeout=300
    )
    assert generated.returncode == 0, generated.stdout
    assert "12+34=46\n" in generated.stdout and "250+250=500\n" in generated.stdout
    streamed = run_cli("generate", str(ASSET_DIR), "61+48=", "--stream", "--scheduler", address, timeout=300)
    assert streamed.returncode == 0 and "61+48=109\n" in streamed.stdout, streamed.stdout
    scored = run_cli("score", str(ASSET_DIR), "12+34=46", "12+34=99", "--scheduler", address, timeout=300)
    assert scored.returncode == 0, scored.stdout
    right, wrong = (float(m.group(1)) for m in re.finditer(r"^\s*(-?[\d.]+) log-likelihood", scored.stdout, re.M))
    assert right > wrong  # the network's model believes the right sum
    demo = run_cli("demo", "--scheduler", address, "-n", "10", timeout=300)
    assert demo.returncode == 0, demo.stdout
    assert f"connecting to the network at {address}" in demo.stdout and "starting" not in demo.stdout
    assert "exact match on 10 held-out problems" in demo.stdout


def test_everyone_stops_with_ctrl_c_and_no_log_holds_an_error(network):
    processes = network["processes"]
    _stop(processes)
    for proc, path in processes.procs:
        text = path.read_text(errors="replace")
        assert not [u for u in UNCLEAN if u in text], f"{proc.args}:\n{text[-4000:]}"
        assert proc.returncode == 0, f"{proc.args} exited with {proc.returncode}:\n{text[-4000:]}"


def test_an_idle_only_worker_on_a_busy_machine_says_why_and_publish_says_it_too(tmp_path):
    port = free_port()
    address = f"tcp://127.0.0.1:{port}"
    # Any use of the machine by another process is "busy": the CPU burner below guarantees some.
    busy = {
        **os.environ,
        "DASK_NEURO__WORKER__IDLE_BUSY_CPU": "0",
        "DASK_NEURO__WORKER__IDLE_RESUME_CPU": "0",
        "DASK_NEURO__WORKER__IDLE_BUSY_SAMPLES": "1",
        "DASK_NEURO__WORKER__IDLE_INTERVAL": "0.2",
    }
    burner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        with Processes(tmp_path) as processes:
            scheduler = processes(
                *NEURO_DASK,
                "scheduler",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--dashboard-address",
                "127.0.0.1:0",
            )
            processes.wait_for(lambda: "volunteers join with" in processes.log(scheduler), 120, "the banner")
            worker = processes(
                *NEURO_DASK,
                "worker",
                address,
                "--memory-budget",
                "512MiB",
                "--no-dashboard",
                "--neuro-no-benchmark",
                env=busy,
            )
            log = _wait_for_text(processes, worker, "paused:", "the worker's pause line")
            assert "idle-only (pauses while this machine's owner uses it)" in log
            assert _line(
                log,
                r"paused: other processes use \d+% CPU\. Expert calls go to other workers until this "
                r"machine is idle again\. To serve while busy: restart with --no-idle-only",
            ), log
            published = run_cli("publish", str(ASSET_DIR), "--scheduler", address, "--wait-timeout", "20", timeout=300)
            assert published.returncode == 2, published.stdout
            assert "every worker (1) is paused because its machine is busy" in published.stdout, published.stdout
            assert "start workers with --no-idle-only" in published.stdout
            _stop(processes)
            for proc, path in processes.procs:
                text = path.read_text(errors="replace")
                assert not [u for u in UNCLEAN if u in text], f"{proc.args}:\n{text[-4000:]}"
    finally:
        burner.kill()
        burner.wait()
