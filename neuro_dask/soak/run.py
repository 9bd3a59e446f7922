"""The soak's shell: real processes, a load generator and the chaos schedule (soak/plan.py), and
the tally of every request (soak/tally.py).

    neuro-dask soak --minutes 3                   (docs/trust.md: what it runs and what it found)

Processes: a scheduler (`dask scheduler --preload neuro_scheduler`, its published models and
reputation kept in files across its restart), `plan.workers` volunteers (`dask worker --preload
neuro_worker` with nannies, each with its own cache folder; a fraction adversarial through
neuro.worker.adversary), the OpenAI-compatible gateway (`neuro-dask serve --scheduler`), and CPU
hogs. This process is the data scientist: it loads the bundled adder on the network and runs
`plan.concurrency` threads of requests, each either a completion through the gateway (with the
`openai` package's client where it is installed, else the same HTTP by hand) or a notebook-style
`generate_text`/`map` call, and checks every answer against the local model's. The chaos thread
SIGKILLs volunteers (a machine switched off: nanny and worker together) and starts them again
`rejoin_after` seconds later under the same name and cache, and stops and restarts the
scheduler once. With trust off (`--no-trust`, a baseline) no worker is operator-trusted either.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

from neuro_dask.soak.plan import ADVERSARIES, SoakPlan, chaos_schedule, problems
from neuro_dask.soak.tally import RequestRecord, records_json, summarize, svg_timeline

REQUEST_TIMEOUT = 180.0  # seconds one request may take before it counts as failed


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for_port(port: int, proc: subprocess.Popen, log: Path, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{log.name} exited:\n{log.read_text(errors='replace')[-3000:]}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
            return
        time.sleep(0.2)  # polling a port that is not open yet
    raise RuntimeError(f"{log.name}: port {port} not open within {timeout} s")


class Network:
    """The processes of one soak, started and stopped here; logs in `folder`."""

    def __init__(self, folder: Path, plan: SoakPlan):
        self.folder, self.plan = folder, plan
        self.port, self.dashboard, self.gateway_port = _free_port(), _free_port(), _free_port()
        self.address = f"tcp://127.0.0.1:{self.port}"
        self.roles = plan.roles()
        # With trust off there is no operator-trusted worker either: the adversaries then get
        # primary work (a trusted anchor ranks first and would take every call), so the
        # baseline shows what their wrong results do to answers.
        self.trusted = f"w{plan.trusted_index()}" if plan.trust else None
        self.procs: dict[str, subprocess.Popen] = {}
        self.logs: dict[str, int] = {}
        self._lock = threading.Lock()

    def _start(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> subprocess.Popen:
        n = self.logs.get(name, 0)
        self.logs[name] = n + 1
        log = self.folder / f"{name}-{n}.log"
        with open(log, "w") as out:
            proc = subprocess.Popen(
                argv, stdout=out, stderr=subprocess.STDOUT, start_new_session=True, env={**os.environ, **(env or {})}
            )
        with self._lock:
            self.procs[name] = proc
        return proc

    def log(self, name: str) -> Path:
        return self.folder / f"{name}-{self.logs[name] - 1}.log"

    def start_scheduler(self) -> None:
        env = {
            "DASK_NEURO__SCHEDULER__REPUTATION_FILE": str(self.folder / "reputation.json"),
            "DASK_NEURO__SCHEDULER__STATE_FILE": str(self.folder / "scheduler-state.json"),
            "DASK_NEURO__SCHEDULER__TRUSTED": json.dumps([self.trusted] if self.trusted else []),
        }
        argv = [sys.executable, "-m", "dask", "scheduler", "--host", "127.0.0.1", "--port", str(self.port)]
        argv += ["--dashboard-address", f"127.0.0.1:{self.dashboard}", "--preload", "neuro_scheduler"]
        proc = self._start("scheduler", [*argv, "--neuro-replicas", str(self.plan.replicas)], env)
        _wait_for_port(self.port, proc, self.log("scheduler"))

    def start_worker(self, slot: int) -> None:
        role = self.roles[slot]
        argv = [sys.executable, "-m", "dask", "worker", self.address, "--nthreads", "1", "--name", f"w{slot}"]
        argv += ["--no-dashboard", "--preload", "neuro_worker", "--neuro-no-benchmark"]
        argv += ["--neuro-cache-dir", str(self.folder / f"cache-w{slot}")]
        if role != "honest":
            argv += ["--neuro-adversary", json.dumps({**ADVERSARIES[role], "seed": slot})]
        self._start(f"w{slot}", argv)

    def start_gateway(self, model: str) -> None:
        argv = [sys.executable, "-m", "neuro_dask.cli.main", "serve", "--scheduler", self.address, "--model", model]
        argv += ["--port", str(self.gateway_port)]
        env = {"DASK_NEURO__CLIENT__TRUST": str(self.plan.trust)}
        proc = self._start("gateway", argv, env)
        _wait_for_port(self.gateway_port, proc, self.log("gateway"), timeout=300)

    def start_hogs(self) -> None:
        for i in range(self.plan.hogs):
            self._start(f"hog{i}", [sys.executable, "-c", "while True: pass"])

    def kill(self, name: str) -> None:
        """SIGKILL the process group: a volunteer's machine switched off (nanny and worker)."""
        proc = self.procs.get(name)
        if proc is not None and proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(30)

    def stop(self, name: str, timeout: float = 60) -> None:
        """Ctrl-C, as an operator stops it; SIGKILL if it does not stop in `timeout` s."""
        proc = self.procs.get(name)
        if proc is None or proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill(name)

    def close(self) -> None:
        for name in [n for n in self.procs if n.startswith("w") or n == "gateway"]:
            self.stop(name, timeout=20)
        for name in list(self.procs):
            self.stop(name, timeout=20)

    def metrics(self) -> dict[str, float]:
        """The scheduler's neuro_* totals (its /metrics), summed over labels."""
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.dashboard}/metrics", timeout=10) as r:
                text = r.read().decode()
        except OSError:
            return {}
        out: dict[str, float] = {}
        for line in text.splitlines():
            if line.startswith("neuro_") and " " in line:
                name, value = line.rsplit(" ", 1)
                key = name.split("{")[0] + ("{" + name.split("{")[1] if "outcome=" in name else "")
                with contextlib.suppress(ValueError):
                    out[key] = out.get(key, 0.0) + float(value)
        return out


