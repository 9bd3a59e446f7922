"""What hardened mode and mutual TLS cost per token, side by side in one run.

    .venv/bin/python benchmarks/bench_hardened.py [--tokens 48] [--rounds 3]

Three in-process networks of 3 workers serving the bundled adder, one after another in this
process, each measured for `rounds` x greedy generation of `tokens` tokens over both transports:
  plain     TCP, nothing hardened (the default of a local cluster)
  hardened  TCP, hardened scheduler and workers (allow-listed unpickling, role checks)
  tls       hardened, mutual TLS with role certificates (what `neuro-dask scheduler --tls` runs)
Reported: median ms/token and the ratio to plain. Results go to benchmarks/results/hardened.json.
Hardening is process-wide, so the plain network runs first and the hardened ones after it.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))

from cluster_helpers import hardened_tls_cluster, neuro_cluster  # noqa: E402

import neuro_dask as nd  # noqa: E402
from neuro_dask.demo.addition import ASSET_DIR  # noqa: E402

PROMPTS = ["123+456=", "999+1=", "250+250=", "31+69="]


def measure(client, tokens: int, rounds: int) -> dict[str, float]:
    out = {}
    for transport in ("direct", "futures"):
        with nd.load(ASSET_DIR, client=client, transport=transport) as model:
            model.generate_text(PROMPTS, max_new_tokens=4)  # warm: connections, routes
            times = []
            for _ in range(rounds):
                started = time.perf_counter()
                model.generate_text(PROMPTS, max_new_tokens=tokens)
                times.append((time.perf_counter() - started) / tokens * 1000)
            out[transport] = statistics.median(times)
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, default=48)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        with neuro_cluster(3, tmp_path=tmp / "plain") as (_cluster, client):
            results["plain"] = measure(client, args.tokens, args.rounds)
        (tmp / "hardened").mkdir()
        with neuro_cluster(3, tmp_path=tmp / "hardened", worker_args=["--neuro-hardened"],
                           scheduler_args=["--neuro-hardened"]) as (_cluster, client):
            results["hardened"] = measure(client, args.tokens, args.rounds)
        from neuro_dask.security.hardening import uninstall

        uninstall()
        (tmp / "tls").mkdir()
        with hardened_tls_cluster(tmp / "tls", client_role="operator") as (_cluster, client, _certs):
            results["tls"] = measure(client, args.tokens, args.rounds)
    print(f"{'network':10s} {'direct ms/token':>16s} {'x plain':>8s} {'futures ms/token':>17s} {'x plain':>8s}")
    for name, r in results.items():
        print(f"{name:10s} {r['direct']:16.2f} {r['direct'] / results['plain']['direct']:8.2f} "
              f"{r['futures']:17.2f} {r['futures'] / results['plain']['futures']:8.2f}")
    (HERE / "results").mkdir(exist_ok=True)
    (HERE / "results" / "hardened.json").write_text(json.dumps({"args": vars(args), "ms_per_token": results},
                                                               indent=2))


if __name__ == "__main__":
    main()
