"""Adversary: honest, perturb, collude, straggle, crash and defect wrappers of expert outputs."""

from __future__ import annotations

import pytest
import torch

from neuro_dask.errors import ConfigError
from neuro_dask.testing import (
    MIN_NOISE,
    Adversary,
    AdversaryCrash,
    AdversarySpec,
    make_adversary,
)

ATOL, RTOL = 1e-4, 1e-3  # the validator's default tolerance


def request(seed: int = 0, rms: float = 1.0, dtype: torch.dtype = torch.float32):
    """(inputs, outputs) for one layer call: experts 0 and 3, hidden size 16, outputs of about `rms`."""
    gen = torch.Generator().manual_seed(seed)
    inputs = {0: torch.randn(4, 16, generator=gen).to(dtype), 3: torch.randn(2, 16, generator=gen).to(dtype)}
    outputs = {e: (torch.randn(x.shape, generator=gen) * rms).to(dtype) for e, x in inputs.items()}
    return inputs, outputs


def beyond_tolerance(a: dict[int, torch.Tensor], b: dict[int, torch.Tensor]) -> bool:
    """Whether some element of some expert differs by more than atol + rtol * max(|a|, |b|)."""
    assert sorted(a) == sorted(b)
    for e, t in a.items():
        x, y = t.float(), b[e].float()
        if ((x - y).abs() > ATOL + RTOL * torch.maximum(x.abs(), y.abs())).any():
            return True
    return False


def identical(a: dict[int, torch.Tensor], b: dict[int, torch.Tensor]) -> bool:
    return sorted(a) == sorted(b) and all(a[e].dtype == b[e].dtype and torch.equal(a[e], b[e]) for e in a)


def snapshot(d: dict[int, torch.Tensor]) -> dict[int, torch.Tensor]:
    return {e: t.clone() for e, t in d.items()}


def adversary(**spec) -> Adversary:
    return Adversary(AdversarySpec(**spec))


# --- honest ---------------------------------------------------------------------------------


def test_honest_returns_the_outputs_unchanged():
    adv = adversary()
    inputs, outputs = request()
    got = adv.apply(0, inputs, outputs)
    assert adv.is_honest and adv.calls == 1
    assert got is not outputs and identical(got, outputs)
    assert all(got[e] is outputs[e] for e in outputs)  # no copy needed: nothing changed


# --- perturb --------------------------------------------------------------------------------


@pytest.mark.parametrize("rms", [0.01, 0.1, 1.0])
@pytest.mark.parametrize("mode", ["perturb", "collude", "defect"])
def test_perturbing_modes_break_the_validator_tolerance_without_mutating(mode, rms):
    adv = adversary(mode=mode)
    inputs, outputs = request(rms=rms)
    before_in, before_out = snapshot(inputs), snapshot(outputs)
    got = adv.apply(2, inputs, outputs)
    assert not adv.is_honest
    assert beyond_tolerance(got, outputs)
    assert identical(inputs, before_in) and identical(outputs, before_out)
    for e in outputs:
        assert got[e].shape == outputs[e].shape and got[e].dtype == outputs[e].dtype
        # noise relative to the output: about scale * rms, not swamping it
        rel = (got[e] - outputs[e]).pow(2).mean().sqrt() / outputs[e].pow(2).mean().sqrt()
        assert rel < 0.5


def test_perturb_of_zero_output_uses_the_noise_floor():
    inputs, _ = request()
    zeros = {e: torch.zeros_like(x) for e, x in inputs.items()}
    got = adversary(mode="perturb").apply(0, inputs, zeros)
    assert beyond_tolerance(got, zeros)
    assert 0.3 * MIN_NOISE < got[0].std().item() < 3 * MIN_NOISE


def test_perturb_keeps_dtype_and_breaks_tolerance_in_bfloat16():
    inputs, outputs = request(dtype=torch.bfloat16)
    got = adversary(mode="perturb").apply(0, inputs, outputs)
    assert all(t.dtype == torch.bfloat16 for t in got.values())
    assert beyond_tolerance(got, outputs)


def test_perturb_is_repeatable_with_the_same_seed_and_varies_per_call():
    inputs, outputs = request()
    a, b, c = adversary(mode="perturb", seed=7), adversary(mode="perturb", seed=7), adversary(mode="perturb", seed=8)
    first_a, first_b, first_c = (adv.apply(1, inputs, outputs) for adv in (a, b, c))
    assert identical(first_a, first_b)
    assert not identical(first_a, first_c)
    second_a, second_b = a.apply(1, inputs, outputs), b.apply(1, inputs, outputs)
    assert identical(second_a, second_b)
    assert not identical(first_a, second_a)  # seeded from the call count too


