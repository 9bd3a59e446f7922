"""Fuzzing the parsers that read what others send: every input either parses or raises the
documented error, never anything else (hardened mode's fourth requirement). Hardened mode's decoders
too: decode_plain_frames (what workers and clients may send: refused with PlainDataRefusedError, or
decoded to exactly what distributed's own decoder makes of the same frames) and the bounded
restricted loader (what schedulers and operators may pickle: PickleRefusedError or UnpicklingError,
never a crash, a hang or a tuple chain taller than its bound).

300 examples each in CI; `python benchmarks/fuzz_parsers.py` runs 100,000 each (NEURO_FUZZ_EXAMPLES).
The targets and their documented errors live in neuro_dask/testing/fuzz_targets.py, which the
coverage-guided fuzzer (benchmarks/fuzz_atheris.py) shares.
"""

from __future__ import annotations

import collections
import datetime
import json
import os
import pickle
import struct

import msgpack
import pytest
import tblib.pickling_support
import torch
from distributed.core import Status
from distributed.protocol import pickle as distributed_pickle
from distributed.protocol.core import dumps as distributed_dumps
from distributed.protocol.core import loads as distributed_loads
from distributed.protocol.serialize import msgpack_encode_default
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from neuro_dask.errors import ConfigFieldError
from neuro_dask.protocol.wire import WireFormatError, decode_response, encode_request, encode_response
from neuro_dask.security.allowlist import SUBSTITUTES, is_allowed, is_named_only
from neuro_dask.security.errors import PickleRefusedError, PlainDataRefusedError
from neuro_dask.security.plain_wire import MAX_DEPTH, MAX_EQUAL_HASHES, decode_plain_frames
from neuro_dask.security.unpickle import restricted_loads
from neuro_dask.testing import fuzz_targets

JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=10), inner, max_size=5),
    max_leaves=20,
)
FUZZ = settings(
    max_examples=int(os.environ.get("NEURO_FUZZ_EXAMPLES", "300")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)


# ---- the manifest -----------------------------------------------------------------------------


def manifest_like():
    good = {
        "format": "neuro-dask-shards",
        "format_version": 1,
        "architecture": "mixtral",
        "config": {},
        "artifacts": [{"path": "trunk.safetensors", "kind": "trunk", "bytes": 1, "sha256": "0" * 64}],
    }
    return st.one_of(JSON, st.fixed_dictionaries({k: st.one_of(st.just(v), JSON) for k, v in good.items()}))


@FUZZ
@given(manifest_like())
def test_the_manifest_parser_refuses_only_with_its_errors(raw):
    fuzz_targets.manifest_dict(raw)


# ---- safetensors files (the shard loader) --------------------------------------------------


def safetensors_bytes():
    header = st.dictionaries(
        st.text(max_size=8),
        JSON
        | st.fixed_dictionaries(
            {
                "dtype": st.sampled_from(["F32", "F16", "BF16", "I64", "X9"]) | JSON,
                "shape": st.lists(st.integers(-2, 6), max_size=3) | JSON,
                "data_offsets": st.lists(st.integers(-10, 200), min_size=0, max_size=3) | JSON,
            }
        ),
        max_size=4,
    )
    framed = st.builds(
        lambda h, body, lie: struct.pack("<Q", max(0, len(h) + lie)) + h + body,
        header.map(lambda d: json.dumps(d).encode()),
        st.binary(max_size=200),
        st.integers(-3, 3),
    )
    listed = st.builds(lambda h: struct.pack("<Q", len(h)) + h, JSON.map(lambda d: json.dumps(d).encode()))
    return framed | listed | st.binary(max_size=300)


@FUZZ
@given(safetensors_bytes())
def test_the_shard_loader_refuses_only_with_its_errors(tmp_path_factory, data):
    path = tmp_path_factory.mktemp("fuzz") / "f.safetensors"
    path.write_bytes(data)
    fuzz_targets.safetensors_file(path)


# ---- expert-call frames ----------------------------------------------------------------------


def frames():
    # As a peer receives it: through msgpack (the data field arrives as bytes).
    real = msgpack.unpackb(
        msgpack.packb(encode_request("m", 1, {0: torch.ones(2, 4), 3: torch.zeros(1, 4)}), use_bin_type=True), raw=False
    )
    mutated = st.fixed_dictionaries({k: st.one_of(st.just(v), JSON, st.binary(max_size=40)) for k, v in real.items()})
    return mutated | st.dictionaries(st.text(max_size=8), JSON | st.binary(max_size=40), max_size=8) | JSON


@FUZZ
@given(frames())
def test_the_frame_decoder_refuses_only_with_its_errors(msg):
    fuzz_targets.frame(msg)  # as a request, and as a response to {0: [2, 4] rows, 3: [1, 4] rows}


# ---- the gateway's requests ------------------------------------------------------------------


def request_bodies():
    fields = {
        "model": st.just("adder") | JSON,
        "prompt": st.text(max_size=20) | JSON,
        "messages": st.lists(
            st.fixed_dictionaries(
                {"role": st.sampled_from(["user", "system", "x"]) | JSON, "content": st.text(max_size=10) | JSON}
            ),
            max_size=3,
        )
        | JSON,
        "max_tokens": st.integers(-5, 10**6) | JSON,
        "temperature": st.floats(allow_nan=True) | JSON,
        "top_p": st.floats(allow_nan=True) | JSON,
        "stream": st.booleans() | JSON,
        "stop": JSON,
        "n": JSON,
        "seed": JSON,
    }
    as_dict = st.fixed_dictionaries({}, optional=fields)
    return st.one_of(
        as_dict.map(lambda d: json.dumps(d).encode()),
        st.binary(max_size=100),
        JSON.map(lambda d: json.dumps(d).encode()),
    )


@FUZZ
@given(request_bodies())
def test_the_gateway_parser_refuses_only_with_protocol_errors(body):
    fuzz_targets.gateway_body(body)  # as a completion and as a chat completion, serving "adder"


# ---- a worker's answer is data ------------------------------------------------------------------


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_a_response_with_non_finite_values_is_refused_before_the_router_sees_it(bad):
    sent = {0: torch.ones(2, 4), 3: torch.zeros(1, 4)}
    good = {0: torch.full((2, 4), 0.5), 3: torch.zeros(1, 4)}
    assert torch.equal(decode_response(encode_response(good), sent)[0], good[0])
    poisoned = {0: good[0].clone(), 3: good[3]}
    poisoned[0][1, 2] = bad
    with pytest.raises(WireFormatError, match="NaN or infinite"):
        decode_response(encode_response(poisoned), sent)


def test_a_response_for_other_experts_or_shapes_is_refused():
    sent = {0: torch.ones(2, 4)}
    with pytest.raises(WireFormatError, match="covers experts"):
        decode_response(encode_response({1: torch.ones(2, 4)}), sent)
    with pytest.raises(WireFormatError):
        decode_response(encode_response({0: torch.ones(3, 4)}), sent)


# ---- hardened mode: plain data from workers and clients (decode_plain_frames) -------------------


SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats(allow_nan=True)
    | st.text(max_size=12)
    | st.binary(max_size=12)
)
HASHABLE = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=3).map(tuple), max_leaves=6)
# Map keys distributed gives a meaning to (a plain message cannot use them: distributed itself would
# unpickle, import, or fail on {"__Set__": x} without "as-list").
MARKER_KEYS = ("__Set__", "__Pickled__", "__Serialized__", "__Enum__")
# What a worker or client may send: msgpack's values, tuples for arrays, any hashable map key, sets.
PLAIN = st.recursive(
    SCALARS,
    lambda inner: (
        st.lists(inner, max_size=4).map(tuple)
        | st.lists(inner, max_size=4)
        | st.dictionaries(st.text(max_size=8).filter(lambda k: k not in MARKER_KEYS) | HASHABLE, inner, max_size=4)
        | st.sets(HASHABLE, max_size=4)
    ),
    max_leaves=25,
)


@FUZZ
@given(PLAIN)
def test_plain_messages_decode_exactly_as_distributed_decodes_them(value):
    frames = distributed_dumps(value)
    assert len(frames) == 1  # plain data never needs a sub-frame
    assert fuzz_targets.same_value(decode_plain_frames(frames), distributed_loads(frames))


