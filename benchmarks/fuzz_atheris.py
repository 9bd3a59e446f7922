"""Coverage-guided fuzzing (atheris, i.e. libFuzzer) of the parsers of untrusted input: the
manifest, the shard loader, the expert-call frame decoder, the gateway's request parser, and hardened
mode's decoders of what peers send (plain: decode_plain_frames; pickle: the bounded restricted loader).

    .venv/bin/python benchmarks/fuzz_atheris.py [--runs 100000]
        [--target all|manifest|safetensors|frame|gateway|plain|pickle] [--seed N] [--keep-going]

Needs the `fuzz` extra (`pip install -e .[fuzz]`, i.e. atheris). Each target runs in a child process
(`--child TARGET`), because atheris.Fuzz() never returns: libFuzzer exits after -runs inputs. The
child instruments neuro_dask for coverage, seeds libFuzzer with valid inputs (the bundled model's
manifest, a small shard, real request and response frames, chat and completion bodies) and a
dictionary of the formats' keywords, and hands every input to the target of
neuro_dask/testing/fuzz_targets.py, the same one tests/unit/test_fuzz_parsers.py (hypothesis) runs:
only the parser's documented error may escape it. Anything else is a crash: libFuzzer stops, the
parent prints the traceback, the decoded input and the raw input in hex, and exits nonzero.

--keep-going records each distinct undocumented exception (type and raising line) and fuzzes on,
so one run surveys every bug a target has instead of stopping at the first.

Inputs: the first byte picks a mode, the rest feeds it. Modes per target:
  manifest     0 raw bytes as a store's manifest.json (Manifest.read), 1 the bundled manifest with
               fields replaced or deleted, 2 any JSON value (both through Manifest.from_dict),
               3 deeply nested JSON text as manifest.json
  safetensors  0 raw file bytes, 1 a header built field by field (often self-consistent) + data,
               2 a deeply nested JSON header
  frame        0 a real request or response frame with fields replaced or deleted, 1 raw msgpack
               decoded as distributed decodes it, 2 any msgpack value, 3 a frame built field by
               field (experts, counts, dtype, hidden, data as long as they imply, or not)
  gateway      0 raw body bytes, 1 a JSON object built from the OpenAI request fields, 2 deeply
               nested JSON text
  plain        0 raw bytes as the one frame, 1 a list of frames (length-prefixed pieces of the input),
               2 a plain value packed by distributed's dumps, often with a refused key, an extension
               type or a timestamp put in, 3 arrays and maps nested up to 2,000 deep, 4 a map or set
               of keys sharing one hash (around the bound)
  pickle       0 raw bytes, 1 opcodes with their arguments and globals (allowed and not) strung
               together, 2 a real pickle (errors as distributed pickles them, a Status, containers,
               a datetime) with bytes replaced, 3 a plain value pickled at protocol 0-5, 4 tuples,
               lists or dicts nested up to 5,000 deep, or colliding dict keys
Crash files go to a temporary folder (-artifact_prefix), never into the repository.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import math
import os
import re
import shutil
import struct
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
TARGETS = ("manifest", "safetensors", "frame", "gateway", "plain", "pickle")
MAX_LEN = {"manifest": 8192, "safetensors": 4096, "frame": 1024, "gateway": 2048, "plain": 4096, "pickle": 4096}
MANIFEST = ROOT / "neuro_dask/assets/adder/manifest.json"
WIRE_DTYPES = ["float32", "float16", "bfloat16", "float64", "int8", ""]
ST_DTYPES = ["F32", "F16", "BF16", "F64", "I64", "I32", "I16", "I8", "U8", "BOOL", "X9", ""]
ST_ITEMSIZE = {"F32": 4, "F16": 2, "BF16": 2, "F64": 8, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}
EDGE_INTS = [0, 1, -1, 2**31, 2**32, 2**53, 2**62, 2**63 - 1, 2**63, -(2**63), 2**64, 10**20, -(10**20)]
KEYWORDS = {
    "manifest": [
        "neuro-dask-shards",
        "format",
        "format_version",
        "architecture",
        "config",
        "artifacts",
        "path",
        "role",
        "sha256",
        "bytes",
        "dtype",
        "layer",
        "expert",
        "parameters",
        "trunk",
        "tokenizer",
        "generation_config",
        "tokenizer_files",
        "source",
        "..",
        "/",
        "\\",
        "null",
        "true",
        "1e999",
    ],
    "safetensors": [
        "dtype",
        "shape",
        "data_offsets",
        "__metadata__",
        *ST_DTYPES[:-1],
        "null",
        "1e999",
        "18446744073709551616",
        "[[[[[[[[",
    ],
    "frame": [
        "experts",
        "counts",
        "dtype",
        "hidden",
        "data",
        "status",
        "OK",
        "model",
        "layer",
        "call",
        "message",
        *WIRE_DTYPES[:-1],
    ],
    "gateway": [
        "model",
        "adder",
        "prompt",
        "messages",
        "role",
        "content",
        "user",
        "system",
        "assistant",
        "tool",
        "developer",
        "type",
        "text",
        "name",
        "max_tokens",
        "max_completion_tokens",
        "temperature",
        "top_p",
        "top_k",
        "seed",
        "n",
        "stream",
        "stream_options",
        "include_usage",
        "stop",
        "presence_penalty",
        "frequency_penalty",
        "logit_bias",
        "echo",
        "best_of",
        "logprobs",
        "top_logprobs",
        "suffix",
        "tools",
        "functions",
        "NaN",
        "Infinity",
        "-Infinity",
        "1e999",
        "null",
        "true",
        "false",
        "\\ud800",
    ],
    "plain": [
        "__Pickled__",
        "__Serialized__",
        "__Enum__",
        "__Set__",
        "as-list",
        "op",
        "status",
        "OK",
        "\xc7\x01\x05",
        "\xd6\xff",
        "\x91\x91\x91\x91",
        "\x81\xa1k",
        "\xdd\xff\xff\xff\xff",
        "\xcf\xff\xff\xff\xff\xff\xff\xff\xff",
    ],
    "pickle": [
        "builtins",
        "set",
        "frozenset",
        "tuple",
        "list",
        "dict",
        "slice",
        "complex",
        "ValueError",
        "OSError",
        "collections",
        "OrderedDict",
        "defaultdict",
        "datetime",
        "timedelta",
        "timezone",
        "distributed.core",
        "Status",
        "tblib.pickling_support",
        "unpickle_exception",
        "unpickle_exception_with_attrs",
        "unpickle_traceback",
        "neuro_dask.errors",
        "_rebuild",
        "ConfigFieldError",
        "bytes",
        "range",
        "numpy",
        "dtype",
        "\x85\x85\x85\x85",
        "\x93",
        "\x94",
        "\x95",
        "\x96",
        "R",
        "b",
        "}(",
        "u",
        "\x8f(",
        "\x90",
    ],
}
GATEWAY_FIELDS = [
    "model",
    "prompt",
    "messages",
    "max_tokens",
    "max_completion_tokens",
    "temperature",
    "top_p",
    "top_k",
    "seed",
    "n",
    "stream",
    "stream_options",
    "stop",
    "presence_penalty",
    "frequency_penalty",
    "logit_bias",
    "echo",
    "best_of",
    "logprobs",
    "top_logprobs",
    "suffix",
    "tools",
    "functions",
]
SKIP = object()  # an input the mode cannot turn into a parser input (e.g. bytes that are not msgpack)


# ---- building inputs from the fuzzer's bytes --------------------------------------------------------


def int_value(fdp) -> int:
    kind = fdp.ConsumeIntInRange(0, 3)
    if kind == 0:
        return fdp.ConsumeIntInRange(-2, 8)
    if kind == 1:
        return fdp.PickValueInList(EDGE_INTS)
    return fdp.ConsumeInt(fdp.ConsumeIntInRange(1, 10))  # up to 80 bits, signed


def json_value(fdp, depth: int = 0, binary: bool = False) -> Any:
    """Any JSON value (msgpack's, with bytes and tuples, when `binary`), at most 4 levels deep."""
    kind = fdp.ConsumeIntInRange(0, (9 if binary else 7) if depth < 4 else 5)
    if kind == 0:
        return None
    if kind == 1:
        return fdp.ConsumeBool()
    if kind == 2:
        return int_value(fdp)
    if kind == 3:
        return fdp.ConsumeFloat()  # NaN and infinities included
    if kind in (4, 5):
        return fdp.ConsumeUnicode(fdp.ConsumeIntInRange(0, 16))
    if kind in (6, 8):
        items = [json_value(fdp, depth + 1, binary) for _ in range(fdp.ConsumeIntInRange(0, 4))]
        return tuple(items) if kind == 8 else items
    if kind == 7:
        return {
            fdp.ConsumeUnicode(fdp.ConsumeIntInRange(0, 8)): json_value(fdp, depth + 1, binary)
            for _ in range(fdp.ConsumeIntInRange(0, 4))
        }
    return fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 64))


