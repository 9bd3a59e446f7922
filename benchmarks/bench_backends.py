"""Per-expert-call latency and memory of each expert backend and precision, side by side.

    .venv/bin/python benchmarks/bench_backends.py [--quick] [--tolerance]

One Mixtral expert at a quarter width (hidden 1024, intermediate 3584; weights scaled as trained
layers are), this process, CPU unless torch/onnxruntime pick an accelerator. Runners:
  torch-float32, torch-bfloat16, int8 (weight-only, per output channel), int4 (group 64),
  onnx-cpu (weights as initializers, one graph per expert), onnx-cpu-inputs (one graph per
  shape, weights fed as inputs).
For 1, 8 and 64 rows: ms per call (median of rounds, runners interleaved within each round),
ratio to torch-float32, relative RMS error against torch-float32, and bytes per expert.
--tolerance also measures, on the golden tiny models and the bundled adder, the smallest atol
(at rtol 0.05 / 0.10) that a float32 vs reduced-precision pair needs (trust/validation.py).
Writes benchmarks/results/backends.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from neuro_dask.model.moe import ExpertWeights, run_expert
from neuro_dask.runtime.runners import prepare_expert

HIDDEN, INTERMEDIATE = 1024, 3584
ROWS = (1, 8, 64)
RESULTS = Path(__file__).resolve().parent / "results" / "backends.json"


def expert(seed: int = 0) -> ExpertWeights:
    g = torch.Generator().manual_seed(seed)
    d, i = HIDDEN, INTERMEDIATE
    return ExpertWeights(
        torch.randn(i, d, generator=g) / d**0.5,
        torch.randn(i, d, generator=g) / d**0.5,
        torch.randn(d, i, generator=g) / i**0.5,
    )


def runners(w: ExpertWeights) -> dict:
    out = {
        name: prepare_expert(w, p)
        for name, p in [
            ("torch-float32", "float32"),
            ("torch-bfloat16", "bfloat16"),
            ("int8", "int8"),
            ("int4", "int4"),
        ]
    }
    try:
        from neuro_dask.runtime.onnx_backend import onnx_expert, pick_providers

        providers = pick_providers()
        out[f"onnx-{providers[0].removesuffix('ExecutionProvider').lower()}"] = onnx_expert(w, providers)
        out["onnx-cpu-inputs"] = onnx_expert(w, ["CPUExecutionProvider"], weights_as_inputs=True)
    except Exception as exc:  # noqa: BLE001 - a benchmark reports what it could not run
        print(f"onnx skipped: {exc}", file=sys.stderr)
    return out


def time_calls(runs: dict, x: torch.Tensor, rounds: int, calls: int) -> dict[str, float]:
    samples: dict[str, list[float]] = {name: [] for name in runs}
    with torch.inference_mode():
        for f in runs.values():
            f(x)  # warm-up
        for _ in range(rounds):
            for name, f in runs.items():
                start = time.perf_counter()
                for _ in range(calls):
                    f(x)
                samples[name].append((time.perf_counter() - start) / calls * 1e3)
    return {name: statistics.median(s) for name, s in samples.items()}


def rel_rms(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).pow(2).mean().sqrt() / b.pow(2).mean().sqrt())


def latency_table(rounds: int, calls: int) -> dict:
    w = expert()
    runs = runners(w)
    g = torch.Generator().manual_seed(1)
    table: dict = {"bytes": {name: f.nbytes() for name, f in runs.items()}, "rows": {}}
    for rows in ROWS:
        x = torch.randn(rows, HIDDEN, generator=g)
        ms = time_calls(runs, x, rounds, calls)
        ref = run_expert(x, w)
        table["rows"][rows] = {
            name: {
                "ms": round(ms[name], 3),
                "vs_float32": round(ms[name] / ms["torch-float32"], 2),
                "rel_rms_error": round(rel_rms(f(x), ref), 5),
            }
            for name, f in runs.items()
        }
    return table


def tolerance_table() -> dict:
    """Smallest atol at rtol 0.05 and 0.10 for float32 vs each precision, per model (64 random rows/expert)."""
    import tempfile

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    from tiny_models import ARCHITECTURES, write_checkpoint

    from neuro_dask.cli.main import main as cli
    from neuro_dask.demo.addition import ASSET_DIR
    from neuro_dask.store.shard_store import ShardStore

    stores = {"adder": ASSET_DIR}
    tmp = Path(tempfile.mkdtemp())
    for arch in ARCHITECTURES:
        stores[arch] = tmp / f"sharded-{arch}"
        cli(["shard", str(write_checkpoint(arch, tmp / f"hf-{arch}")), str(stores[arch]), "--quiet"])
    g = torch.Generator().manual_seed(0)
    out: dict = {}
    for name, path in stores.items():
        store = ShardStore(path)
        cfg = store.config
        for precision in ("bfloat16", "int8", "int4"):
            need = {"0.05": 0.0, "0.1": 0.0, "rel_rms": 0.0, "out_rms": 0.0}
            for layer in cfg.moe_layers:
                for e in range(cfg.num_experts):
                    w = store.read_expert(layer, e)
                    x = torch.randn(64, cfg.hidden_size, generator=g)
                    ref, y = run_expert(x, w), prepare_expert(w, precision)(x)
                    big = torch.maximum(ref.abs(), y.abs())
                    for rtol in ("0.05", "0.1"):
                        need[rtol] = max(need[rtol], float(((y - ref).abs() - float(rtol) * big).max().clamp(min=0)))
                    need["rel_rms"] = max(need["rel_rms"], rel_rms(y, ref))
                    need["out_rms"] = max(need["out_rms"], float(ref.pow(2).mean().sqrt()))
            out.setdefault(name, {})[precision] = {k: round(v, 5) for k, v in need.items()}
    return out


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--tolerance", action="store_true")
    args = parser.parse_args()
    command = (
        "python benchmarks/bench_backends.py"
        + (" --quick" if args.quick else "")
        + (" --tolerance" if args.tolerance else "")
    )
    print(command)
    rounds, calls = (3, 3) if args.quick else (7, 10)
    result = {
        "command": command,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "hidden": HIDDEN,
        "intermediate": INTERMEDIATE,
        "latency": latency_table(rounds, calls),
    }
    try:
        import onnxruntime

        result["onnxruntime"] = onnxruntime.__version__
    except ImportError:
        pass
    lat = result["latency"]
    names = list(lat["bytes"])
    print(f"{'runner':18} {'bytes/expert':>13} " + " ".join(f"{f'{r} rows ms (x f32)':>22}" for r in ROWS))
    for name in names:
        cells = " ".join(
            f"{lat['rows'][r][name]['ms']:>12.3f} ({lat['rows'][r][name]['vs_float32']:>5.2f}x)   " for r in ROWS
        )
        print(f"{name:18} {lat['bytes'][name]:>13,} {cells}")
    print("relative RMS error vs float32 (64 rows):", {n: lat["rows"][64][n]["rel_rms_error"] for n in names})
    if args.tolerance:
        result["tolerance"] = tolerance_table()
        for model, per in result["tolerance"].items():
            print(model, per)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=1))
    print(f"wrote {RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
