"""neuro_dask: Mixture-of-Experts inference with the experts on volunteer Dask workers.

import neuro_dask as nd
model = nd.load("path/to/sharded")
model.generate_text(["123+456="], max_new_tokens=8)
"""

from __future__ import annotations

import importlib

# Registers neuro.yaml's defaults with Dask's config as soon as any part of the package is
# imported: registered later, inside a `dask.config.set` block, they would vanish with it.
from neuro_dask import settings as _settings  # noqa: F401
from neuro_dask.errors import NeuroDaskError

__version__ = "0.1.0"

# Imported on first use, so that light tools (the ledger CLI, a ledger writer) never load torch.
_LAZY = {
    "load": "neuro_dask.client.loading",
    "MapFailure": "neuro_dask.model.mapping",
    "failures": "neuro_dask.model.mapping",
    "MoEConfig": "neuro_dask.model.config",
    "SUPPORTED_MODEL_TYPES": "neuro_dask.model.config",
    "MoEModel": "neuro_dask.model.model",
    "shard_checkpoint": "neuro_dask.store.sharder",
    "harden": "neuro_dask.security.hardening",
    "security_for": "neuro_dask.security.tls",
    "follow": "neuro_dask.client.following",
    "publish": "neuro_dask.client.following",
    "adopt": "neuro_dask.client.following",
    "channels": "neuro_dask.client.following",
    "network_status": "neuro_dask.client.network",
    "NetworkStatus": "neuro_dask.client.network",
}


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'neuro_dask' has no attribute {name!r}")


__all__ = [
    "MapFailure",
    "failures",
    "MoEConfig",
    "MoEModel",
    "NeuroDaskError",
    "SUPPORTED_MODEL_TYPES",
    "load",
    "follow",
    "publish",
    "adopt",
    "channels",
    "network_status",
    "NetworkStatus",
    "harden",
    "security_for",
    "shard_checkpoint",
    "__version__",
]