def nested_text(fdp) -> bytes:
    """JSON text nested up to 5,000 deep (json.dumps would refuse to write it): arrays or objects."""
    depth = fdp.ConsumeIntInRange(0, 5000)
    opener, closer = fdp.PickValueInList([("[", "]"), ('{"a":', "}"), ('{"model": "adder", "messages":', "}")])
    return (opener * depth + json.dumps(json_value(fdp)) + closer * depth).encode()


# Opcodes with their arguments, and globals allowed and not: what the pickle target strings together.
PICKLE_FRAGMENTS = [
    b"N",
    b"\x88",
    b"\x89",
    b"K\x01",
    b"K\xff",
    b"J\xff\xff\xff\x7f",
    b"\x8a\x09" + b"\xff" * 9,
    b"G?\xf8\x00\x00\x00\x00\x00\x00",
    b"\x8c\x01a",
    b"\x8c\x04args",
    b"C\x02ab",
    b"\x96\x03\x00\x00\x00\x00\x00\x00\x00abc",
    b"U\x01x",
    b"X\x01\x00\x00\x00a",
    b"I1\n",
    b"L12\n",
    b"F1.5\n",
    b"S'x'\n",
    b"Vx\n",
    b")",
    b"]",
    b"}",
    b"\x8f",
    b"(",
    b"t",
    b"\x85",
    b"\x86",
    b"\x87",
    b"l",
    b"d",
    b"\x91",
    b"a",
    b"e",
    b"s",
    b"u",
    b"\x90",
    b"0",
    b"1",
    b"2",
    b"\x94",
    b"h\x00",
    b"h\x01",
    b"j\x00\x00\x00\x00",
    b"q\x00",
    b"r\x00\x00\x00\x00",
    b"p0\n",
    b"g0\n",
    b"R",
    b"\x81",
    b"\x92",
    b"b",
    b"\x93",
    b"o",
    b"\x97",
    b"\x98",
    b"\x95\x05\x00\x00\x00\x00\x00\x00\x00",
    b"P1\n",
    b"Q",
    b"cbuiltins\nset\n",
    b"cbuiltins\nfrozenset\n",
    b"cbuiltins\ntuple\n",
    b"cbuiltins\nlist\n",
    b"cbuiltins\ndict\n",
    b"cbuiltins\nslice\n",
    b"cbuiltins\ncomplex\n",
    b"cbuiltins\nValueError\n",
    b"cbuiltins\nOSError\n",
    b"cbuiltins\nKeyError\n",
    b"cbuiltins\nUnicodeError\n",
    b"ccollections\nOrderedDict\n",
    b"ccollections\ndefaultdict\n",
    b"cdatetime\ndatetime\n",
    b"cdatetime\ntimedelta\n",
    b"cdatetime\ntimezone\n",
    b"cdistributed.core\nStatus\n",
    b"cdistributed.core\nCommClosedError\n",
    b"ctblib.pickling_support\nunpickle_exception\n",
    b"ctblib.pickling_support\nunpickle_exception_with_attrs\n",
    b"ctblib.pickling_support\nunpickle_traceback\n",
    b"ctblib\nFrame\n",
    b"cneuro_dask.errors\n_rebuild\n",
    b"cneuro_dask.errors\nConfigFieldError\n",
    b"cneuro_dask.errors\nMissingTensorError\n",
    b"cbuiltins\nbytes\n",
    b"cbuiltins\nrange\n",
    b"cnumpy\ndtype\n",
    b"ios\nsystem\n",
    b"\x8c\x08builtins\x8c\x03set\x93",
    b"\x8c\x08builtins\x8c\x04dict\x93",
    b"\x8c\x08builtins\x8c\x0cdict.fromkeys\x93",
]


