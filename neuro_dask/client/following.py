"""`nd.follow(channel, client)`: a model that follows a channel's current version.

Each request (generate, generate_text, stream, forward, score, map) runs on one version from
start to end. The scheduler tells every request's start which version is current
(neuro_dask/scheduler/versions.py); when it has moved, the next request loads the new version first (its
trunk from the version's store; its experts are already on the workers) and the old one is
closed once no request of this process uses it. The scheduler keeps a replaced version served
until every request leased on it has ended, so switching drops nothing.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable, Iterator
from typing import Any

from neuro_dask.errors import NeuroDaskError
from neuro_dask.scheduler.versions import RetiredVersionError, check_channel_name

log = logging.getLogger(__name__)

REQUEST_METHODS = ("generate", "generate_text", "forward", "score", "map")


class ChannelNotFoundError(NeuroDaskError):
    def __init__(self, channel: str, known: list[str]):
        self.channel, self.known = channel, known
        super().__init__(
            f"no channel {channel!r} on this scheduler (channels: {', '.join(known) or 'none'}); "
            f"the operator publishes one with `neuro-dask publish STORE --channel {channel}`"
        )


def channel_versions(client: Any, channel: str) -> tuple[str, dict[str, str]]:
    """(the channel's current model id, model id -> store of every published version), asked of
    the scheduler."""
    reply = client.sync(client.scheduler.neuro_channels)
    ch = reply.get("channels", {}).get(channel)
    if ch is None or not ch.get("current"):
        raise ChannelNotFoundError(channel, sorted(reply.get("channels", {})))
    return ch["current"], dict(reply["stores"])


class FollowingModel:
    """Delegates to the current version's MoEModel; see the module docstring."""

    def __init__(self, channel: str, client: Any, loader: Callable[..., Any] | None = None, **load_options: Any):
        from neuro_dask.client.loading import load

        self.channel = check_channel_name(channel)
        self.client = client
        self._loader = loader or load
        self._options = load_options
        self._lock = threading.Lock()
        self._active: dict[int, int] = {}  # id(model) -> requests of this process running on it
        self._retired_here: list[Any] = []  # replaced models still running a request
        self._accounts = threading.local()  # `charging`: who pays, per thread, whatever the version
        self.switches: list[tuple[str, str]] = []  # (from, to) model ids, in order
        current, stores = channel_versions(client, channel)
        self.model = self._load(current, stores[current])

    @property
    def model_id(self) -> str:
        return self.model.executor.model_id

    def _load(self, model_id: str, store: str) -> Any:
        model = self._loader(store, client=self.client, **self._options)
        if model.executor.model_id != model_id:
            model.close()
            raise NeuroDaskError(
                f"channel {self.channel!r}: the store {store} holds {model.executor.model_id}, not {model_id}"
            )
        return model

    # ---- switching -----------------------------------------------------------------------------

    def _switch_to(self, model_id: str | None) -> None:
        """Under the lock: load `model_id` (the channel's current one when it is not published, or
        None) and retire ours when idle."""
        current, stores = channel_versions(self.client, self.channel)
        if model_id not in stores:
            model_id = current
        if model_id == self.model_id:
            return
        old, self.model = self.model, self._load(model_id, stores[model_id])
        self.switches.append((old.executor.model_id, model_id))
        log.info("channel %s: switched from %s to %s", self.channel, old.executor.model_id, model_id)
        self._retired_here.append(old)
        self._close_idle()

    def _close_idle(self) -> None:
        for old in [m for m in self._retired_here if not self._active.get(id(m))]:
            self._retired_here.remove(old)
            self._active.pop(id(old), None)
            old.close()

    def _acquire(self, force_to: str | None = None, force: bool = False) -> Any:
        with self._lock:
            current = self.model.requests.current_version  # as the scheduler said at the last request's start
            if force or (current and current != self.model_id):
                self._switch_to(force_to or current)
            self._active[id(self.model)] = self._active.get(id(self.model), 0) + 1
            return self.model

    def _release(self, model: Any) -> None:
        with self._lock:
            self._active[id(model)] -= 1
            self._close_idle()

    @contextlib.contextmanager
    def charging(self, account: str | None) -> Iterator[None]:
        """As MoEModel.charging: requests this thread starts in the block are paid by `account`,
        on whichever version they run."""
        before = getattr(self._accounts, "account", None)
        self._accounts.account = account
        try:
            yield
        finally:
            self._accounts.account = before

    def _paid_by_caller(self, model: Any):
        account = getattr(self._accounts, "account", None)
        return model.charging(account) if account else contextlib.nullcontext()

    def _call(self, name: str, *args: Any, **kwargs: Any) -> Any:
        model = self._acquire()
        try:
            with self._paid_by_caller(model):
                return getattr(model, name)(*args, **kwargs)
        except RetiredVersionError as exc:  # refused at the request's start: nothing ran; go on on the new one
            log.info("channel %s: %s", self.channel, exc)
            current = exc.current
        finally:
            self._release(model)
        model = self._acquire(force_to=current, force=True)
        try:
            with self._paid_by_caller(model):
                return getattr(model, name)(*args, **kwargs)
        finally:
            self._release(model)

    # ---- the model's API -----------------------------------------------------------------------

    def __getattr__(self, name: str) -> Any:
        if name in REQUEST_METHODS:
            return lambda *args, **kwargs: self._call(name, *args, **kwargs)
        return getattr(self.__dict__["model"], name)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._call("forward", *args, **kwargs)

    def stream(self, *args: Any, **kwargs: Any):
        model = self._acquire()
        try:
            with self._paid_by_caller(model):
                yield from model.stream(*args, **kwargs)
        finally:
            self._release(model)

    def close(self) -> None:
        with self._lock:
            for model in [*self._retired_here, self.model]:
                model.close()
            self._retired_here.clear()

    def __enter__(self) -> FollowingModel:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def follow(channel: str, client: Any, **load_options: Any) -> FollowingModel:
    """A model that always serves `channel`'s current version (load options as for nd.load)."""
    return FollowingModel(channel, client, **load_options)


# ---- the operator's side, from Python (the CLI: neuro-dask publish --channel / adopt / channels) --


def publish(path_or_url: Any, client: Any, channel: str = "", wait: bool = True) -> dict:
    """Publish a sharded model (on `channel`: as its current version if it has none, else as its
    candidate); with `wait`, until every expert is served. Returns the scheduler's reply:
    {"model": id, "role": "current" | "candidate", ...}."""
    from neuro_dask.client.dispatch.session import publish as publish_store
    from neuro_dask.client.dispatch.session import store_url_for, wait_until_served
    from neuro_dask.settings import ClientSettings

    reply = publish_store(client, store_url_for(path_or_url), channel=channel)
    if wait:
        wait_until_served(client, reply["model"], ClientSettings.load().load_timeout)
    return reply


def adopt(channel: str, model: str, client: Any) -> dict:
    """Make the channel's served candidate `model` current (the operator's adoption); raises
    VersionError with the scheduler's reason when refused (not served yet, votes decide, ...)."""
    from neuro_dask.scheduler.versions import VersionError

    reply = client.sync(client.scheduler.neuro_adopt, channel=channel, model=model)
    if reply.get("status") != "OK":
        raise VersionError(f"not adopted: {reply.get('message')}")
    return {**reply, "retiring": list(reply.get("retiring", ()))}


def channels(client: Any) -> dict:
    """Every channel (current, candidate, history), retiring and retired versions."""
    reply = client.sync(client.scheduler.neuro_channels)
    reply.pop("stores", None)  # may hold credentials: not for display
    return reply
