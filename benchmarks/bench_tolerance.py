"""Where the validator's default tolerance sits: honest float differences vs a token-changing perturbation.

    .venv/bin/python benchmarks/bench_tolerance.py

One Mixtral-shaped expert at a quarter width (hidden 1024, intermediate 3584, weights scaled as
trained models are). Honest differences: float32 against a float64 reference, one row at a time
against a 64-row batch (different BLAS kernels), and 1 vs 2 threads. The smallest adversarial
perturbation the drills use is scale 0.01 x the output's RMS. Prints the largest
|a - b| - rtol * max(|a|, |b|) seen for each, against atol = 1e-4, rtol = 1e-3.
"""

from __future__ import annotations

import sys

import torch

from neuro_dask.model.moe import ExpertWeights, run_expert
from neuro_dask.trust.validation import ValidationPolicy, agree


def excess(a: torch.Tensor, b: torch.Tensor, rtol: float) -> float:
    return float(((a - b).abs() - rtol * torch.maximum(a.abs(), b.abs())).max())


def main() -> int:
    g = torch.Generator().manual_seed(0)
    d, i = 1024, 3584
    w = ExpertWeights(
        torch.randn(i, d, generator=g) / d**0.5,
        torch.randn(i, d, generator=g) / d**0.5,
        torch.randn(d, i, generator=g) / i**0.5,
    )
    x = torch.randn(64, d, generator=g)
    base = run_expert(x, w)
    ref64 = run_expert(x.double(), ExpertWeights(*(t.double() for t in w.as_dict().values()))).float()
    rows = torch.cat([run_expert(x[k : k + 1], w) for k in range(64)])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    single = run_expert(x, w)
    torch.set_num_threads(threads)
    perturbed = base + 0.01 * base.pow(2).mean().sqrt() * torch.randn(base.shape, generator=g)
    policy = ValidationPolicy()
    print(f"command: python {' '.join(sys.argv)}")
    print(f"output RMS {float(base.pow(2).mean().sqrt()):.4f}; validator atol {policy.atol}, rtol {policy.rtol}")
    for name, other in (
        ("float64 reference", ref64),
        ("row by row", rows),
        ("1 thread", single),
        ("perturbed 0.01 x RMS", perturbed),
    ):
        print(
            f"{name:22s} max |diff| {float((base - other).abs().max()):.2e}  "
            f"excess over rtol {excess(base, other, policy.rtol):+.2e}  agree: {agree({0: base}, {0: other}, policy)}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