def _mutations():
    """A plain message's frame, then cut, extended or with a byte changed: mostly not msgpack, or
    another message."""
    frame = PLAIN.map(lambda v: distributed_dumps(v)[0])
    return st.one_of(
        frame,
        st.builds(lambda f, n: f[:n], frame, st.integers(0, 60)),
        st.builds(lambda f, tail: f + tail, frame, st.binary(max_size=8)),
        st.builds(
            lambda f, i, b: f[: i % max(len(f), 1)] + bytes([b]) + f[i % max(len(f), 1) + 1 :],
            frame,
            st.integers(0, 200),
            st.integers(0, 255),
        ),
        st.binary(max_size=300),
    )


@FUZZ
@given(_mutations())
def test_the_plain_decoder_refuses_only_with_its_error(frame):
    fuzz_targets.plain_frame(frame)  # and what it accepts is exactly what distributed makes of it


@FUZZ
@given(st.lists(_mutations(), max_size=4))
def test_any_frame_list_is_refused_or_one_plain_frame(frames):
    fuzz_targets.plain_frames(frames)
    if len(frames) != 1:
        with pytest.raises(PlainDataRefusedError):
            decode_plain_frames(frames)


REFUSED_KEY = st.sampled_from(["__Pickled__", "__Serialized__", "__Enum__"])


@FUZZ
@given(PLAIN, REFUSED_KEY, SCALARS, st.integers(0, 3))
def test_a_refused_key_anywhere_is_refused(value, key, payload, depth):
    poisoned: object = {key: payload}
    for _ in range(depth):
        poisoned = {"wrap": (poisoned, value)}
    with pytest.raises(PlainDataRefusedError, match=key):
        decode_plain_frames([msgpack.packb(poisoned, default=msgpack_encode_default, use_bin_type=True)])


@FUZZ
@given(PLAIN, st.integers(-128, 127), st.binary(max_size=16))
def test_an_extension_type_anywhere_is_refused(value, code, data):
    try:  # PLAIN may draw a map holding "__Set__" or another key the decoder refuses on its own
        decode_plain_frames(distributed_dumps(value))
    except PlainDataRefusedError:
        assume(False)
    # ext 8, written by hand: msgpack's packer writes codes 0..127 only, the wire carries -128..127
    ext = b"\xc7" + bytes([len(data)]) + struct.pack("b", code) + data
    frame = b"\x82\xa1x" + msgpack.packb(value, default=msgpack_encode_default, use_bin_type=True) + b"\xa3ext" + ext
    with pytest.raises(PlainDataRefusedError):
        decode_plain_frames([frame])
    timestamp = msgpack.packb([value, msgpack.Timestamp(1, 2)], default=msgpack_encode_default, use_bin_type=True)
    with pytest.raises(PlainDataRefusedError, match="Timestamp"):
        decode_plain_frames([timestamp])


@FUZZ
@given(st.integers(1, 2 * MAX_DEPTH), st.sampled_from([b"\x91", b"\x81\xa1k"]))
def test_nesting_is_refused_past_the_bound(depth, opener):
    frame = opener * depth + b"\xc0"
    if depth <= MAX_DEPTH:
        decode_plain_frames([frame])
    else:
        with pytest.raises(PlainDataRefusedError, match="nested"):
            decode_plain_frames([frame])


@FUZZ
@given(st.integers(MAX_EQUAL_HASHES - 2, 4 * MAX_EQUAL_HASHES), st.booleans())
def test_colliding_keys_are_refused_past_the_bound(n, as_set):
    keys = fuzz_targets.colliding_int_pairs(n)
    packer = msgpack.Packer(use_bin_type=True)
    if as_set:
        frame = packer.pack({"__Set__": True, "as-list": [list(k) for k in keys]})
    else:
        frame = packer.pack_map_header(n) + b"".join(packer.pack(list(k)) + packer.pack(0) for k in keys)
    if n <= MAX_EQUAL_HASHES:
        decode_plain_frames([frame])
    else:
        with pytest.raises(PlainDataRefusedError, match="one hash"):
            decode_plain_frames([frame])


