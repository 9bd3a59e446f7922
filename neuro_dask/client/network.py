"""`nd.network_status(client)`: what the scheduler knows about its network, as plain data.

The `neuro_scheduler` plugin answers `neuro_status` with every worker (owner, speed, memory
budget, the experts it serves, its standing in the trust layer) and every published model. This
module is the public way to ask for it: no handler names, no `client.sync(client.scheduler....)`
in user code.

    status = nd.network_status(client)
    pd.DataFrame.from_dict(status.workers, orient="index")   # one row per worker
    pd.DataFrame(status.placement(), columns=["worker", "model", "layer", "expert"])
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from neuro_dask.errors import NeuroDaskError


class NetworkStatusUnavailableError(NeuroDaskError):
    """The scheduler does not answer `neuro_status`: it runs without neuro_dask's plugin."""

    def __init__(self, address: str, detail: str):
        self.address, self.detail = address, detail
        super().__init__(
            f"the scheduler at {address} does not run neuro_dask's plugin ({detail}); start it with "
            "`neuro-dask scheduler` or `dask scheduler --preload neuro_scheduler`"
        )


@dataclass(frozen=True)
class NetworkStatus:
    """A snapshot of the scheduler's view (plain dicts and lists, nothing live).

    workers: worker address -> {"name", "owner", "speed", "memory_budget" (bytes),
        "serving": [[model_id, layer, expert], ...], and "trust_*" fields: "trust_score",
        "trust_established", "trust_consecutive_valid", "trust_routable", ... (the reputation the
        trust layer keeps; present when the scheduler has a standing for the worker)}.
    models: model id -> {"store_url" (credentials redacted), "experts" (how many), "summary"
        (the model's config in brief)}.
    versions: the channels of published versions (as `nd.channels` reports them).
    """

    workers: dict[str, dict[str, Any]] = field(default_factory=dict)
    models: dict[str, dict[str, Any]] = field(default_factory=dict)
    versions: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_reply(cls, reply: dict[str, Any]) -> NetworkStatus:
        """From the scheduler's `neuro_status` reply (unknown keys are ignored)."""
        workers = {
            str(address): {**info, "serving": [list(p) for p in info.get("serving", ())]}
            for address, info in dict(reply.get("workers") or {}).items()
        }
        return cls(
            workers=workers,
            models={str(m): dict(info) for m, info in dict(reply.get("models") or {}).items()},
            versions=dict(reply.get("versions") or {}),
        )

    def placement(self) -> list[tuple[str, str, int, int]]:
        """(worker name, model id, layer, expert) for every expert replica a worker serves, sorted."""
        return sorted(
            (str(w.get("name", address)), str(model), int(layer), int(expert))
            for address, w in self.workers.items()
            for model, layer, expert in w.get("serving", ())
        )

    def as_dict(self) -> dict[str, Any]:
        """{"workers": ..., "models": ..., "versions": ...}: the same data as one plain dict."""
        return {"workers": self.workers, "models": self.models, "versions": self.versions}


def network_status(client: Any) -> NetworkStatus:
    """Ask the scheduler `client` is connected to for its view of the network (one round trip).

    Raises NetworkStatusUnavailableError when the scheduler runs without neuro_dask's plugin."""
    try:
        reply = client.sync(client.scheduler.neuro_status)
    except Exception as exc:  # distributed raises a bare ValueError/KeyError for an unknown handler
        if "neuro_status" in str(exc):
            raise NetworkStatusUnavailableError(str(getattr(client.scheduler, "address", "?")), str(exc)) from None
        raise
    if not isinstance(reply, dict):  # a scheduler without the handler closes the call without a reply
        raise NetworkStatusUnavailableError(
            str(getattr(client.scheduler, "address", "?")), f"no reply to neuro_status: {reply!r}"
        )
    return NetworkStatus.from_reply(reply)
