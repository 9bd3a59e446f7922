"""Dask preload for volunteers: `dask worker tcp://HOST:8786 --preload neuro_worker`.

A thin adapter: it profiles the machine, tells the scheduler what this worker can host
(startup information and heartbeat metrics), and translates Dask comm messages into calls on
neuro_dask's ExpertHost. Loading and computing run in threads, never on the event loop.

Options (preload arguments, or Dask config under `neuro.worker`):
  --neuro-store URL        a mirror of the model store to fetch experts from
  --neuro-cache-dir DIR    where verified expert files are cached across restarts
  --neuro-memory-budget N  bytes or e.g. 4GiB for expert weights (default: half the free RAM)
  --neuro-device D         auto | cpu | cuda | mps
  --neuro-backend B        torch | onnx (ONNX Runtime with the best execution provider)
  --neuro-precision P      float32 | bfloat16 | int8 | int4 | auto (experts quantized at load)
  --neuro-owner ID         owner id: replicas of one expert never share an owner
  --neuro-no-benchmark     skip the expert-FFN micro-benchmark at start
  --neuro-adversary JSON   drills only: behave as an adversary (neuro_dask/testing/adversary.py)
  --neuro-idle-only / --neuro-no-idle-only
                           pause while the owner uses the machine (default: neuro.worker.idle-only;
                           `neuro-dask worker` turns it on); docs/distributed.md
  --neuro-hardened / --neuro-no-hardened
                           (also `--preload-nanny neuro_worker`: the nanny is hardened too)
                           hardened mode (default: neuro.security.hardened; `neuro-dask worker` turns
                           it on): only allow-listed pickles load, only neuro_dask's expert tasks run,
                           remote code (client.run, plugins, uploads) is refused (docs/security.md)
"""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import click
import dask.config
from distributed import Nanny
from distributed.core import Status
from tqdm import tqdm

from neuro_dask import console
from neuro_dask.console import loaded_line, worker_banner
from neuro_dask.errors import NeuroDaskError
from neuro_dask.protocol.messages import Cancel, ExpertsLoaded, WorkerStatus, receiver
from neuro_dask.protocol.wire import WireFormatError, decode_request, encode_error, encode_response
from neuro_dask.runtime.drop_list import DropList
from neuro_dask.runtime.expert_host import ExpertHost
from neuro_dask.runtime.expert_memory import ExpertMemory
from neuro_dask.runtime.machine import benchmark_expert_ffn, pick_device, profile_machine
from neuro_dask.runtime.receipting import Receipting, load_signer
from neuro_dask.security.hardening import report
from neuro_dask.settings import SecuritySettings, WorkerSettings
from neuro_dask.store.remote import ExpertFileCache
from neuro_dask.testing import AdversaryCrash, make_adversary
from neuro_dask.trust.receipts import EvidenceError
from neuro_dask.volunteer import admission
from neuro_dask.volunteer.comeback import worker_file
from neuro_dask.volunteer.reconnect import restart_on_scheduler_loss, wait_as_told

log = logging.getLogger("neuro_dask.worker")


