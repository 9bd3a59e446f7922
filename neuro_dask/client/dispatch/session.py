"""nd.load(..., client=...): publish the model, wait until every expert is served, build the model.

The trunk and tokenizer are read here (from the folder, or fetched and verified from a URL);
the experts stay on the workers. The model returned has exactly the local model's API.
"""

from __future__ import annotations

import functools
import logging
import os
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from distributed import Client
from tqdm import tqdm

from neuro_dask.client.assembly import assemble_model
from neuro_dask.client.dispatch.executor import DistributedExecutor
from neuro_dask.client.dispatch.routes import ExpertsUnloadableError, ExpertUnavailableError, RouteTable, why_unserved
from neuro_dask.client.dispatch.transports import make_transport
from neuro_dask.errors import NeuroDaskError
from neuro_dask.model.model import MoEModel
from neuro_dask.security.redact import redact_url
from neuro_dask.settings import ClientSettings, SecuritySettings
from neuro_dask.store.manifest import MANIFEST_NAME
from neuro_dask.store.remote import ExpertFileCache, read_manifest
from neuro_dask.store.shard_store import ShardStore

log = logging.getLogger(__name__)


class SchedulerPluginMissingError(NeuroDaskError):
    def __init__(self, address: str, detail: str):
        super().__init__(
            f"the scheduler at {address} does not run neuro_dask's plugin ({detail}); start it with "
            "`neuro-dask scheduler` or `dask scheduler --preload neuro_scheduler`"
        )


class TransportUnavailableError(NeuroDaskError):
    """The futures transport sends Dask task graphs, which are pickles: a hardened scheduler
    accepts plain data only from clients (docs/security.md)."""

    def __init__(self, address: str):
        super().__init__(
            f"the scheduler at {address} runs hardened mode, which refuses Dask task graphs from clients "
            "(they are pickles, and a network of strangers loads none): use transport='direct' "
            "(the default; also for batches: model.map pipelines its calls)"
        )


def _is_local(path_or_url: str | Path) -> bool:
    text = str(path_or_url)
    return "://" not in text or text.startswith("file://")


def _local_path(path_or_url: str | Path) -> Path:
    text = str(path_or_url)
    return Path(text[len("file://") :] if text.startswith("file://") else text).resolve()


def store_url_for(path_or_url: str | Path) -> str:
    """What workers and the scheduler should read: a local path made absolute (their working
    directories are not the caller's), a URL as it is."""
    return str(_local_path(path_or_url)) if _is_local(path_or_url) else str(path_or_url)


def open_store(path_or_url: str | Path, verify: bool, cache_dir: Path | None = None) -> tuple[str, ShardStore]:
    """(the URL workers should read, a local ShardStore holding at least manifest, trunk, tokenizer)."""
    if _is_local(path_or_url):
        local = _local_path(path_or_url)
        return str(local), ShardStore(local, verify=verify)
    url = str(path_or_url).rstrip("/")
    manifest = read_manifest(url)
    cache = ExpertFileCache(cache_dir or Path(os.path.expanduser("~/.cache/neuro_dask")))
    mirror = cache.root / "clients" / manifest.trunk.sha256[:16]
    mirror.mkdir(parents=True, exist_ok=True)
    (mirror / MANIFEST_NAME).write_text(manifest.to_json())
    for artifact in [manifest.trunk, *(a for a in manifest.artifacts if a.role == "tokenizer")]:
        target = mirror / artifact.path
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(cache.fetch(url, artifact), target)
    # what else the client reads (a draft's expert copies, an MTP layer) comes when first read
    return url, ShardStore(mirror, verify=verify, fetch=functools.partial(cache.fetch, url))


def publish(client: Client, store_url: str, model_id: str | None = None, channel: str = "") -> dict[str, Any]:
    """Ask the scheduler to serve the model at `store_url` (on `channel`: as its current version
    if it has none, else as its candidate; neuro_dask/scheduler/versions.py). On a hardened network only
    the operator publishes: a client then finds the model among those already published."""
    if model_id is not None and not channel and _is_published(client, model_id):
        return {"status": "OK", "model": model_id}
    try:
        reply = client.sync(
            client.scheduler.neuro_publish, store_url=store_url, **({"channel": channel} if channel else {})
        )
    except Exception as exc:  # distributed raises a bare ValueError/KeyError for an unknown handler
        if "only the operator" in str(exc) and model_id is not None:
            return _published_by_operator(client, store_url, model_id)
        if "neuro_publish" in str(exc):
            raise SchedulerPluginMissingError(client.scheduler.address, str(exc)) from None
        raise
    if reply.get("status") != "OK":
        raise NeuroDaskError(f"the scheduler refused to publish {redact_url(store_url)}: {reply.get('message')}")
    return reply


