"""The private tier's worker arithmetic on this machine's CPU (docs/privacy.md).

    .venv/bin/python benchmarks/bench_ring_matmul.py

Share rows x integer weights in Z_2^64 at two expert widths: torch's int64 matmul (what CPU
workers use), the float64 16-bit-limb GEMMs (what CUDA workers use; exact, checked here) and a
float32 GEMM of the same shape (the standard tier). Best of 5. The GPU numbers come from
scripts/gpu_private_check.py on a lent GPU.
"""

from __future__ import annotations

import time

import torch

from neuro_dask.privacy.fixed_point import encode, limb_exact, ring_matmul, ring_matmul_limbs


def best_ms(fn, repeat: int = 5) -> float:
    fn()
    best = float("inf")
    for _ in range(repeat):
        started = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - started)
    return 1e3 * best


def main() -> int:
    print("command: .venv/bin/python benchmarks/bench_ring_matmul.py")
    print(f"{'rows x K x N':>22} {'int64 ms':>9} {'limbs ms':>9} {'float32 ms':>11}")
    g = torch.Generator().manual_seed(0)
    for rows, k, n in [(32, 1024, 2816), (32, 4096, 3584)]:
        a = torch.randint(-(2**63), 2**63 - 1, (rows, k), generator=g, dtype=torch.int64)
        w = encode(torch.randn(k, n, generator=g) * 0.05)
        assert limb_exact(w)
        w64, x, wf = w.to(torch.float64), torch.randn(rows, k), torch.randn(k, n)
        assert torch.equal(ring_matmul_limbs(a, w64), ring_matmul(a, w))
        int64 = best_ms(lambda a=a, w=w: ring_matmul(a, w))
        limbs = best_ms(lambda a=a, w64=w64: ring_matmul_limbs(a, w64))
        float32 = best_ms(lambda x=x, wf=wf: x @ wf)
        print(f"{f'{rows} x {k} x {n}':>22} {int64:9.1f} {limbs:9.1f} {float32:11.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