def real_pickles() -> list[bytes]:
    """What schedulers and operators really pickle: errors as distributed pickles them, a Status,
    containers, a datetime; the seeds the pickle target mutates."""
    import collections
    import datetime
    import pickle

    import tblib.pickling_support
    from distributed.core import Status
    from distributed.protocol import pickle as distributed_pickle

    from neuro_dask.errors import ConfigFieldError

    def raised(exc: Exception) -> bytes:
        try:
            raise exc
        except Exception as err:
            tblib.pickling_support.install(err)
            return distributed_pickle.dumps(err)

    return [
        raised(ValueError("x")),
        raised(ConfigFieldError("a.yaml", "f", "is bad")),
        raised(FileNotFoundError(2, "missing", "/x")),
        pickle.dumps(Status.running, protocol=5),
        pickle.dumps(collections.OrderedDict(a=1), protocol=5),
        pickle.dumps(collections.defaultdict(list, k=[1])),
        pickle.dumps(datetime.datetime(2030, 1, 2, tzinfo=datetime.UTC), protocol=5),
        pickle.dumps({"a": (1, 2.5, b"x", None), 3: {1, 2}, "f": frozenset({"z"}), "s": slice(1, 2)}, protocol=5),
        pickle.dumps([1, 2 + 3j, bytearray(b"ab")], protocol=5),
        pickle.dumps(bytes, protocol=5),
        pickle.dumps({(1, 2): {"k": (3, 4)}}, protocol=2, fix_imports=False),
    ]


def _hashables(value: Any) -> list:
    """The hashable parts of a fuzzed value, for a set."""
    items = value if isinstance(value, (list, tuple)) else [value]
    out = []
    for item in items:
        try:
            hash(item)
        except TypeError:
            continue
        out.append(item)
    return out


def _encode_sets(obj: Any) -> Any:
    if isinstance(obj, set):
        return {"__Set__": True, "as-list": list(obj)}
    raise TypeError(f"cannot pack {type(obj).__name__}")


