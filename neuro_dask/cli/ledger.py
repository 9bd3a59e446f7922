"""`neuro-dask ledger ...` and `neuro-dask gov ...`: the NEURO books and their governance from a shell.

Every command opens the database named by `--db` (default: `neuro.ledger.url` in the Dask
config), does one thing and closes it. Amounts on the command line are NEURO as decimal strings
("12.5"); printed amounts are NEURO; `--json` prints integers of the smallest unit (10^9 per
NEURO). Refusals (`LedgerError`) reach `neuro-dask`'s main, which prints them and exits 2.

Kept light: nothing here imports torch or Dask's distributed; the ledger itself is imported
when a command runs.
"""

from __future__ import annotations

import argparse
import json
import os
import time
import uuid
from typing import Any

# Parameters that are amounts of the smallest unit (the others are basis points, seconds or counts).
_AMOUNT_PARAMS = (
    "price_per_expert_token",
    "price_per_private_expert_token",
    "price_per_request",
    "min_stake",
    "emission_initial",
)
_KINDS = (
    "user",
    "provider",
    "stake",
    "unbonding",
    "genesis",
    "vesting",
    "treasury",
    "emission",
    "escrow",
    "burn",
    "issuance",
)
# The fields of Ledger.report() that are counts (the others are amounts).
_COUNTS = ("accounts", "entries")
_NOW_HELP = "for audits and tests: the time to act at, in seconds since the epoch (default: now)"


# ---- shared plumbing ---------------------------------------------------------------------------


def _now(args: argparse.Namespace) -> float:
    return time.time() if args.now is None else args.now


def _url(args: argparse.Namespace) -> str:
    if args.db:
        return args.db
    import dask.config

    import neuro_dask.settings  # noqa: F401  (registers neuro.yaml's defaults)
    from neuro_dask.errors import ConfigError

    url = dask.config.get("neuro.ledger.url", default=None)
    if not url:
        raise ConfigError(
            "no ledger database: pass --db sqlite:///path/ledger.db (or postgresql://...) "
            "or set neuro.ledger.url (e.g. DASK_NEURO__LEDGER__URL)"
        )
    return str(url)


def _sqlite_file(url: str) -> str | None:
    """The file a SQLite URL names (as ledger/db.py reads it); None for PostgreSQL and memory."""
    if url.startswith(("postgresql://", "postgres://")):
        return None
    path = url.removeprefix("sqlite://")
    if url.startswith("sqlite://") and path.startswith("/"):
        path = path[1:]
    return None if path in ("", ":memory:") else path


def _open(args: argparse.Namespace, create: bool = False):
    """The ledger at --db. Only `ledger open` and `open-provider` create a new SQLite file:
    a mistyped path would otherwise start a second ledger (and its vesting clock) silently."""
    from neuro_dask.ledger import IdempotencyConflictError, Ledger, LedgerConfig, LedgerError
    from neuro_dask.security.redact import redact_url

    url = _url(args)
    path = _sqlite_file(url)
    if not create and path is not None and not os.path.exists(path):
        raise LedgerError(f"no ledger at {path}: `neuro-dask ledger open USER --db {redact_url(url)}` creates one")
    try:
        return Ledger.open(url, LedgerConfig.from_dask_config(), now=_now(args))
    except IdempotencyConflictError as exc:
        if exc.idem != "genesis":
            raise
        raise LedgerError(
            f"the ledger at {redact_url(url)} was created with another genesis: neuro.ledger's "
            "max-supply, allocations or emission-pool-share differ from the config now; "
            "run with the config it was created with"
        ) from None


def _amount(text: str) -> int:
    from neuro_dask.ledger import BadAmountError, neuro

    try:
        units = neuro(text)
    except ValueError:
        raise BadAmountError(text, "is not a NEURO amount: digits with at most 9 decimals, such as 12.5") from None
    if units <= 0:
        raise BadAmountError(text, "must be more than 0 NEURO")
    return units


def _n(units: int) -> str:
    from neuro_dask.ledger import format_neuro

    return f"{format_neuro(units)} NEURO"