class NeuroWorker:
    """What the preload attaches to a Dask worker as `worker.extensions["neuro"]`."""

    def __init__(self, worker, settings: WorkerSettings, security: SecuritySettings | None = None):
        self.worker = worker
        self.settings = settings
        self.security = security or SecuritySettings.load()
        self.profile = profile_machine()
        self.device = pick_device(settings.device)
        self.budget = settings.budget_bytes(self.profile.memory_available)
        self.speed = 0.0
        self.adversary = make_adversary(settings.adversary, salt=str(worker.name))  # honest unless a drill says so
        self.host = ExpertHost(
            ExpertFileCache(settings.resolved_cache_dir()),
            ExpertMemory(self.budget),
            device=self.device,
            store_override=settings.store,
            backend=settings.backend,
            precision=settings.precision,
        )
        # One thread computes (expert calls are short and ordered), another loads (slow I/O).
        self._compute = ThreadPoolExecutor(1, thread_name_prefix="neuro-compute")
        self._loader = ThreadPoolExecutor(1, thread_name_prefix="neuro-load")
        self.dropped = DropList()  # (caller, call id): a client may drop only its own calls
        self.paused = ""  # idle-only: why expert calls are refused now ("" = serving; neuro_dask/volunteer/idle.py)
        self.idle = None
        # Tickets in, signed receipts out (neuro_dask/runtime/receipting.py): with TLS, the key
        # of this worker's certificate.
        security = getattr(worker, "security", None)
        key_file = getattr(security, "tls_worker_key", None) or getattr(security, "tls_worker_cert", None)
        self.receipts = Receipting(load_signer(key_file), self.signing_name)

    async def start(self) -> None:
        if self.settings.benchmark:
            self.speed = await asyncio.get_running_loop().run_in_executor(
                self._compute, lambda: benchmark_expert_ffn(device=self.device)
            )
        self.speed = self.speed or 1.0
        w = self.worker
        w.handlers.update(
            {
                "neuro_expert": self.handle_expert,
                Cancel.OP: receiver(Cancel, self.handle_cancel),
                "neuro_expert_share": self.handle_expert_share,
                "neuro_assign": self.handle_assign,
                "neuro_drop": self.handle_drop,
                WorkerStatus.OP: receiver(WorkerStatus, self.handle_status),
            }
        )
        w.startup_information["neuro"] = lambda _w: self.info()
        w.metrics["neuro"] = lambda _w: self.host.status()
        w.extensions["neuro"] = self
        if self.profile.cuda and self.device == "cuda":
            w.state.total_resources.setdefault("GPU", len(self.profile.cuda))
            w.state.available_resources.setdefault("GPU", len(self.profile.cuda))
        self._start_idle_guard()
        log.info(
            "neuro_worker ready: device %s, budget %d bytes, expert FFN %.1f GFLOP/s",
            self.device,
            self.budget,
            self.speed,
        )
        self._announce = asyncio.get_running_loop().create_task(self._announce_when_registered())

    async def _announce_when_registered(self) -> None:
        """The preload runs before the worker registers: say "connected" once it has."""
        w = self.worker
        while w.status not in (Status.running, Status.paused):
            if w.status in (Status.closing, Status.closed, Status.failed):
                return
            await asyncio.sleep(0.1)
        console.say(
            worker_banner(
                str(w.name),
                w.address,
                w.scheduler.address,
                self.device,
                self.budget,
                self.settings.idle_only,
                self.security.hardened,
            )
        )

    def info(self) -> dict[str, Any]:
        return {
            "profile": self.profile.to_dict(),
            "speed": self.speed,
            "memory_budget": self.budget,
            "owner": self.settings.owner,
            "device": self.device,
            "backend": self.settings.backend,
            "precision": self.settings.precision,
            "signing_key": self.receipts.signer.public_der,
        }

    def signing_name(self) -> str:
        """The name receipts are signed under: the certificate's on TLS (the scheduler names the
        worker by it), else this worker's name."""
        from neuro_dask.security.guards import own_name

        return own_name(self.worker) or str(self.worker.name)

    # ---- serving ------------------------------------------------------------------------------

    def serve(
        self,
        msg: dict[str, Any],
        caller: str | None = None,
        from_scheduler: bool = False,
        peer: tuple[str | None, str | None] = (None, None),
    ) -> tuple[dict[str, Any], float]:
        """Run one expert call: (response, seconds to hold it back, nonzero only in straggle
        drills). Never raises, so no exception is ever sent back to a client. `caller`: the
        calling certificate's name, `peer` its (address, role:name) for the report of a refusal; the
        scheduler's own calls (disputes, probes) need no ticket."""
        try:
            refusal = admission.paused_refusal(self.paused)
            if refusal is not None:  # the owner is using this machine: the client re-sends elsewhere
                return encode_error(refusal), 0.0
            if self.dropped.take(admission.drop_key(caller, msg.get("call"))):
                return encode_error(admission.DROPPED), 0.0
            ticket = self._admit(msg, caller, from_scheduler, peer)
            request = decode_request(msg, max_rows=self.security.max_rows)
            outputs, delay = self.host.run(request), 0.0
            if not self.adversary.is_honest:
                outputs, delay = self.adversary.respond(request.layer, request.inputs, outputs)
            return self.receipts.sign("expert", msg, encode_response(outputs), ticket), delay
        except AdversaryCrash:
            log.warning("drill: adversary crash after %d calls; closing this worker", self.adversary.calls)
            self.worker.loop.add_callback(self.worker.close, reason="neuro-drill-crash", nanny=False)
            return encode_error("crashed"), 0.0
        except (NeuroDaskError, WireFormatError) as exc:  # TicketError among them
            return encode_error(str(exc)), 0.0
        except Exception as exc:
            log.exception("expert call failed")
            return encode_error(f"{type(exc).__name__}: {exc}"), 0.0

    def _admit(
        self, msg: dict[str, Any], caller: str | None, from_scheduler: bool, peer: tuple[str | None, str | None]
    ):
        """The call's ticket, or the TicketError that refuses it, reported with the caller's identity."""
        try:
            return self.receipts.admit(msg, caller, from_scheduler)
        except EvidenceError as exc:
            report("ticket", peer[0], f"{getattr(exc, 'reason', 'malformed')}: {exc}", peer[1])
            raise

    async def handle_expert(self, comm, **msg) -> dict[str, Any]:
        caller, from_scheduler = _caller(comm)
        try:
            response, delay = await asyncio.get_running_loop().run_in_executor(
                self._compute, self.serve, msg, caller, from_scheduler, _peer(comm)
            )
        except RuntimeError:  # the executor is shut down: this worker is closing
            return encode_error(f"{self.worker.address} is closing")
        if delay:
            await asyncio.sleep(delay)  # a straggle drill: this answer is late, the next call is not
        return response

    async def handle_expert_share(self, comm, **msg) -> dict[str, Any]:
        """The private tier (docs/privacy.md): an expert's linear maps on one secret share."""
        from neuro_dask.runtime.private_runner import PrivateExpertHost

        refusal = admission.paused_refusal(self.paused)
        if refusal is not None:
            return encode_error(refusal)
        self.private = getattr(self, "private", None) or PrivateExpertHost(self.host)
        caller, from_scheduler = _caller(comm)
        try:
            return await asyncio.get_running_loop().run_in_executor(
                self._compute, self._serve_share, msg, caller, from_scheduler, _peer(comm)
            )
        except RuntimeError:  # the executor is shut down: this worker is closing
            return encode_error(f"{self.worker.address} is closing")

    def _serve_share(
        self, msg: dict[str, Any], caller: str | None, from_scheduler: bool, peer: tuple[str | None, str | None]
    ) -> dict[str, Any]:
        from neuro_dask.runtime.private_runner import serve_share

        try:
            ticket = self._admit(msg, caller, from_scheduler, peer)
        except EvidenceError as exc:
            return encode_error(str(exc))
        tamper = None if self.adversary.is_honest else self.adversary.tamper_shares  # drills only
        response = serve_share(self.private, msg, self.security.max_rows, tamper)
        if response.get("status") != "OK":
            return response
        try:
            return self.receipts.sign("share", msg, response, ticket)
        except (NeuroDaskError, KeyError, TypeError, ValueError) as exc:
            return encode_error(f"could not sign the answer: {exc}")

    def handle_cancel(self, comm, msg: Cancel) -> dict[str, Any]:
        """The client won a hedge race elsewhere: skip these calls of its own if they have not started."""
        caller, _ = _caller(comm)
        for key in admission.cancel_keys(caller, msg.calls):
            self.dropped.add(key)
        return {"status": "OK"}

    async def handle_assign(
        self, model: str, store_url: str, experts: list, tickets: dict | None = None
    ) -> dict[str, Any]:
        self.receipts.set_policy(tickets)
        pairs = admission.expert_pairs(experts)
        asyncio.get_running_loop().create_task(self._load_and_report(model, store_url, pairs))
        return {"status": "OK"}

    async def _load_and_report(self, model: str, store_url: str, pairs: list[tuple[int, int]]) -> None:
        console.say("loading %d experts of %s ...", len(pairs), model)
        started = time.perf_counter()
        # a bar on a volunteer's terminal; a log file gets the line before and the one after
        bar = tqdm(total=len(pairs), desc="fetching experts", unit="expert", disable=not sys.stderr.isatty())
        try:
            result = await asyncio.get_running_loop().run_in_executor(
                self._loader, self.host.load, model, store_url, pairs, bar.update
            )
        except RuntimeError:  # the executor is shut down: this worker is closing
            return
        finally:
            bar.close()
        for line in loaded_line(
            model, len(result.loaded), result.failed, time.perf_counter() - started, self.host.status()["memory_bytes"]
        ):
            console.say(line)
        failed = admission.failed_list(result.failed)
        if failed:
            self.worker.log_event(
                "neuro", {"action": "load-failed", "model": model, "failed": failed[: admission.MAX_FAILED_IN_EVENT]}
            )
        try:
            await ExpertsLoaded(
                self.worker.address,
                model,
                tuple(result.loaded),
                tuple(failed),
                admission.reported_precision(self.host.status(), model),
            ).send(self.worker.scheduler)
        except Exception as exc:
            if self.worker.status == Status.running:  # while closing, the scheduler is gone anyway
                log.warning("could not tell the scheduler which experts are loaded: %s", exc)

    def handle_drop(self, model: str, experts: list) -> dict[str, Any]:
        self.host.drop(model, admission.expert_pairs(experts))
        console.say("dropped %d experts of %s (placed elsewhere)", len(experts), model)
        return {"status": "OK"}

    def handle_status(self, msg: WorkerStatus) -> dict[str, Any]:
        # the host's per-model precision (what `auto` chose) wins over the configured setting
        return {
            **self.info(),
            **self.host.status(),
            "paused": bool(self.paused),
            "pause_reason": self.paused,
            "hosted": {m: [list(p) for p in ps] for m, ps in self.host.hosted().items()},
        }

    def _start_idle_guard(self) -> None:
        from neuro_dask.volunteer.idle import IdleGuard, apply_limits

        applied = apply_limits(self.settings, self.device, self.profile.cores)
        if applied:
            log.info("neuro_worker limits: %s", applied)
        if self.settings.idle_only:
            self.idle = IdleGuard(self, self.settings)
            self.idle.start()

    def close(self) -> None:
        if self.idle is not None:
            self.idle.stop()
        self._compute.shutdown(wait=False, cancel_futures=True)
        self._loader.shutdown(wait=False, cancel_futures=True)