class Inputs:
    """Turns fuzzer bytes into (value, call) for one target, or SKIP; file targets reuse one scratch file."""

    def __init__(self, target: str, work: Path):
        import atheris
        import msgpack
        import torch

        from neuro_dask.protocol.wire import encode_request, encode_response
        from neuro_dask.testing import fuzz_targets

        self.atheris, self.msgpack, self.torch, self.targets = atheris, msgpack, torch, fuzz_targets
        self.target = target
        self.store = work / "store"
        self.store.mkdir(parents=True, exist_ok=True)
        self.shard = work / "f.safetensors"
        self.manifest = json.loads(MANIFEST.read_text())
        sent = fuzz_targets.sent_groups()
        # As a peer receives them: through msgpack (the data field arrives as bytes).
        self.frames = [
            msgpack.unpackb(msgpack.packb(frame, use_bin_type=True), raw=False)
            for frame in (
                encode_request("m", 1, sent, call="c1"),
                encode_response({e: torch.full_like(rows, 0.5) for e, rows in sent.items()}),
            )
        ]
        self.real_pickles = real_pickles() if target == "pickle" else []
        self.modes: list[Callable[[bytes], Any]] = {
            "manifest": [self.manifest_bytes, self.manifest_mutated, self.manifest_any, self.manifest_nested],
            "safetensors": [self.safetensors_bytes, self.safetensors_built, self.safetensors_nested],
            "frame": [self.frame_mutated, self.frame_msgpack, self.frame_any, self.frame_built],
            "gateway": [self.gateway_bytes, self.gateway_built, self.gateway_nested],
            "plain": [
                self.plain_bytes,
                self.plain_frame_list,
                self.plain_value,
                self.plain_nested,
                self.plain_colliding,
            ],
            "pickle": [self.pickle_bytes, self.pickle_soup, self.pickle_mutated, self.pickle_dumped, self.pickle_bombs],
        }[target]

    def build(self, data: bytes):
        if not data:
            return SKIP
        return self.modes[data[0] % len(self.modes)](data[1:])

    # manifest
    def manifest_bytes(self, raw: bytes):
        (self.store / "manifest.json").write_bytes(raw)
        return raw, lambda: self.targets.manifest_file(self.store)

    def manifest_mutated(self, raw: bytes):
        fdp = self.atheris.FuzzedDataProvider(raw)
        manifest = copy.deepcopy(self.manifest)
        fields = ["path", "role", "sha256", "bytes", "dtype", "layer", "expert", "parameters", "extra"]
        for _ in range(fdp.ConsumeIntInRange(1, 4)):
            where = manifest
            if fdp.ConsumeBool() and isinstance(manifest.get("artifacts"), list) and manifest["artifacts"]:
                where = manifest["artifacts"][fdp.ConsumeIntInRange(0, len(manifest["artifacts"]) - 1)]
                key = fdp.PickValueInList(fields)
            else:
                key = fdp.PickValueInList([*self.manifest, "extra"])
            if not isinstance(where, dict):
                continue
            action = fdp.ConsumeIntInRange(0, 3)
            if action == 0:
                where.pop(key, None)
            elif action == 1:
                where[key] = int_value(fdp)
            elif action == 2:
                where[key] = fdp.PickValueInList(
                    [
                        "../x",
                        "/abs",
                        "a//b",
                        "a\\b",
                        ".",
                        "",
                        "a" * 64,
                        "f" * 64,
                        "F" * 64,
                        "trunk",
                        "expert",
                        "tokenizer",
                        "neuro-dask-shards",
                    ]
                )
            else:
                where[key] = json_value(fdp)
        return manifest, lambda: self.targets.manifest_dict(manifest)

    def manifest_nested(self, raw: bytes):
        return self.manifest_bytes(nested_text(self.atheris.FuzzedDataProvider(raw)))

    def manifest_any(self, raw: bytes):
        value = json_value(self.atheris.FuzzedDataProvider(raw))
        return value, lambda: self.targets.manifest_dict(value)

    # safetensors
    def safetensors_bytes(self, raw: bytes):
        self.shard.write_bytes(raw)
        return raw, lambda: self.targets.safetensors_file(self.shard)

    def safetensors_nested(self, raw: bytes):
        text = nested_text(self.atheris.FuzzedDataProvider(raw))
        return self.safetensors_bytes(struct.pack("<Q", len(text)) + text)

    def safetensors_built(self, raw: bytes):
        fdp = self.atheris.FuzzedDataProvider(raw)
        header: dict[str, Any] = {}
        offset = 0
        for i in range(fdp.ConsumeIntInRange(0, 3)):
            name = fdp.ConsumeUnicode(4) if fdp.ConsumeBool() else f"t{i}"
            if fdp.ConsumeIntInRange(0, 7) == 0:
                header[name] = json_value(fdp)
                continue
            dtype = fdp.PickValueInList(ST_DTYPES) if fdp.ConsumeIntInRange(0, 7) else json_value(fdp)
            shape = (
                [int_value(fdp) for _ in range(fdp.ConsumeIntInRange(0, 3))]
                if fdp.ConsumeIntInRange(0, 7)
                else json_value(fdp)
            )
            numel = math.prod(shape) if isinstance(shape, list) and all(isinstance(d, int) for d in shape) else 1
            if fdp.ConsumeBool():  # consistent with dtype and shape
                end = offset + abs(numel) * ST_ITEMSIZE.get(dtype if isinstance(dtype, str) else "", 1)
                offsets: Any = [offset, end]
                offset = end
            else:
                offsets = (
                    [int_value(fdp) for _ in range(fdp.ConsumeIntInRange(0, 3))]
                    if fdp.ConsumeBool()
                    else json_value(fdp)
                )
            header[name] = {"dtype": dtype, "shape": shape, "data_offsets": offsets}
        if fdp.ConsumeIntInRange(0, 3) == 0:
            header["__metadata__"] = json_value(fdp)
        text = json.dumps(header).encode()
        text += b" " * fdp.ConsumeIntInRange(0, 7)
        lie = fdp.ConsumeIntInRange(-3, 3) if fdp.ConsumeIntInRange(0, 3) == 0 else 0
        body = bytes(min(offset, 1 << 16)) if fdp.ConsumeBool() else fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 512))
        data = struct.pack("<Q", max(0, len(text) + lie)) + text + body
        self.shard.write_bytes(data)
        return data, lambda: self.targets.safetensors_file(self.shard)

    # frames
    def frame_mutated(self, raw: bytes):
        fdp = self.atheris.FuzzedDataProvider(raw)
        msg = dict(self.frames[fdp.ConsumeIntInRange(0, 1)])
        for _ in range(fdp.ConsumeIntInRange(1, 4)):
            key = fdp.PickValueInList(
                ["experts", "counts", "dtype", "hidden", "data", "status", "model", "layer", "call", "message"]
            )
            action = fdp.ConsumeIntInRange(0, 3)
            if action == 0:
                msg.pop(key, None)
            elif action == 1:
                msg[key] = json_value(fdp, binary=True)
            elif key in ("experts", "counts"):
                items = [int_value(fdp) for _ in range(fdp.ConsumeIntInRange(0, 4))]
                msg[key] = tuple(items) if fdp.ConsumeBool() else items
            elif key == "dtype":
                msg[key] = fdp.PickValueInList(WIRE_DTYPES)
            elif key in ("hidden", "layer"):
                msg[key] = fdp.PickValueInList([int_value(fdp), fdp.ConsumeFloat(), str(int_value(fdp)), True])
            elif key == "data":  # as long as the header implies, or not
                counts, hidden = msg.get("counts"), msg.get("hidden")
                size = (
                    sum(c for c in counts if isinstance(c, int)) * hidden * 4
                    if isinstance(counts, (list, tuple)) and isinstance(hidden, int)
                    else 0
                )
                size = max(0, min(size, 4096) + (0 if fdp.ConsumeBool() else fdp.ConsumeIntInRange(-2, 2)))
                msg[key] = fdp.ConsumeBytes(size).ljust(size, b"\0")
            else:
                msg[key] = fdp.PickValueInList(["OK", "ok", "error", "m", ""])
        return msg, lambda: self.targets.frame(msg)

    def frame_msgpack(self, raw: bytes):
        try:  # as distributed.protocol.core.loads reads a message (tuples for arrays, any map keys)
            msg = self.msgpack.loads(raw, use_list=False, strict_map_key=False, raw=False)
        except Exception:
            return SKIP  # not msgpack: distributed refuses it before the decoder sees it
        return msg, lambda: self.targets.frame(msg)

    def frame_built(self, raw: bytes):
        """A frame field by field: experts, counts, dtype, hidden and data (often as long as they imply)."""
        fdp = self.atheris.FuzzedDataProvider(raw)
        n = fdp.ConsumeIntInRange(0, 4)
        experts = [int_value(fdp) if fdp.ConsumeIntInRange(0, 3) == 0 else i for i in range(n)]
        counts = [
            int_value(fdp) for _ in range(n + (fdp.ConsumeIntInRange(-1, 1) if fdp.ConsumeIntInRange(0, 7) == 0 else 0))
        ]
        dtype = fdp.PickValueInList(WIRE_DTYPES)
        hidden = (
            int_value(fdp)
            if fdp.ConsumeIntInRange(0, 7)
            else fdp.PickValueInList([fdp.ConsumeFloat(), str(int_value(fdp)), True, None])
        )
        itemsize = {"float32": 4, "float16": 2, "bfloat16": 2}.get(dtype, 4)
        size = sum(counts) * hidden * itemsize if isinstance(hidden, int) else 0
        size = max(0, min(size, 4096) + (0 if fdp.ConsumeIntInRange(0, 3) else fdp.ConsumeIntInRange(-2, 2)))
        msg: dict[Any, Any] = {
            "experts": tuple(experts) if fdp.ConsumeBool() else experts,
            "counts": tuple(counts) if fdp.ConsumeBool() else counts,
            "dtype": dtype,
            "hidden": hidden,
            "data": fdp.ConsumeBytes(size).ljust(size, b"\0"),
        }
        if fdp.ConsumeIntInRange(0, 3):
            msg.update(model="m", layer=int_value(fdp), status=fdp.PickValueInList(["OK", "error", None]))
        return msg, lambda: self.targets.frame(msg)

    def frame_any(self, raw: bytes):
        msg = json_value(self.atheris.FuzzedDataProvider(raw), binary=True)
        return msg, lambda: self.targets.frame(msg)

    # plain: decode_plain_frames
    def plain_bytes(self, raw: bytes):
        return raw, lambda: self.targets.plain_frame(raw)

    def plain_frame_list(self, raw: bytes):
        fdp = self.atheris.FuzzedDataProvider(raw)
        frames = [fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 256)) for _ in range(fdp.ConsumeIntInRange(0, 4))]
        return frames, lambda: self.targets.plain_frames(frames)

    def plain_value(self, raw: bytes):
        """A plain value as distributed frames it, often poisoned: a refused key, an extension type or a
        timestamp, written in by hand where distributed's own packer would not."""
        from distributed.protocol.core import dumps

        fdp = self.atheris.FuzzedDataProvider(raw)
        value = json_value(fdp, binary=True)
        if fdp.ConsumeBool():
            value = {"__Set__": True, "as-list": value} if fdp.ConsumeBool() else set(_hashables(value))
        try:
            [frame] = dumps(value)
        except Exception:
            return SKIP
        poison = fdp.ConsumeIntInRange(0, 5)
        if poison == 1:
            frame = self.msgpack.packb(
                {
                    fdp.PickValueInList(["__Pickled__", "__Serialized__", "__Enum__"]): fdp.PickValueInList(
                        [1, 0, -1, True, "x", None]
                    ),
                    "v": value,
                },
                use_bin_type=True,
                default=_encode_sets,
            )
        elif poison == 2:
            data = fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 16))
            code = struct.pack("b", fdp.ConsumeIntInRange(-128, 127))
            frame = b"\x92" + frame + b"\xc7" + bytes([len(data)]) + code + data
        elif poison == 3:
            frame = b"\x92" + frame + self.msgpack.packb(self.msgpack.Timestamp(fdp.ConsumeIntInRange(0, 2**33), 0))
        return frame, lambda: self.targets.plain_frames([frame])

    def plain_nested(self, raw: bytes):
        fdp = self.atheris.FuzzedDataProvider(raw)
        depth = fdp.ConsumeIntInRange(0, 2000)
        frame = b"".join(fdp.PickValueInList([b"\x91", b"\x81\xa1k", b"\x81\x91\x01"]) for _ in range(min(depth, 40)))
        frame = frame + fdp.PickValueInList([b"\x91", b"\x81\xa1k"]) * (depth - min(depth, 40)) + b"\xc0"
        return frame, lambda: self.targets.plain_frame(frame)

    def plain_colliding(self, raw: bytes):
        from distributed.protocol.serialize import msgpack_encode_default  # noqa: F401

        fdp = self.atheris.FuzzedDataProvider(raw)
        n = fdp.ConsumeIntInRange(0, 80)
        keys = self.targets.colliding_int_pairs(n)
        packer = self.msgpack.Packer(use_bin_type=True)
        if fdp.ConsumeBool():
            frame = packer.pack({"__Set__": True, "as-list": [list(k) for k in keys]})
        else:
            frame = packer.pack_map_header(n) + b"".join(packer.pack(list(k)) + packer.pack(0) for k in keys)
        return frame, lambda: self.targets.plain_frame(frame)

    # pickle: the bounded restricted loader
    def pickle_bytes(self, raw: bytes):
        return raw, lambda: self.targets.restricted_pickle(raw)

    def pickle_soup(self, raw: bytes):
        fdp = self.atheris.FuzzedDataProvider(raw)
        data = (
            b"\x80"
            + bytes([fdp.ConsumeIntInRange(0, 5)])
            + b"".join(fdp.PickValueInList(PICKLE_FRAGMENTS) for _ in range(fdp.ConsumeIntInRange(0, 48)))
            + b"."
        )
        return data, lambda: self.targets.restricted_pickle(data)

    def pickle_mutated(self, raw: bytes):
        fdp = self.atheris.FuzzedDataProvider(raw)
        data = bytearray(fdp.PickValueInList(self.real_pickles))
        for _ in range(fdp.ConsumeIntInRange(1, 4)):
            if data:
                data[fdp.ConsumeIntInRange(0, len(data) - 1)] = fdp.ConsumeIntInRange(0, 255)
        if fdp.ConsumeBool():
            data = data[: fdp.ConsumeIntInRange(0, len(data))]
        data = bytes(data)
        return data, lambda: self.targets.restricted_pickle(data)

    def pickle_dumped(self, raw: bytes):
        import pickle

        fdp = self.atheris.FuzzedDataProvider(raw)
        value = json_value(fdp, binary=True)
        try:
            data = pickle.dumps(value, protocol=fdp.ConsumeIntInRange(0, 5))
        except Exception:
            return SKIP
        return data, lambda: self.targets.restricted_pickle(data)

    def pickle_bombs(self, raw: bytes):
        fdp = self.atheris.FuzzedDataProvider(raw)
        depth = fdp.ConsumeIntInRange(0, 5000)
        kind = fdp.ConsumeIntInRange(0, 4)
        if kind == 0:  # TUPLE1 after TUPLE1, maybe as a dict key
            tall = b"N" + b"\x85" * depth
            data = b"\x80\x02}" + tall + b"Ns." if fdp.ConsumeBool() else b"\x80\x02" + tall + b"."
        elif kind == 1:  # lists in lists
            data = b"\x80\x02" + b"]" * (depth + 1) + b"a" * depth + b"."
        elif kind == 2:  # dicts in dicts
            data = b"\x80\x02" + b"}" + b"K\x01}" * depth + b"s" * depth + b"."
        elif kind == 3:  # frozensets in frozensets
            data = b"\x80\x04" + b"(" * depth + b"N" + b"\x91" * depth + b"."
        else:  # keys sharing one hash, one SETITEM each
            import pickle

            keys = self.targets.colliding_int_pairs(fdp.ConsumeIntInRange(0, 80))
            data = b"\x80\x02}" + b"".join(pickle.dumps(k, protocol=2)[2:-1] + b"Ns" for k in keys) + b"."
        return data, lambda: self.targets.restricted_pickle(data)

    # gateway
    def gateway_bytes(self, raw: bytes):
        return raw, lambda: self.targets.gateway_body(raw)

    def gateway_nested(self, raw: bytes):
        return self.gateway_bytes(nested_text(self.atheris.FuzzedDataProvider(raw)))

    def gateway_built(self, raw: bytes):
        fdp = self.atheris.FuzzedDataProvider(raw)
        body: dict[str, Any] = {}
        for name in GATEWAY_FIELDS:
            kind = fdp.ConsumeIntInRange(0, 7)
            if kind == 0:
                body[name] = None
            elif kind == 1:
                body[name] = json_value(fdp)
            elif kind == 2:
                body[name] = self.gateway_field(fdp, name)
        text = json.dumps(body).encode()
        return text, lambda: self.targets.gateway_body(text)

    def gateway_field(self, fdp, name: str) -> Any:
        if name == "model":
            return fdp.PickValueInList(["adder", "other", ""])
        if name == "prompt":
            return fdp.PickValueInList(
                [fdp.ConsumeUnicode(12), [int_value(fdp) for _ in range(3)], ["a"], ["a", "b"], [[1, 2]], [], [True]]
            )
        if name == "messages":
            return [
                {
                    "role": fdp.PickValueInList(["user", "system", "assistant", "tool", "developer", "x"]),
                    "content": fdp.PickValueInList(
                        [fdp.ConsumeUnicode(8), None, [{"type": "text", "text": "a"}], [{"type": "image"}], 3]
                    ),
                    **({"name": json_value(fdp)} if fdp.ConsumeBool() else {}),
                }
                for _ in range(fdp.ConsumeIntInRange(0, 3))
            ]
        if name in ("temperature", "top_p", "presence_penalty", "frequency_penalty"):
            return fdp.PickValueInList([fdp.ConsumeFloat(), fdp.ConsumeFloatInRange(-1.0, 3.0), 0, 1, True])
        if name in ("stream", "echo", "logprobs"):
            return fdp.ConsumeBool()
        if name == "stream_options":
            return {"include_usage": json_value(fdp)}
        if name == "stop":
            return [fdp.ConsumeUnicode(3) for _ in range(fdp.ConsumeIntInRange(0, 6))]
        if name in ("logit_bias", "tools", "functions"):
            return {} if name == "logit_bias" else []
        return int_value(fdp)


