"""Local training of a participant and the model plumbing of federated rounds (torch, no Dask).

What is trained: the router of every MoE layer and every routed expert (gate, up, down). The
embeddings, attention, norms and lm_head stay as the base version has them. The flat parameter
vector, in `trainable_names` order, is what travels: the global vector out to participants, one
update (delta = after local steps - before) back, masked.

Shape legend: P trainable parameters.
"""

from __future__ import annotations

import json
import random
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from neuro_dask.demo.addition import Problem, sample_problems
from neuro_dask.demo.train import _balance_loss, _encode
from neuro_dask.model.generation import Batch
from neuro_dask.model.model import MoEModel
from neuro_dask.model.moe import ExpertWeights
from neuro_dask.store.manifest import ROLE_EXPERT, ROLE_TRUNK, Manifest, expert_path
from neuro_dask.store.safetensors_io import StreamingWriter
from neuro_dask.store.sharder import TRUNK_PATH

TRAINED = "router of every MoE layer + every routed expert (gate_proj, up_proj, down_proj); the rest frozen"
VERSION_FILE = "federation.json"


@dataclass(frozen=True)
class LocalSteps:
    """A participant's local training per round (a fresh AdamW each round: no optimizer state
    outlives a round, so nothing but the update leaves or persists)."""

    steps: int = 10
    batch_size: int = 64
    lr: float = 3e-3
    aux_loss: float = 0.01


def trainable_tensors(model: MoEModel) -> dict[str, torch.Tensor]:
    """name -> the live tensor, in a fixed order (MoE layers ascending, router then experts)."""
    out: dict[str, torch.Tensor] = {}
    for layer in model.config.moe_layers:
        out[f"layers.{layer}.router.weight"] = model.trunk.layers[layer].router.weight
        for e in range(model.config.num_experts):
            for name, t in model.executor.weights[(layer, e)].as_dict().items():
                out[f"experts.{layer}.{e}.{name}"] = t
    return out


def get_flat(model: MoEModel) -> np.ndarray:
    """[P] float32 copy of the trainable parameters."""
    return torch.cat([t.detach().reshape(-1) for t in trainable_tensors(model).values()]).float().numpy().copy()


def set_flat(model: MoEModel, flat: np.ndarray) -> None:
    vec = torch.as_tensor(np.asarray(flat), dtype=torch.float32)
    tensors = trainable_tensors(model)
    total = sum(t.numel() for t in tensors.values())
    if vec.numel() != total:
        raise ValueError(f"parameter vector has {vec.numel()} values, the model trains {total}")
    offset = 0
    with torch.no_grad():
        for t in tensors.values():
            t.copy_(vec[offset : offset + t.numel()].view_as(t).to(t.dtype))
            offset += t.numel()


def prepare_for_training(model: MoEModel) -> list[torch.Tensor]:
    """Freeze everything, then make the trainable tensors leaves that require grad."""
    for p in model.trunk.parameters():
        p.requires_grad_(False)
    params = []
    for t in trainable_tensors(model).values():
        t.requires_grad_(True)
        params.append(t)
    return params


class LocalTrainer:
    """Runs `LocalSteps` on one model in place; reused across rounds on one participant."""

    def __init__(self, model: MoEModel, settings: LocalSteps):
        self.model, self.settings = model, settings
        self.params = prepare_for_training(model)
        self.captured: list[torch.Tensor] = []
        for layer in model.config.moe_layers:
            model.trunk.layers[layer].router.register_forward_hook(lambda _m, _i, out: self.captured.append(out))
        self.optimizer: torch.optim.Optimizer | None = None

    def step(self, problems: Sequence[Problem]) -> float:
        cfg, s = self.model.config, self.settings
        batch, loss_mask = _encode(self.model.tokenizer, problems, cfg.eos_token_id[0], cfg.pad_token_id)
        self.captured.clear()
        self.model.trunk.train()
        logits = self.model._forward_logits(Batch(batch.ids[:, :-1], batch.mask[:, :-1]))
        target = batch.ids[:, 1:]
        lm = F.cross_entropy(logits[loss_mask[:, 1:]], target[loss_mask[:, 1:]])
        loss = lm + s.aux_loss * _balance_loss(self.captured, cfg.num_experts_per_tok)
        assert self.optimizer is not None
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.optimizer.step()
        self.model.trunk.eval()
        return float(lm.item())

    def fresh_optimizer(self) -> None:
        self.optimizer = torch.optim.AdamW(self.params, lr=self.settings.lr, weight_decay=0.01, betas=(0.9, 0.98))

    def local_update(self, global_flat: np.ndarray, data: Sequence[Problem], rng: random.Random) -> np.ndarray:
        """Start from the global parameters, take `steps` AdamW steps on mini-batches of `data`,
        return the update [P] (float64)."""
        set_flat(self.model, global_flat)
        self.fresh_optimizer()
        for _ in range(self.settings.steps):
            self.step(rng.choices(data, k=self.settings.batch_size))
        return get_flat(self.model).astype(np.float64) - np.asarray(global_flat, dtype=np.float64)


