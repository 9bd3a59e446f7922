"""What hardened mode, mutual TLS, signed answers and paid tickets cost per token, side by side in one run.

    .venv/bin/python benchmarks/bench_hardened.py [--tokens 48] [--rounds 5] [--repeats 5] [--networks plain,tls]
        [--processes]

In-process networks of 3 workers serving the bundled adder, started afresh for each measurement
(rounds outside, networks inside, so that a busy moment costs every network alike), each a
greedy generation of `tokens` tokens for 4 prompts over the direct transport (a hardened network
refuses the futures transport's task graphs):
  plain           TCP, nothing hardened, answers unsigned: what a network of friends runs
  plain+signed    the same, every answer signed by its worker (what every network now does)
  hardened        TCP, hardened scheduler and workers: plain data only, role and shape checks
  tls             hardened, mutual TLS with role certificates, answers signed with the certificates' keys
  tls+ledger      tls with a NEURO ledger: a hold and a scheduler-signed ticket per request, checked by
                  every worker on every call, receipts presented and verified, the request settled
Reported: the median ms/token over the rounds and the ratio to plain; also the unit costs (sign,
verify, a cached ticket check) measured here. Results go to benchmarks/results/hardened.json.
Hardening is process-wide: it is undone after each hardened network.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))

import dask  # noqa: E402
from cluster_helpers import hardened_tls_cluster, neuro_cluster  # noqa: E402

import neuro_dask as nd  # noqa: E402
from neuro_dask.demo.addition import ASSET_DIR  # noqa: E402
from neuro_dask.runtime.receipting import Receipting  # noqa: E402

PROMPTS = ["123+456=", "999+1=", "250+250=", "31+69="]


def measure(client, tokens: int, rounds: int) -> float:
    """Median ms/token of `rounds` generations, after a short one that opens connections and routes."""
    with nd.load(ASSET_DIR, client=client) as model:
        model.generate_text(PROMPTS, max_new_tokens=4)
        times = []
        for _ in range(rounds):
            started = time.perf_counter()
            model.generate_text(PROMPTS, max_new_tokens=tokens)
            times.append((time.perf_counter() - started) / tokens * 1000)
    return statistics.median(times)


@contextlib.contextmanager
def unsigned():
    """Workers answer without a receipt (how every network ran before issue 16), in this process."""
    original = Receipting.sign
    Receipting.sign = lambda self, kind, msg, response, ticket: response
    try:
        yield
    finally:
        Receipting.sign = original


def unit_costs() -> dict[str, float]:
    from neuro_dask.security.signing import Signer, verify
    from neuro_dask.trust.receipts import Ticket, TicketChecker, issue_ticket

    signer, payload, n = Signer.generate(), b"x" * 200, 2000
    started = time.perf_counter()
    for _ in range(n):
        sig = signer.sign(payload)
    sign_us = (time.perf_counter() - started) / n * 1e6
    started = time.perf_counter()
    for _ in range(n):
        verify(signer.public_der, payload, sig)
    verify_us = (time.perf_counter() - started) / n * 1e6
    checker = TicketChecker(time.time)
    checker.set_key(signer.public_der, True)
    ticket = issue_ticket(signer, Ticket("r", "m", "alice", "alice", "standard", time.time() + 600))
    checker.check(ticket, "m", "alice")
    started = time.perf_counter()
    for _ in range(n):
        checker.check(ticket, "m", "alice")
    ticket_us = (time.perf_counter() - started) / n * 1e6
    return {"sign_us": sign_us, "verify_us": verify_us, "cached_ticket_check_us": ticket_us}


NETWORKS = ("plain", "plain+signed", "hardened", "tls", "tls+ledger")


@contextlib.contextmanager
def network(name: str, tmp: Path, ledger_url: str, processes: bool = False):
    """One of NETWORKS, started fresh: (its client). Hardening is undone after each. With
    `processes`, every worker runs in its own process (the client and scheduler in this one)."""
    from neuro_dask.security.hardening import uninstall

    try:
        if name in ("plain", "plain+signed", "hardened"):
            hardened = ["--neuro-hardened"] if name == "hardened" else []
            with (
                unsigned() if name == "plain" else contextlib.nullcontext(),
                _tcp_cluster(tmp, processes, hardened) as client,
            ):
                yield client
        elif name == "tls":
            with hardened_tls_cluster(tmp, client_role="operator", processes=processes) as (_cluster, client, _certs):
                yield client
        else:
            with (
                dask.config.set({"neuro.ledger.url": ledger_url, "neuro.client.account": "operator"}),
                hardened_tls_cluster(tmp, client_role="operator", processes=processes) as (_cluster, client, _),
            ):
                yield client
    finally:
        uninstall()


@contextlib.contextmanager
def _tcp_cluster(tmp: Path, processes: bool, hardened: list[str]):
    if not processes:
        with neuro_cluster(3, tmp_path=tmp, worker_args=hardened, scheduler_args=hardened) as (_cluster, client):
            yield client
        return
    from distributed import Client

    from neuro_dask.client.cluster import local_cluster

    with (
        dask.config.set({"neuro.worker.cache-dir": str(tmp / "cache")}),
        local_cluster(
            3,
            processes=True,
            worker_args=["--neuro-no-benchmark", *hardened],
            scheduler_args=hardened,
            dashboard_address=None,
        ) as cluster,
        Client(cluster) as client,
    ):
        client.wait_for_workers(3, timeout=120)
        yield client


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, default=48)
    parser.add_argument("--rounds", type=int, default=5, help="fresh networks of each kind")
    parser.add_argument("--repeats", type=int, default=5, help="generations measured on each network (median)")
    parser.add_argument("--networks", default=",".join(NETWORKS), help=f"a comma-separated subset of {NETWORKS}")
    parser.add_argument(
        "--processes",
        action="store_true",
        help="each worker in its own process (plain: receipts signed there, not switchable)",
    )
    args = parser.parse_args()
    chosen = [n for n in args.networks.split(",") if n]
    if args.processes and "plain+signed" in chosen:  # worker processes always sign: plain is plain+signed
        chosen.remove("plain+signed")
    unknown = sorted(set(chosen) - set(NETWORKS))
    if unknown or "plain" not in chosen:
        parser.error(
            f"--networks takes plain and any of {', '.join(NETWORKS)}; not {', '.join(unknown) or 'without plain'}"
        )
    samples: dict[str, list[float]] = {name: [] for name in chosen}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        ledger_url = f"sqlite:///{tmp / 'ledger.db'}"
        fund(ledger_url)
        with network("plain", tmp / "warm", ledger_url, args.processes) as client:  # imports, first kernels
            measure(client, 8, 1)
        # Rounds outside, networks inside: a busy moment of the machine costs every network alike.
        for r in range(args.rounds):
            for name in chosen:
                with network(name, tmp / f"{name}-{r}", ledger_url, args.processes) as client:
                    samples[name].append(measure(client, args.tokens, args.repeats))
    results = {name: statistics.median(values) for name, values in samples.items()}
    units = unit_costs()
    print(f"{'network':14s} {'direct ms/token':>16s} {'x plain':>8s}   all rounds")
    for name, ms in results.items():
        print(f"{name:14s} {ms:16.2f} {ms / results['plain']:8.2f}   {', '.join(f'{v:.2f}' for v in samples[name])}")
    print(
        f"sign {units['sign_us']:.1f} us, verify {units['verify_us']:.1f} us, "
        f"cached ticket check {units['cached_ticket_check_us']:.1f} us"
    )
    (HERE / "results").mkdir(exist_ok=True)
    out = "hardened-processes.json" if args.processes else "hardened.json"
    (HERE / "results" / out).write_text(
        json.dumps(
            {
                "args": vars(args),
                "ms_per_token": results,
                "samples": samples,
                "x_plain": {k: v / results["plain"] for k, v in results.items()},
                "unit_costs_us": units,
            },
            indent=2,
        )
    )


def fund(url: str) -> None:
    """The operator's account pays for the benchmark's requests; every worker is staked."""
    from neuro_dask.ledger import Ledger, LedgerConfig, neuro

    ledger = Ledger.open(url, LedgerConfig.from_dask_config(), now=time.time())
    try:
        ledger.open_user("operator", exist_ok=True)
        ledger.deposit("operator", neuro(100_000), "bench-operator")
        for i in range(1, 4):
            ledger.stake_from_community(f"worker-{i}", "bench", owner=f"worker-{i}")
    finally:
        ledger.close()


if __name__ == "__main__":
    main()