def _emit(args: argparse.Namespace, data: Any, text: str) -> None:
    print(json.dumps(data, indent=2) if args.json else text)


def _receipt(receipt) -> dict:
    return {
        "entry": receipt.entry,
        "id": receipt.idem,
        "kind": receipt.kind,
        "replayed": receipt.replayed,
        "postings": [{"debit": p.debit, "credit": p.credit, "amount": p.amount} for p in receipt.postings],
    }


def _when(at: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(at))


def _movement(args: argparse.Namespace, receipt, what: str) -> None:
    if receipt.replayed:
        text = f"already done: entry {receipt.entry} has id {receipt.idem}; nothing moved this time"
    else:
        text = f"{what} (entry {receipt.entry}, id {receipt.idem}; pass --id {receipt.idem} to retry safely)"
    _emit(args, _receipt(receipt), text)


def _run(func):
    """Open the ledger, run `func(args, ledger)`, close it; the exit status is func's (0 if None)."""

    def command(args: argparse.Namespace) -> int:
        from neuro_dask.ledger import InsufficientFundsError, LedgerError

        ledger = _open(args, create=getattr(args, "creates", False))
        try:
            return func(args, ledger) or 0
        except InsufficientFundsError as exc:  # its message counts units; say it in NEURO
            raise LedgerError(
                f"{exc.account} holds {_n(exc.available)}, {_n(exc.needed)} needed: nothing was moved"
            ) from None
        finally:
            ledger.close()

    return command


def _duration(seconds: int) -> str:
    for size, unit in ((86400, "day"), (3600, "hour"), (60, "minute")):
        if seconds >= size:
            n = seconds / size
            return f"{n:.4g} {unit}{'' if n == 1 else 's'}"
    return f"{seconds} seconds"


def describe_param(name: str, value: int) -> str:
    """A parameter's integer value and what it means: "1500 (15%)", "259200 (3 days)"."""
    from neuro_dask.ledger import format_neuro

    if name in _AMOUNT_PARAMS:
        return f"{value} ({format_neuro(value)} NEURO)"
    if name.endswith("_bps"):
        return f"{value} ({value / 100:g}%)"
    if name.endswith("_seconds"):
        return f"{value} ({_duration(value)})"
    return str(value)


def bounds_table() -> str:
    from neuro_dask.ledger.params import BOUNDS

    lines = ["governable parameters and their bounds (no vote can cross them):"]
    for name, (low, high) in sorted(BOUNDS.items()):
        lines.append(f"  {name:<24} {describe_param(name, low)} .. {describe_param(name, high)}")
    return "\n".join(lines)


# ---- ledger commands ---------------------------------------------------------------------------


@_run
def _cmd_open(args, ledger) -> None:
    from neuro_dask.ledger import user

    opened = ledger.open_user(args.user, exist_ok=args.exist_ok)
    _emit(args, {"account": opened, "balance": ledger.balance(user(args.user))}, f"opened {opened}")


@_run
def _cmd_open_provider(args, ledger) -> None:
    from neuro_dask.ledger import provider, stake_account, unbonding_account

    ledger.open_provider(args.name, owner=args.owner or "", exist_ok=args.exist_ok)
    accounts = [provider(args.name), stake_account(args.name), unbonding_account(args.name)]
    _emit(
        args,
        {"accounts": accounts, "owner": args.owner or args.name},
        f"opened {', '.join(accounts)} (owner {args.owner or args.name})",
    )


@_run
def _cmd_deposit(args, ledger) -> None:
    from neuro_dask.ledger import user

    amount = _amount(args.amount)
    receipt = ledger.deposit(args.user, amount, args.id or str(uuid.uuid4()), source=args.source, now=_now(args))
    _movement(args, receipt, f"deposited {_n(amount)} to {user(args.user)} from {args.source}")


@_run
def _cmd_transfer(args, ledger) -> None:
    amount = _amount(args.amount)
    receipt = ledger.transfer(args.source, args.dest, amount, args.id or str(uuid.uuid4()), now=_now(args))
    _movement(args, receipt, f"moved {_n(amount)} from {args.source} to {args.dest}")


