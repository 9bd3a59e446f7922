"""Fuzzing the parsers that read what others send: every input either parses or raises the
documented error, never anything else (hardened mode's fourth requirement).

300 examples each in CI; `python benchmarks/fuzz_parsers.py` runs 100,000 each (NEURO_FUZZ_EXAMPLES).
The targets and their documented errors live in neuro_dask/testing/fuzz_targets.py, which the
coverage-guided fuzzer (benchmarks/fuzz_atheris.py) shares.
"""

from __future__ import annotations

import json
import os
import struct

import msgpack
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from neuro_dask.testing import fuzz_targets
from neuro_dask.wire import WireFormatError, decode_response, encode_request, encode_response

JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=20),
                    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=10), inner, max_size=5),
                    max_leaves=20)
FUZZ = settings(max_examples=int(os.environ.get("NEURO_FUZZ_EXAMPLES", "300")), deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                      HealthCheck.function_scoped_fixture])


# ---- the manifest -----------------------------------------------------------------------------

def manifest_like():
    good = {"format": "neuro-dask-shards", "format_version": 1, "architecture": "mixtral", "config": {},
            "artifacts": [{"path": "trunk.safetensors", "kind": "trunk", "bytes": 1, "sha256": "0" * 64}]}
    return st.one_of(JSON, st.fixed_dictionaries({k: st.one_of(st.just(v), JSON) for k, v in good.items()}))


@FUZZ
@given(manifest_like())
def test_the_manifest_parser_refuses_only_with_its_errors(raw):
    fuzz_targets.manifest_dict(raw)


# ---- safetensors files (the shard loader) --------------------------------------------------

def safetensors_bytes():
    header = st.dictionaries(st.text(max_size=8), JSON | st.fixed_dictionaries(
        {"dtype": st.sampled_from(["F32", "F16", "BF16", "I64", "X9"]) | JSON,
         "shape": st.lists(st.integers(-2, 6), max_size=3) | JSON,
         "data_offsets": st.lists(st.integers(-10, 200), min_size=0, max_size=3) | JSON}), max_size=4)
    framed = st.builds(lambda h, body, lie: struct.pack("<Q", max(0, len(h) + lie)) + h + body,
                       header.map(lambda d: json.dumps(d).encode()), st.binary(max_size=200), st.integers(-3, 3))
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
    real = msgpack.unpackb(msgpack.packb(encode_request("m", 1, {0: torch.ones(2, 4), 3: torch.zeros(1, 4)}),
                                         use_bin_type=True), raw=False)
    mutated = st.fixed_dictionaries({k: st.one_of(st.just(v), JSON, st.binary(max_size=40)) for k, v in real.items()})
    return mutated | st.dictionaries(st.text(max_size=8), JSON | st.binary(max_size=40), max_size=8) | JSON


@FUZZ
@given(frames())
def test_the_frame_decoder_refuses_only_with_its_errors(msg):
    fuzz_targets.frame(msg)  # as a request, and as a response to {0: [2, 4] rows, 3: [1, 4] rows}


# ---- the gateway's requests ------------------------------------------------------------------

def request_bodies():
    fields = {"model": st.just("adder") | JSON, "prompt": st.text(max_size=20) | JSON,
              "messages": st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "x"]) | JSON,
                                                          "content": st.text(max_size=10) | JSON}), max_size=3) | JSON,
              "max_tokens": st.integers(-5, 10**6) | JSON, "temperature": st.floats(allow_nan=True) | JSON,
              "top_p": st.floats(allow_nan=True) | JSON, "stream": st.booleans() | JSON, "stop": JSON, "n": JSON,
              "seed": JSON}
    as_dict = st.fixed_dictionaries({}, optional=fields)
    return st.one_of(as_dict.map(lambda d: json.dumps(d).encode()), st.binary(max_size=100),
                     JSON.map(lambda d: json.dumps(d).encode()))


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
