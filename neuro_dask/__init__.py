"""neuro_dask: Mixture-of-Experts inference with the experts on volunteer Dask workers.

    import neuro_dask as nd
    model = nd.load("path/to/sharded")
    model.generate_text(["123+456="], max_new_tokens=8)
"""

from __future__ import annotations

from neuro_dask.errors import NeuroDaskError
from neuro_dask.loading import load
from neuro_dask.model.config import SUPPORTED_MODEL_TYPES, MoEConfig
from neuro_dask.model.model import MoEModel
from neuro_dask.store.sharder import shard_checkpoint

__version__ = "0.1.0"

__all__ = [
    "MoEConfig",
    "MoEModel",
    "NeuroDaskError",
    "SUPPORTED_MODEL_TYPES",
    "load",
    "shard_checkpoint",
    "__version__",
]
