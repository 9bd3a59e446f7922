"""Federated fine-tuning of the demo adder vs centralised training with the same number of steps.

    .venv/bin/python benchmarks/bench_federated.py [--rounds 40] [--local-steps 5] [--dask]
        [--drop-round -1] [--clip 0] [--noise 0]

Start: the bundled adder with every router and expert re-initialised (held-out accuracy ~0),
written as store version v0. Data: 4 participants, non-IID by the first operand's last digit
({0,4,8}, {1,5,9}, {2,6}, {3,7}), 2000 training problems each. Federated: `rounds` rounds of
FedAvg, `local-steps` AdamW steps of batch 64 per participant per round, secure aggregation on.
Centralised: rounds * local-steps * 4 steps of batch 64 on the union (same steps, same samples).
Trained in both: routers + experts. Accuracy: exact match on 1000 held-out problems.
"""

from __future__ import annotations

import argparse
import logging
import random
import sys
import tempfile
import time
from pathlib import Path

import torch

import neuro_dask as nd
from neuro_dask.demo.addition import ASSET_DIR, evaluate, sample_problems
from neuro_dask.federated.dp import DPSettings
from neuro_dask.federated.rounds import FederatedCoordinator, Participant
from neuro_dask.federated.training import (
    LocalSteps,
    get_flat,
    non_iid_split,
    reinitialise_moe,
    set_flat,
    train_centralised,
    write_version,
)
from neuro_dask.store.manifest import Manifest


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=40)
    ap.add_argument("--local-steps", type=int, default=5)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--per-participant", type=int, default=2000)
    ap.add_argument("--eval", type=int, default=1000)
    ap.add_argument("--drop-round", type=int, default=-1, help="participant p3 leaves mid-round in this round")
    ap.add_argument("--clip", type=float, default=0.0)
    ap.add_argument("--noise", type=float, default=0.0)
    ap.add_argument("--dask", action="store_true", help="participants as actors on an in-process LocalCluster")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(2)
    torch.manual_seed(args.seed)
    work = Path(tempfile.mkdtemp(prefix="bench-federated-"))
    eval_set = sample_problems(args.eval, random.Random(args.seed + 1), held_out=True)

    start = nd.load(ASSET_DIR)
    reinitialise_moe(start, args.seed)
    v0 = work / "v0"
    write_version(start, ASSET_DIR, v0, {"version": 0, "note": "bundled adder, routers and experts re-initialised"})
    acc0, _ = evaluate(nd.load(v0), eval_set)

    local = LocalSteps(steps=args.local_steps, batch_size=args.batch)
    dp = DPSettings(clip_norm=args.clip or None, noise_multiplier=args.noise)
    split = non_iid_split(args.per_participant, args.seed)
    ids = [f"p{k}" for k in range(len(split))]
    kwargs = dict(local=local, dp=dp, seed=args.seed)
    t0 = time.monotonic()
    cluster = client = None
    if args.dask:
        from distributed import Client, LocalCluster

        from neuro_dask.federated.dask_rounds import start_participants

        cluster = LocalCluster(n_workers=len(ids), threads_per_worker=1, processes=False, dashboard_address=None)
        client = Client(cluster)
        addrs = sorted(client.scheduler_info()["workers"])
        data = {pid: (lambda k=k: non_iid_split(args.per_participant, args.seed)[k]) for k, pid in enumerate(ids)}
        handles = start_participants(client, dict(zip(ids, addrs)), str(v0), data, drop_in_rounds=(), **kwargs)
        if args.drop_round >= 0:
            raise SystemExit("--drop-round with --dask: see tests/integration/test_federated_rounds.py")
    else:
        handles = {
            pid: Participant(pid, str(v0), split[k], drop_in_rounds=[args.drop_round] if pid == "p3" else [], **kwargs)
            for k, pid in enumerate(ids)
        }
    coord = FederatedCoordinator(handles, get_flat(start), dp=dp)
    coord.setup_keys()
    for _ in range(args.rounds):
        r = coord.run_round()
        if r.dropped:
            print(f"round {r.round_id}: dropped {r.dropped}, survivors {r.survivors}")
    fed_s = time.monotonic() - t0
    if client is not None:
        client.close()
        cluster.close()
    fed_model = nd.load(v0)
    set_flat(fed_model, coord.global_flat)
    v1 = work / f"v{args.rounds}"
    write_version(fed_model, v0, v1, {"version": 1, "rounds": args.rounds, "epsilon": coord.history[-1].epsilon})
    acc_fed, _ = evaluate(nd.load(v1), eval_set)

    central = nd.load(v0)
    total_steps = args.rounds * args.local_steps * len(ids)
    t0 = time.monotonic()
    train_centralised(central, [p for part in split for p in part], total_steps, local, random.Random(args.seed))
    central_s = time.monotonic() - t0
    acc_central, _ = evaluate(central, eval_set)

    eps = coord.history[-1].epsilon
    out = {
        "start": acc0,
        "federated": acc_fed,
        "centralised": acc_central,
        "federated_s": fed_s,
        "centralised_s": central_s,
        "epsilon": eps,
        "store": str(v1),
    }
    print(f"command: {' '.join([sys.executable, *sys.argv])}")
    print(
        f"trained: routers + experts; {len(ids)} participants non-IID by first operand's last digit; "
        f"{args.rounds} rounds x {args.local_steps} local steps x batch {args.batch}; "
        f"centralised {total_steps} steps x batch {args.batch}"
    )
    print(
        f"held-out exact match ({args.eval} problems): start {acc0:.3f}  federated {acc_fed:.3f}  "
        f"centralised {acc_central:.3f}  gap {100 * (acc_central - acc_fed):+.1f} points"
    )
    print(f"wall: federated {fed_s:.1f} s ({'dask' if args.dask else 'in-process'}), centralised {central_s:.1f} s")
    if eps is not None:
        print(
            f"DP: clip {args.clip}, noise multiplier {args.noise}: epsilon {eps:.2f} at delta 1e-5 "
            f"(RDP, {args.rounds} rounds)"
        )
    print(f"new version: {v1} (model_id {Manifest.read(v1).model_id}, parent {Manifest.read(v0).model_id})")
    return out


if __name__ == "__main__":
    main()
