"""The private tier's worker arithmetic on a CUDA GPU (run where one is lent; CI has none).

    python scripts/gpu_private_check.py OUT_DIR

For production-sized experts (Mixtral-8x7B: D=4096, I=14336; a mid-size one: D=1024, I=2816)
and 32 share rows: whether torch has an int64 matmul on CUDA; that the float64 16-bit-limb path
(neuro_dask/privacy/fixed_point.ring_matmul_limbs, what IntegerExpert uses on a CUDA worker)
equals the CPU int64 ring matmul bit for bit; and the time of each step on the GPU (limbs) and
on this machine's CPU (int64), beside a float32 expert step on the GPU (the standard tier's
arithmetic). Writes OUT_DIR/gpu_private.json.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

from neuro_dask.model.moe import ExpertWeights
from neuro_dask.privacy.fixed_point import encode, ring_matmul
from neuro_dask.runtime.private_runner import IntegerExpert


def timed(fn, repeat: int = 10, cuda: bool = False) -> float:
    fn()
    if cuda:
        torch.cuda.synchronize()
    best = float("inf")
    for _ in range(repeat):
        started = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - started)
    return 1e3 * best


def check(hidden: int, inter: int, rows: int = 32) -> dict:
    g = torch.Generator().manual_seed(hidden)
    w = ExpertWeights(
        torch.randn(inter, hidden, generator=g) * 0.02,
        torch.randn(inter, hidden, generator=g) * 0.02,
        torch.randn(hidden, inter, generator=g) * 0.02,
    )
    cpu = IntegerExpert.from_weights(w, 16, "cpu")
    gpu = IntegerExpert.from_weights(w, 16, "cuda")
    share = torch.randint(-(2**63), 2**63 - 1, (rows, hidden), generator=g, dtype=torch.int64)
    hidden_share = torch.randint(-(2**63), 2**63 - 1, (rows, inter), generator=g, dtype=torch.int64)
    out = {"hidden": hidden, "intermediate": inter, "rows": rows, "gpu_weights_dtype": str(gpu.gate_up_t.dtype)}
    out["exact_gate_up"] = torch.equal(gpu.apply("gate_up", share), cpu.apply("gate_up", share))
    out["exact_down"] = torch.equal(gpu.apply("down", hidden_share), cpu.apply("down", hidden_share))
    out["gpu_limbs_ms"] = timed(lambda: (gpu.apply("gate_up", share), gpu.apply("down", hidden_share)), cuda=True)
    out["cpu_int64_ms"] = timed(lambda: (cpu.apply("gate_up", share), cpu.apply("down", hidden_share)), repeat=3)
    x = torch.randn(rows, hidden, device="cuda")
    wf = {k: v.cuda() for k, v in w.as_dict().items()}

    def float_step():
        h = torch.nn.functional.silu(x @ wf["gate_proj"].t()) * (x @ wf["up_proj"].t())
        return h @ wf["down_proj"].t()

    out["gpu_float32_expert_ms"] = timed(float_step, cuda=True)
    a, b = share[:, :64].cuda(), encode(torch.randn(64, 8)).cuda()
    try:
        got = a @ b
        out["cuda_int64_matmul"] = bool(torch.equal(got.cpu(), ring_matmul(a.cpu(), b.cpu())))
    except RuntimeError as exc:
        out["cuda_int64_matmul"] = f"unsupported: {str(exc).splitlines()[0]}"
    return out


def main(out_dir: str) -> int:
    assert torch.cuda.is_available(), "no CUDA device"
    report = {
        "device": torch.cuda.get_device_name(0),
        "torch": torch.__version__,
        "shapes": [check(1024, 2816), check(4096, 14336)],
    }
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    (Path(out_dir) / "gpu_private.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    ok = all(
        s["exact_gate_up"] and s["exact_down"] and s["gpu_weights_dtype"] == "torch.float64" for s in report["shapes"]
    )
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1] if len(sys.argv) > 1 else "."))