@click.command(context_settings={"ignore_unknown_options": False})
@click.option("--neuro-store", default=None, help="model store mirror URL")
@click.option("--neuro-cache-dir", default=None, help="expert file cache directory")
@click.option("--neuro-memory-budget", default=None, help="bytes or e.g. 4GiB for expert weights")
@click.option("--neuro-device", default=None, type=click.Choice(["auto", "cpu", "cuda", "mps"]))
@click.option("--neuro-backend", default=None, type=click.Choice(["torch", "onnx"]), help="expert backend")
@click.option(
    "--neuro-precision",
    default=None,
    type=click.Choice(["auto", "float32", "bfloat16", "int8", "int4"]),
    help="expert weight precision",
)
@click.option("--neuro-owner", default=None, help="owner id of this machine")
@click.option("--neuro-no-benchmark", is_flag=True, default=False, help="skip the start-up micro-benchmark")
@click.option("--neuro-adversary", default=None, help='drills only: JSON such as {"mode": "perturb"}')
@click.option(
    "--neuro-idle-only/--neuro-no-idle-only",
    default=None,
    help="pause while the owner uses this machine (default: neuro.worker.idle-only)",
)
@click.option(
    "--neuro-hardened/--neuro-no-hardened", default=None, help="hardened mode (default: neuro.security.hardened)"
)
async def dask_setup(
    worker,
    neuro_store,
    neuro_cache_dir,
    neuro_memory_budget,
    neuro_device,
    neuro_backend,
    neuro_precision,
    neuro_owner,
    neuro_no_benchmark,
    neuro_adversary,
    neuro_hardened,
    neuro_idle_only=None,
) -> None:
    settings = WorkerSettings.load(
        store=neuro_store,
        cache_dir=neuro_cache_dir,
        memory_budget=neuro_memory_budget,
        device=neuro_device,
        backend=neuro_backend,
        precision=neuro_precision,
        owner=neuro_owner,
        benchmark=False if neuro_no_benchmark else None,
        adversary=json.loads(neuro_adversary) if neuro_adversary else None,
        idle_only=neuro_idle_only,
    )
    security = SecuritySettings.load(hardened=neuro_hardened)
    console.enable(bool(dask.config.get("neuro.console", default=True)))
    if isinstance(worker, Nanny):  # `--preload-nanny neuro_worker`: harden the nanny, host nothing
        if security.hardened:
            harden_nanny(worker, security)
        return
    if security.hardened:
        try:
            harden_worker(worker, security)
        except Exception:
            # distributed only logs a preload's failure and starts anyway: a volunteer who asked
            # for hardened mode must not get an open worker instead.
            log.critical("hardened mode could not start: closing this worker", exc_info=True)
            worker.loop.add_callback(worker.close, reason="neuro-hardening-failed", nanny=True)
            raise
    _leave_ctrl_c_to_the_nanny(worker)
    note = worker_file(settings.resolved_cache_dir(), "comeback", worker.name, ".json") if worker.nanny else None
    await wait_as_told(worker, note)  # back after a scheduler restart: paced (neuro_dask/volunteer/comeback.py)
    adapter = NeuroWorker(worker, settings, security)
    await adapter.start()
    restart_on_scheduler_loss(worker, note)  # outlive a scheduler restart (neuro_dask/volunteer/reconnect.py)