# ---- the child: one target under libFuzzer ------------------------------------------------------------


def child(args: argparse.Namespace) -> None:
    import atheris
    import distributed.protocol.core  # noqa: F401  (the plain target's differential check)
    import jinja2  # noqa: F401  (third-party modules load uninstrumented; only neuro_dask is)
    import msgpack  # noqa: F401
    import tblib.pickling_support  # noqa: F401
    import torch  # noqa: F401

    with atheris.instrument_imports(include=["neuro_dask"]):
        # the targets, and with them the manifest, shard, frame and gateway parsers they call, and
        # hardened mode's decoders (imported lazily by the targets, so imported here to be covered)
        import neuro_dask.security.allowlist  # noqa: F401
        import neuro_dask.security.plain_wire  # noqa: F401
        import neuro_dask.security.unpickle  # noqa: F401
        import neuro_dask.testing.fuzz_targets  # noqa: F401
    if args.child == "pickle":
        # The loader is the stdlib's pure-Python unpickler with some opcodes overridden: its
        # functions are instrumented in place, so the loader's dispatch table (which holds them)
        # reports their coverage too.
        import pickle

        for owner in (pickle._Unpickler, pickle._Unframer):
            for function in vars(owner).values():
                if isinstance(function, type(child)):
                    atheris.instrument_func(function)

    # standalone (no --work) the folder outlives the child: libFuzzer's exit skips Python's cleanup
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix=f"fuzz-{args.child}-", dir=_fast_tmp()))
    corpus = Path(args.corpus) if args.corpus else work / "corpus"
    artifacts = Path(args.artifacts) if args.artifacts else work / "artifacts"
    if not args.corpus:
        write_seeds(args.child, corpus)  # --corpus FILE instead runs that one input (libFuzzer's reproduce mode)
    artifacts.mkdir(parents=True, exist_ok=True)
    words = work / "keywords.dict"
    words.write_text("".join(f'"{_dict_escape(_word_bytes(w))}"\n' for w in KEYWORDS[args.child]))
    inputs = Inputs(args.child, work / "scratch")
    seen: set[str] = set()
    timing = Path(args.timing) if args.timing else None

    def one_input(data: bytes) -> None:
        nonlocal timing
        if timing:  # when fuzzing began, past the imports: the parent's exec/s counts from here
            timing.write_text(repr(time.time()))
            timing = None
        built = inputs.build(data)
        if built is SKIP:
            return
        value, call = built
        try:
            call()
        except Exception as exc:
            tb = traceback.extract_tb(exc.__traceback__)
            site = next((f for f in reversed(tb) if "neuro_dask" in f.filename), tb[-1])
            signature = f"{type(exc).__name__} at {Path(site.filename).name}:{site.lineno} ({site.name})"
            report = {
                "target": args.child,
                "signature": signature,
                "error": f"{type(exc).__name__}: {exc}"[:600],
                "input": _describe(value),
                "input_hex": data.hex(),
                "traceback": "".join(traceback.format_exception(exc))[-4000:],
            }
            if not args.keep_going:
                print(f"\nFUZZ FINDING {json.dumps(report)}", file=sys.stderr, flush=True)
                raise
            if signature not in seen:
                seen.add(signature)
                with open(args.findings, "a") as fh:
                    fh.write(json.dumps(report) + "\n")

    flags = [
        f"-runs={args.runs}",
        f"-max_len={MAX_LEN[args.child]}",
        "-rss_limit_mb=2048",
        "-timeout=60",
        f"-artifact_prefix={artifacts}{os.sep}",
        f"-dict={words}",
        "-print_final_stats=1",
        str(corpus),
    ]
    if args.seed:
        flags.insert(0, f"-seed={args.seed}")
    atheris.Setup([sys.argv[0], *flags], one_input)
    atheris.Fuzz()  # never returns: libFuzzer exits after -runs inputs, or at the first crash