class Load:
    """The data scientist's requests: each thread draws a way in and a problem, asks, checks."""

    def __init__(self, plan: SoakPlan, network: Network, model, expected: dict[str, str], model_id: str):
        self.plan, self.network, self.model, self.expected, self.model_id = plan, network, model, expected, model_id
        self.records: list[RequestRecord] = []
        self._lock = threading.Lock()
        self._openai = openai_client(network.gateway_port)
        self.start = time.monotonic()

    def run(self, until: float, index: int) -> None:
        rng = random.Random(f"{self.plan.seed}-load-{index}")
        prompts = list(self.expected)
        while time.monotonic() < until:
            via = "gateway" if rng.random() < self.plan.gateway_share else rng.choice(["generate", "map"])
            batch = [rng.choice(prompts) for _ in range(1 if via == "gateway" else 2)]
            started = time.monotonic()
            try:
                answers = self._ask(via, batch)
                wrong = [p for p, a in zip(batch, answers, strict=True) if a != self.expected[p]]
                outcome, error = ("wrong", f"{wrong[0]!r} answered {answers!r}") if wrong else ("correct", "")
            except Exception as exc:  # noqa: BLE001 - every failure is counted and kept
                outcome, error = "failed", f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"
            record = RequestRecord(via, started - self.start, time.monotonic() - started, outcome, error, len(batch))
            with self._lock:
                self.records.append(record)

    def _ask(self, via: str, batch: list[str]) -> list[str]:
        if via == "generate":
            return list(self.model.generate_text(batch, max_new_tokens=self.plan.max_new_tokens))
        if via == "map":
            out = list(self.model.map(batch, max_new_tokens=self.plan.max_new_tokens, batch_size=2, progress=False))
            failed = [a for a in out if not isinstance(a, str)]
            if failed:  # a MapFailure is a request the network lost, not a wrong answer
                raise RuntimeError(f"map failed a prompt: {failed[0]!r}"[:300])
            return out
        return [self._gateway(batch[0])]

    def _gateway(self, prompt: str) -> str:
        if self._openai is not None:  # the way a user's program asks: the official client, no retries
            answer = self._openai.completions.create(
                model=self.model_id, prompt=prompt, max_tokens=self.plan.max_new_tokens, temperature=0
            )
            return answer.choices[0].text
        body = {"model": self.model_id, "prompt": prompt, "max_tokens": self.plan.max_new_tokens, "temperature": 0}
        request = urllib.request.Request(
            f"http://127.0.0.1:{self.network.gateway_port}/v1/completions",
            data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=REQUEST_TIMEOUT) as r:
            return json.loads(r.read())["choices"][0]["text"]


def openai_client(port: int):
    """The `openai` package's client for the gateway (the test extras install it), or None where
    it is not installed: the soak then speaks the same HTTP with urllib. max_retries=0, so a
    failed request counts as failed instead of being retried out of sight."""
    try:
        from openai import OpenAI
    except ImportError:
        return None
    return OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="soak", timeout=REQUEST_TIMEOUT, max_retries=0)