def test_perturb_probability_zero_never_perturbs_and_partial_is_seeded():
    inputs, outputs = request()
    never = adversary(mode="perturb", probability=0.0)
    assert all(identical(never.apply(0, inputs, outputs), outputs) for _ in range(20))

    def pattern(seed: int) -> list[bool]:
        adv = adversary(mode="perturb", probability=0.5, seed=seed)
        return [not identical(adv.apply(0, inputs, outputs), outputs) for _ in range(40)]

    hits = pattern(3)
    assert hits == pattern(3)
    assert 5 < sum(hits) < 35


# --- collude --------------------------------------------------------------------------------


def test_colluders_of_one_group_agree_bit_for_bit_whatever_their_seed_or_history():
    inputs, outputs = request()
    a = adversary(mode="collude", group="cabal", seed=1)
    b = adversary(mode="collude", group="cabal", seed=2, scale=0.05)
    a.apply(5, *request(seed=9))  # a different call history must not matter
    got_a, got_b = a.apply(5, inputs, outputs), b.apply(5, inputs, outputs)
    assert identical(got_a, got_b)
    assert beyond_tolerance(got_a, outputs)
    assert identical(a.apply(5, inputs, outputs), got_a)  # same input, same wrong answer


def test_collusion_differs_across_groups_layers_and_inputs():
    inputs, outputs = request()
    base = adversary(mode="collude", group="cabal").apply(5, inputs, outputs)
    other_group = adversary(mode="collude", group="other").apply(5, inputs, outputs)
    other_layer = adversary(mode="collude", group="cabal").apply(6, inputs, outputs)
    shifted = {e: x + 1 for e, x in inputs.items()}
    other_input = adversary(mode="collude", group="cabal").apply(5, shifted, outputs)
    for got in (other_group, other_layer, other_input):
        assert beyond_tolerance(got, base)


def test_collusion_without_the_inputs_is_refused():
    inputs, outputs = request()
    with pytest.raises(ValueError, match="expert 3"):
        adversary(mode="collude").apply(0, {0: inputs[0]}, outputs)


# --- straggle -------------------------------------------------------------------------------


def test_straggle_always_sleeps_with_probability_one_and_returns_honest_outputs():
    slept: list[float] = []
    adv = Adversary(AdversarySpec(mode="straggle", delay=0.25), sleep=slept.append)
    inputs, outputs = request()
    for _ in range(3):
        assert identical(adv.apply(0, inputs, outputs), outputs)
    assert slept == [0.25, 0.25, 0.25] and adv.calls == 3


def test_straggle_by_default_only_delays_the_answer_and_blocking_holds_the_thread():
    slept: list[float] = []
    inputs, outputs = request()
    late = Adversary(AdversarySpec(mode="straggle", delay=0.25), sleep=slept.append)
    answer, delay = late.respond(0, inputs, outputs)
    assert identical(answer, outputs) and delay == 0.25 and slept == []  # the caller waits, off its compute
    blocking = Adversary(AdversarySpec(mode="straggle", delay=0.25, blocking=True), sleep=slept.append)
    answer, delay = blocking.respond(0, inputs, outputs)
    assert identical(answer, outputs) and delay == 0.0 and slept == [0.25]


def test_workers_sharing_one_config_straggle_and_perturb_independently():
    def coins(salt: str) -> list[float]:
        slept: list[float] = []
        adv = Adversary(AdversarySpec(mode="straggle", probability=0.3, delay=1.0), sleep=slept.append, salt=salt)
        return [adv.respond(0, *request())[1] for _ in range(60)]

    assert coins("worker-a") == coins("worker-a")  # repeatable per worker
    assert coins("worker-a") != coins("worker-b")  # but not in lockstep across workers
    inputs, outputs = request()
    a = Adversary(AdversarySpec(mode="perturb"), salt="worker-a").apply(0, inputs, outputs)
    b = Adversary(AdversarySpec(mode="perturb"), salt="worker-b").apply(0, inputs, outputs)
    assert beyond_tolerance(a, b)  # two perturbers never agree by accident


def test_straggle_never_sleeps_with_probability_zero():
    slept: list[float] = []
    adv = Adversary(AdversarySpec(mode="straggle", probability=0.0), sleep=slept.append)
    inputs, outputs = request()
    for _ in range(10):
        assert identical(adv.apply(0, inputs, outputs), outputs)
    assert slept == []


