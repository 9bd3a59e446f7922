"""Several writers at once on one SQLite ledger file: 4 threads (sharing one Ledger) and 2 processes
(spawned, each with its own), doing random transfers, holds and settles among shared accounts.
Every balance check and the postings it allows must be one atomic step: afterwards the books
balance, the file is sound, and the entries are exactly the ones the writers were told succeeded."""

from __future__ import annotations

import multiprocessing
import random
import threading

import pytest

from neuro_dask.ledger import (
    IdempotencyConflictError,
    InsufficientFundsError,
    Ledger,
    provider,
    user,
)

USERS = [f"u{i}" for i in range(6)]
WORKERS = ["w0", "w1", "w2"]
FUNDING = 1_000_000
OPS = 400
T0 = 1_700_000_000.0


def _write(led: Ledger, name: str, seed: int, ops: int) -> dict:
    """`ops` random movements; returns what this writer was told: the entries it made, its refusals
    and its replays."""
    rng = random.Random(seed)
    made: list[int] = []  # entry ids of the movements acknowledged as new
    refused = replayed = 0
    transfers: list[tuple[str, str, str, int]] = []
    open_holds: list[str] = []
    seen = 0
    for i in range(ops):
        # a reader between the writes: its snapshot is consistent and never goes back in time
        snapshot = led.report()
        assert snapshot["minted"] == snapshot["balances_total"] + snapshot["burned"]
        assert snapshot["entries"] >= seen
        seen = snapshot["entries"]
        k = rng.random()
        try:
            if k < 0.45:
                src, dst = rng.sample(USERS, 2)
                idem = f"{name}-t{i}"
                amount = rng.randint(1, 2_500) if rng.random() < 0.9 else FUNDING * len(USERS)  # some overdraw
                if rng.random() < 0.05:  # spend all that was there a moment ago: races the other writers
                    amount = max(1, led.balance(user(src)))
                r = led.transfer(user(src), user(dst), amount, idem, now=T0 + i)
                transfers.append((idem, src, dst, amount))
            elif k < 0.70:
                request = f"{name}-r{i}"
                r = led.hold(rng.choice(USERS), request, rng.randint(1, 2_000), now=T0 + i)
                open_holds.append(request)
            elif k < 0.90 and open_holds:
                request = open_holds.pop(rng.randrange(len(open_holds)))
                work = {w: rng.randint(0, 5) for w in rng.sample(WORKERS, rng.randint(0, 3))}
                r = led.settle(request, rng.randint(0, 2_500), work, now=T0 + i)
            elif transfers and k < 0.95:  # a retry of an acknowledged movement: the first receipt, nothing moved
                idem, src, dst, amount = rng.choice(transfers)
                r = led.transfer(user(src), user(dst), amount, idem)
                assert r.replayed and r.entry in made
                replayed += 1
                continue
            elif transfers:  # the same id for another movement: refused
                idem, src, dst, amount = rng.choice(transfers)
                try:
                    led.transfer(user(src), user(dst), amount + 1, idem)
                except IdempotencyConflictError:
                    refused += 1
                    continue
                raise AssertionError(f"{idem} reused for another amount was accepted")
            else:
                continue
        except InsufficientFundsError:
            refused += 1
            continue
        assert not r.replayed
        made.append(r.entry)
    return {"name": name, "made": made, "refused": refused, "replayed": replayed, "open_holds": open_holds}


def _process_writer(url: str, name: str, seed: int, ops: int, ready, go, results) -> None:
    """A writer in its own (spawned) process, with its own Ledger and connection."""
    led = Ledger.open(url)
    ready.put(name)
    go.wait(120)
    try:
        results.put(_write(led, name, seed, ops))
    except BaseException as exc:  # report, so that the test fails with the reason
        results.put({"name": name, "error": repr(exc)})
    finally:
        led.close()


