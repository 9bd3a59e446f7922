"""Lazy reading of Hugging Face safetensors checkpoints, single-file or sharded with an index.

Nothing is read until asked, and a stacked expert tensor is read one expert (or half of one) at
a time through safetensors slices, so memory stays near the largest single piece.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from neuro_dask.errors import CheckpointError, ManifestError, MissingConfigError, MissingTensorError, TruncatedFileError
from neuro_dask.model.config import MoEConfig
from neuro_dask.model.keymap import TensorRef
from neuro_dask.store.safetensors_io import SafetensorsFile

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
# chat_template.jinja: where transformers 5 saves a chat template (the gateway reads it)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")


class HFCheckpoint:
    def __init__(self, root: str | Path, parse_config: bool = True):
        """parse_config False: a transformers-layout shard reads config.json through transformers."""
        self.root = Path(root)
        if not (self.root / "config.json").is_file():
            raise MissingConfigError(str(self.root))
        self.config = MoEConfig.from_file(self.root) if parse_config else None
        self.raw_config: dict[str, Any] = json.loads((self.root / "config.json").read_text())
        self.generation_config = _read_optional_json(self.root / "generation_config.json")
        self._files: dict[str, SafetensorsFile] = {}
        self.locations = self._locate_tensors()

    @property
    def names(self) -> set[str]:
        return set(self.locations)

    @property
    def tokenizer_files(self) -> list[str]:
        return [name for name in TOKENIZER_FILES if (self.root / name).is_file()]

    def _locate_tensors(self) -> dict[str, str]:
        index = self.root / INDEX_NAME
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as exc:
                raise ManifestError(str(index), f"is not a valid safetensors index ({exc})") from exc
            for file in set(weight_map.values()):
                if not (self.root / file).is_file():
                    raise TruncatedFileError(str(self.root / file), "listed in the index but missing")
            return dict(weight_map)
        files = (
            [self.root / SINGLE_NAME]
            if (self.root / SINGLE_NAME).is_file()
            else sorted(self.root.glob("*.safetensors"))
        )
        if not files:
            raise CheckpointError(
                f"{self.root}: no *.safetensors weights found. Save the model with "
                "`save_pretrained(..., safe_serialization=True)`; .bin/.pt checkpoints are not read."
            )
        locations = {}
        for file in files:
            for name in self._file(file.name).keys():
                locations[name] = file.name
        return locations

    def _file(self, file: str) -> SafetensorsFile:
        if file not in self._files:
            self._files[file] = SafetensorsFile(self.root / file)
        return self._files[file]

    def _locate(self, ref: TensorRef) -> SafetensorsFile:
        if ref.name not in self.locations:
            raise MissingTensorError(ref.name, str(self.root))
        return self._file(self.locations[ref.name])

    def spec(self, ref: TensorRef) -> tuple[torch.dtype, tuple[int, ...]]:
        """dtype and shape of what read(ref) returns, without reading data."""
        dtype, shape = self._locate(ref).spec(ref.name)
        if ref.expert is not None:
            shape = shape[1:]
        if ref.half is not None:
            shape = (shape[0] // 2, *shape[1:])
        return dtype, tuple(shape)

    def read(self, ref: TensorRef) -> torch.Tensor:
        return self._locate(ref).read(ref.name, ref.expert, ref.half)

    def read_key(self, name: str, expert: int | None = None) -> torch.Tensor:
        """A tensor by its checkpoint name, or one expert's slice of a stacked one."""
        return self.read(TensorRef(name, expert))


def _read_optional_json(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ManifestError(str(path), f"is not valid JSON ({exc})") from exc