def _fast_tmp() -> str | None:
    """A RAM-backed folder where there is one: the file targets write one file per input."""
    shm = "/dev/shm"
    return shm if os.path.isdir(shm) and os.access(shm, os.W_OK) else None


def _word_bytes(word: str) -> bytes:
    """A keyword as libFuzzer should see it: byte for byte when it spells bytes (the msgpack and
    pickle markers), UTF-8 otherwise."""
    return word.encode("latin-1") if all(ord(c) < 256 for c in word) else word.encode()


def _dict_escape(word: bytes) -> str:
    return "".join(chr(b) if 32 <= b < 127 and b not in (34, 92) else f"\\x{b:02x}" for b in word)


def _describe(value: Any) -> str:
    if isinstance(value, (bytes, bytearray)):
        return repr(bytes(value[:1500])) + ("..." if len(value) > 1500 else "")
    text = repr(value)
    return text[:1500] + ("..." if len(text) > 1500 else "")


def write_seeds(target: str, corpus: Path) -> None:
    """Valid inputs (and a few near misses) for each mode of a target."""
    import msgpack
    import torch

    from neuro_dask.protocol.wire import encode_request, encode_response
    from neuro_dask.store.safetensors_io import StreamingWriter
    from neuro_dask.testing.fuzz_targets import sent_groups

    corpus.mkdir(parents=True, exist_ok=True)
    seeds: list[bytes] = []
    if target == "manifest":
        text = MANIFEST.read_bytes()
        small = json.dumps(
            {
                "format": "neuro-dask-shards",
                "format_version": 1,
                "architecture": "mixtral",
                "config": {},
                "artifacts": [{"path": "trunk.safetensors", "role": "trunk", "bytes": 1, "sha256": "0" * 64}],
            }
        ).encode()
        seeds = [b"\0" + text, b"\0" + small, b"\0{}", b"\1" + bytes(16), b"\1" + bytes(range(64)), b"\2" + bytes(32)]
    elif target == "safetensors":
        with tempfile.TemporaryDirectory() as tmp:
            for i, specs in enumerate(
                [[("a", torch.float32, (2, 3)), ("b", torch.int64, (0,))], [("w", torch.bfloat16, (4, 2, 2))], []]
            ):
                writer = StreamingWriter(Path(tmp) / f"{i}.safetensors", specs, {"format": "pt"} if i else None)
                writer.write(torch.ones(shape, dtype=dtype) for _, dtype, shape in specs)
                seeds.append(b"\0" + (Path(tmp) / f"{i}.safetensors").read_bytes())
        seeds += [b"\1" + bytes(32), b"\1" + bytes(range(1, 80))]
    elif target == "frame":
        sent = sent_groups()
        request = encode_request("m", 1, sent, call="c1")
        response = encode_response({e: torch.full_like(rows, 0.5) for e, rows in sent.items()})
        seeds = [
            b"\1" + msgpack.dumps(request),
            b"\1" + msgpack.dumps(response),
            b"\1" + msgpack.dumps({"status": "error", "message": "no"}),
            b"\0" + bytes(16),
            b"\0\1" + bytes(range(40)),
            b"\2" + bytes(range(7, 40)),
        ]
    elif target == "plain":
        from distributed.core import Status
        from distributed.protocol.core import dumps
        from distributed.protocol.serialize import ToPickle, to_serialize

        plain = [
            {
                "op": "heartbeat-worker",
                "now": 1.5,
                "metrics": {"a": {"b": (1, 2.5, None)}, "k": {("x-1", 0)}},
                "big": 2**64 - 1,
                "neg": -(2**63),
                "data": b"\x00" * 16,
                "ok": True,
            },
            {
                "op": "neuro_expert",
                "experts": (0, 3),
                "counts": (2, 1),
                "dtype": "float32",
                "hidden": 4,
                "data": bytes(12),
            },
            [{"op": "task-finished", "key": ("x", 1)}, {"op": "keep-alive"}],
            {1: 2, (1, "a"): {3}},
            None,
        ]
        refused = [
            {"op": "x", "data": ToPickle(1)},
            {"op": "x", "data": to_serialize(b"y")},
            {"op": "x", "status": Status.running},
        ]
        seeds = [b"\0" + dumps(m)[0] for m in plain + refused]
        seeds += [
            b"\1" + bytes([3, 0]) + dumps(plain[0])[0][:200],
            b"\2" + bytes(range(40)),
            b"\3" + bytes(8),
            b"\4" + bytes([0x20, 1]),
        ]
    elif target == "pickle":
        seeds = [b"\0" + p for p in real_pickles()]
        seeds += [b"\1" + bytes(range(1, 40)), b"\2" + bytes(8), b"\3" + bytes(range(3, 30)), b"\4" + bytes([1, 2, 3])]
    else:
        seeds = [
            b"\0" + json.dumps(body).encode()
            for body in (
                {"model": "adder", "prompt": "123+456=", "max_tokens": 8, "temperature": 0},
                {
                    "model": "adder",
                    "prompt": [1, 2, 3],
                    "stream": True,
                    "stream_options": {"include_usage": True},
                    "stop": ["\n"],
                    "seed": 7,
                    "top_p": 0.9,
                },
                {
                    "model": "adder",
                    "messages": [
                        {"role": "system", "content": "be brief"},
                        {"role": "user", "content": [{"type": "text", "text": "1+1"}]},
                    ],
                    "max_completion_tokens": 4,
                    "n": 1,
                    "logit_bias": {},
                },
            )
        ] + [b"\1" + bytes(range(1, 60))]
    for seed in seeds:
        (corpus / hashlib.sha1(seed).hexdigest()).write_bytes(seed)