def test_threads_and_processes_write_one_ledger_at_once(tmp_path):
    path = tmp_path / "ledger.db"
    url = f"sqlite:///{path}"  # an absolute path: sqlite:////tmp/..., four slashes
    led = Ledger.open(url, now=T0)
    for u in USERS:
        led.open_user(u)
        led.deposit(u, FUNDING, f"fund-{u}")
    for w in WORKERS:
        led.open_provider(w, "owner")
    setup_entries = led.report()["entries"]
    with led.db.read() as cur:
        setup_max = cur.execute("SELECT MAX(id) FROM entries").scalar()
    before = led.balances()

    ctx = multiprocessing.get_context("spawn")
    ready, results, go = ctx.Queue(), ctx.Queue(), ctx.Event()
    procs = [
        ctx.Process(target=_process_writer, args=(url, f"proc{i}", 100 + i, OPS, ready, go, results)) for i in range(2)
    ]
    for p in procs:
        p.start()
    try:
        assert sorted(ready.get(timeout=120) for _ in procs) == ["proc0", "proc1"]
        barrier = threading.Barrier(4)
        outcomes: dict[str, dict] = {}

        def thread_writer(i: int) -> None:
            barrier.wait(60)
            try:
                outcomes[f"thread{i}"] = _write(led, f"thread{i}", i, OPS)
            except BaseException as exc:
                outcomes[f"thread{i}"] = {"error": repr(exc)}

        threads = [threading.Thread(target=thread_writer, args=(i,)) for i in range(4)]
        go.set()
        for t in threads:
            t.start()
        for t in threads:
            t.join(300)
            assert not t.is_alive()
        for _ in procs:
            out = results.get(timeout=300)
            outcomes[out["name"]] = out
        for p in procs:
            p.join(60)
            assert p.exitcode == 0
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
    for name, out in outcomes.items():
        assert "error" not in out, (name, out)
    assert len(outcomes) == 6

    # every writer did some of each, and met contention (refusals) on the shared accounts
    made = [e for out in outcomes.values() for e in out["made"]]
    assert all(len(out["made"]) > OPS // 4 for out in outcomes.values()), {
        n: (len(o["made"]), o["refused"]) for n, o in outcomes.items()
    }
    print(
        "writer: (entries made, refused, replayed):",
        {n: (len(o["made"]), o["refused"], o["replayed"]) for n, o in sorted(outcomes.items())},
    )
    assert sum(out["refused"] for out in outcomes.values()) > 0
    assert sum(out["replayed"] for out in outcomes.values()) > 0

    assert led.check_invariants() == []
    assert led.db.integrity_check() == "ok"
    report = led.report()
    assert report["entries"] == setup_entries + len(made)
    assert len(set(made)) == len(made)  # no two writers were told they made the same entry
    with led.db.read() as cur:
        ids = [r[0] for r in cur.execute("SELECT id FROM entries WHERE id > ? ORDER BY id", (setup_max,)).all()]
        open_holds = {r[0] for r in cur.execute("SELECT request FROM holds WHERE settled = 0").all()}
    assert ids == sorted(made)
    with led.db.read() as cur:
        order = [
            r[0]
            for r in cur.execute(
                "SELECT idem FROM entries WHERE id > ? AND idem LIKE '%-%' ORDER BY id", (setup_max,)
            ).all()
        ]
    writer_of = [idem.split(":")[-1].split("-")[0] for idem in order]
    kind_of = [w.rstrip("0123456789") for w in writer_of]
    print(
        f"entries of one writer then another's: {sum(a != b for a, b in zip(writer_of, writer_of[1:]))}; "
        f"of a thread then a process or back: {sum(a != b for a, b in zip(kind_of, kind_of[1:]))}"
    )
    assert open_holds == {r for out in outcomes.values() for r in out["open_holds"]}
    # nothing created or lost: what the users had is now with the users, in escrow, with the
    # providers, the treasury, or burned
    after = led.balances()
    moved = sum(after[user(u)] for u in USERS) + after["escrow"] + sum(after[provider(w)] for w in WORKERS)
    moved += (after["treasury"] - before["treasury"]) + (after["burn"] - before["burn"])
    assert moved == FUNDING * len(USERS)
    assert {
        n: b
        for n, b in after.items()
        if not n.startswith(("user:", "provider:")) and n not in ("escrow", "treasury", "burn")
    } == {
        n: b
        for n, b in before.items()
        if not n.startswith(("user:", "provider:")) and n not in ("escrow", "treasury", "burn")
    }
    led.close()
    # a fresh connection (as after a restart) sees the same books
    again = Ledger.open(url)
    assert again.report() == report and again.check_invariants() == []
    again.close()


@pytest.mark.parametrize("trial", range(30))
def test_concurrent_first_open_runs_genesis_once(tmp_path, trial):
    """Writers that open a new ledger file at the same moment: one genesis, one schema (and no
    "database is locked" from the switch of the new file to WAL)."""
    url = f"sqlite:///{tmp_path / 'fresh.db'}"
    barrier = threading.Barrier(8)
    errors: list[str] = []
    ledgers: list[Ledger] = []

    def opener() -> None:
        barrier.wait(60)
        try:
            ledgers.append(Ledger.open(url, now=T0))
        except BaseException as exc:
            errors.append(repr(exc))

    threads = [threading.Thread(target=opener) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert errors == []
    led = ledgers[0]
    with led.db.read() as cur:
        assert cur.execute("SELECT COUNT(*) FROM entries WHERE kind = 'genesis'").scalar() == 1
    assert led.check_invariants() == [] and led.report()["minted"] == led.report()["max_supply"]
    for each in ledgers:
        each.close()
