"""`neuro-dask serve`: start the OpenAI-compatible gateway in front of a model and run until
interrupted. What it prints is the command's output; the server itself is server.py."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from neuro_dask.gateway.server import Gateway, GatewayConfigError, GatewayServer, configured_api_keys, default_model_id


def curl_example(url: str, model_id: str, prompt: str, key: bool) -> str:
    auth = ' -H "Authorization: Bearer $NEURO_API_KEY"' if key else ""
    body = json.dumps({"model": model_id, "prompt": prompt, "max_tokens": 8, "temperature": 0})
    return f"curl {url}/completions -H 'Content-Type: application/json'{auth} -d '{body}'"


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt  # SIGTERM stops the gateway as Ctrl-C does


def serve(
    scheduler: str | None = None,
    model_path: str | Path | None = None,
    host: str = "127.0.0.1",
    port: int = 8000,
    api_keys: str | Path | None = None,
    workers: int = 3,
    model_id: str | None = None,
    transport: str | None = None,
    tls: str | None = None,
    channel: str | None = None,
    privacy: str = "standard",
    speculate: Callable[[Any], None] | None = None,
) -> int:
    """Load the model (on `scheduler`'s cluster, or an embedded local one) and serve it until
    interrupted (Ctrl-C or SIGTERM). Without a model: the bundled adder. `tls`: a folder with a
    client certificate for a hardened network (docs/security.md). `channel`: serve that
    channel's current version, following it to each new one between requests (nd.follow).
    `privacy="private"`: every expert call on secret shares (docs/privacy.md). `speculate`: sets
    the model's speculative decoding (model.speculate) before it serves."""
    import signal

    from neuro_dask.client.cluster import connect
    from neuro_dask.client.loading import load
    from neuro_dask.demo.addition import ASSET_DIR

    keys = configured_api_keys(api_keys)
    path = model_path or ASSET_DIR
    where = f"connecting to {scheduler}" if scheduler else f"starting a local cluster of {workers} worker processes"
    print(f"{where} ...", flush=True)
    client, cluster = connect(scheduler, tls=tls, n_workers=workers)
    model = gateway = server = None
    previous = signal.getsignal(signal.SIGTERM) if threading.current_thread() is threading.main_thread() else None
    try:
        if channel:
            from neuro_dask.client.following import follow

            model = follow(channel, client, transport=transport, privacy=privacy)
        else:
            model = load(path, client=client, transport=transport, privacy=privacy)
        if speculate is not None:
            speculate(model)
        gateway = Gateway(model, model_id=model_id or channel or default_model_id(str(path)), api_keys=keys)
        try:
            server = GatewayServer(gateway, host, port).start()
        except OSError as exc:  # the port is taken, or the host is not this machine's
            raise GatewayConfigError(f"{host}:{port}", f"cannot listen there ({exc.strerror or exc})") from None
        bundled = Path(str(path)).resolve() == ASSET_DIR.resolve() if "://" not in str(path) else False
        print(
            f"serving model {gateway.model_id!r} at {server.url} (OpenAI API: /models, /completions, /chat/completions)"
        )
        print(
            "try:\n  " + curl_example(server.url, gateway.model_id, "123+456=" if bundled else "Hello", bool(keys)),
            flush=True,
        )
        if previous is not None:
            signal.signal(signal.SIGTERM, _interrupt)
        try:
            threading.Event().wait()
        except KeyboardInterrupt:
            print("stopping the gateway", flush=True)
        return 0
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
        if server is not None:
            server.stop()
        if gateway is not None:
            gateway.close()
        if model is not None:
            model.close()
        client.close()
        if cluster is not None:
            cluster.close()