# ---- the parent: one child per target, and the report -------------------------------------------------


def run_target(target: str, args: argparse.Namespace) -> bool:
    with tempfile.TemporaryDirectory(prefix=f"fuzz-{target}-", dir=_fast_tmp()) as tmp:
        corpus, artifacts, findings = Path(tmp) / "corpus", Path(tmp) / "artifacts", Path(tmp) / "findings.jsonl"
        timing = Path(tmp) / "started"
        write_seeds(target, corpus)
        cmd = [
            sys.executable,
            str(Path(__file__).resolve()),
            "--child",
            target,
            "--runs",
            str(args.runs),
            "--corpus",
            str(corpus),
            "--artifacts",
            str(artifacts),
            "--findings",
            str(findings),
            "--seed",
            str(args.seed),
            "--timing",
            str(timing),
            "--work",
            tmp,
        ] + (["--keep-going"] if args.keep_going else [])
        started = time.perf_counter()
        try:
            proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, errors="replace", timeout=args.timeout)
            code, output = proc.returncode, proc.stdout + proc.stderr
        except subprocess.TimeoutExpired as exc:
            code = -1
            output = (
                ((exc.stdout or b"").decode(errors="replace") if isinstance(exc.stdout, bytes) else exc.stdout or "")
                + ((exc.stderr or b"").decode(errors="replace") if isinstance(exc.stderr, bytes) else exc.stderr or "")
                + f"\ntimed out after {args.timeout} s"
            )
        seconds, ended = time.perf_counter() - started, time.time()
        runs = (
            _stat(output, r"stat::number_of_executed_units:\s*(\d+)")
            or _stat(output, r"Done (\d+) runs")
            or _stat(output, r"#(\d+)\s", last=True)
        )
        fuzzing = ended - float(timing.read_text()) if timing.exists() else seconds
        speed = round((runs or 0) / fuzzing) if fuzzing > 0 else 0  # libFuzzer's own rounds seconds down
        found = [json.loads(line) for line in findings.read_text().splitlines()] if findings.exists() else []
        crash = re.search(r"^FUZZ FINDING (\{.*\})$", output, re.M)
        ok = code == 0 and not found
        verdict = (
            "no input raised an undocumented error"
            if ok
            else (f"{len(found)} distinct undocumented error(s)" if found else f"FAILED (exit {code})")
        )
        print(f"{target:12s} {runs or 0:>9,} {seconds:9.1f} {fuzzing:9.1f} {speed:>7,}  {verdict}", flush=True)
        for report in found + ([json.loads(crash.group(1))] if crash else []):
            _print_finding(report)
        if not ok and not found and not crash:
            print(output[-6000:])
        elif crash:
            print(
                "  libFuzzer: "
                + "\n  libFuzzer: ".join(
                    line for line in output.splitlines() if line.startswith("==") and "ERROR" in line
                )
            )
        crashes = sorted(artifacts.glob("*")) if artifacts.exists() else []
        if crashes:  # the temporary folder goes; the crash inputs stay (outside the repository)
            kept = Path(tempfile.mkdtemp(prefix=f"fuzz-{target}-crashes-"))
            for path in crashes:
                shutil.copy(path, kept / path.name)
            print(
                f"  crash input kept in {kept}; reproduce with: python benchmarks/fuzz_atheris.py "
                f"--child {target} --corpus {kept / crashes[0].name}"
            )
        return ok


