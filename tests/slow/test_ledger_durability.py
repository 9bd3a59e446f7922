"""kill -9 a ledger writer at random points, 200+ times: nothing acknowledged is lost.

A writer process streams deposits, transfers, holds and settles to a SQLite ledger file and
prints each entry id right after the call returned (= acknowledged). The test kills it with
SIGKILL at seeded random moments (during start-up, between writes, inside a transaction) and
starts it again where the acknowledgements stopped, retrying the movement that was in flight
with the same id, as a client would. Afterwards every acknowledged id is in `entries`, the ids
form an unbroken sequence (none lost, none doubled), the file passes PRAGMA integrity_check and
the books balance.
"""

from __future__ import annotations

import random
import signal
import subprocess
import sys
import threading
import time

import pytest

from neuro_dask.ledger import Ledger, provider, user

pytestmark = pytest.mark.slow

KILLS = 200
SEED = 20_260_101

# Imports only neuro_dask.ledger. Movement n is a pure function of n, so that a retry after a
# kill is the same request: a replay when it had been written, a fresh entry when it had not.
WRITER = r"""
import sys
from neuro_dask.ledger import Ledger, user

url, n = sys.argv[1], int(sys.argv[2])
led = Ledger.open(url)
print("READY", "torch" in sys.modules, flush=True)
while True:
    idem = f"w-{n}"
    step = n % 4
    if step == 0:
        r = led.deposit("a", 1 + n % 7, idem, now=float(n))
    elif step == 1:
        r = led.transfer(user("a"), user("b"), 1 + n % 5, idem, now=float(n))
    elif step == 2:
        r = led.hold("b", idem, 10 + n % 3, now=float(n))
    else:
        r = led.settle(f"w-{n - 1}", 7, {"p": 1 + n % 2}, now=float(n))
    print(idem, int(r.replayed), flush=True)
    n += 1
"""


def _reader(stream, lines: list[str], first: threading.Event) -> None:
    for line in stream:
        if line.endswith("\n"):  # a whole line: printed after the call returned
            lines.append(line.rstrip("\n"))
            first.set()
    first.set()  # the end of the stream: the writer died


def _movement(idem: str) -> int:
    """The writer's movement number behind an entry id (holds and settles are named by request)."""
    kind, _, rest = idem.rpartition(":")
    n = int(rest.removeprefix("w-"))
    return n + 1 if kind == "settle" else n


def _check(url: str) -> Ledger:
    led = Ledger.open(url)
    assert led.db.integrity_check() == "ok"
    assert led.check_invariants() == []
    return led


def test_sigkill_loses_nothing_acknowledged(tmp_path):
    url = f"sqlite:///{tmp_path / 'ledger.db'}"
    led = Ledger.open(url, now=0.0)
    for name in ("a", "b"):
        led.open_user(name)
        led.deposit(name, 10**9, f"fund-{name}")
    led.open_provider("p")
    led.close()

    rng = random.Random(SEED)
    started = time.monotonic()
    acked: list[int] = []
    replays_after_restart = 0
    kills = during_startup = 0
    while kills < KILLS:
        start = acked[-1] + 1 if acked else 0  # retry the one in flight when the last writer died
        proc = subprocess.Popen(
            [sys.executable, "-c", WRITER, url, str(start)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        lines: list[str] = []
        first = threading.Event()
        reader = threading.Thread(target=_reader, args=(proc.stdout, lines, first))
        reader.start()
        try:
            if rng.random() < 0.2:  # somewhere in start-up: the import, the open, the first write
                time.sleep(rng.uniform(0.0, 0.2))  # a random kill point, not synchronisation
                during_startup += 1
            else:
                assert first.wait(60), "the writer did not start"
                time.sleep(rng.uniform(0.0, 0.03))  # a random kill point, not synchronisation
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait(30)
            reader.join(30)
            stderr = proc.stderr.read()
            proc.stderr.close()
        assert proc.returncode == -signal.SIGKILL, f"the writer ended on its own: {stderr}"
        kills += 1
        if lines:
            ready, *writes = lines
            assert ready == "READY False", f"the writer imported torch (or never started): {ready}"
            for i, line in enumerate(writes):
                idem, replayed = line.split()
                n = int(idem.removeprefix("w-"))
                assert n == (acked[-1] + 1 if acked else 0), (line, acked[-1:])  # in order, none skipped
                acked.append(n)
                if replayed == "1":
                    # only the retry of the movement in flight at the last kill can be a replay
                    assert i == 0, line
                    replays_after_restart += 1
        if kills % 25 == 0:
            _check(url).close()
    elapsed = time.monotonic() - started

    led = _check(url)
    with led.db.read() as cur:
        written = sorted(
            _movement(r[0])
            for r in cur.execute(
                "SELECT idem FROM entries WHERE idem LIKE 'w-%' OR idem LIKE 'hold:w-%' OR idem LIKE 'settle:w-%'"
            ).all()
        )
        holds = cur.execute("SELECT COUNT(*) FROM holds").scalar()
        settled = cur.execute("SELECT COUNT(*) FROM holds WHERE settled = 1").scalar()
    assert acked, "no write was ever acknowledged"
    # every acknowledged id was written; nothing beyond, except perhaps the one in flight at the
    # last kill (written, never acknowledged); no gaps, no duplicates
    assert written[: len(acked)] == acked == list(range(len(acked)))
    assert written in (acked, acked + [len(acked)])
    assert holds == sum(1 for n in written if n % 4 == 2)
    assert settled == sum(1 for n in written if n % 4 == 3)
    report = led.report()
    assert report["minted"] == report["max_supply"]
    assert led.balance(provider("p")) > 0 and led.balance(user("b")) > 0
    led.close()
    print(
        f"{kills} kills ({during_startup} during start-up), {len(acked)} acknowledged writes, "
        f"{replays_after_restart} retries found already written, in {elapsed:.1f} s"
    )
