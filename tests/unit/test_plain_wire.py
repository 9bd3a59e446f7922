"""decode_plain_frames (neuro_dask/security/plain_wire.py): what a hardened network reads from
workers, clients and peers without a certificate.

Frames here are made by distributed itself (`distributed.protocol.core.dumps` and the comm's
`to_frames`, then packed and unpacked as the TCP comm sends them): a plain message decodes to
exactly what distributed's own `loads` makes of it; a message carrying anything distributed would
unpickle, deserialize or import (ToPickle, to_serialize, Serialize of a numpy array, an Enum) is
refused before any of it is parsed, and spies on every loader prove nothing was unpickled,
deserialized or imported. Then what distributed would not send but an attacker may: extension
types and timestamps, more than one frame, malformed msgpack, deep nesting, keys that share a hash.
"""

from __future__ import annotations

import asyncio
import math
import time

import msgpack
import numpy as np
import pytest
from distributed.comm.utils import to_frames
from distributed.core import Status
from distributed.protocol.core import dumps, loads
from distributed.protocol.serialize import Serialize, ToPickle, to_serialize
from distributed.protocol.utils import pack_frames, unpack_frames

from neuro_dask.errors import NeuroDaskError
from neuro_dask.security.errors import PlainDataRefusedError, SecurityError
from neuro_dask.security.plain_wire import (
    MAX_DEPTH,
    MAX_EQUAL_HASHES,
    REFUSED_KEYS,
    check_plain,
    decode_plain_frames,
)
from neuro_dask.testing.fuzz_targets import colliding_int_pairs, same_value

# ---- plain messages decode exactly as distributed decodes them -----------------------------------

PLAIN_MESSAGES = {
    "op-only": {"op": "heartbeat-worker"},
    "nested": {"op": "x", "a": {"b": {"c": (1, 2, (3, [4, 5]))}}, "list": [1, [2, [3]]]},
    "scalars": {
        "none": None,
        "t": True,
        "f": False,
        "zero": 0,
        "float": 2.5,
        "neg-float": -1e-300,
        "inf": math.inf,
        "nan": math.nan,
        "str": "ünïcödé ✓",
        "empty-str": "",
        "empty-bytes": b"",
    },
    "big-ints": {"u64": 2**64 - 1, "i64": -(2**63), "u32": 2**32, "neg": -1},
    "bytes": {"data": bytes(range(256)) * 4, "mv": memoryview(b"a memoryview"), "ba": bytearray(b"a bytearray")},
    "sets": {"keys": {("x-1", 0), ("x-1", 1), "y"}, "ints": {1, 2, 3}, "empty": set(), "nested": [{1}, ({"a"},)]},
    "non-str-keys": {1: "one", 2.5: "float", ("x", 1): "tuple", None: "none", False: "bool", b"k": "bytes"},
    "empty": {},
    "top-level-list": [{"op": "a"}, {"op": "b", "key": ("k", 0)}],
    "top-level-scalar": 42,
    "top-level-none": None,
    "a batch like BatchedSend's": [
        {"op": "task-finished", "key": f"k-{i}", "nbytes": i, "metadata": {}} for i in range(50)
    ],
    "an expert call's header": {
        "op": "neuro_expert",
        "model": "m",
        "layer": 3,
        "experts": (0, 7),
        "counts": (2, 1),
        "dtype": "float32",
        "hidden": 4,
        "data": np.ones((3, 4), np.float32).tobytes(),
    },
    "deep but in bounds": {"a": [[[[[[[[[[{"b": ("c",)}]]]]]]]]]]},
}


def _through_the_comm(frames) -> list[memoryview]:
    """As the TCP comm delivers them: packed into one buffer, unpacked into memoryviews."""
    return unpack_frames(pack_frames(frames))


@pytest.mark.parametrize("name", list(PLAIN_MESSAGES))
def test_plain_messages_decode_exactly_as_distributed_decodes_them(name):
    msg = PLAIN_MESSAGES[name]
    for frames in (dumps(msg), asyncio.run(to_frames(msg)), _through_the_comm(dumps(msg))):
        assert len(frames) == 1  # distributed adds sub-frames only for pickled and serialized objects
        ours, theirs = decode_plain_frames(frames), loads(frames, deserialize=True)
        assert same_value(ours, theirs), (ours, theirs)
    for kind in (bytes, bytearray, memoryview):
        assert same_value(decode_plain_frames([kind(dumps(msg)[0])]), loads(dumps(msg)))