@_run
def _cmd_grant(args, ledger) -> None:
    account = args.account.removeprefix("user:")
    receipt = ledger.grant(account, args.client, _now(args), args.id or str(uuid.uuid4()))
    _movement(args, receipt, f"granted: client certificate {args.client} may charge user:{account}")


@_run
def _cmd_revoke(args, ledger) -> None:
    account = args.account.removeprefix("user:")
    receipt = ledger.revoke(account, args.client, _now(args), args.id or str(uuid.uuid4()))
    _movement(args, receipt, f"revoked: client certificate {args.client} may no longer charge user:{account}")


@_run
def _cmd_grants(args, ledger) -> None:
    rows = ledger.grants(args.account.removeprefix("user:") if args.account else None)
    lines = [
        f"user:{g['account']:<24} charged by client {g['client']:<24} since {_when(g['granted_at'])} [{g['idem']}]"
        for g in rows
    ]
    _emit(args, rows, "\n".join(lines) or "no grants: each client certificate charges only its own account")


@_run
def _cmd_audit(args, ledger) -> None:
    rows = ledger.audit(limit=args.limit)
    lines = []
    for r in rows:
        if r["client"] is not None:
            what = f"{r['accounts'][0]} {'to' if r['kind'] == 'grant' else 'from'} client {r['client']}"
        else:
            what = f"{' -> '.join(r['accounts'])}  {_n(r['amount'])}"
        cause = f"{r['cause']}, " if r["cause"] else ""
        lines.append(f"#{r['entry']:<6} {_when(r['at'])}  {r['kind']:<14} {what}  [{cause}id {r['idem']}]")
    _emit(args, rows, "\n".join(lines) or "no operator entries")


@_run
def _cmd_stake(args, ledger) -> None:
    from neuro_dask.ledger import stake_account

    amount = _amount(args.amount)
    receipt = ledger.stake(args.provider, amount, args.id or str(uuid.uuid4()), now=_now(args))
    staked = ledger.stake_of(args.provider)
    minimum = ledger.params()["min_stake"]
    note = "" if staked >= minimum else f"; below the minimum of {_n(minimum)}, the provider is not routed to"
    _movement(args, receipt, f"staked {_n(amount)}: {stake_account(args.provider)} holds {_n(staked)}{note}")


@_run
def _cmd_unstake(args, ledger) -> None:
    amount = _amount(args.amount)
    now = _now(args)
    receipt = ledger.unstake(args.provider, amount, args.id or str(uuid.uuid4()), now=now)
    until = now + ledger.params()["unbonding_seconds"]
    _movement(
        args,
        receipt,
        f"unbonding {_n(amount)} of {args.provider}'s stake: slashable until {_when(until)}, "
        "spendable after `neuro-dask ledger release` then",
    )


@_run
def _cmd_release(args, ledger) -> None:
    now = _now(args)
    receipts = list(ledger.release_unbonded(now))
    for bucket in sorted(name.split(":", 1)[1] for name in ledger.balances(kind="vesting")):
        receipt = ledger.release_vesting(bucket, now)
        if receipt is not None:
            receipts.append(receipt)
    lines = [f"{p.debit} -> {p.credit}: {_n(p.amount)}" for r in receipts for p in r.postings]
    _emit(
        args,
        [_receipt(r) for r in receipts],
        "\n".join(["released:", *lines]) if lines else f"nothing to release at {_when(now)}",
    )


@_run
def _cmd_balances(args, ledger) -> None:
    if args.accounts:
        balances = {account: ledger.balance(account) for account in args.accounts}
        if args.kind:
            kinds = ledger.balances(kind=args.kind)
            balances = {a: b for a, b in balances.items() if a in kinds}
    else:
        balances = ledger.balances(kind=args.kind)
    width = max((len(a) for a in balances), default=0)
    text = "\n".join(f"{a:<{width}}  {_n(b):>32}" for a, b in balances.items()) or "no such accounts"
    _emit(args, balances, text)