# ---- hardened mode: the bounded loader (pickles from schedulers and operators) -----------------


def _exception_pickle(exc: Exception) -> bytes:
    try:
        raise exc
    except Exception as raised:
        tblib.pickling_support.install(raised)
        return distributed_pickle.dumps(raised)


REAL_PICKLES = [
    _exception_pickle(ValueError("x")),
    _exception_pickle(ConfigFieldError("a.yaml", "f", "is bad")),
    _exception_pickle(FileNotFoundError(2, "missing", "/x")),
    pickle.dumps(Status.running, protocol=5),
    pickle.dumps(collections.OrderedDict(a=1), protocol=5),
    pickle.dumps(collections.defaultdict(list, k=[1])),
    pickle.dumps(datetime.datetime(2030, 1, 2, tzinfo=datetime.UTC), protocol=5),
    pickle.dumps({"a": (1, 2.5, b"x", None), 3: {1, 2}, "f": frozenset({"z"}), "s": slice(1, 2)}, protocol=5),
    pickle.dumps([1, 2 + 3j, bytearray(b"ab")], protocol=5),
    pickle.dumps(bytes, protocol=5),
]
# Opcodes with their arguments, and globals allowed and not: what a pickle is made of.
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
    b"q\x00",
    b"R",
    b"\x81",
    b"\x92",
    b"b",
    b"\x93",
    b"cbuiltins\nset\n",
    b"cbuiltins\nfrozenset\n",
    b"cbuiltins\ntuple\n",
    b"cbuiltins\nlist\n",
    b"cbuiltins\ndict\n",
    b"cbuiltins\nslice\n",
    b"cbuiltins\ncomplex\n",
    b"cbuiltins\nValueError\n",
    b"cbuiltins\nOSError\n",
    b"cbuiltins\nUnicodeError\n",
    b"ccollections\nOrderedDict\n",
    b"ccollections\ndefaultdict\n",
    b"cdatetime\ndatetime\n",
    b"cdatetime\ntimedelta\n",
    b"cdatetime\ntimezone\n",
    b"cdistributed.core\nStatus\n",
    b"ctblib.pickling_support\nunpickle_exception\n",
    b"ctblib.pickling_support\nunpickle_exception_with_attrs\n",
    b"ctblib.pickling_support\nunpickle_traceback\n",
    b"ctblib\nFrame\n",
    b"cneuro_dask.errors\n_rebuild\n",
    b"cneuro_dask.errors\nConfigFieldError\n",
    b"cbuiltins\nbytes\n",
    b"cbuiltins\nrange\n",
    b"cnumpy\ndtype\n",
    b"\x8c\x08builtins\x8c\x03set\x93",
    b"\x8c\x08builtins\x8c\x04dict\x93",
]


def pickles():
    soup = st.builds(
        lambda proto, parts: b"\x80" + bytes([proto]) + b"".join(parts) + b".",
        st.integers(0, 5),
        st.lists(st.sampled_from(PICKLE_FRAGMENTS), max_size=24),
    )
    real = st.sampled_from(REAL_PICKLES)
    mutated = st.builds(
        lambda p, i, b: p[: i % len(p)] + bytes([b]) + p[i % len(p) + 1 :],
        real,
        st.integers(0, 10**4),
        st.integers(0, 255),
    )
    dumped = st.builds(lambda v, proto: pickle.dumps(v, protocol=proto), PLAIN, st.integers(0, 5))
    return soup | real | mutated | dumped | st.binary(max_size=200)


@FUZZ
@given(pickles())
def test_the_bounded_loader_refuses_only_with_its_errors(data):
    fuzz_targets.restricted_pickle(data)


@FUZZ
@given(PLAIN, st.integers(3, 5))
def test_plain_values_pickled_by_python_load_back(value, protocol):
    data = pickle.dumps(value, protocol=protocol)
    try:
        loaded = restricted_loads(data, allowed=is_allowed, named_only=is_named_only, substitutes=SUBSTITUTES)
    except PickleRefusedError as exc:  # only the bounds may refuse plain data
        assert exc.module == "<pickle>", exc
        return
    assert fuzz_targets.same_value(loaded, value)