def test_what_plain_decoding_gives():
    got = decode_plain_frames(dumps(PLAIN_MESSAGES["bytes"]))
    assert got["mv"] == b"a memoryview" and type(got["mv"]) is bytes  # a memoryview travels as bytes
    got = decode_plain_frames(dumps(PLAIN_MESSAGES["sets"]))
    assert got["keys"] == {("x-1", 0), ("x-1", 1), "y"} and type(got["keys"]) is set
    assert decode_plain_frames(dumps(PLAIN_MESSAGES["nested"]))["list"] == (1, (2, (3,)))  # arrays are tuples


# ---- anything distributed would unpickle, deserialize or import: refused, nothing loaded -------


@pytest.fixture
def spies(monkeypatch):
    """Every loader distributed could reach from a message, replaced by a recorder."""
    import importlib
    import pickle

    import cloudpickle

    # by module path: `distributed.protocol.serialize` is also the name of a function there
    dpickle = importlib.import_module("distributed.protocol.pickle")
    dserialize = importlib.import_module("distributed.protocol.serialize")
    dcore = importlib.import_module("distributed.protocol.core")

    called: list[str] = []

    def spy(name):
        def record(*args, **kwargs):
            called.append(name)
            raise AssertionError(f"{name} was called")

        return record

    for owner, attribute in (
        (pickle, "loads"),
        (pickle, "load"),
        (cloudpickle, "loads"),
        (dpickle, "loads"),
        (dserialize, "deserialize"),
        (dserialize, "merge_and_deserialize"),
        (dserialize, "import_allowed_module"),
        (dserialize, "msgpack_decode_default"),
        (dcore, "merge_and_deserialize"),
        (dcore, "msgpack_decode_default"),
        (importlib, "import_module"),
    ):
        monkeypatch.setattr(owner, attribute, spy(f"{owner.__name__}.{attribute}"))
    return called


REFUSED_MESSAGES = {
    "ToPickle": lambda: {"op": "x", "data": ToPickle(lambda: None)},
    "to_serialize": lambda: {"op": "x", "data": to_serialize(b"payload")},
    "Serialize(numpy array)": lambda: {"op": "x", "data": Serialize(np.arange(12.0).reshape(3, 4))},
    "Enum": lambda: {"op": "x", "status": Status.running},
    "ToPickle nested deep": lambda: {"op": "x", "a": [{"b": ({"c": ToPickle({"d": 1})},)}]},
}


@pytest.mark.parametrize("name", list(REFUSED_MESSAGES))
def test_messages_with_pickled_serialized_or_enum_values_are_refused_unloaded(name, spies):
    frames = dumps(REFUSED_MESSAGES[name]())
    spies.clear()  # dumps may have used them; only decoding counts
    for candidate in (frames, _through_the_comm(frames), frames[:1]):  # frame 0 alone: refused by its keys
        with pytest.raises(PlainDataRefusedError) as info:
            decode_plain_frames(candidate, peer="tls://203.0.113.9:40000")
        assert "tls://203.0.113.9:40000" in str(info.value)
    assert spies == []


def test_the_spies_see_distributeds_own_loads(spies):
    # The control for the test above: distributed's decoder does reach them.
    frames = dumps({"op": "x", "data": ToPickle(1)})
    spies.clear()
    with pytest.raises(AssertionError):
        loads(frames)
    assert spies


@pytest.mark.parametrize("key", REFUSED_KEYS)
@pytest.mark.parametrize("value", [1, 0, -1, True, False, None, "x", (b"h", (b"f",))])
def test_a_refused_key_is_refused_whatever_its_value(key, value, spies):
    # `{"__Serialized__": 0, "data": ...}` is no offset: distributed then builds Serialized(*data).
    for msg in ({key: value}, {"op": "x", "deep": ({"k": {key: value, "data": (b"h", (b"f",))}},)}):
        with pytest.raises(PlainDataRefusedError, match=key) as info:
            decode_plain_frames([msgpack.packb(msg, use_bin_type=True)])
        assert info.value.reason and key in info.value.reason
    assert spies == []


def test_only_str_keys_are_distributeds_markers():
    # distributed looks up the str key; a bytes key of the same spelling is data.
    assert decode_plain_frames([msgpack.packb({b"__Pickled__": 1}, use_bin_type=True)]) == {b"__Pickled__": 1}


# ---- one frame of valid msgpack, plain values only -----------------------------------------------


@pytest.mark.parametrize(
    "frames, reason",
    [
        ([], "no frames"),
        ([msgpack.packb(1), msgpack.packb(2)], "2 frames"),
        ([msgpack.packb({"op": "x"}), b""], "2 frames"),
        (["a str"], "type str"),
        ([12], "type int"),
        (None, "not a list"),
    ],
)
def test_anything_but_one_bytes_frame_is_refused(frames, reason):
    with pytest.raises(PlainDataRefusedError, match=reason):
        decode_plain_frames(frames)