@_run
def _cmd_history(args, ledger) -> None:
    rows = ledger.history(args.account, limit=args.limit)
    lines = []
    for r in rows:
        sign = "-" if r["debit"] == args.account else "+"
        other = r["credit"] if sign == "-" else r["debit"]
        lines.append(
            f"#{r['entry']:<6} {_when(r['at'])}  {r['kind']:<9} {sign}{_n(r['amount']):<28} "
            f"{'to' if sign == '-' else 'from'} {other}  [{r['cause'] or r['idem']}]"
        )
    _emit(args, rows, "\n".join(lines) or f"{args.account}: no movements")


@_run
def _cmd_supply(args, ledger) -> None:
    r = ledger.report()
    rows = [
        ("max supply", r["max_supply"]),
        ("minted", r["minted"]),
        ("burned", r["burned"]),
        ("held in accounts", r["balances_total"]),
        ("  staked", r["staked_total"]),
        ("  unbonding", r["unbonding_total"]),
        ("  treasury", r["treasury"]),
        ("  emission pool", r["emission_pool"]),
        ("  vesting (locked)", r["vesting_locked"]),
        ("  escrow", r["escrow"]),
    ]
    _emit(args, r, "\n".join(f"{label:<20} {_n(value):>32}" for label, value in rows))


@_run
def _cmd_report(args, ledger) -> None:
    r = ledger.report()
    _emit(args, r, "\n".join(f"{k:<16} {v if k in _COUNTS else _n(v):>32}" for k, v in r.items()))


@_run
def _cmd_leaderboard(args, ledger) -> None:
    rows = ledger.leaderboard(by=args.by, limit=args.limit)
    text = "\n".join(f"{i:>3}. {name:<32} {units:>14,} expert-tokens" for i, (name, units) in enumerate(rows, 1))
    _emit(
        args,
        [{args.by: name, "expert_tokens": units} for name, units in rows],
        text or "no validated work credited yet",
    )


@_run
def _cmd_check(args, ledger) -> int:
    problems = ledger.check_invariants()
    integrity = ledger.db.integrity_check()
    if integrity != "ok":
        problems.append(f"database integrity check: {integrity}")
    entries = ledger.report()["entries"]
    text = (
        "\n".join(["problems:", *(f"  {p}" for p in problems)])
        if problems
        else f"ok: {entries} entries, the books balance, database integrity ok"
    )
    _emit(args, {"ok": not problems, "problems": problems, "entries": entries}, text)
    return 1 if problems else 0


# ---- governance commands -----------------------------------------------------------------------


def _param_value(name: str, text: str) -> int:
    from neuro_dask.ledger import ParamError
    from neuro_dask.ledger.params import BOUNDS, check_param

    try:
        value = int(text)
    except ValueError:
        bounds = f" within [{BOUNDS[name][0]}, {BOUNDS[name][1]}]" if name in BOUNDS else ""
        raise ParamError(name, text, f"must be an integer{bounds} (units, basis points or seconds)") from None
    return check_param(name, value)


@_run
def _cmd_propose(args, ledger) -> None:
    from neuro_dask.ledger import ParamError

    for prefix, command in (
        ("spend:", "propose-spend PROPOSER DEST AMOUNT"),
        ("adopt:", "propose-version PROPOSER CHANNEL MODEL_ID"),
    ):
        if args.param.startswith(prefix):
            raise ParamError(args.param, args.value, f"is not a parameter: `neuro-dask gov {command}` proposes it")
    value = _param_value(args.param, args.value)
    idem = args.id or str(uuid.uuid4())
    current = ledger.params()[args.param]
    proposal = ledger.propose(args.proposer, args.param, value, _now(args), idem)
    row = next(p for p in ledger.proposals() if p["id"] == proposal)
    _emit(
        args,
        {**row, "id_used": idem, "current": current},
        f"proposal {proposal}: {args.param} {describe_param(args.param, current)} -> "
        f"{describe_param(args.param, value)}; voting open until {_when(row['ends_at'])} "
        f"(id {idem}; pass --id {idem} to retry safely)",
    )


