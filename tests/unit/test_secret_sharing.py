"""The private tier's pure cores: fixed point over Z_2^64, additive shares, linear maps on
shares, the wire format, the owner-pair planner, and the statistical independence of a worker's
view from the input (docs/privacy.md)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from neuro_dask.client.dispatch.private_executor import owner_of, plan_pairs
from neuro_dask.client.dispatch.routes import RouteTable
from neuro_dask.model.moe import ExpertWeights, run_expert
from neuro_dask.privacy import FRAC_BITS, FixedPointOverflowError, decode, encode, reconstruct, split
from neuro_dask.privacy.fixed_point import ring_matmul
from neuro_dask.privacy.share_wire import (
    decode_share_request,
    decode_share_response,
    encode_share_request,
    encode_share_response,
)
from neuro_dask.protocol.wire import WireFormatError
from neuro_dask.runtime.private_runner import IntegerExpert
from neuro_dask.trust.replication import Standing

F = FRAC_BITS


def seeded_bytes(seed: int):
    rng = np.random.default_rng(seed)
    return rng.bytes


@pytest.mark.parametrize("scale", [1e-4, 1.0, 300.0, 1e6])
def test_encode_decode_round_trip_within_half_an_ulp(scale):
    x = torch.randn(64, 33, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * scale
    err = (decode(encode(x)) - x).abs().max().item()
    assert err <= 2.0 ** -(F + 1)


@pytest.mark.parametrize("bad", [2.0**46, float("inf"), float("nan"), -1e15])
def test_encode_refuses_values_past_the_bound(bad):
    with pytest.raises(FixedPointOverflowError):
        encode(torch.tensor([0.0, bad]))


def test_shares_reconstruct_exactly_and_wrap():
    secret = torch.tensor([0, 1, -1, 2**63 - 1, -(2**63), 12345], dtype=torch.int64)
    for seed in range(5):
        r, s = split(secret, seeded_bytes(seed))
        assert r.dtype == s.dtype == torch.int64
        assert torch.equal(reconstruct(r, s), secret)
        assert torch.equal(reconstruct(s, r), secret)


def test_ring_matmul_is_exact_mod_2_64():
    g = torch.Generator().manual_seed(1)
    a = torch.randint(-(2**62), 2**62, (5, 17), generator=g, dtype=torch.int64)
    b = torch.randint(-(2**62), 2**62, (17, 7), generator=g, dtype=torch.int64)
    got = ring_matmul(a, b).numpy().view(np.uint64)
    for i in range(5):
        for j in range(7):
            exact = sum(int(a[i, k]) * int(b[k, j]) for k in range(17)) % 2**64
            assert int(got[i, j]) == exact


def test_linear_map_on_shares_equals_plaintext_within_the_fixed_point_bound():
    g = torch.Generator().manual_seed(2)
    d, out = 96, 40
    w = torch.randn(out, d, generator=g, dtype=torch.float64) * 0.2
    x = torch.randn(12, d, generator=g, dtype=torch.float64) * 5
    w_int = encode(w).t()
    s0, s1 = split(encode(x), seeded_bytes(3))
    y = decode(reconstruct(ring_matmul(s0, w_int), ring_matmul(s1, w_int)), 2 * F)
    exact = x @ w.t()
    bound = (
        2.0 ** -(F + 1) * (w.abs().sum(1)[None, :] + x.abs().sum(1)[:, None])
        + d * 2.0 ** -(2 * F + 2)
        + 2.0**-52 * exact.abs()
    )
    assert ((y - exact).abs() <= bound).all()
    # and the shares' products alone are nothing like the answer
    assert (decode(ring_matmul(s0, w_int), 2 * F) - exact).abs().median() > 1e6


def test_swiglu_expert_on_shares_matches_run_expert():
    g = torch.Generator().manual_seed(4)
    d, i = 32, 48
    w = ExpertWeights(
        torch.randn(i, d, generator=g) * 0.1, torch.randn(i, d, generator=g) * 0.1, torch.randn(d, i, generator=g) * 0.1
    )
    x = torch.randn(9, d, generator=g)
    expert = IntegerExpert.from_weights(w, F)
    rb = seeded_bytes(5)
    shares = split(encode(x), rb)
    gu = decode(reconstruct(*(expert.apply("gate_up", s) for s in shares)), 2 * F, torch.float32)
    gate, up = gu.chunk(2, dim=-1)
    shares = split(encode(torch.nn.functional.silu(gate) * up), rb)
    y = decode(reconstruct(*(expert.apply("down", s) for s in shares)), 2 * F, torch.float32)
    torch.testing.assert_close(y, run_expert(x, w), atol=1e-4, rtol=0)


# ---- a worker's view is independent of the input ----------------------------------------------


def chi2_sf(stat: float, df: int) -> float:
    """Upper tail of chi-square by Wilson-Hilferty (accurate to ~1e-3 for df in the hundreds)."""
    z = ((stat / df) ** (1 / 3) - (1 - 2 / (9 * df))) / math.sqrt(2 / (9 * df))
    return 0.5 * math.erfc(z / math.sqrt(2))


def homogeneity_p(a: np.ndarray, b: np.ndarray) -> float:
    """Two-sample chi-square test of equal byte distributions (256 bins)."""
    ha = np.bincount(a, minlength=256).astype(float)
    hb = np.bincount(b, minlength=256).astype(float)
    total = ha + hb
    keep = total > 0
    ha, hb, total = ha[keep], hb[keep], total[keep]
    ea, eb = total * ha.sum() / total.sum(), total * hb.sum() / total.sum()
    stat = float(((ha - ea) ** 2 / ea).sum() + ((hb - eb) ** 2 / eb).sum())
    return chi2_sf(stat, int(keep.sum()) - 1)


def byte_planes(v: torch.Tensor) -> np.ndarray:
    return v.contiguous().numpy().view(np.uint8).reshape(-1, 8)  # little endian: column 7 holds the top bits


def view_p_values(a: torch.Tensor, b: torch.Tensor) -> list[float]:
    pa, pb = byte_planes(a), byte_planes(b)
    return [homogeneity_p(pa[:, k], pb[:, k]) for k in range(8)]


def test_a_workers_shares_do_not_depend_on_the_input():
    n = 64 * 256  # rows x hidden of a small batch: 16k ring elements per sample
    zeros = encode(torch.zeros(n))
    loud = encode(torch.randn(n, generator=torch.Generator().manual_seed(6)) * 1000 + 50)
    alpha = 1e-3 / 16  # Bonferroni over 8 byte positions x 2 shares
    for share in (0, 1):  # whichever share a worker gets
        view_a = split(zeros, seeded_bytes(10))[share]
        view_b = split(loud, seeded_bytes(11))[share]
        p = view_p_values(view_a, view_b)
        assert min(p) > alpha, p
        # each share is also uniform on its own: top byte against fresh uniform bytes
        uniform = np.frombuffer(seeded_bytes(12)(n), dtype=np.uint8)
        assert homogeneity_p(byte_planes(view_b)[:, 7], uniform) > alpha


def test_the_uniformity_check_does_detect_a_leaky_view():
    """Power check: the same test flags plaintext encodings and a 'share' with too little randomness."""
    n = 64 * 256
    zeros = encode(torch.zeros(n))
    loud = encode(torch.randn(n, generator=torch.Generator().manual_seed(6)) * 1000 + 50)
    assert min(view_p_values(zeros, loud)) < 1e-12
    weak = torch.from_numpy(np.random.default_rng(13).integers(0, 2**16, n, dtype=np.int64))  # 16-bit masks
    assert min(view_p_values(zeros - weak, loud - weak)) < 1e-12


# ---- wire -------------------------------------------------------------------------------------


def test_share_messages_round_trip_and_refuse_malformed():
    g = {3: torch.arange(12, dtype=torch.int64).reshape(3, 4) - 6, 7: torch.full((2, 4), -(2**63), dtype=torch.int64)}
    msg = encode_share_request("m", 1, "gate_up", F, g)
    req = decode_share_request({**msg, "data": bytes(msg["data"])})
    assert (req.model, req.layer, req.step, req.frac_bits) == ("m", 1, "gate_up", F)
    assert all(torch.equal(req.inputs[e], g[e]) for e in g)
    resp = encode_share_response({3: torch.zeros(3, 8, dtype=torch.int64), 7: torch.ones(2, 8, dtype=torch.int64)})
    out = decode_share_response({**resp, "data": bytes(resp["data"])}, g, None)
    assert out[7].shape == (2, 8)
    with pytest.raises(WireFormatError):
        decode_share_response({**resp, "data": bytes(resp["data"])}, g, 4)
    for bad in (
        {**msg, "step": "silu"},
        {**msg, "data": b"x"},
        {**msg, "experts": [3, 3]},
        {**msg, "frac_bits": 99},
        {**msg, "layer": True},
        "nope",
    ):
        with pytest.raises(WireFormatError):
            decode_share_request(bad)
    with pytest.raises(WireFormatError):
        decode_share_request(msg, max_rows=4)
    with pytest.raises(WireFormatError):
        decode_share_response({"status": "error", "message": "no"}, g, None)


# ---- pairs of distinct owners -----------------------------------------------------------------


def table(routes, owners):
    return RouteTable(1, routes, {w: Standing(owner=o) for w, o in owners.items()})


def test_pairs_use_two_distinct_owners_and_spread_load():
    routes = {(0, 0): ("a", "b", "c"), (0, 1): ("a", "b", "c"), (0, 2): ("c", "d")}
    t = table(routes, {"a": "alice", "b": "alice", "c": "carol", "d": ""})
    pairs, short = plan_pairs(t, 0, {0: 4, 1: 4, 2: 1})
    assert not short
    for w0, w1 in pairs.values():
        assert owner_of(t, w0) != owner_of(t, w1)
    assert owner_of(t, "d") == "d"  # no declared owner: the worker is its own
    assert {pairs[0][0], pairs[1][0]} == {"a", "b"}  # the second expert goes to the less loaded alice worker


@pytest.mark.parametrize(
    "routes,owners,exclude,expected",
    [
        ({(0, 0): ("a", "b")}, {"a": "alice", "b": "alice"}, set(), {0: ["alice"]}),
        ({(0, 0): ("a", "b")}, {"a": "alice", "b": "bob"}, {"b"}, {0: ["alice"]}),
        ({(0, 0): ("a",)}, {}, set(), {0: ["a"]}),
        ({(0, 0): ()}, {}, set(), {0: []}),
    ],
)
def test_experts_without_two_owners_are_short(routes, owners, exclude, expected):
    pairs, short = plan_pairs(table(routes, owners), 0, {0: 1}, exclude)
    assert pairs == {} and short == expected


@pytest.mark.parametrize("k, n", [(1, 1), (64, 96), (1024, 256)])
def test_limb_gemms_equal_the_int64_ring_matmul_bit_for_bit(k, n):
    """The CUDA path (float64 GEMMs on 16-bit limbs), run here on the CPU: exact for uniformly
    random shares (extremes included) and weights at the tier's scale."""
    from neuro_dask.privacy.fixed_point import limb_exact, ring_matmul, ring_matmul_limbs

    g = torch.Generator().manual_seed(k)
    a = torch.randint(-(2**63), 2**63 - 1, (7, k), generator=g, dtype=torch.int64)
    a[0, 0], a[-1, -1] = -(2**63), 2**63 - 1
    w = encode(torch.randn(k, n, generator=g) * 3.0)
    assert limb_exact(w)
    assert torch.equal(ring_matmul_limbs(a, w.to(torch.float64)), ring_matmul(a, w))


def test_weights_too_large_for_exact_limbs_are_detected():
    from neuro_dask.privacy.fixed_point import limb_exact

    assert not limb_exact(torch.full((4096, 2), 2**26, dtype=torch.int64))  # 2^12 * (2^16 - 1) * 2^26 > 2^53
    assert limb_exact(torch.full((4096, 2), 2**20, dtype=torch.int64))


def test_an_integer_expert_on_the_cpu_keeps_int64_weights():
    from neuro_dask.runtime.private_runner import IntegerExpert

    w = ExpertWeights(torch.randn(6, 4), torch.randn(6, 4), torch.randn(4, 6))
    ie = IntegerExpert.from_weights(w, 16, "cpu")
    assert ie.gate_up_t.dtype == torch.int64 and ie.device == torch.device("cpu")