def _leave_ctrl_c_to_the_nanny(worker) -> None:
    """Ctrl-C in a terminal (or a service manager's SIGTERM to the process group) reaches the nanny
    and its worker process at once. The nanny then asks the worker to close, while the worker's own
    asyncio runner cancels its main task in the middle of that close (or SIGTERM ends it outright);
    the close never finishes and the nanny kills the process 8 s later ("Worker process still alive
    after 8.0 seconds, killing"). Under a nanny, the worker process leaves both signals to it and
    closes when its nanny says so (and on its own if the nanny dies: Dask's parent monitor)."""
    if admission.leaves_signals_to_nanny(
        bool(getattr(worker, "nanny", None)), threading.current_thread() is threading.main_thread()
    ):
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, signal.SIG_IGN)


def _caller(comm) -> tuple[str | None, bool]:
    """(the calling certificate's name or None, whether the caller is the scheduler)."""
    from neuro_dask.security.hardening import comm_identity

    return admission.caller_of(comm_identity(comm))


def _peer(comm) -> tuple[str | None, str | None]:
    """(address, role:name) of the calling connection, for the report of a refusal."""
    from neuro_dask.security.hardening import comm_identity
    from neuro_dask.security.identity import describe

    return getattr(comm, "peer_address", None), describe(comm_identity(comm))


