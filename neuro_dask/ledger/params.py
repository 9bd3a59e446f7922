"""Protocol parameters: integer values, their bounds (which no vote can cross), and genesis.

Every parameter is an integer: amounts in units (policy.UNIT per NEURO), shares in basis points,
times in seconds. `neuro.ledger` in configs/neuro.yaml gives the starting values in friendlier
terms (NEURO, fractions); `LedgerConfig.from_dask_config` converts them. Governance changes the
live values stored in the ledger, always inside BOUNDS.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field

from neuro_dask.ledger.errors import ParamError
from neuro_dask.ledger.policy import BPS, UNIT

# name -> (lowest, highest): the range a vote may move the parameter in.
BOUNDS: dict[str, tuple[int, int]] = {
    "price_per_expert_token": (0, 1_000 * UNIT),
    "price_per_request": (0, 1_000_000 * UNIT),
    "price_per_private_expert_token": (0, 2_000 * UNIT),
    "treasury_bps": (0, 5_000),
    "burn_bps": (0, BPS),
    "min_stake": (0, 10_000_000 * UNIT),
    "unbonding_seconds": (0, 90 * 24 * 3600),
    "emission_initial": (0, 100_000_000 * UNIT),
    "emission_decay_bps": (0, BPS),
    "slash_bps": (0, BPS),
    "slash_correlation_bps": (0, 10 * BPS),
    "slash_max_bps": (0, BPS),
    "slash_burn_bps": (0, BPS),
    "slash_window_seconds": (0, 30 * 24 * 3600),
    "spot_check_bps": (100, BPS),  # never below 1%: no vote can switch checking off
    "min_quorum": (2, 5),
    "voting_seconds": (60, 90 * 24 * 3600),
    "gov_quorum_bps": (1_000, BPS),
    "gov_threshold_bps": (5_000, 9_000),  # at 100% nothing could pass again, not even a way back
}
# Fixed at genesis, never voted on: renumbering epochs would pay some twice and skip others.
FIXED = ("epoch_seconds",)
# Parameters the scheduler plugin hands to clients with the routes (the trust policy's knobs).
TRUST_PARAMS = ("spot_check_bps", "min_quorum")

ALLOCATIONS = ("community", "treasury", "team", "investors", "liquidity")


def check_param(name: str, value: object) -> int:
    if name not in BOUNDS:
        raise ParamError(name, value, f"unknown; governable parameters are {', '.join(sorted(BOUNDS))}")
    if isinstance(value, bool) or not isinstance(value, int):
        raise ParamError(name, value, "must be an integer (units, basis points or seconds)")
    low, high = BOUNDS[name]
    if not low <= value <= high:
        raise ParamError(name, value, f"outside its bounds [{low}, {high}], which no vote can cross")
    return value


# A proposal to adopt a model version on a channel (docs/privacy.md) is named
# "adopt:CHANNEL:MODEL_ID" with value 1; a passed one is recorded in `adoptions`, where the
# scheduler reads it and adopts the version once its experts are served.
ADOPT_PREFIX = "adopt:"
_ADOPT = re.compile(r"adopt:([A-Za-z0-9][A-Za-z0-9._-]{0,63}):([A-Za-z0-9][A-Za-z0-9._-]{0,127})")


def adoption_param(channel: str, model: str) -> str:
    param = f"{ADOPT_PREFIX}{channel}:{model}"
    check_adoption(param, 1)
    return param


def check_adoption(param: str, value: object) -> tuple[str, str]:
    """(channel, model) of a version-adoption proposal, or ParamError."""
    match = _ADOPT.fullmatch(param) if isinstance(param, str) else None
    if match is None:
        raise ParamError(param, value, "a version proposal is adopt:CHANNEL:MODEL_ID (letters, digits, '.', '_', '-')")
    if value != 1 or isinstance(value, bool):
        raise ParamError(param, value, "a version proposal's value is 1")
    return match.group(1), match.group(2)


def is_adoption(param: object) -> bool:
    return isinstance(param, str) and param.startswith(ADOPT_PREFIX)


# A treasury spend (docs/ledger.md, "The treasury moves only by vote") is named "spend:ACCOUNT"
# with the amount in units as its value, ACCOUNT a user's or a provider's spendable account; a
# passed one is paid at its tally, in the tally's transaction. Whether the account exists is the
# books' check (books.Ledger.propose): this one is the shape only.
SPEND_PREFIX = "spend:"
_SPEND = re.compile(r"spend:((?:user|provider):[^\s:][^\s]{0,199})")
MAX_SPEND = 2**62  # below what a BIGINT holds, like every other amount


def spend_param(dest: str) -> str:
    param = f"{SPEND_PREFIX}{dest}"
    check_spend(param, 1)
    return param


def check_spend(param: str, value: object) -> str:
    """The destination account of a treasury-spend proposal, or ParamError."""
    match = _SPEND.fullmatch(param) if isinstance(param, str) else None
    if match is None:
        raise ParamError(
            param,
            value,
            "a treasury spend is spend:user:NAME or spend:provider:NAME: it pays a "
            "user's or a provider's spendable account, never a locked or system one",
        )
    if isinstance(value, bool) or not isinstance(value, int) or not 0 < value < MAX_SPEND:
        raise ParamError(param, value, "a treasury spend's value is the amount: an integer of units above 0")
    return match.group(1)


def is_spend(param: object) -> bool:
    return isinstance(param, str) and param.startswith(SPEND_PREFIX)


def check_consistent(params: Mapping[str, int]) -> None:
    """Rules across parameters: stake that voted cannot leave and vote again within one vote
    (unbonding lasts at least the voting period); the private tier is never cheaper than the
    standard one (each of its calls occupies two workers, docs/privacy.md)."""
    if params.get("unbonding_seconds", 0) < params.get("voting_seconds", 0):
        raise ParamError(
            "unbonding_seconds",
            params.get("unbonding_seconds"),
            f"must be at least voting_seconds ({params.get('voting_seconds')}), so that stake "
            "cannot vote, leave and vote again within one vote",
        )
    private, standard = params.get("price_per_private_expert_token"), params.get("price_per_expert_token")
    if private is not None and standard is not None and private < standard:
        raise ParamError(
            "price_per_private_expert_token",
            private,
            f"must be at least price_per_expert_token ({standard}): a private call occupies two "
            "workers, so it never costs less than a standard one",
        )


@dataclass(frozen=True)
class Vesting:
    months: int = 48
    cliff_months: int = 12


@dataclass(frozen=True)
class LedgerConfig:
    """Genesis and starting parameters (integers throughout)."""

    max_supply: int = 1_000_000_000 * UNIT
    allocation_bps: Mapping[str, int] = field(
        default_factory=lambda: {
            "community": 4_000,
            "treasury": 2_000,
            "team": 2_000,
            "investors": 1_500,
            "liquidity": 500,
        }
    )
    emission_pool_bps: int = 7_500  # of the community allocation, set aside for provider emissions
    vesting: Mapping[str, Vesting] = field(default_factory=lambda: {"team": Vesting(), "investors": Vesting()})
    params: Mapping[str, int] = field(default_factory=lambda: dict(DEFAULT_PARAMS))

    def __post_init__(self) -> None:
        if sorted(self.allocation_bps) != sorted(ALLOCATIONS) or sum(self.allocation_bps.values()) != BPS:
            raise ParamError(
                "allocations",
                dict(self.allocation_bps),
                f"must give each of {', '.join(ALLOCATIONS)} a share, summing to 100%",
            )
        if not 0 < self.max_supply < 2**62:
            raise ParamError("max_supply", self.max_supply, "must be positive and fit a 64-bit integer")
        if not 0 <= self.emission_pool_bps <= BPS:
            raise ParamError("emission_pool_bps", self.emission_pool_bps, "must be within [0, 10000]")
        for name, value in self.params.items():
            if name in FIXED:
                if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                    raise ParamError(name, value, "must be a positive integer of seconds")
                continue
            check_param(name, value)
        check_consistent(self.params)
        missing = sorted((set(BOUNDS) | set(FIXED)) - set(self.params))
        if missing:
            raise ParamError("params", missing, "are missing")

    def allocation(self, name: str) -> int:
        """Units allocated to `name` at genesis; the rounding remainder goes to the community."""
        amounts = {n: self.max_supply * bps // BPS for n, bps in self.allocation_bps.items()}
        amounts["community"] += self.max_supply - sum(amounts.values())
        return amounts[name]

    @classmethod
    def from_dask_config(cls, raw: Mapping | None = None) -> LedgerConfig:
        """From `neuro.ledger` (NEURO amounts and fractions, as in configs/neuro.yaml)."""
        import dask.config

        import neuro_dask.settings  # noqa: F401  (registers neuro.yaml's defaults with Dask)

        raw = dict(dask.config.get("neuro.ledger", {}) if raw is None else raw)
        raw = {k.replace("_", "-"): v for k, v in raw.items()}  # Dask treats - and _ alike

        def units(key: str) -> int:
            return int(round(float(raw[key]) * UNIT))

        def bps(key: str) -> int:
            return int(round(float(raw[key]) * BPS))

        vest = raw.get("vesting", {})
        private = raw.get("price-per-private-expert-token")  # absent in configs older than the private tier
        params = {
            "price_per_expert_token": units("price-per-expert-token"),
            "price_per_request": units("price-per-request"),
            "price_per_private_expert_token": (
                units("price-per-private-expert-token") if private is not None else 2 * units("price-per-expert-token")
            ),
            "treasury_bps": bps("treasury-share"),
            "burn_bps": bps("burn-share"),
            "min_stake": units("min-stake"),
            "unbonding_seconds": int(raw["unbonding-seconds"]),
            "epoch_seconds": int(raw["epoch-seconds"]),
            "emission_initial": units("emission-initial"),
            "emission_decay_bps": bps("emission-decay"),
            "slash_bps": bps("slash-fraction"),
            "slash_correlation_bps": bps("slash-correlation"),
            "slash_max_bps": bps("slash-max-fraction"),
            "slash_burn_bps": bps("slash-burn-share"),
            "slash_window_seconds": int(raw["slash-window-seconds"]),
            "spot_check_bps": bps("spot-check"),
            "min_quorum": int(raw["min-quorum"]),
            "voting_seconds": int(raw["voting-seconds"]),
            "gov_quorum_bps": bps("vote-quorum"),
            "gov_threshold_bps": bps("vote-threshold"),
        }
        return cls(
            max_supply=units("max-supply"),
            allocation_bps={k: int(round(float(v) * BPS)) for k, v in raw["allocations"].items()},
            emission_pool_bps=bps("emission-pool-share"),
            vesting={k: Vesting(int(v["months"]), int(v["cliff-months"])) for k, v in vest.items()},
            params=params,
        )


DEFAULT_PARAMS: dict[str, int] = {
    "price_per_expert_token": UNIT // 1_000,  # 0.001 NEURO
    "price_per_request": UNIT // 100,  # 0.01 NEURO
    "price_per_private_expert_token": UNIT // 500,  # 0.002 NEURO: two share holders each do a standard call's work
    "treasury_bps": 1_000,
    "burn_bps": 2_000,
    "min_stake": 1_000 * UNIT,
    "unbonding_seconds": 7 * 24 * 3600,
    "epoch_seconds": 3600,
    "emission_initial": 30_000 * UNIT,  # x 1 / (1 - 0.9999) = the 300 M NEURO pool, over the years
    "emission_decay_bps": 9_999,
    "slash_bps": 1_000,
    "slash_correlation_bps": 10_000,
    "slash_max_bps": BPS,
    "slash_burn_bps": 5_000,
    "slash_window_seconds": 3600,
    "spot_check_bps": 500,
    "min_quorum": 2,
    "voting_seconds": 3 * 24 * 3600,
    "gov_quorum_bps": 3_300,
    "gov_threshold_bps": 5_000,
}
