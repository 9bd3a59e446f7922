"""Device check (run where a CUDA GPU is lent): a CUDA volunteer and a CPU volunteer serve the
same experts of the same models, and generation matches the all-CPU reference.

    python scripts/gpu_check.py [OUT_DIR]

For each tiny golden architecture: experts on CUDA (float32, bfloat16, int8 where the kernel
exists) against CPU float32, max |diff| of expert outputs; then an in-process Dask cluster with
one worker on `--neuro-device cuda` and one on `cpu` generating greedily, compared token for
token with the local CPU model. Writes OUT_DIR/gpu_check.json.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(ROOT / "plugins")]

import torch  # noqa: E402


def main() -> int:
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(".")
    gpu = os.environ.get("NEURO_GPU_CHECK_DEVICE", "cuda")  # "cpu" to dry-run the script here
    report: dict = {
        "torch": torch.__version__,
        "cuda": torch.cuda.is_available(),
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    print(report, flush=True)
    from tiny_models import ARCHITECTURES, build_hf_model, padded_batch

    import neuro_dask as nd
    from neuro_dask.runtime.runners import prepare_expert

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for variant in ARCHITECTURES:
            hf = build_hf_model(variant)
            hf.save_pretrained(tmp / f"hf-{variant}")
            nd.shard_checkpoint(tmp / f"hf-{variant}", tmp / variant)
            local = nd.load(tmp / variant)
            weights = local.executor.weights
            key = next(iter(weights.keys()))
            w = weights[key]
            x = torch.randn(16, w.gate_proj.shape[1])
            from neuro_dask.model.moe import run_expert

            ref = run_expert(x, w)
            diffs = {}
            for precision in ("float32", "bfloat16", "int8", "int4"):
                try:
                    runner = prepare_expert(w, precision=precision, device=gpu)
                    got = runner(x)
                    diffs[precision] = float((got.float().cpu() - ref).abs().max())
                except Exception as exc:  # a kernel this build lacks: say which
                    diffs[precision] = f"{type(exc).__name__}: {str(exc)[:160]}"
            report[f"{variant}_expert_cuda_vs_cpu_maxdiff"] = diffs
            print(variant, diffs, flush=True)

        from distributed import Client, LocalCluster

        results = {}
        for variant in ARCHITECTURES:
            ids, mask = padded_batch((5, 9, 13), seed=1)
            expected = nd.load(tmp / variant).generate(ids, mask, max_new_tokens=16)
            started = time.perf_counter()
            with (
                LocalCluster(
                    n_workers=0,
                    processes=False,
                    dashboard_address=None,
                    host="127.0.0.1",
                    protocol="tcp://",
                    scheduler_kwargs={"preload": ["neuro_scheduler"], "preload_argv": [[]]},
                ) as cluster,
                Client(cluster) as client,
            ):
                from distributed import Worker

                async def start(device, *extra):
                    return await Worker(
                        cluster.scheduler_address,
                        nthreads=1,
                        preload=["neuro_worker"],
                        preload_argv=[
                            [
                                "--neuro-no-benchmark",
                                "--neuro-device",
                                device,
                                "--neuro-cache-dir",
                                str(tmp / f"cache-{device}{len(extra)}"),
                                *extra,
                            ]
                        ],
                    )

                workers = [client.sync(start, d) for d in (gpu, "cpu")]
                with nd.load(tmp / variant, client=client) as model:
                    tokens = model.generate(ids, mask, max_new_tokens=16)
                    status = {w.address: client.sync(client.rpc(w.address).neuro_status) for w in workers}
                for w in workers:
                    client.sync(w.close)
                # An int8 volunteer on the GPU next to a float32 one on the CPU, trust on.
                import dask

                workers = [client.sync(start, gpu, "--neuro-precision", "int8"), client.sync(start, "cpu")]
                with (
                    dask.config.set({"neuro.client.trust": True, "neuro.client.spot-check": 1.0}),
                    nd.load(tmp / variant, client=client) as model,
                ):
                    mixed = model.generate(ids, mask, max_new_tokens=16)
                    model.executor.flush_reports()
                invalid = [e for _, e in client.get_events("neuro-trust") if e.get("action") == "invalid"]
                for w in workers:
                    client.sync(w.close)
            served = {s["device"]: s["calls_served"] for s in status.values()}
            new = slice(ids.shape[1], None)
            results[variant] = {
                "identical": bool(torch.equal(tokens, expected)),
                "calls_served_by_device": served,
                "int8_gpu_tokens_equal": float((mixed[:, new] == expected[:, new]).float().mean()),
                "int8_gpu_invalid_outcomes": len(invalid),
                "seconds": round(time.perf_counter() - started, 2),
            }
            print(variant, results[variant], flush=True)
        report["cluster_cuda_and_cpu_workers"] = results
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_check.json").write_text(json.dumps(report, indent=2))
    return 0 if all(r["identical"] for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