def chaos(network: Network, plan: SoakPlan, start: float, stop: threading.Event, say: Callable[[str], None]) -> None:
    """Carry out the schedule: each fault at its time (the plan's, not a reaction to the network)."""
    for fault in chaos_schedule(plan).faults:
        if stop.wait(max(0.0, start + fault.at - time.monotonic())):
            return
        if fault.kind == "kill":
            name = f"w{fault.target}"
            network.kill(name)
            say(f"killed {name} ({network.roles[fault.target]})")
            rejoin = lambda slot=fault.target: stop.is_set() or network.start_worker(slot)  # noqa: E731
            threading.Timer(plan.rejoin_after, rejoin).start()
        else:
            say("stopping the scheduler (Ctrl-C), then starting it again")
            network.stop("scheduler")
            network.start_scheduler()
            say("the scheduler is back")


def soak(plan: SoakPlan, folder: Path, say: Callable[[str], None] = print) -> dict:
    """Run one soak; returns the summary (also written to folder/soak.json, the plot to soak.svg)."""
    import dask
    from distributed import Client

    import neuro_dask as nd
    from neuro_dask.demo.addition import ASSET_DIR

    folder.mkdir(parents=True, exist_ok=True)
    network = Network(folder, plan)
    pool = problems(plan.seed, 200)
    say(f"reference answers of {len(pool)} problems from the local model ...")
    expected = dict(zip(pool, nd.load(ASSET_DIR).generate_text(pool, max_new_tokens=plan.max_new_tokens), strict=True))
    roles = ", ".join(f"w{i} {r}" for i, r in enumerate(network.roles))
    anchor = f"{network.trusted} operator-trusted" if network.trusted else "none operator-trusted: trust off"
    say(f"starting a scheduler, {plan.workers} volunteers ({roles}; {anchor}) ...")
    try:
        network.start_scheduler()
        for slot in range(plan.workers):
            network.start_worker(slot)
        settings = {"neuro.client.trust": plan.trust, "neuro.client.seed": plan.seed}
        with dask.config.set(settings), Client(network.address, timeout=120) as client:
            client.wait_for_workers(plan.workers, timeout=300)
            with nd.load(ASSET_DIR, client=client) as model:
                network.start_gateway(str(ASSET_DIR))
                network.start_hogs()
                summary = _drive(plan, network, model, expected, Path(ASSET_DIR).name, say)
                summary["network"] = {**_model_figures(model), **network.metrics()}
    finally:
        network.close()
    (folder / "soak.json").write_text(json.dumps(summary, indent=2, default=str))
    return summary


def _drive(
    plan: SoakPlan, network: Network, model, expected: dict[str, str], model_id: str, say: Callable[[str], None]
) -> dict:
    load = Load(plan, network, model, expected, model_id)
    stop = threading.Event()
    until = load.start + plan.seconds
    say(f"soaking for {plan.minutes:g} min: {plan.concurrency} request threads, {plan.hogs} CPU hogs ...")
    killer = threading.Thread(target=chaos, args=(network, plan, load.start, stop, say), daemon=True)
    killer.start()
    threads = [threading.Thread(target=load.run, args=(until, i), daemon=True) for i in range(plan.concurrency)]
    for t in threads:
        t.start()
    while any(t.is_alive() for t in threads):
        next(t for t in threads if t.is_alive()).join(10)  # a progress line every 10 s
        rs = list(load.records)
        say(
            f"{time.monotonic() - load.start:5.0f} s: {len(rs)} requests, {sum(r.outcome == 'correct' for r in rs)} "
            f"correct, {sum(r.outcome == 'wrong' for r in rs)} wrong, {sum(r.outcome == 'failed' for r in rs)} failed"
        )
    stop.set()
    killer.join(120)
    records = sorted(load.records, key=lambda r: r.started)
    summary = summarize(records)
    schedule = chaos_schedule(plan)
    summary["plan"] = {**plan.__dict__, "kills": schedule.kills, "roles": network.roles}
    summary["records"] = records_json(records)
    title = (
        f"soak: {plan.minutes:g} min, {plan.workers} workers ({round(plan.adversarial * 100)}% adversarial), "
        f"a kill every {plan.kill_every:g} s, {plan.hogs} hogs"
    )
    (network.folder / "soak.svg").write_text(svg_timeline(records, schedule.faults, plan.seconds, title))
    return summary


def _model_figures(model) -> dict:
    stats = model.stats()
    layers = sorted(model.executor.layer_seconds) if hasattr(model.executor, "layer_seconds") else []

    def q(p: float) -> float | None:
        return layers[min(len(layers) - 1, int(p * len(layers)))] if layers else None

    return {
        "layer_p50_s": q(0.5),
        "layer_p99_s": q(0.99),
        "client_hedges": stats.get("hedges"),
        "client_units": stats.get("units"),
        "client_replicas_sent": stats.get("replicas_sent"),
    }