def harden_nanny(nanny, security: SecuritySettings) -> None:
    """A nanny starts, restarts and can run code in its worker's machine: it is hardened like the
    worker (restricted unpickling, no `run`, no plugins, control from the scheduler only)."""
    from neuro_dask.security.events import TOPIC, security_log
    from neuro_dask.security.guards import guard_nanny
    from neuro_dask.security.hardening import install

    try:
        install(max_message_bytes=security.max_message_bytes)
        guard_nanny(nanny)
    except Exception:
        log.critical("hardened mode could not start: closing this nanny", exc_info=True)
        nanny.loop.add_callback(nanny.close, reason="neuro-hardening-failed")
        raise

    async def tell_scheduler(event) -> None:
        try:
            await nanny.scheduler.log_event(topic=TOPIC, msg=event.to_dict())
        except Exception as exc:  # the scheduler is away: the nanny's own log has the event
            log.debug("could not forward a security event: %s", exc)

    security_log.subscribe(lambda event: nanny.loop.add_callback(tell_scheduler, event))


def harden_worker(worker, security: SecuritySettings) -> None:
    """Restricted unpickling in this process, role checks on every handler, neuro tasks only;
    each refusal goes to the scheduler's event log as well as this worker's."""
    from neuro_dask.security.events import TOPIC, security_log
    from neuro_dask.security.guards import guard_worker
    from neuro_dask.security.hardening import install

    install(max_message_bytes=security.max_message_bytes)
    guard_worker(worker)

    def forward(event) -> None:
        if worker.status == Status.running:
            worker.loop.add_callback(worker.log_event, TOPIC, event.to_dict())

    worker._neuro_unsubscribe_security = security_log.subscribe(forward)


def dask_teardown(worker) -> None:
    unsubscribe = getattr(worker, "_neuro_unsubscribe_security", None)
    if unsubscribe is not None:
        unsubscribe()
    adapter = getattr(worker, "extensions", {}).get("neuro")  # a nanny (`--preload-nanny`) has none
    if adapter is not None:
        adapter.close()
