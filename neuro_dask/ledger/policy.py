"""The NEURO economy's rules as pure integer arithmetic: no database, no clock, no floats.

Amounts are integers of the smallest unit (`UNIT` of them make one NEURO); shares are basis
points (1/10,000). Every rule here says exactly where an integer remainder goes, so that
splits add up to the amount split, to the unit.

Rules:
  1. Fee split: treasury = fee x treasury_bps // 10,000; burn = treasury x burn_bps // 10,000
     (burned out of the treasury's share); providers share fee - treasury in proportion to
     their validated work, each rounded down; what rounding leaves goes to the treasury, as
     does the providers' part when no provider did validated work.
  2. Emissions: epoch e pays initial x (decay_bps / 10,000)^e, rounded down, never more than
     what is left in the emission pool; split among providers like rule 1's providers' part,
     rounding remainders staying in the pool.
  3. Vesting: nothing before the cliff; then total x elapsed_months // months, all of it from
     the last month on. Months are 30-day months of seconds since the start.
  4. Slashing: base_bps of the slashable stake, times (1 + correlation x (others caught in
     the window)), capped at max_bps; burn_bps of the slashed amount is burned, the rest goes
     to the treasury.
  5. Governance tally: passes when the staked weight that voted is at least quorum_bps of all
     stake and the yes weight is more than threshold_bps of the weight that voted.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

UNIT = 10**9  # smallest units per NEURO: 10^9 x the default 10^9 supply still fits a signed 64-bit integer
BPS = 10_000
MONTH = 30 * 24 * 3600
# A private-tier (token, expert) is computed on two secret shares in two steps (gate/up, then
# down), by two workers each: four share-rows, which the scheduler counts from the workers' signed
# receipts, one per worker and step.
SHARE_ROWS_PER_PRIVATE_TOKEN = 4
TIERS = ("standard", "private")


def neuro(amount: int | str) -> int:
    """Whole NEURO to units (an int, or a decimal string such as "0.5")."""
    if isinstance(amount, int) and not isinstance(amount, bool):
        return amount * UNIT
    whole, _, frac = str(amount).partition(".")
    if not whole.lstrip("-").isdigit() or (frac and (not frac.isdigit() or len(frac) > 9)):
        raise ValueError(f"{amount!r} is not a NEURO amount (digits, at most 9 decimals)")
    sign = -1 if whole.startswith("-") else 1
    return sign * (abs(int(whole)) * UNIT + int(frac.ljust(9, "0") or 0))


def format_neuro(units: int) -> str:
    sign = "-" if units < 0 else ""
    whole, frac = divmod(abs(units), UNIT)
    return f"{sign}{whole:,}" + (f".{frac:09d}".rstrip("0") if frac else "")


@dataclass(frozen=True)
class FeeSplit:
    providers: dict[str, int]
    treasury: int  # after the burn
    burn: int

    @property
    def total(self) -> int:
        return sum(self.providers.values()) + self.treasury + self.burn


def _pro_rata(pool: int, work: Mapping[str, int]) -> dict[str, int]:
    total = sum(w for w in work.values() if w > 0)
    if pool <= 0 or total <= 0:
        return {}
    shares = {p: pool * w // total for p, w in sorted(work.items()) if w > 0}
    return {p: a for p, a in shares.items() if a > 0}


def split_fee(fee: int, work: Mapping[str, int], treasury_bps: int, burn_bps: int) -> FeeSplit:
    """Rule 1. `work`: provider -> validated work units (expert-tokens) in the job."""
    treasury = fee * treasury_bps // BPS
    burn = treasury * burn_bps // BPS
    providers = _pro_rata(fee - treasury, work)
    leftover = fee - treasury - sum(providers.values())
    return FeeSplit(providers, treasury - burn + leftover, burn)


def emission_for_epoch(epoch: int, initial: int, decay_bps: int, pool: int) -> int:
    """Rule 2: the epoch's emission, before the split; never more than the pool holds."""
    amount = initial
    for _ in range(epoch):
        amount = amount * decay_bps // BPS
        if amount == 0:
            break
    return max(0, min(amount, pool))


def split_emission(amount: int, work: Mapping[str, int]) -> dict[str, int]:
    """Rule 2's split; whatever is not paid out stays in the pool."""
    return _pro_rata(amount, work)


def vested(total: int, start: float, now: float, months: int, cliff_months: int) -> int:
    """Rule 3: how much of `total` has vested by `now`."""
    if months <= 0:
        return total
    elapsed = int(max(0.0, now - start) // MONTH)
    if elapsed < cliff_months:
        return 0
    return total if elapsed >= months else total * elapsed // months


def slash_bps(base_bps: int, others_caught: int, correlation_bps: int, max_bps: int) -> int:
    """Rule 4: the fraction (bps) of stake slashed when `others_caught` providers were slashed
    in the same window: coordinated fraud costs each of its members more."""
    return min(max_bps, base_bps + base_bps * correlation_bps * max(0, others_caught) // BPS)


def split_slash(amount: int, burn_bps: int) -> tuple[int, int]:
    """Rule 4: (to treasury, burned)."""
    burn = amount * burn_bps // BPS
    return amount - burn, burn


@dataclass(frozen=True)
class Tally:
    yes: int
    no: int
    total_stake: int
    passed: bool
    quorum_met: bool


def tally(yes: int, no: int, total_stake: int, quorum_bps: int, threshold_bps: int) -> Tally:
    """Rule 5."""
    voted = yes + no
    quorum_met = total_stake > 0 and voted * BPS >= quorum_bps * total_stake
    passed = quorum_met and voted > 0 and yes * BPS > threshold_bps * voted
    return Tally(yes, no, total_stake, passed, quorum_met)