def wait_until_served(
    client: Client,
    model_id: str,
    timeout: float,
    clock=time.monotonic,
    redundancy_grace: float = 10.0,
    on_progress: Callable[[int, int, str | None], None] | None = None,
) -> RouteTable:
    """Poll the scheduler until every expert has a serving replica; a progress bar on a terminal.

    Once every expert is served, wait up to `redundancy_grace` more seconds for the planned
    replicas still loading, so the first generation already has a replica to fall back on.
    `on_progress(served, total, note)`: called when the count changes, and with a note when
    nothing has moved for a while and the network says why (workers paused, budgets too small).
    A timeout says the network's reason too.
    """
    started = clock()
    served_at = None
    bar = None
    shown: tuple[int, str | None] | None = None
    moved_at, last_served = started, -1
    while True:
        msg = client.sync(client.scheduler.neuro_routes, model=model_id)
        table = RouteTable.from_message(msg)
        total, missing = len(table.routes), table.missing
        served = total - len(missing)
        if served != last_served:
            moved_at, last_served = clock(), served
        if not missing and msg.get("pending") and clock() - (served_at := served_at or clock()) < redundancy_grace:
            time.sleep(0.05)  # poll
            continue
        if bar is None and missing:
            bar = tqdm(total=total, desc="experts served", unit="expert", disable=not sys.stderr.isatty())
        if bar is not None:
            bar.n = served
            bar.refresh()
        note = _stall_reason(client, model_id) if missing and clock() - moved_at > STALL_NOTE_AFTER else None
        if on_progress is not None and (served, note) != shown and (note or not shown or served != shown[0]):
            on_progress(served, total, note)
            shown = (served, note)
        if not missing:
            if bar is not None:
                bar.close()
            return table
        unloadable = msg.get("unloadable") or []
        if unloadable or clock() - started > timeout:
            if bar is not None:
                bar.close()
            if unloadable:  # every worker tried: say why now rather than after the timeout
                layer, why = unloadable[0][0], str(unloadable[0][2])
                raise ExpertsUnloadableError(
                    model_id, layer, [e for l, e, _ in unloadable if l == layer], clock() - started, why
                )
            layer = missing[0][0]
            raise ExpertUnavailableError(
                model_id,
                layer,
                [e for l, e in missing if l == layer],
                clock() - started,
                note or _stall_reason(client, model_id),
            )
        time.sleep(0.05)  # poll: workers report loaded experts as they finish


STALL_NOTE_AFTER = 5.0  # seconds without a newly served expert before asking the network why


def _stall_reason(client: Client, model_id: str) -> str | None:
    """The network's reason for not serving `model_id` (neuro_dask.client.dispatch.routes.why_unserved),
    or None where it gives none or cannot be asked."""
    try:
        status = client.sync(client.scheduler.neuro_status)
        model = status["models"][model_id]
        replicas = int(model.get("replicas") or 1)
        return why_unserved(status["workers"], int(model["summary"].get("bytes_experts") or 0), replicas)
    except Exception:  # a certificate that may not read the status, an older scheduler
        return None


def _is_published(client: Client, model_id: str) -> bool:
    try:
        return client.sync(client.scheduler.neuro_routes, model=model_id).get("status") == "OK"
    except Exception:  # no neuro plugin: publish() says so in words
        return False


def _published_by_operator(client: Client, store_url: str, model_id: str) -> dict[str, Any]:
    if not _is_published(client, model_id):
        raise NeuroDaskError(
            f"{redact_url(store_url)} ({model_id}) is not published on {client.scheduler.address}, "
            "and on this hardened "
            "network only the operator publishes models: ask them to run "
            f"`neuro-dask publish {redact_url(store_url)} --scheduler {client.scheduler.address} --tls DIR`"
        )
    return {"status": "OK", "model": model_id}


def _check_private(store: ShardStore) -> None:
    """Refuse before publishing: the private tier runs plain SwiGLU experts only."""
    from neuro_dask.runtime.hf_experts import describe_refusal, is_swiglu
    from neuro_dask.store.manifest import LAYOUT_TRANSFORMERS

    spec = store.manifest.experts_spec or {}
    if store.manifest.layout == LAYOUT_TRANSFORMERS and not is_swiglu(spec):
        from neuro_dask.errors import ConfigError

        raise ConfigError(
            f"privacy='private' cannot serve {store.manifest.architecture}: {describe_refusal(spec)}, "
            "and secret shares pass through linear maps and a SiLU-gated product only "
            "(docs/privacy.md); load it with privacy='standard'"
        )


def load_distributed(
    path_or_url: str | Path,
    client: Client,
    *,
    transport: str | None = None,
    dtype: torch.dtype = torch.float32,
    verify: bool = True,
    privacy: str = "standard",
    device: str | torch.device = "cpu",
) -> MoEModel:
    settings = ClientSettings.load(transport=transport)
    if SecuritySettings.load().hardened:
        from neuro_dask.security.hardening import harden

        harden()
    store_url, store = open_store(path_or_url, verify)
    if privacy == "private":
        _check_private(store)
    reply = publish(client, store_url, store.manifest.model_id)
    model_id = reply["model"]
    table = wait_until_served(client, model_id, settings.load_timeout)
    if table.hardened and settings.transport == "futures":
        raise TransportUnavailableError(client.scheduler.address)
    executor = DistributedExecutor(
        client, model_id, make_transport(settings.transport, client, settings.connect_timeout, settings), settings
    )
    if privacy == "private":
        from neuro_dask.client.dispatch.private_executor import PrivateExecutor

        executor = PrivateExecutor(executor)
    model = assemble_model(store, executor, dtype, device)
    model.use_requests(executor.requests)  # the scheduler begins, bills and ends its requests
    log.info("loaded %s as %s over %s; experts on workers", redact_url(store_url), model_id, settings.transport)
    return model