@pytest.mark.parametrize(
    "frame",
    [
        b"",
        b"\xc1",
        b"\x92\x01",
        b"\x01\x02",
        b"\x81\xa1a",
        b"\xdd\xff\xff\xff\xff",
        b"\xdb\xff\xff\xff\xff",
        b"\xc6\x7f\xff\xff\xff",
        b"\xa3ab",
        b"\xa2\xff\xfe",  # truncated, unused, trailing, oversized, invalid UTF-8
    ],
    ids=[
        "empty",
        "never-used",
        "truncated",
        "trailing",
        "key-only",
        "array-2**32",
        "str-2**32",
        "bin-2**31",
        "short-str",
        "bad-utf8",
    ],
)
def test_malformed_msgpack_is_refused(frame):
    with pytest.raises(PlainDataRefusedError, match="not valid msgpack"):
        decode_plain_frames([frame])


@pytest.mark.parametrize("code", [-128, -2, 0, 5, 127])
def test_extension_types_are_refused(code):
    ext = b"\xc7\x03" + bytes([code & 0xFF]) + b"abc"
    for frame in (ext, b"\x91" + ext, b"\x81\xa1k" + ext, b"\x81" + ext + b"\x01"):
        with pytest.raises(PlainDataRefusedError, match="extension type"):
            decode_plain_frames([frame])


def test_timestamps_are_refused_though_msgpack_decodes_them_before_the_ext_hook():
    stamp = msgpack.packb(msgpack.Timestamp(1, 2))
    assert isinstance(msgpack.unpackb(stamp, ext_hook=lambda *_: 1 / 0), msgpack.Timestamp)
    for frame in (
        stamp,
        msgpack.packb([msgpack.Timestamp(1, 2)]),
        msgpack.packb({"t": msgpack.Timestamp(1, 2)}),
        msgpack.packb({"__Set__": True, "as-list": [msgpack.Timestamp(1, 2)]}),
    ):
        with pytest.raises(PlainDataRefusedError, match="Timestamp"):
            decode_plain_frames([frame])


@pytest.mark.parametrize(
    "msg, reason",
    [
        ({"__Set__": True, "as-list": [{"a": 1}]}, "unhashable"),
        ({"__Set__": True, "as-list": [[1, {"a": 1}]]}, "unhashable"),
        ({"__Set__": True, "as-list": "abc"}, "not an array"),  # distributed would make {"a", "b", "c"}
        ({"__Set__": True, "as-list": {"a": 1}}, "not an array"),
        ({"__Set__": True}, "missing"),
        ({"__Set__": True, "as-list": [{"__Set__": True, "as-list": [1]}]}, "unhashable"),  # a set of a set
    ],
)
def test_sets_that_are_not_sets_of_plain_hashables_are_refused(msg, reason):
    with pytest.raises(PlainDataRefusedError, match=reason):
        decode_plain_frames([msgpack.packb(msg, use_bin_type=True)])


def test_unhashable_map_keys_are_refused():
    for frame in (
        b"\x81\x81\xa1a\x01\x02",
        b"\x81\x91\x81\xa1a\x01\x02",  # a map, an array holding a map, as key
        b"\x81" + msgpack.packb({"__Set__": True, "as-list": [1]}) + b"\x02",
    ):  # a set as key
        with pytest.raises(PlainDataRefusedError, match="unhashable"):
            decode_plain_frames([frame])


# ---- nesting --------------------------------------------------------------------------------------


@pytest.mark.parametrize("opener", [b"\x91", b"\x81\xa1k"], ids=["arrays", "maps"])
def test_nesting_up_to_the_bound_decodes_and_past_it_is_refused(opener):
    decode_plain_frames([opener * MAX_DEPTH + b"\xc0"])
    with pytest.raises(PlainDataRefusedError, match=f"nested more than {MAX_DEPTH}"):
        decode_plain_frames([opener * (MAX_DEPTH + 1) + b"\xc0"])
    # as deep as msgpack itself goes (1024): still ours to refuse
    with pytest.raises(PlainDataRefusedError, match=f"nested more than {MAX_DEPTH}"):
        decode_plain_frames([opener * 1024 + b"\xc0"])