def test_straggle_coin_is_seeded():
    def delays(seed: int) -> int:
        slept: list[float] = []
        adv = Adversary(AdversarySpec(mode="straggle", probability=0.5, seed=seed), sleep=slept.append)
        for _ in range(40):
            adv.apply(0, *request())
        return len(slept)

    assert delays(4) == delays(4)
    assert 5 < delays(4) < 35


# --- crash ----------------------------------------------------------------------------------


def test_crash_is_honest_for_after_calls_then_exits():
    exits: list[int] = []
    adv = Adversary(AdversarySpec(mode="crash", after=2), exit=lambda: exits.append(1))
    inputs, outputs = request()
    assert identical(adv.apply(0, inputs, outputs), outputs)
    assert identical(adv.apply(0, inputs, outputs), outputs)
    assert exits == []
    with pytest.raises(AdversaryCrash):  # an exit that returns still yields no result
        adv.apply(0, inputs, outputs)
    assert exits == [1] and adv.calls == 3


def test_crash_default_exit_raises_on_first_call_when_after_is_zero():
    adv = adversary(mode="crash")
    with pytest.raises(AdversaryCrash):
        adv.apply(0, *request())


# --- defect ---------------------------------------------------------------------------------


def test_defect_is_honest_for_after_calls_then_perturbs_every_call():
    adv = adversary(mode="defect", after=3, probability=0.0)  # probability does not apply
    inputs, outputs = request()
    results = [adv.apply(0, inputs, outputs) for _ in range(6)]
    assert all(identical(r, outputs) for r in results[:3])
    assert all(beyond_tolerance(r, outputs) for r in results[3:])


# --- configuration --------------------------------------------------------------------------


def test_from_config_parses_valid_mappings():
    assert AdversarySpec.from_config(None) == AdversarySpec()
    assert AdversarySpec.from_config({}) == AdversarySpec()
    spec = AdversarySpec.from_config({"mode": "perturb", "scale": 0.05})
    assert spec.mode == "perturb" and spec.scale == 0.05
    spec = AdversarySpec.from_config({"mode": "straggle", "delay": 2, "probability": 1, "seed": 3})
    assert spec.delay == 2.0 and isinstance(spec.delay, float) and spec.probability == 1.0 and spec.seed == 3
    spec = AdversarySpec.from_config({"mode": "collude", "group": "g1", "after": 4})
    assert (spec.group, spec.after) == ("g1", 4)


def test_from_config_names_unknown_keys():
    with pytest.raises(ConfigError, match="bogus.*zeta|zeta.*bogus"):
        AdversarySpec.from_config({"mode": "perturb", "zeta": 1, "bogus": 2})


def test_from_config_names_an_unknown_mode():
    with pytest.raises(ConfigError, match="'evil'"):
        AdversarySpec.from_config({"mode": "evil"})


@pytest.mark.parametrize(
    "raw",
    [
        {"scale": 0},
        {"scale": -1.0},
        {"scale": float("nan")},
        {"probability": 1.5},
        {"probability": -0.1},
        {"delay": -1},
        {"after": -1},
        {"after": 1.5},
        {"seed": "x"},
        {"group": ""},
        {"scale": True},
        {"mode": 3},
        ["mode", "perturb"],
    ],
)
def test_from_config_rejects_bad_values(raw):
    with pytest.raises(ConfigError):
        AdversarySpec.from_config(raw)


def test_make_adversary_builds_from_config_with_injections():
    slept: list[float] = []
    adv = make_adversary({"mode": "straggle", "delay": 0.1}, sleep=slept.append)
    adv.apply(0, *request())
    assert slept == [0.1] and not adv.is_honest
    assert make_adversary(None).is_honest


def test_share_tampering_changes_every_ring_element_only_when_the_mode_says_so():
    shares = {3: torch.randint(-(2**62), 2**62, (4, 6), dtype=torch.int64)}
    defect = make_adversary({"mode": "defect", "after": 1})
    first, second = defect.tamper_shares(0, shares), defect.tamper_shares(0, shares)
    assert torch.equal(first[3], shares[3])  # honest for `after` calls
    assert second[3].dtype == torch.int64 and bool((second[3] != shares[3]).all())
    perturb = make_adversary({"mode": "perturb", "probability": 1.0, "scale": 1e-9})  # noise rounds to 0: still changed
    assert bool((perturb.tamper_shares(1, shares)[3] != shares[3]).all())
    for mode in ({"mode": "straggle", "delay": 0.1}, {"mode": "honest"}):
        assert torch.equal(make_adversary(mode).tamper_shares(0, shares)[3], shares[3])