@_run
def _cmd_propose_version(args, ledger) -> None:
    from neuro_dask.ledger.params import adoption_param

    param = adoption_param(args.channel, args.model)
    idem = args.id or str(uuid.uuid4())
    proposal = ledger.propose(args.proposer, param, 1, _now(args), idem)
    row = next(p for p in ledger.proposals() if p["id"] == proposal)
    _emit(
        args,
        {**row, "id_used": idem},
        f"proposal {proposal}: adopt {args.model} as the current version of channel {args.channel}; voting open "
        f"until {_when(row['ends_at'])}; once passed and tallied, a scheduler with version-adoption: vote adopts "
        f"it as soon as its experts are served (id {idem}; pass --id {idem} to retry safely)",
    )


@_run
def _cmd_propose_spend(args, ledger) -> None:
    from neuro_dask.ledger.params import SPEND_PREFIX

    amount = _amount(args.amount)
    idem = args.id or str(uuid.uuid4())
    proposal = ledger.propose(args.proposer, f"{SPEND_PREFIX}{args.dest}", amount, _now(args), idem)
    row = next(p for p in ledger.proposals() if p["id"] == proposal)
    _emit(
        args,
        {**row, "id_used": idem},
        f"proposal {proposal}: pay {_n(amount)} from the treasury to {args.dest}; voting open until "
        f"{_when(row['ends_at'])}; if it passes, `neuro-dask gov tally {proposal}` pays it, once, when the treasury "
        f"holds enough (id {idem}; pass --id {idem} to retry safely)",
    )


def _proposal_text(p: dict) -> str:
    """What a proposal asks for, in words."""
    if p["param"].startswith("spend:"):
        return f"pay {_n(p['value'])} from the treasury to {p['param'].removeprefix('spend:')}"
    if p["param"].startswith("adopt:"):
        _, channel, model = p["param"].split(":", 2)
        return f"adopt {model} on channel {channel}"
    return f"{p['param']}={p['value']}"


@_run
def _cmd_vote(args, ledger) -> None:
    weight = ledger.vote(args.proposal, args.voter, args.choice == "yes", _now(args))
    _emit(
        args,
        {"proposal": args.proposal, "voter": args.voter, "yes": args.choice == "yes", "weight": weight},
        f"{args.voter} voted {args.choice} on proposal {args.proposal} with the weight of {_n(weight)} staked",
    )


@_run
def _cmd_tally(args, ledger) -> None:
    from neuro_dask.ledger import GovernanceError

    now = _now(args)
    row = next((p for p in ledger.proposals() if p["id"] == args.proposal), None)
    if row is not None and row["status"] == "open" and now < row["ends_at"]:
        raise GovernanceError(
            f"proposal {args.proposal} is open to votes until {_when(row['ends_at'])}: tally it after that"
        )
    result = ledger.tally(args.proposal, now)
    voted = result["yes"] + result["no"]
    of = f" of {_n(result['total_stake'])} staked" if "total_stake" in result else ""
    text = (
        f"proposal {result['proposal']}: {result['status']} (yes {_n(result['yes'])}, no {_n(result['no'])}, "
        f"{_n(voted)} voted{of})"
    )
    if "spent" in result:
        spent = result["spent"]
        text += f"; paid {_n(spent['amount'])} from {spent['debit']} to {spent['credit']} (entry {spent['entry']})"
    elif result["status"] == "failed":
        text += (
            f"; the treasury could not pay {_n(result['value'])} to {result['param'].removeprefix('spend:')}: "
            "nothing moved"
        )
    elif result["status"] == "passed" and result["param"].startswith("adopt:"):
        text += f"; schedulers voting on versions adopt {result['param'].split(':', 2)[2]} once it is served"
    elif result["status"] == "passed":
        text += f"; {result['param']} is {describe_param(result['param'], result['value'])}"
    _emit(args, result, text)


@_run
def _cmd_gov_list(args, ledger) -> None:
    rows = ledger.proposals()
    lines = [
        f"#{p['id']:<4} {p['status']:<9} {_proposal_text(p)} by {p['proposer']}, yes {_n(p['yes'])}, "
        f"no {_n(p['no'])}, voting until {_when(p['ends_at'])}"
        for p in rows
    ]
    _emit(args, rows, "\n".join(lines) or "no proposals")