@pytest.mark.parametrize("opener", [b"\x91", b"\x81\xa1k", b"\x81\x91\x01"], ids=["arrays", "maps", "map-keys"])
def test_what_msgpack_does_with_100000_nested_containers(opener):
    # msgpack's C unpacker keeps its own stack of 1024 containers and raises StackError past it,
    # without recursing; the decoder refuses that too, in well under a second.
    frame = opener * 100_000 + b"\xc0"
    with pytest.raises(msgpack.StackError):
        msgpack.unpackb(frame, use_list=False, strict_map_key=False, raw=False)
    with pytest.raises(PlainDataRefusedError, match="nested past its own limit"):
        decode_plain_frames([frame])


def test_mixed_nesting_counts_every_container():
    value: object = "leaf"
    for i in range(MAX_DEPTH + 1):
        value = [value] if i % 3 == 0 else {"k": value} if i % 3 == 1 else ((i, "key"), value)
    with pytest.raises(PlainDataRefusedError, match="nested"):
        decode_plain_frames([msgpack.packb(value, use_bin_type=True)])


# ---- hash flooding ---------------------------------------------------------------------------------


def _colliding_map(n: int) -> bytes:
    packer = msgpack.Packer(use_bin_type=True)
    return packer.pack_map_header(n) + b"".join(packer.pack(list(k)) + packer.pack(0) for k in colliding_int_pairs(n))


def test_keys_sharing_one_hash_up_to_the_bound_decode():
    keys = colliding_int_pairs(MAX_EQUAL_HASHES)
    assert set(decode_plain_frames([_colliding_map(MAX_EQUAL_HASHES)])) == set(keys)
    members = msgpack.packb({"__Set__": True, "as-list": [list(k) for k in keys]})
    assert decode_plain_frames([members]) == set(keys)


def test_a_map_of_20000_keys_sharing_one_hash_is_refused_before_it_is_built():
    frame = _colliding_map(20_000)  # 290 kB; msgpack alone takes seconds to build it, quadratically
    with pytest.raises(PlainDataRefusedError, match="sharing one hash"):
        decode_plain_frames([frame])
    members = msgpack.packb({"__Set__": True, "as-list": [list(k) for k in colliding_int_pairs(20_000)]})
    with pytest.raises(PlainDataRefusedError, match="sharing one hash"):
        decode_plain_frames([members])


def test_honest_big_maps_with_tuple_and_int_keys_decode():
    msg = {
        "who_has": {(f"x-{i}", i): (f"tcp://10.0.0.{i % 250}:1",) for i in range(5000)},
        "nbytes": {i: i * 8 for i in range(5000)},
        "keys": {(f"x-{i}", i) for i in range(5000)},
    }
    assert same_value(decode_plain_frames(dumps(msg)), loads(dumps(msg)))


def test_the_flooding_check_is_cheap_for_a_large_honest_message():
    msg = {"nbytes": {f"key-{i}": i for i in range(200_000)}}
    frames = dumps(msg)
    started = time.perf_counter()
    loads(frames)
    theirs = time.perf_counter() - started
    started = time.perf_counter()
    decode_plain_frames(frames)
    ours = time.perf_counter() - started
    assert ours < 10 * theirs + 0.5  # same order as distributed's own decoder


# ---- the error and check_plain ---------------------------------------------------------------------


def test_the_error_says_what_and_how_to_fix_it():
    err = PlainDataRefusedError("a map with a __Pickled__ key", "tls://198.51.100.4:5000")
    assert isinstance(err, SecurityError) and isinstance(err, ValueError) and isinstance(err, NeuroDaskError)
    assert err.reason == "a map with a __Pickled__ key" and err.peer == "tls://198.51.100.4:5000"
    text = str(err)
    assert "plain data only from workers and clients" in text and "tls://198.51.100.4:5000" in text
    assert "__Pickled__" in text


def test_check_plain_accepts_what_the_decoder_returns():
    for msg in PLAIN_MESSAGES.values():
        check_plain(decode_plain_frames(dumps(msg)))


@pytest.mark.parametrize(
    "value, reason",
    [
        ([1, 2], "builtins.list"),  # msgpack with use_list=False never makes a list
        ({"a": object()}, "builtins.object"),
        ({"a": {"__Pickled__": 1}}, "__Pickled__"),
        ((frozenset({1}),), "builtins.frozenset"),
        (msgpack.Timestamp(1, 0), "Timestamp"),
        (np.float32(1), "numpy"),
    ],
)
def test_check_plain_refuses_the_rest(value, reason):
    with pytest.raises(PlainDataRefusedError, match=reason):
        check_plain(value)


def test_check_plain_bounds_nesting_without_recursing():
    value: object = None
    for _ in range(100_000):
        value = (value,)
    with pytest.raises(PlainDataRefusedError, match="nested"):
        check_plain(value)
