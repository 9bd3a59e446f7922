"""How wrong must an expert's output be to change the bundled adder's answers?

    .venv/bin/python scripts/noise_probe.py [SCALE ...]     (default: 0.05 0.3 1.0)

For each noise scale, the soak's 200 problems are answered locally twice: with the noise an
adversary adds (testing/adversary.py's perturb: N(0, scale x RMS of the output)) on the outputs
of experts 0 and 2 of every layer (half of them, as if their hosts lied on every call), and on
every expert's output. Prints how many answers differ from the honest run. The soak's
adversaries use a scale that changes answers (soak/plan.py's ADVERSARIES), so that a soak that
answers nothing wrong shows that wrong results were kept out, not that they did not matter.
"""

from __future__ import annotations

import sys

import torch

import neuro_dask as nd
from neuro_dask.demo.addition import ASSET_DIR
from neuro_dask.model.moe import LocalExpertExecutor
from neuro_dask.soak.plan import problems
from neuro_dask.testing.adversary import _noisy


def answers_with_noise(model, prompts: list[str], scale: float, lying: set[int] | None) -> list[str]:
    """The model's answers with noise on the outputs of the `lying` experts (None: all)."""
    honest = LocalExpertExecutor.run_layer

    def run_layer(self, layer, groups):
        out = honest(self, layer, groups)
        return {e: _noisy(t, scale, 1000 * layer + e) if lying is None or e in lying else t for e, t in out.items()}

    LocalExpertExecutor.run_layer = run_layer
    try:
        return model.generate_text(prompts, max_new_tokens=6)
    finally:
        LocalExpertExecutor.run_layer = honest


def main() -> int:
    scales = [float(s) for s in sys.argv[1:]] or [0.05, 0.3, 1.0]
    torch.set_num_threads(1)
    prompts = problems(0, 200)
    model = nd.load(ASSET_DIR)
    reference = model.generate_text(prompts, max_new_tokens=6)
    print(f"{len(prompts)} problems; answers that differ from the honest run:")
    for scale in scales:
        half = answers_with_noise(model, prompts, scale, {0, 2})
        every = answers_with_noise(model, prompts, scale, None)
        print(
            f"  noise {scale:g} x RMS: experts 0 and 2 of every layer {sum(a != b for a, b in zip(reference, half))}, "
            f"every expert {sum(a != b for a, b in zip(reference, every))}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
