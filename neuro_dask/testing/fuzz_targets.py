"""The parsers of untrusted input as fuzz targets, shared by tests/unit/test_fuzz_parsers.py
(hypothesis) and benchmarks/fuzz_atheris.py (atheris, coverage-guided libFuzzer).

Each target hands one input to its parser and lets through only that parser's documented error
(`DOCUMENTED`); anything else propagates, and a fuzzer reports it as a finding.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from neuro_dask.errors import NeuroDaskError
from neuro_dask.gateway.protocol import ProtocolError, parse_chat, parse_completion, parse_json
from neuro_dask.store.manifest import Manifest
from neuro_dask.store.safetensors_io import SafetensorsFile
from neuro_dask.wire import WireFormatError, decode_request, decode_response

# What each parser may raise on a bad input: the documented refusal. Anything else is a bug.
DOCUMENTED: dict[str, tuple[type[BaseException], ...]] = {
    "manifest": (NeuroDaskError,),  # ManifestError, MissingConfigError
    "safetensors": (NeuroDaskError,),  # TruncatedFileError
    "frame": (WireFormatError,),
    "gateway": (ProtocolError,),
}
MODEL_IDS = ("adder",)  # the models the fuzzed gateway serves


def sent_groups() -> dict[int, torch.Tensor]:
    """The request a fuzzed response answers: expert 0 with rows [2, 4], expert 3 with [1, 4]."""
    return {0: torch.ones(2, 4), 3: torch.zeros(1, 4)}


def manifest_dict(raw: Any) -> None:
    """A parsed manifest.json (any JSON value) through Manifest.from_dict."""
    try:
        Manifest.from_dict(raw)
    except DOCUMENTED["manifest"]:
        pass


def manifest_file(root: str | Path) -> None:
    """A store folder whose manifest.json holds untrusted bytes, through Manifest.read."""
    try:
        Manifest.read(root)
    except DOCUMENTED["manifest"]:
        pass


def safetensors_file(path: str | Path) -> None:
    """An untrusted .safetensors file: open it and read every tensor it lists."""
    try:
        f = SafetensorsFile(Path(path))
        for name in f.keys():
            f.read(name)
    except DOCUMENTED["safetensors"]:
        pass


def frame(msg: Any) -> None:
    """One expert-call frame (a msgpack value), decoded as a request and as a response to sent_groups()."""
    try:
        decode_request(msg)
    except DOCUMENTED["frame"]:
        pass
    try:
        decode_response(msg, sent_groups())
    except DOCUMENTED["frame"]:
        pass


def gateway_body(body: bytes | str) -> None:
    """One HTTP request body, parsed as a completion and as a chat completion."""
    for parse in (parse_completion, parse_chat):
        try:
            parse(parse_json(body), list(MODEL_IDS))
        except DOCUMENTED["gateway"]:
            pass