def _print_finding(report: dict) -> None:
    print(f"  [{report['target']}] {report['signature']}: {report['error'].splitlines()[0]}")
    print(f"    decoded input: {report['input']}")
    print(f"    raw input (hex, mode byte first): {report['input_hex'][:3000]}")
    print("    " + report["traceback"].rstrip().replace("\n", "\n    "))


def _stat(output: str, pattern: str, last: bool = False) -> int | None:
    hits = re.findall(pattern, output)
    return int(hits[-1 if last else 0]) if hits else None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=100_000, help="inputs per target (libFuzzer -runs)")
    parser.add_argument("--target", choices=("all", *TARGETS), default="all")
    parser.add_argument("--seed", type=int, default=0, help="libFuzzer -seed (0: a random one)")
    parser.add_argument(
        "--keep-going",
        action="store_true",
        help="record each distinct undocumented error and fuzz on, instead of stopping at the first",
    )
    parser.add_argument("--timeout", type=float, default=3600, help="seconds per target before the child is killed")
    parser.add_argument("--child", choices=TARGETS, help=argparse.SUPPRESS)
    parser.add_argument("--corpus", help=argparse.SUPPRESS)
    parser.add_argument("--artifacts", help=argparse.SUPPRESS)
    parser.add_argument("--findings", default=os.devnull, help=argparse.SUPPRESS)
    parser.add_argument("--timing", help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return 0  # not reached
    try:
        import atheris  # noqa: F401
    except ImportError:
        print("atheris is not installed: pip install -e .[fuzz]", file=sys.stderr)
        return 2
    targets = TARGETS if args.target == "all" else (args.target,)
    print(f"command: python {' '.join(sys.argv)}")
    print(
        f"{'target':12s} {'runs':>9s} {'seconds':>9s} {'fuzzing':>9s} {'exec/s':>7s}  (seconds: the child's wall "
        "time with imports; fuzzing: from its first input; exec/s: runs / fuzzing)"
    )
    results = [run_target(t, args) for t in targets]
    return 0 if all(results) else 1


if __name__ == "__main__":
    sys.exit(main())
