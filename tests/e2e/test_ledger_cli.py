"""`neuro-dask ledger` and `neuro-dask gov` as an operator runs them: real processes, exit codes,
a SQLite file in tmp_path. Each start takes about 0.15 s: the ledger CLI imports neither torch
nor distributed (checked below)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

UNIT = 10**9
DAY = 86400
CLI = [sys.executable, "-m", "neuro_dask.cli.main"]


def run(*args, check=True, cwd=None, env=None):
    full_env = dict(os.environ, PYTHONUNBUFFERED="1")
    full_env.pop("DASK_NEURO__LEDGER__URL", None)
    full_env.update(env or {})
    proc = subprocess.run([*CLI, *map(str, args)], capture_output=True, text=True, timeout=120, env=full_env, cwd=cwd)
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}")
    return proc


def refused(*args, message: str):
    proc = run(*args, check=False)
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    assert message in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    return proc


def as_json(*args, **kwargs):
    return json.loads(run(*args, "--json", **kwargs).stdout)


def test_accounts_deposit_stake_report_history_and_refusals(tmp_path):
    db = ["--db", f"sqlite:///{tmp_path}/books.db"]  # an absolute path: sqlite:////...
    refused("ledger", "balances", *db, message="no ledger at")  # reads never create a ledger
    assert not (tmp_path / "books.db").exists()

    assert "opened user:alice" in run("ledger", "open", "alice", *db).stdout
    assert "stake:gpu1" in run("ledger", "open-provider", "gpu1", "--owner", "bob", *db).stdout
    refused("ledger", "open", "alice", *db, message="already exists")

    deposit = as_json("ledger", "deposit", "alice", "5000", *db)
    assert deposit["replayed"] is False and deposit["postings"] == [
        {"debit": "genesis:community", "credit": "user:alice", "amount": 5000 * UNIT}
    ]
    retry = run("ledger", "deposit", "alice", "5000", "--id", deposit["id"], *db).stdout
    assert "already done" in retry and "nothing moved" in retry
    run("ledger", "transfer", "user:alice", "provider:gpu1", "2000.5", *db)
    assert "stake:gpu1 holds 1,500 NEURO" in run("ledger", "stake", "gpu1", "1500", *db).stdout

    balances = as_json("ledger", "balances", "user:alice", "provider:gpu1", "stake:gpu1", *db)
    assert balances == {"user:alice": 2999_500_000_000, "provider:gpu1": 500_500_000_000, "stake:gpu1": 1500 * UNIT}
    assert as_json("ledger", "balances", "--kind", "stake", *db) == {"stake:gpu1": 1500 * UNIT}

    report = as_json("ledger", "report", *db)
    assert {
        "max_supply",
        "minted",
        "burned",
        "treasury",
        "balances_total",
        "staked_total",
        "fees",
        "rewards",
        "slashed",
    } <= set(report)
    assert all(isinstance(v, int) for v in report.values())
    assert report["max_supply"] == 1_000_000_000 * UNIT == report["minted"]
    assert report["minted"] == report["balances_total"] + report["burned"]
    assert report["staked_total"] == 1500 * UNIT

    history = as_json("ledger", "history", "user:alice", *db)
    assert [(h["kind"], h["amount"]) for h in history] == [("transfer", 2000_500_000_000), ("deposit", 5000 * UNIT)]
    text = run("ledger", "history", "user:alice", *db).stdout
    assert "+5,000 NEURO" in text and "-2,000.5 NEURO" in text and "to provider:gpu1" in text

    # Refusals: exit 2, a message on stderr, nothing moved.
    refused(
        "ledger",
        "transfer",
        "user:alice",
        "provider:gpu1",
        "3000",
        *db,
        message="user:alice holds 2,999.5 NEURO, 3,000 NEURO needed: nothing was moved",
    )
    refused("ledger", "deposit", "alice", "-5", *db, message="must be more than 0 NEURO")
    refused("ledger", "deposit", "alice", "1.0000000001", *db, message="is not a NEURO amount")
    refused("ledger", "deposit", "alice", "7", "--id", deposit["id"], *db, message="already used")
    refused("ledger", "stake", "nobody", "1", *db, message="no account 'provider:nobody'")
    assert as_json("ledger", "report", *db) == report

    supply = run("ledger", "supply", *db).stdout
    assert "max supply" in supply and "1,000,000,000 NEURO" in supply
    assert run("ledger", "check", *db).stdout.startswith("ok: 4 entries")


def test_governance_with_time_made_to_pass_then_unbonding_and_vesting(tmp_path):
    now = time.time()
    db = ["--db", f"sqlite:///{tmp_path}/books.db"]
    run("ledger", "open", "alice", *db)
    for name in ("gpu1", "gpu2"):
        run("ledger", "open-provider", name, *db)
    run("ledger", "deposit", "alice", "10000", *db)
    for name, amount in (("gpu1", 3000), ("gpu2", 1000)):
        run("ledger", "transfer", "user:alice", f"provider:{name}", amount, *db)
        run("ledger", "stake", name, amount, *db)

    refused("gov", "propose", "gpu1", "treasury_bps", "9000", *db, message="outside its bounds [0, 5000]")
    refused("gov", "propose", "alice", "treasury_bps", "1500", *db, message="alice has no stake")
    assert "treasury_bps" in run("gov", "propose", "--help").stdout  # the bounds table
    out = run("gov", "propose", "gpu1", "treasury_bps", "1500", "--id", "raise-treasury", *db).stdout
    assert out.startswith("proposal 1: treasury_bps 1000 (10%) -> 1500 (15%)")
    assert run("gov", "propose", "gpu1", "treasury_bps", "1500", "--id", "raise-treasury", *db).stdout == out

    assert "weight of 3,000 NEURO" in run("gov", "vote", "1", "gpu1", "yes", *db).stdout
    run("gov", "vote", "1", "gpu2", "no", *db)
    refused("gov", "vote", "1", "gpu2", "yes", *db, message="already voted")
    refused("gov", "tally", "1", *db, message="open to votes until")
    assert as_json("gov", "params", *db)["treasury_bps"] == {"value": 1000, "low": 0, "high": 5000}

    tally = as_json("gov", "tally", "1", "--now", now + 4 * DAY, *db)
    assert tally["status"] == "passed" and (tally["yes"], tally["no"]) == (3000 * UNIT, 1000 * UNIT)
    assert as_json("gov", "params", *db)["treasury_bps"]["value"] == 1500
    assert [(p["id"], p["status"]) for p in as_json("gov", "list", *db)] == [(1, "passed")]

    # Unbonding matures after 7 days; team and investors vest monthly after a 12-month cliff.
    run("ledger", "unstake", "gpu2", "400", *db)
    assert "nothing to release" in run("ledger", "release", *db).stdout
    released = as_json("ledger", "release", "--now", now + 8 * DAY, *db)
    assert [p for r in released for p in r["postings"]] == [
        {"debit": "unbonding:gpu2", "credit": "provider:gpu2", "amount": 400 * UNIT}
    ]
    out = run("ledger", "release", "--now", now + 400 * DAY, *db).stdout  # 13 whole 30-day months
    assert "vesting:team -> genesis:team: 54,166,666.666666666 NEURO" in out
    assert as_json("ledger", "balances", "genesis:team", *db) == {"genesis:team": 200_000_000 * UNIT * 13 // 48}
    assert "no validated work" in run("ledger", "leaderboard", *db).stdout
    check = as_json("ledger", "check", *db)
    assert check["ok"] is True and check["problems"] == []


def test_database_from_config_relative_url_and_none(tmp_path):
    env = {"DASK_NEURO__LEDGER__URL": "sqlite:///rel/books.db"}  # relative to the working directory
    run("ledger", "open", "carol", cwd=tmp_path, env=env)
    assert (tmp_path / "rel" / "books.db").exists()
    assert as_json("ledger", "balances", "user:carol", cwd=tmp_path, env=env) == {"user:carol": 0}
    refused("ledger", "supply", message="no ledger database: pass --db")


def test_ledger_commands_import_neither_torch_nor_distributed(tmp_path):
    started = time.perf_counter()
    proc = subprocess.run(
        [
            sys.executable,
            "-X",
            "importtime",
            *CLI[1:],
            "ledger",
            "open",
            "dave",
            "--db",
            f"sqlite:///{tmp_path}/books.db",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    elapsed = time.perf_counter() - started
    assert proc.returncode == 0, proc.stderr
    modules = {line.split("|")[-1].strip() for line in proc.stderr.splitlines() if line.startswith("import time:")}
    heavy = sorted(m for m in modules if m.split(".")[0] in ("torch", "distributed", "transformers", "numpy"))
    assert not heavy, heavy
    assert elapsed < 10, elapsed


def test_a_model_version_put_to_a_vote(tmp_path):
    now = time.time()
    db = ["--db", f"sqlite:///{tmp_path}/books.db"]
    run("ledger", "open-provider", "gpu1", *db)
    run("ledger", "transfer", "genesis:community", "provider:gpu1", "2000", *db)
    run("ledger", "stake", "gpu1", "2000", *db)
    refused("gov", "propose-version", "gpu1", "bad name", "mixtral-0a1b", *db, message="a version proposal is")
    out = run("gov", "propose-version", "gpu1", "adder", "mixtral-0a1b", "--id", "v2", *db).stdout
    assert out.startswith("proposal 1: adopt mixtral-0a1b as the current version of channel adder")
    run("gov", "vote", "1", "gpu1", "yes", *db)
    tally = run("gov", "tally", "1", "--now", now + 4 * DAY, *db).stdout
    assert "passed" in tally and "adopt mixtral-0a1b once it is served" in tally
    assert [(p["param"], p["status"]) for p in as_json("gov", "list", *db)] == [("adopt:adder:mixtral-0a1b", "passed")]


def test_the_treasury_moves_only_by_vote_grants_and_the_audit(tmp_path):
    now = time.time()
    db = ["--db", f"sqlite:///{tmp_path}/books.db"]
    for name in ("alice", "bob"):
        run("ledger", "open", name, *db)
    run("ledger", "open-provider", "gpu1", *db)
    run("ledger", "deposit", "alice", "100", "--id", "fund-alice", *db)
    run("ledger", "transfer", "genesis:community", "provider:gpu1", "2000", *db)
    run("ledger", "stake", "gpu1", "2000", *db)
    treasury = as_json("ledger", "balances", "treasury", *db)["treasury"]

    # The operator cannot move the treasury; a vote can, once.
    refused(
        "ledger",
        "transfer",
        "treasury",
        "user:bob",
        "5",
        *db,
        message="only through a passed spend proposal (`neuro-dask gov propose-spend PROPOSER DEST AMOUNT`",
    )
    refused("ledger", "deposit", "bob", "5", "--from", "treasury", *db, message="gov propose-spend")
    refused("gov", "propose-spend", "gpu1", "stake:gpu1", "5", *db, message="a treasury spend is spend:user:NAME")
    refused("gov", "propose-spend", "alice", "user:bob", "5", *db, message="alice has no stake")
    refused("gov", "propose", "gpu1", "spend:user:bob", "5", *db, message="`neuro-dask gov propose-spend")
    out = run("gov", "propose-spend", "gpu1", "user:bob", "250", "--id", "pay-bob", *db).stdout
    assert out.startswith("proposal 1: pay 250 NEURO from the treasury to user:bob; voting open until")
    run("gov", "vote", "1", "gpu1", "yes", *db)
    assert "#1    open      pay 250 NEURO from the treasury to user:bob by gpu1" in run("gov", "list", *db).stdout
    assert as_json("ledger", "balances", "user:bob", *db) == {"user:bob": 0}  # nothing before the tally
    tally = run("gov", "tally", "1", "--now", now + 4 * DAY, *db).stdout
    assert tally.startswith("proposal 1: passed") and "paid 250 NEURO from treasury to user:bob" in tally
    again = as_json("gov", "tally", "1", "--now", now + 5 * DAY, *db)  # a second tally pays nothing more
    assert again["status"] == "passed" and again["spent"]["amount"] == 250 * UNIT
    assert as_json("ledger", "balances", "user:bob", "treasury", *db) == {
        "user:bob": 250 * UNIT,
        "treasury": treasury - 250 * UNIT,
    }

    # A client certificate charges another user's account only while granted.
    assert "gateway may charge user:alice" in run("ledger", "grant", "alice", "gateway", "--id", "g1", *db).stdout
    assert "already done" in run("ledger", "grant", "alice", "gateway", "--id", "g1", *db).stdout
    refused("ledger", "grant", "ghost", "gateway", *db, message="no account 'user:ghost'")
    refused("ledger", "grant", "alice", "gateway", *db, message="may already charge user:alice")
    grants = as_json("ledger", "grants", "alice", *db)
    assert [(g["account"], g["client"], g["idem"]) for g in grants] == [("alice", "gateway", "g1")]
    run("ledger", "revoke", "alice", "gateway", "--id", "rv1", *db)
    assert as_json("ledger", "grants", *db) == []
    assert "no grants" in run("ledger", "grants", *db).stdout
    refused("ledger", "revoke", "alice", "gateway", *db, message="holds no grant on user:alice")

    # Everything the operator did, newest first.
    audit = as_json("ledger", "audit", *db)
    assert [r["kind"] for r in audit] == ["revoke", "grant", "treasury-spend", "stake", "transfer", "deposit"]
    assert audit[2]["accounts"] == ["treasury", "user:bob"] and audit[2]["cause"] == "proposal:1"
    text = run("ledger", "audit", "--limit", "3", *db).stdout.splitlines()
    assert len(text) == 3 and "user:alice from client gateway  [id rv1]" in text[0]
    assert "treasury -> user:bob  250 NEURO  [proposal:1, id treasury-spend:1]" in text[2]
    assert as_json("ledger", "report", *db)["treasury_spent"] == 250 * UNIT
    assert as_json("ledger", "check", *db)["ok"] is True
