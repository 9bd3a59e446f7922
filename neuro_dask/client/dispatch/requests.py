"""PaidRequests: the request scope (model/moe.py's RequestScope) of a distributed model.

A request is one generation (or forward, score, map batch) from its start to its end. At the start
the scheduler leases the model's version for it (a replaced version stays served until its
requests end), quotes and holds the fee at the tier's price when it runs a ledger (or refuses,
and then nothing is sent), and names the request with a ticket every call of it shows the
workers. At the end the client presents the workers' receipts and reports every judged reply,
and the scheduler settles by the receipts it verified.

Which request a thread works for, and who pays, is per thread: concurrent generations are
separate requests. Concurrent streams merge their expert calls (model/batching.py): the work of
a merged call is credited to the request of the thread that ran it; the client pays for all.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from distributed import Client

from neuro_dask.client.dispatch.routes import MAX_WAIT_FACTOR
from neuro_dask.client.dispatch.scheduler_away import SchedulerAwayError, call_through_restart
from neuro_dask.errors import NeuroDaskError
from neuro_dask.protocol.messages import RequestBegin, RequestEnd
from neuro_dask.protocol.records import PassReport
from neuro_dask.scheduler.versions import RetiredVersionError
from neuro_dask.settings import ClientSettings

log = logging.getLogger(__name__)


class PaymentRefusedError(NeuroDaskError):
    """The scheduler's ledger refused to hold this request's fee: no work was sent."""

    def __init__(self, account: str | None, request: str, why: str):
        self.account, self.request, self.why = account, request, why
        hint = "" if account else " (set neuro.client.account to the ledger user that pays)"
        super().__init__(f"request refused before any work was sent: {why}{hint}")


class _ThreadRequest(threading.local):
    """One thread's request: its id and ticket, whether a ledger charges it, and who pays."""

    id: str = ""
    ticket: Any = None
    charged: bool = False
    account: str | None = None


class PaidRequests:
    """Requests of one distributed model, begun and ended with the scheduler.

    `flush` reports everything the client buffered (receipts, outcomes, load) before an end;
    `forget` drops what was kept of an ended request (its receipts); `passes` takes the records of
    speculative passes (for the dashboard). `priced_at(tier)` is the same
    scope billed at another tier's price (the private tier's), sharing every thread's state.
    """

    def __init__(
        self,
        client: Client,
        model_id: str,
        settings: ClientSettings,
        flush: Callable[[], None],
        forget: Callable[[str], None],
        tier: str = "standard",
        passes: Callable[[PassReport], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ):
        self.client = client
        self.clock, self.sleep = clock, sleep
        self.model_id = model_id
        self.settings = settings
        self.micro_batches = int(settings.micro_batches or 1)
        self.tier = tier
        self._flush, self._forget, self._passes = flush, forget, passes
        self._threads = _ThreadRequest()
        self.settlements: list[dict] = []  # what the scheduler charged, per request
        self._heard: dict[str, str] = {}  # "current": the channel's current version, as last heard

    def priced_at(self, tier: str) -> PaidRequests:
        view = copy.copy(self)  # shares the threads' state, the settlements and what was heard
        view.tier = tier
        return view

    # ---- this thread's request ------------------------------------------------------------------

    @property
    def request(self) -> str:
        """The request this thread's generation is doing work for ("" outside one)."""
        return self._threads.id

    def stamp(self) -> dict[str, Any]:
        """What every call of this thread's request carries: its id and the scheduler's ticket."""
        stamp: dict[str, Any] = {"request": self._threads.id} if self._threads.id else {}
        if self._threads.ticket is not None:
            stamp["ticket"] = self._threads.ticket
        return stamp

    def _adopt(self, stamp: Mapping[str, Any]) -> None:
        self._threads.id = str(stamp.get("request", ""))
        self._threads.ticket = stamp.get("ticket")

    def note_pass(self, drafted: int, kept: int) -> None:
        """A speculative pass of this thread's request, for the dashboard (reported with the next batch)."""
        if self._passes is not None:
            self._passes(PassReport(int(drafted), int(kept), self._threads.id))

    @contextlib.contextmanager
    def lane(self, stamp: Mapping[str, Any]) -> Iterator[None]:
        """A lane of a pipelined generation (its own thread) works for the generation's request."""
        before = self.stamp()
        self._adopt(stamp)
        try:
            yield
        finally:
            self._adopt(before)

    @contextlib.contextmanager
    def charging(self, account: str | None) -> Iterator[None]:
        """Generations this thread starts inside the block are paid by `account` (a ledger user)
        instead of neuro.client.account: a gateway serving many API keys, for example."""
        before = self._threads.account
        self._threads.account = account
        try:
            yield
        finally:
            self._threads.account = before

    @property
    def account(self) -> str | None:
        return self._threads.account or self.settings.account

    @property
    def current_version(self) -> str | None:
        return self._heard.get("current")

    # ---- begin and end --------------------------------------------------------------------------

    def begin(self, expert_tokens: int) -> None:
        """Before any work: the scheduler leases this model version for the request, quotes and
        holds the fee at the tier's price (when it runs a ledger), or refuses, and then nothing is
        sent. Its reply names the request and carries the ticket every call of it shows the workers."""
        begin = RequestBegin(self.model_id, self.account or "", int(expert_tokens), self.tier)
        reply = self._ask(begin.send, "request begin")
        if reply.get("retired"):
            raise RetiredVersionError(self.model_id, str(reply.get("channel")), reply.get("current"))
        if reply.get("unpublished"):
            raise NeuroDaskError(str(reply.get("message")))
        if reply.get("status") != "OK":
            raise PaymentRefusedError(self.account, str(reply.get("request", "")), str(reply.get("message")))
        if reply.get("current"):
            self._heard["current"] = reply["current"]  # a following client switches after this request
        self._threads.charged = reply.get("ledger") is not False
        self._adopt({"request": str(reply["request"]), "ticket": reply.get("ticket")})

    def _ask(self, send: Callable[[Any], Any], what: str) -> dict:
        """The scheduler's reply to `send`, asked again while it restarts (scheduler_away.py), for
        as long as a layer waits for a restarting network (MAX_WAIT_FACTOR x missing-expert-wait)."""
        return call_through_restart(
            lambda: self.client.sync(send, self.client.scheduler),
            what=what,
            scheduler=str(getattr(self.client.scheduler, "address", "")),
            cap=MAX_WAIT_FACTOR * self.settings.missing_expert_wait,
            clock=self.clock,
            sleep=self.sleep,
        )

    def end(self) -> None:
        """After the work: present the workers' receipts and report every judged reply, then end
        the request: the scheduler settles it by the receipts it verified and ends the lease."""
        request = self.request
        if not request:
            return
        charged = self._threads.charged
        self._flush()
        self._adopt({})
        try:
            reply = self._ask(RequestEnd(request).send, "request end")
        except SchedulerAwayError as exc:  # the answer is already the caller's: do not lose it
            log.warning("request %s not ended: %s; its lease expires and settles it", request, exc)
            reply = {"status": "error", "message": str(exc)}
        self._forget(request)  # presented with the flush: nothing of this request is kept
        if not charged:
            return
        self.settlements.append({"request": request, **reply})
        if reply.get("status") != "OK":
            log.warning("request %s could not be settled: %s", request, reply.get("message"))