def evaluate_model(model: MoEModel, problems: Sequence[Problem], batch_size: int = 256) -> dict[str, float]:
    """How well `model` adds: {"loss": mean cross-entropy per answer token (the answer's digits and
    its EOS, as the participants train it), "accuracy": greedy exact match}, on `problems`
    (held-out ones, to measure generalisation)."""
    from neuro_dask.demo.addition import evaluate

    cfg = model.config
    total, tokens = 0.0, 0
    with torch.inference_mode():
        for start in range(0, len(problems), batch_size):
            chunk = problems[start : start + batch_size]
            batch, loss_mask = _encode(model.require_tokenizer(), chunk, cfg.eos_token_id[0], cfg.pad_token_id)
            logits = model._forward_logits(Batch(batch.ids[:, :-1], batch.mask[:, :-1]))
            scored = loss_mask[:, 1:]
            total += float(F.cross_entropy(logits[scored].float(), batch.ids[:, 1:][scored], reduction="sum"))
            tokens += int(scored.sum())
    accuracy, _ = evaluate(model, list(problems), batch_size)
    return {"loss": total / max(tokens, 1), "accuracy": float(accuracy)}


def evaluator(model: MoEModel, problems: Sequence[Problem]) -> Callable[[np.ndarray], dict[str, float]]:
    """For `run_federated(..., evaluate=...)`: loads each round's global vector into `model` (a
    local copy in the coordinator's process) and returns `evaluate_model` on `problems`."""

    def measure(global_flat: np.ndarray) -> dict[str, float]:
        set_flat(model, global_flat)
        return evaluate_model(model, problems)

    return measure


# ---- the data of the acceptance experiment -----------------------------------------------------

NON_IID_DIGITS = ((0, 4, 8), (1, 5, 9), (2, 6), (3, 7))


def non_iid_split(
    n_per_participant: int, seed: int, digits: Sequence[Sequence[int]] = NON_IID_DIGITS
) -> list[list[Problem]]:
    """Training problems (never held-out ones) for each participant: participant k sees only
    problems whose first operand ends in one of digits[k]."""
    out = []
    for k, allowed in enumerate(digits):
        rng = random.Random(seed * 1000 + k)
        local: list[Problem] = []
        while len(local) < n_per_participant:
            local += [p for p in sample_problems(4 * n_per_participant, rng, held_out=False) if p.a % 10 in allowed]
        out.append(local[:n_per_participant])
    return out


def reinitialise_moe(model: MoEModel, seed: int, std: float = 0.02) -> None:
    """The deliberately under-trained start: routers and experts redrawn from N(0, std^2)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for t in trainable_tensors(model).values():
            t.copy_(torch.randn(t.shape, generator=g) * std)


def train_centralised(
    model: MoEModel,
    data: Sequence[Problem],
    total_steps: int,
    settings: LocalSteps,
    rng: random.Random,
    progress: Callable[[int, float], None] | None = None,
) -> None:
    """The baseline: one optimizer, `total_steps` steps on the union of the participants' data."""
    trainer = LocalTrainer(model, settings)
    trainer.fresh_optimizer()
    for step in range(total_steps):
        loss = trainer.step(rng.choices(data, k=settings.batch_size))
        if progress:
            progress(step, loss)


# ---- a round's result as a new model version in the store ----------------------------------------


def write_version(model: MoEModel, base: str | Path, out: str | Path, info: dict) -> Manifest:
    """Write `model` as a new sharded version at `out`: the base store's tokenizer files copied,
    a new trunk file and new expert files with their sha256, a new manifest.json (written last),
    and `federation.json` beside it naming the parent version (the Manifest has no free-form
    fields and its reader drops unknown keys, so the lineage lives in this sidecar and the
    folder name)."""
    base, out = Path(base), Path(out)
    parent = Manifest.read(base)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    artifacts = []
    trunk_state = model.trunk.state_dict()
    expected = model.trunk.expected_tensors()
    tensors = {name: trunk_state[name].detach().float().contiguous() for name in expected}
    artifacts.append(_write_file(out, TRUNK_PATH, tensors, parent.trunk, ROLE_TRUNK))
    for a in parent.experts:
        w: ExpertWeights = model.executor.weights[(a.layer, a.expert)]
        tensors = {k: v.detach().float().contiguous() for k, v in w.as_dict().items()}
        artifacts.append(_write_file(out, expert_path(a.layer, a.expert), tensors, a, ROLE_EXPERT))
    for a in parent.artifacts:
        if a.role not in (ROLE_TRUNK, ROLE_EXPERT):
            (out / a.path).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(base / a.path, out / a.path)
            artifacts.append(a)
    manifest = Manifest(
        architecture=parent.architecture,
        config=parent.config,
        artifacts=tuple(artifacts),
        generation_config=parent.generation_config,
        tokenizer_files=parent.tokenizer_files,
        source=f"federated from {parent.model_id}",
    )
    (out / VERSION_FILE).write_text(
        json.dumps(
            {
                "parent": parent.model_id,
                "parent_path": str(base),
                "model_id": manifest.model_id,
                "trained": TRAINED,
                **info,
            },
            indent=1,
        )
    )
    manifest.write(out)
    return manifest


def _write_file(out: Path, rel: str, tensors: dict[str, torch.Tensor], like, role: str):
    from dataclasses import replace

    writer = StreamingWriter(
        out / rel, [(k, v.dtype, tuple(v.shape)) for k, v in tensors.items()], metadata={"format": "pt", "role": role}
    )
    writer.write(iter(tensors.values()))
    return replace(like, sha256=writer.sha256, bytes=writer.bytes, dtype="F32")
