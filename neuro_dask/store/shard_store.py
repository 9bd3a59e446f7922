"""Reading a sharded model: every artifact sha256-verified before its tensors are trusted."""

from __future__ import annotations

import logging
import shutil
from collections.abc import Callable
from pathlib import Path

import torch

from neuro_dask.errors import ManifestError, TensorShapeError
from neuro_dask.model.config import MoEConfig
from neuro_dask.model.keymap import expert_shapes
from neuro_dask.model.moe import ExpertWeights
from neuro_dask.store.manifest import LAYOUT_TRANSFORMERS, ROLE_EXPERT, ROLE_MTP_EXPERT, Artifact, Manifest
from neuro_dask.store.safetensors_io import read_tensors, verify_sha256

log = logging.getLogger(__name__)


def read_expert_file(path: Path, config: MoEConfig, dtype: torch.dtype | None = None) -> ExpertWeights:
    """One expert's file -> ExpertWeights, every tensor's presence and shape checked."""
    tensors = read_tensors(path)
    for name, shape in expert_shapes(config).items():
        actual = tuple(tensors[name].shape) if name in tensors else ()
        if actual != shape:
            raise TensorShapeError(name, str(path), shape, actual)
    if dtype is not None:
        tensors = {k: v.to(dtype) for k, v in tensors.items()}
    return ExpertWeights(**{name: tensors[name] for name in ExpertWeights.TENSOR_NAMES})


class ShardStore:
    def __init__(self, root: str | Path, verify: bool = True, fetch: Callable[[Artifact], Path] | None = None):
        """`fetch`: for a client's partial mirror of a remote store, where a file the mirror
        lacks comes from (a verified download: store/remote.py); None: every file is here."""
        self.root = Path(root)
        self.manifest = Manifest.read(self.root)
        self.config = self.manifest.model_config
        self.verify = verify
        self.fetch = fetch

    def path(self, artifact: Artifact) -> Path:
        path = self.root / artifact.path
        if self.fetch is not None and not path.is_file():
            path.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(self.fetch(artifact), path)
        return path

    def _read(self, artifact: Artifact) -> dict[str, torch.Tensor]:
        path = self.path(artifact)
        if self.verify:
            verify_sha256(path, artifact.sha256)
        return read_tensors(path)

    def read_trunk(self) -> dict[str, torch.Tensor]:
        return self._read(self.manifest.trunk)

    def read_mtp(self) -> dict[str, torch.Tensor]:
        """The multi-token-prediction layers' tensors (ManifestError if the store has none)."""
        artifact = self.manifest.mtp
        if artifact is None:
            raise ManifestError(str(self.root), "has no multi-token-prediction layers")
        return self._read(artifact)

    def expert_path(self, layer: int, expert: int, role: str = ROLE_EXPERT) -> Path:
        """The expert's file (a multi-token-prediction layer's with role=ROLE_MTP_EXPERT),
        sha256-verified when this store verifies."""
        by_role = self.manifest.mtp_expert if role == ROLE_MTP_EXPERT else self.manifest.expert
        artifact = by_role(layer, expert)
        path = self.path(artifact)
        if self.verify:
            verify_sha256(path, artifact.sha256)
        return path

    def read_expert(
        self, layer: int, expert: int, dtype: torch.dtype | None = None, role: str = ROLE_EXPERT
    ) -> ExpertWeights:
        """One expert as SwiGLU weights (a transformers-layout store's plain SwiGLU experts too;
        other layouts raise ExpertLayoutError: run them with runtime/hf_experts.py)."""
        path = self.expert_path(layer, expert, role)
        if self.manifest.layout == LAYOUT_TRANSFORMERS:
            from neuro_dask.store.expert_files import read_expert_tensors, swiglu_weights

            spec = self.manifest.experts_spec or {}
            weights = swiglu_weights(read_expert_tensors(path, spec), spec)
            return weights if dtype is None else ExpertWeights(*(t.to(dtype) for t in weights.as_dict().values()))
        return read_expert_file(path, self.config, dtype)

    def tokenizer_path(self) -> Path | None:
        artifact = self.manifest.tokenizer()
        if artifact is None:
            return None
        path = self.path(artifact)
        if self.verify:
            verify_sha256(path, artifact.sha256)
        return path
