"""The parsers of untrusted input as fuzz targets, shared by tests/unit/test_fuzz_parsers.py
(hypothesis) and benchmarks/fuzz_atheris.py (atheris, coverage-guided libFuzzer): the manifest, the
shard loader, expert-call frames, gateway requests, and hardened mode's two decoders of what peers
send (plain_frames: decode_plain_frames for workers and clients; restricted_pickle: the bounded
restricted loader for schedulers and operators).

Each target hands one input to its parser and lets through only that parser's documented error
(`DOCUMENTED`); anything else propagates, and a fuzzer reports it as a finding.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import torch

from neuro_dask.errors import NeuroDaskError
from neuro_dask.gateway.protocol import ProtocolError, parse_chat, parse_completion, parse_json
from neuro_dask.protocol.wire import WireFormatError, decode_request, decode_response
from neuro_dask.security.errors import PickleRefusedError, PlainDataRefusedError
from neuro_dask.store.manifest import Manifest
from neuro_dask.store.safetensors_io import SafetensorsFile

# What each parser may raise on a bad input: the documented refusal. Anything else is a bug.
DOCUMENTED: dict[str, tuple[type[BaseException], ...]] = {
    "manifest": (NeuroDaskError,),  # ManifestError, MissingConfigError
    "safetensors": (NeuroDaskError,),  # TruncatedFileError
    "frame": (WireFormatError,),
    "gateway": (ProtocolError,),
    "plain_frames": (PlainDataRefusedError,),
    # a refused global or a bound (PickleLimitError), or the UnpicklingError restricted_loads makes
    # of a malformed pickle; anything else, a crash or a hang is a finding
    "restricted_pickle": (PickleRefusedError, pickle.UnpicklingError),
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


# ---- hardened mode's decoders: plain data from workers and clients, bounded pickles from the rest ----


def plain_frame(data: bytes) -> None:
    """Arbitrary bytes as the one frame of a message from a worker or client."""
    plain_frames([data])


def plain_frames(frames: list[bytes]) -> None:
    """Arbitrary frames through decode_plain_frames. Refused with PlainDataRefusedError, or decoded
    to plain data that is exactly what distributed's own decoder makes of the same frames (a
    differential check: safe to run, since what was accepted holds nothing distributed would
    unpickle, deserialize or import)."""
    from neuro_dask.security.plain_wire import check_plain, decode_plain_frames

    try:
        value = decode_plain_frames(frames)
    except DOCUMENTED["plain_frames"]:
        return
    check_plain(value)  # raises PlainDataRefusedError: a finding here, since decode accepted it
    from distributed.protocol.core import loads

    theirs = loads(list(frames), deserialize=True)
    if not same_value(value, theirs):
        raise AssertionError(f"decode_plain_frames and distributed differ: {repr(value)[:300]} != {repr(theirs)[:300]}")


def same_value(a: Any, b: Any) -> bool:
    """Equal as decoded plain data: the same types all the way down (1, 1.0 and True differ; so do
    tuple and list), floats by repr (NaN equals NaN), dicts in the same order, sets by members'
    reprs (a NaN member hashes by identity, so two equal sets may iterate in different orders)."""
    pending = [(a, b)]
    while pending:
        x, y = pending.pop()
        if type(x) is not type(y):
            return False
        if type(x) is float:
            if repr(x) != repr(y):
                return False
        elif type(x) is tuple or type(x) is list:
            if len(x) != len(y):
                return False
            pending.extend(zip(x, y))
        elif type(x) is dict:
            if len(x) != len(y):
                return False
            pending.extend(zip(x.keys(), y.keys()))
            pending.extend(zip(x.values(), y.values()))
        elif type(x) is set:
            if sorted(map(repr, x)) != sorted(map(repr, y)):
                return False
        elif x != y:
            return False
    return True


def restricted_pickle(data: bytes) -> None:
    """Arbitrary bytes through the bounded restricted loader, exactly as hardened mode calls it. A
    value that loads must hold no tuple (frozenset, slice) chain taller than the loader's bound,
    anywhere inside it (hash() of one recurses in C: a crash for whoever holds it later), and is
    then used as its holder would (repr, str, hash, ==): those may raise, never crash or hang."""
    from neuro_dask.security.allowlist import SUBSTITUTES, is_allowed, is_named_only
    from neuro_dask.security.unpickle import MAX_HASHABLE_DEPTH, restricted_loads

    try:
        value = restricted_loads(data, allowed=is_allowed, named_only=is_named_only, substitutes=SUBSTITUTES)
    except DOCUMENTED["restricted_pickle"]:
        return
    height = hashable_height(value)
    if height > MAX_HASHABLE_DEPTH + 1:  # + 1: an exception's args, a tuple the loader never sees
        raise AssertionError(f"the loader returned tuples nested {height} deep (bound {MAX_HASHABLE_DEPTH})")
    for use in (repr, str, hash, lambda v: v == v):
        try:
            use(value)
        except Exception:  # noqa: BLE001 - unhashable, a RecursionError on deep lists: clean errors
            pass


_HASHABLE_CONTAINERS = (tuple, frozenset, slice)


def hashable_height(root: Any) -> int:
    """The tallest chain of tuples, frozensets and slices nested in one another anywhere in `root`
    (through lists, dicts, sets, exceptions' args, attributes, causes and contexts). Iterative;
    each object once."""
    heights: dict[int, int] = {}
    seen: set[int] = set()
    keep: list[Any] = []  # ids stay unique while their objects live
    pending: list[tuple[Any, bool]] = [(root, False)]
    tallest = 0
    while pending:
        obj, done = pending.pop()
        if done:
            height = 1 + max(
                (heights.get(id(child), 0) for child in _children(obj) if isinstance(child, _HASHABLE_CONTAINERS)),
                default=0,
            )
            heights[id(obj)] = height
            tallest = max(tallest, height)
            continue
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        keep.append(obj)
        if isinstance(obj, _HASHABLE_CONTAINERS):
            pending.append((obj, True))
        pending.extend((child, False) for child in _children(obj) if id(child) not in seen)
    return tallest


def _children(obj: Any) -> list[Any]:
    if isinstance(obj, (str, bytes, bytearray, memoryview, int, float, complex)) or obj is None:
        return []
    if isinstance(obj, slice):
        return [obj.start, obj.stop, obj.step]
    if isinstance(obj, dict):
        return [*obj.keys(), *obj.values()]
    if isinstance(obj, (tuple, list, set, frozenset)):
        return list(obj)
    children: list[Any] = []
    if isinstance(obj, BaseException):
        children += [obj.args, obj.__cause__, obj.__context__]
    attributes = getattr(obj, "__dict__", None)
    if isinstance(attributes, dict):
        children += [*attributes.values()]
    return children


def colliding_int_pairs(n: int) -> list[tuple[int, int]]:
    """n distinct (a, b) tuples of ints that all have one hash in CPython (64-bit builds).

    Tuple hashing is xxHash-like and invertible, and int hashes are the int modulo 2**61 - 1, so
    for most `a` a `b` completes the chosen hash. A dict or set of n such keys costs n**2 / 2
    comparisons to build: the hash-flooding input the decoders must refuse, which no fuzzer
    would find on its own."""
    mask = 2**64 - 1
    p1, p2, p5 = 11400714785074694791, 14029467366897019727, 2870177450012600261
    prime = 2**61 - 1

    def rotl(x: int) -> int:
        return ((x << 31) | (x >> 33)) & mask

    def rotr(x: int) -> int:
        return ((x >> 31) | (x << 33)) & mask

    target = rotr(12345 * pow(p1, -1, 2**64) % 2**64)
    inverse_p2 = pow(p2, -1, 2**64)
    pairs: list[tuple[int, int]] = []
    a = 0
    while len(pairs) < n:
        acc = rotl((p5 + (hash(a) & mask) * p2) & mask) * p1 & mask
        lane = (target - acc) * inverse_p2 & mask
        if lane < prime:
            pairs.append((a, lane))
        elif 2**64 - lane < prime and 2**64 - lane != 1:
            pairs.append((a, lane - 2**64))
        a += 1
    return pairs