@_run
def _cmd_gov_params(args, ledger) -> None:
    from neuro_dask.ledger.params import BOUNDS

    live = ledger.params()
    data = {
        name: {"value": value, "low": BOUNDS[name][0], "high": BOUNDS[name][1]} for name, value in sorted(live.items())
    }
    lines = [
        f"{name:<24} {describe_param(name, d['value']):<40} bounds [{d['low']}, {d['high']}]"
        for name, d in data.items()
    ]
    _emit(args, data, "\n".join(lines))


# ---- the parsers -------------------------------------------------------------------------------


def register(sub: argparse._SubParsersAction) -> None:
    """Add `ledger` and `gov` to neuro-dask's subcommands."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--db",
        metavar="URL",
        help="sqlite:///rel.db, sqlite:////abs/path.db or postgresql://... (default: neuro.ledger.url)",
    )
    common.add_argument("--json", action="store_true", help="print data as JSON (amounts in units: 10^9 per NEURO)")
    common.add_argument("--now", type=float, metavar="SECONDS", help=_NOW_HELP)

    def command(group, name: str, func, help: str, **kwargs) -> argparse.ArgumentParser:
        p = group.add_parser(name, parents=[common], help=help, description=help, **kwargs)
        p.set_defaults(func=func)
        return p

    led = sub.add_parser("ledger", help="the NEURO books: accounts, deposits, stakes, supply, audit")
    ls = led.add_subparsers(dest="ledger_command", required=True, metavar="COMMAND")

    p = command(ls, "open", _cmd_open, "open a user's account (creates the ledger and runs genesis the first time)")
    p.add_argument("user")
    p.add_argument("--exist-ok", action="store_true", help="no error when it is already open")
    p.set_defaults(creates=True)
    p = command(
        ls,
        "open-provider",
        _cmd_open_provider,
        "open a provider's spendable, stake and unbonding accounts (creates the ledger the first time)",
    )
    p.add_argument("name")
    p.add_argument("--owner", help="the person or organisation behind it (default: the name)")
    p.add_argument("--exist-ok", action="store_true", help="no error when it is already open")
    p.set_defaults(creates=True)

    idem = {
        "dest": "id",
        "metavar": "IDEM",
        "help": "idempotency id: a retry with the same id moves nothing twice (default: a new uuid, printed)",
    }
    p = command(ls, "deposit", _cmd_deposit, "fund a user from a genesis pool")
    p.add_argument("user")
    p.add_argument("amount", help="NEURO, e.g. 12.5")
    p.add_argument(
        "--from", dest="source", default="genesis:community", help="genesis:community (default) or genesis:liquidity"
    )
    p.add_argument("--id", **idem)
    p = command(
        ls,
        "transfer",
        _cmd_transfer,
        "move spendable NEURO between users, providers and genesis pools on their owners' instruction (e.g. "
        "user:alice -> provider:gpu1, so it can stake); never from the treasury: see gov propose-spend",
    )
    p.add_argument("source", help="account name, e.g. user:alice")
    p.add_argument("dest", help="account name, e.g. provider:gpu1")
    p.add_argument("amount", help="NEURO, e.g. 12.5")
    p.add_argument("--id", **idem)
    p = command(ls, "stake", _cmd_stake, "lock a provider's spendable NEURO as stake")
    p.add_argument("provider")
    p.add_argument("amount", help="NEURO, e.g. 1000")
    p.add_argument("--id", **idem)
    p = command(ls, "unstake", _cmd_unstake, "start unbonding stake (slashable until it matures)")
    p.add_argument("provider")
    p.add_argument("amount", help="NEURO")
    p.add_argument("--id", **idem)
    command(ls, "release", _cmd_release, "release matured unbondings and the vested part of team and investors")
    p = command(ls, "grant", _cmd_grant, "let a client certificate charge a user's account (on the owner's word)")
    p.add_argument("account", metavar="ACCOUNT", help="the user whose account is charged, e.g. alice")
    p.add_argument("client", metavar="CLIENT", help="the name on the client certificate, e.g. gateway")
    p.add_argument("--id", **idem)
    p = command(ls, "revoke", _cmd_revoke, "take a grant back: the client certificate no longer charges the account")
    p.add_argument("account", metavar="ACCOUNT", help="the user, e.g. alice")
    p.add_argument("client", metavar="CLIENT", help="the name on the client certificate")
    p.add_argument("--id", **idem)
    p = command(ls, "grants", _cmd_grants, "the grants in force (of one account, or all)")
    p.add_argument("account", nargs="?", metavar="ACCOUNT", help="a user, e.g. alice")

    p = command(ls, "balances", _cmd_balances, "balances of the named accounts, or of every account of a kind")
    p.add_argument("accounts", nargs="*", metavar="ACCOUNT", help="e.g. user:alice stake:gpu1 treasury")
    p.add_argument("--kind", choices=_KINDS)
    p = command(ls, "history", _cmd_history, "an account's movements, newest first")
    p.add_argument("account", help="e.g. user:alice")
    p.add_argument("--limit", type=int, default=50, help="at most this many postings (default 50)")
    command(ls, "supply", _cmd_supply, "max supply, minted, burned, and where the tokens are")
    command(ls, "report", _cmd_report, "the transparency report (--json: one object, integers of the smallest unit)")
    p = command(ls, "leaderboard", _cmd_leaderboard, "validated work (expert-tokens) by owner or by worker")
    p.add_argument("--by", choices=["owner", "worker"], default="owner")
    p.add_argument("--limit", type=int, default=20)
    command(ls, "check", _cmd_check, "audit: invariants and database integrity; exit 1 listing any problem")
    p = command(
        ls,
        "audit",
        _cmd_audit,
        "every operator-initiated entry, newest first: deposits, transfers, stakes, "
        "unstakes, grants, revokes and treasury spends",
    )
    p.add_argument("--limit", type=int, default=50, help="at most this many entries (default 50)")

    gov = sub.add_parser("gov", help="stake-weighted governance of the protocol parameters")
    gs = gov.add_subparsers(dest="gov_command", required=True, metavar="COMMAND")
    p = command(
        gs,
        "propose",
        _cmd_propose,
        "propose a new value for one parameter (staked providers only)",
        epilog=bounds_table(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("proposer", help="a provider with stake")
    p.add_argument("param", help="a governable parameter (see below)")
    p.add_argument("value", help="the raw integer value: units, basis points or seconds")
    p.add_argument("--id", dest="id", metavar="IDEM", help="idempotency id (default: a new uuid, printed)")
    p = command(
        gs,
        "propose-version",
        _cmd_propose_version,
        "propose adopting a model version on a channel (staked providers only; docs/privacy.md)",
    )
    p.add_argument("proposer", help="a provider with stake")
    p.add_argument("channel", help="the channel (as published with `neuro-dask publish --channel`)")
    p.add_argument("model", help="the candidate version's model id")
    p.add_argument("--id", dest="id", metavar="IDEM", help="idempotency id (default: a new uuid, printed)")
    p = command(
        gs,
        "propose-spend",
        _cmd_propose_spend,
        "propose paying NEURO from the treasury to a user or a provider (staked providers only); the "
        "treasury moves in no other way",
    )
    p.add_argument("proposer", help="a provider with stake")
    p.add_argument("dest", metavar="DEST", help="the account paid: user:NAME or provider:NAME")
    p.add_argument("amount", metavar="AMOUNT", help="NEURO, e.g. 250")
    p.add_argument("--id", dest="id", metavar="IDEM", help="idempotency id (default: a new uuid, printed)")
    p = command(gs, "vote", _cmd_vote, "vote with the weight of your stake (one staked token, one vote)")
    p.add_argument("proposal", type=int)
    p.add_argument("voter", help="a provider with stake")
    p.add_argument("choice", choices=["yes", "no"])
    p = command(
        gs,
        "tally",
        _cmd_tally,
        "close a proposal after its voting period; a passed change goes live, a passed treasury spend is paid",
    )
    p.add_argument("proposal", type=int)
    command(gs, "list", _cmd_gov_list, "every proposal and its status")
    command(gs, "params", _cmd_gov_params, "the live parameters and their bounds")
