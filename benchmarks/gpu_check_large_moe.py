"""gpt-oss-120b's shapes on neuro_dask: a GPU check (--gpu) and a projection from CPU costs (--project).

    .venv/bin/python benchmarks/gpu_check_large_moe.py --project [--quick]
    .venv/bin/python benchmarks/gpu_check_large_moe.py --gpu [--workers 4] [--budget-s 450]
    .venv/bin/python benchmarks/gpu_check_large_moe.py --gpu --shape tiny --device cpu --out /tmp/x.json   # CPU test

The model shape ("full"): openai/gpt-oss-120b as transformers 5.24's GptOssConfig defaults describe it
(they are that model's): 36 layers alternating sliding (128) and full attention, 64 query / 8 KV heads
of 64, hidden 2880, vocabulary 201,088, YaRN RoPE; 128 experts a layer, top-4, expert intermediate
2880 with gpt-oss's clamped SwiGLU (biases, interleaved gate/up); experts in MXFP4 as published
(config.json quantization_config {"quant_method": "mxfp4", ...}), everything else bfloat16. "tiny" is
the same architecture at hidden 64 (2 layers, 8 experts, top-4, vocabulary 256) for CPU tests.

THE SYNTHETIC STORE (both modes). A transformers-layout store exactly as neuro_dask's transformers sharder
(store/hf_sharder.py) writes one, without a 60 GB checkpoint:
  - first a tiny gpt_oss checkpoint is built by transformers, its experts packed to MXFP4 in the
    published layout (store/expert_formats.py quantize_mxfp4 of the nn.Linear-oriented weights,
    `..._blocks`/`..._scales` stacked per layer) and sharded by the REAL sharder (shard_checkpoint,
    layout="transformers"): the reference for names, order, dtypes and the experts_spec;
  - experts_spec of the big store: hf_sharder.expert_spec over the architecture's transformers skeleton
    at the big shape (parameters on meta), as the sharder computes it; checked against the reference's
    (same class, flags, activation, format; parameter names equal, shapes equal after scaling);
  - expert files: one random expert per layer (random float weights packed by quantize_mxfp4; biases
    bfloat16) with the reference expert file's tensor names, order and dtypes: gate_up_proj_blocks
    uint8 [2I, D/32, 16], gate_up_proj_scales uint8 [2I, D/32], gate_up_proj_bias [2I], down_proj_blocks
    [D, I/32, 16], down_proj_scales [D, I/32], down_proj_bias [D], written by StreamingWriter with the
    sharder's metadata; every other expert of the layer is a hard link to it (same bytes, same sha256 in
    the manifest: a valid store; workers cache files by sha256, so each distinct file is copied once);
  - trunk.safetensors: every non-expert tensor of the architecture's transformers model (hf_trunk.py
    trunk_shapes: attention with biases and sinks, norms, routers, embeddings, LM head), random, in
    bfloat16 (the config's dtype, as the sharder stores a bf16 checkpoint's trunk), streamed one tensor
    at a time (about 4.2 GB at the full shape: 2.1 B parameters, 1.16 B of them embeddings and head);
  - manifest.json: neuro_dask.store.manifest.Manifest(layout="transformers", experts_spec=...). The
    expert artifacts carry the dtype string and logical parameter count the sharder computes.
  In tiny mode every header (names, shapes, dtypes), artifact size and the experts_spec must equal the
  real sharder's output for the same shape exactly; at the big shape the names, dtypes and spec
  structure must match. Any difference stops the run.

--gpu (needs a CUDA GPU for the check itself; the development machine has none. Run here instead:
`--shape tiny --device cpu`, where the store equals the sharder's exactly, and `--shape full --device cpu`
serving 1 and 2 full-shape layers on 2 CPU worker processes with MXFP4-resident experts. Not run: the
CUDA calls, i.e. torch.cuda.mem_get_info / synchronize / max_memory_allocated and the GPU fit):
  1. plan: with --layers auto, as many whole layers (all 128 experts each, full shapes) as fit
     --gpu-fraction of the GPU's free memory beside a full-depth bf16 trunk, a CUDA context per worker
     (0.7 GiB, assumed) and 3 GiB for the cache and activations. A worker keeps an MXFP4 expert at the
     precision its `auto` rule picks (--precision): dequantized bfloat16, 49.8 MB (229 GB for all 4,608:
     9 layers fit an 80 GB H100), or, where the installed neuro_dask offers it, `stored` (MXFP4 as in
     the file, 13.2 MB, 61 GB for all: 36 layers just fit). Then one full-shape expert is written and
     loaded as a worker loads it (re-hash, transformers_runner on the device at the predicted
     precision); if loading every planned expert (x 1.5, over min(workers, cores / 2) loading at once)
     would not fit the time budget, fewer layers are served;
  2. the synthetic store (above) in --store-dir (default: a temporary folder on the machine's disk);
  3. --workers worker processes on this machine (local_cluster(processes=True), `--neuro-device cuda
     --neuro-precision P --neuro-memory-budget B --neuro-no-benchmark --neuro-cache-dir C`; budget B
     = the room planned for experts / workers; replicas 1; hot-extra-replicas 0; client deadline and
     scheduler probe timeout 120 s), nd.load(store, client=client, device="cuda", dtype=torch.bfloat16)
     with the experts-served count printed every 20 s;
  4. a check of layer 0: 4 experts' answers from the workers against the same files run in this process
     at the workers' precision (max |difference|);
  5. greedy generation, batch 1 and batch 8 (prompts of --prompt-len, --new-tokens new, EOS off):
     decode ms/step = (t(generate new) - t(generate 1)) / (new - 1), medians of 2 when time allows; also
     scaled by 36 / layers (labelled) when fewer than 36 layers were served;
  6. memory: this process's CUDA peak, each worker's expert bytes and CUDA peak, nvidia-smi.
  The whole run keeps to --budget-s (default 450 s): progress printed, the JSON rewritten after every
  phase, a generation phase skipped when the time left is short, nd.load bounded by what is left.

--project (runs here, on the CPU): measures, at gpt-oss-120b's exact widths,
  client_layer  one decoder layer of the client's transformers trunk at one decode step (attention over a
                --context-token cache, router), float32, batch 1 and 8: the step of a synthetic store with 3
                layers minus one with 1, halved (vocabulary 4096; experts answered at once by a stub
                executor; the step is model.hf's forward of one token on a copy of the prefilled cache)
  client_head   embedding + final norm + LM head at the full vocabulary: the 1-layer model's time minus
                one layer, plus a float32 [1, 2880] x [2880, V] product measured at V = 201,088 / 8 and
                scaled by 8 (memory-bound: linear in V)
  expert        one expert call (x [rows, 2880] -> expert(x)) at the full expert shape with neuro_dask's
                own runner (hf_experts.transformers_runner over a synthetic MXFP4 expert file) at float32,
                bfloat16 and (when installed) `stored`, rows 1 and 8; the time to load one expert; and
                the Python the `stored` path runs per call (hf_experts.experts_template of the 36-layer model)
  wire          DistributedExecutor.run_layer round trip for one [rows, 2880] float32 message to one
                worker process on loopback (direct transport; an expert of intermediate 32 so compute is
                negligible), minus the same call in-process: serialization + TCP + worker dispatch
and projects ms/token for the full model, LABELLED A PROJECTION:
  per token = head + 36 x (client_layer + wire(rows) + RTT + transfer(rows) + slowest worker's experts)
  batch 1: the 4 experts of a layer on 4 workers, called in parallel, one row each;
  batch 8: 32 (token, expert) pairs per layer; with W workers each holding 128/W experts of every layer
  (placement spreads them), the expected number of messages and the expected largest number of experts
  one worker runs are taken from a seeded Monte Carlo of uniform routing; rows = 8 x 4 / messages.
  transfer = 2 x rows x 2880 x 4 bytes over --mbit (request and answer).
  Scenarios: (a) this CPU as client, CPU volunteer workers keeping experts dequantized (the measured
  expert time, the faster of float32 and bfloat16); (a') the same with MXFP4-resident experts (the
  `stored` precision, when this neuro_dask has it: dequantized at every call, measured); (b) this CPU as
  client, H100 workers; (c) an H100 client and H100 workers, bfloat16-resident experts; (c') the same,
  MXFP4-resident experts.
  GPU figures (published, NVIDIA H100 Tensor Core GPU datasheet, https://www.nvidia.com/en-us/data-center/h100/,
  H100 SXM5 80 GB): HBM3 bandwidth 3.35 TB/s; dense BF16 tensor throughput 989 TFLOP/s (1,979 with
  sparsity). A decode-time expert call is memory-bound (2 x 24.9 M FLOP a row against 49.8 MB of bf16
  weights): bf16-resident, 49.8 MB / 3.35 TB/s = 14.9 us plus an ASSUMED fixed 0.05 ms per call
  (host-device copies and a few kernel launches; not a published figure); MXFP4-resident, neuro_dask
  dequantizes the whole expert at every call (expert_formats.dequantize_mxfp4): ESTIMATED 31 bytes of
  memory traffic per weight (25 M weights: 0.23 ms), 20 kernels at an ASSUMED 5 us, the 0.05 ms, and
  the Python that path runs per call, measured on this CPU. A GPU client layer: its bf16 weights (53 MB)
  / 3.35 TB/s + an ASSUMED 0.2 ms of launches; its head: the 1.16 GB bf16 LM head / 3.35 TB/s + 0.05 ms.
Results: benchmarks/results/gpu-projection.json (--project writes it; --gpu adds its measurements under
"gpu_check" unless --out names another file).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import json
import math
import os
import platform
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from timing import median_ms  # benchmarks/timing.py

HERE = Path(__file__).resolve().parent
RESULT = HERE / "results" / "gpu-projection.json"

# openai/gpt-oss-120b (transformers 5.24 GptOssConfig defaults are this model's values).
FULL = dict(
    vocab_size=201088,
    hidden_size=2880,
    intermediate_size=2880,
    num_hidden_layers=36,
    num_local_experts=128,
    num_experts_per_tok=4,
    head_dim=64,
    num_attention_heads=64,
    num_key_value_heads=8,
    sliding_window=128,
    max_position_embeddings=131072,
    eos_token_id=200002,
    pad_token_id=199999,
)
TINY = dict(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=64,
    num_hidden_layers=2,
    num_local_experts=8,
    num_experts_per_tok=4,
    head_dim=16,
    num_attention_heads=4,
    num_key_value_heads=2,
    sliding_window=8,
    max_position_embeddings=4096,
    eos_token_id=2,
    pad_token_id=0,
)
MXFP4_CONFIG = {
    "modules_to_not_convert": [
        "model.layers.*.self_attn",
        "model.layers.*.mlp.router",
        "model.embed_tokens",
        "lm_head",
    ],
    "quant_method": "mxfp4",
}
# Published H100 SXM5 figures (NVIDIA H100 datasheet) and the stated assumptions of the projection.
H100 = {
    "hbm_bytes_per_s": 3.35e12,
    "bf16_dense_flops": 989e12,
    "source": "NVIDIA H100 Tensor Core GPU datasheet, "
    "H100 SXM5 80 GB: 3.35 TB/s HBM3, 989 TFLOP/s dense BF16 (https://www.nvidia.com/en-us/data-center/h100/)",
    "assumed_call_overhead_ms": 0.05,
    "assumed_client_layer_launch_ms": 0.2,
    "assumed_head_launch_ms": 0.05,
    "assumed_stored_bytes_per_weight": 31,
    "assumed_stored_kernels": 20,
    "assumed_kernel_launch_ms": 0.005,
}


def log(msg: str, began: list[float] = [time.perf_counter()]) -> None:  # noqa: B006 - the run's start
    print(f"[{time.perf_counter() - began[0]:7.1f} s] {msg}", flush=True)


def gpt_oss_config(base: dict, **override) -> dict:
    """A config.json as gpt-oss publishes it (RoPE: GptOssConfig's YaRN defaults, gpt-oss-120b's)."""
    c = {**base, **override}
    for name, inside in (("pad_token_id", 0), ("eos_token_id", 2)):  # a reduced vocabulary keeps them inside
        if c[name] >= c["vocab_size"]:
            c[name] = inside
    layers = c["num_hidden_layers"]
    return {
        "model_type": "gpt_oss",
        "architectures": ["GptOssForCausalLM"],
        **c,
        "layer_types": ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(layers)],
        "experts_per_token": c["num_experts_per_tok"],
        "rms_norm_eps": 1e-5,
        "swiglu_limit": 7.0,
        "attention_bias": True,
        "tie_word_embeddings": False,
        "hidden_act": "silu",
        "use_cache": True,
        "dtype": "bfloat16",
        "quantization_config": dict(MXFP4_CONFIG),
    }


# ---------------------------------------------------------------- the reference: the real sharder


_REFERENCES: dict[str, Path] = {}


def reference_store(root: Path, raw: dict) -> Path:
    """A tiny gpt_oss checkpoint in the published MXFP4 layout, sharded by neuro_dask's sharder
    (made once per config in a run)."""
    key = json.dumps(raw, sort_keys=True)
    if key in _REFERENCES and (_REFERENCES[key] / "manifest.json").exists():
        return _REFERENCES[key]
    _REFERENCES[key] = _reference_store(root, raw)
    return _REFERENCES[key]


def _reference_store(root: Path, raw: dict) -> Path:
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM

    import neuro_dask as nd
    from neuro_dask.model.hf_trunk import hf_config
    from neuro_dask.store.expert_formats import quantize_mxfp4

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(hf_config(raw), dtype=torch.bfloat16).eval()
    model.save_pretrained(root / "float")
    tensors = {}
    for f in sorted((root / "float").glob("*.safetensors")):
        tensors.update(load_file(f))
    packed = {}
    for name, t in tensors.items():
        if name.endswith((".mlp.experts.gate_up_proj", ".mlp.experts.down_proj")):
            # in memory [E, in, out]; published as nn.Linear [E, out, in], packed along `in`
            packed[name + "_blocks"], packed[name + "_scales"] = quantize_mxfp4(t.transpose(-1, -2))
        else:
            packed[name] = t
    (root / "mxfp4").mkdir()
    config = json.loads((root / "float" / "config.json").read_text())
    config["quantization_config"] = dict(MXFP4_CONFIG)
    (root / "mxfp4" / "config.json").write_text(json.dumps(config, indent=2))
    save_file(
        {k: v.contiguous() for k, v in packed.items()}, root / "mxfp4" / "model.safetensors", metadata={"format": "pt"}
    )
    nd.shard_checkpoint(root / "mxfp4", root / "sharded", layout="transformers")
    return root / "sharded"


def header(path: Path) -> list[tuple[str, str, tuple[int, ...]]]:
    from neuro_dask.store.safetensors_io import DTYPE_NAMES, SafetensorsFile

    f = SafetensorsFile(path)
    return [(k, DTYPE_NAMES[f.spec(k)[0]], tuple(f.spec(k)[1])) for k in f.keys()]


# ---------------------------------------------------------------- the synthetic store


def expert_file_specs(
    reference: list[tuple[str, str, tuple[int, ...]]], spec: dict
) -> list[tuple[str, torch.dtype, tuple]]:
    """The reference expert file's names, order and dtypes, with shapes from the big spec's params:
    X [in, out] (in memory, transposed) -> X_blocks [out, in/32, 16], X_scales [out, in/32]; others as is."""
    from neuro_dask.store.safetensors_io import _TORCH_DTYPES

    params = {k: tuple(v) for k, v in spec["parameters"].items()}
    out = []
    for name, dtype, _ in reference:
        if name.endswith("_blocks"):
            d_in, d_out = params[name.removesuffix("_blocks")]
            shape = (d_out, d_in // 32, 16)
        elif name.endswith("_scales"):
            d_in, d_out = params[name.removesuffix("_scales")]
            shape = (d_out, d_in // 32)
        else:
            shape = params[name]
        out.append((name, _TORCH_DTYPES[dtype], shape))
    return out


def random_expert(specs, seed: int, device: str) -> list[torch.Tensor]:
    """Random float weights in the published [out, in] orientation, packed by quantize_mxfp4."""
    from neuro_dask.store.expert_formats import quantize_mxfp4

    g = torch.Generator(device=device).manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}
    for name, dtype, shape in specs:
        if name.endswith("_blocks"):
            out, groups, _ = shape
            w = torch.randn(out, groups * 32, generator=g, device=device) / math.sqrt(groups * 32)
            base = name.removesuffix("_blocks")
            tensors[base + "_blocks"], tensors[base + "_scales"] = quantize_mxfp4(w)
        elif not name.endswith("_scales"):
            tensors[name] = (torch.randn(shape, generator=g, device=device) * 0.01).to(dtype)
    return [tensors[name].cpu() for name, _, _ in specs]


def trunk_value(name: str, shape: tuple[int, ...], g: torch.Generator, device: str) -> torch.Tensor:
    if len(shape) >= 2:
        return torch.randn(shape, generator=g, device=device) / math.sqrt(shape[-1])
    if name.endswith("norm.weight"):
        return torch.ones(shape, device=device)
    return torch.randn(shape, generator=g, device=device) * 0.01  # biases, attention sinks


def synthetic_store(dst: Path, raw: dict, ref: Path, device: str = "cpu", progress: Callable = log) -> dict:
    """Write the store (see the module docstring); returns what was checked and written."""
    from neuro_dask.model.hf_trunk import build_skeleton, trunk_shapes
    from neuro_dask.store.hf_sharder import expert_spec, experts_layout
    from neuro_dask.store.manifest import LAYOUT_TRANSFORMERS, ROLE_EXPERT, ROLE_TRUNK, Artifact, Manifest, expert_path
    from neuro_dask.store.safetensors_io import DTYPE_NAMES, StreamingWriter

    started = time.perf_counter()
    reference = Manifest.read(ref)
    model = build_skeleton(raw, torch.float32)  # parameters on meta: free at any size
    layers = experts_layout(model)
    spec = expert_spec(model, layers, reference.experts_spec["format"], reference.experts_spec["block"])
    _check_spec(spec, reference.experts_spec)
    ref_expert = header(ref / reference.experts[0].path)
    specs = expert_file_specs(ref_expert, spec)
    ref_trunk = {n: (d, s) for n, d, s in header(ref / reference.trunk.path)}
    shapes = trunk_shapes(model)
    trunk_dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(raw.get("dtype"), torch.float32)
    _check_trunk_names(shapes, ref_trunk, trunk_dtype)
    del model
    dst.mkdir(parents=True, exist_ok=True)

    # trunk: streamed, one tensor in memory at a time
    t_specs = [(n, trunk_dtype, s) for n, s in shapes.items()]
    writer = StreamingWriter(dst / "trunk.safetensors", t_specs, metadata={"format": "pt", "role": ROLE_TRUNK})
    g = torch.Generator(device=device).manual_seed(1)
    writer.write(trunk_value(n, s, g, device).to(trunk_dtype) for n, s in shapes.items())
    trunk_params = sum(math.prod(s) for s in shapes.values())
    artifacts = [
        Artifact(
            "trunk.safetensors",
            ROLE_TRUNK,
            writer.sha256,
            writer.bytes,
            DTYPE_NAMES[trunk_dtype],
            None,
            None,
            trunk_params,
        )
    ]
    progress(
        f"trunk written: {trunk_params / 1e9:.2f} B parameters, {writer.bytes / 2**30:.2f} GiB "
        f"({time.perf_counter() - started:.0f} s)"
    )

    # experts: one random file per layer, hard-linked for every expert of the layer
    dtypes = ",".join(sorted({DTYPE_NAMES[d] for _, d, _ in specs}))
    params = sum(
        math.prod(s) * (2 if n.endswith("_blocks") else 0 if n.endswith(("_scales", "_scale_inv")) else 1)
        for n, _, s in specs
    )
    links = 0
    for layer, lay in sorted(layers.items()):
        first = dst / expert_path(layer, 0)
        w = StreamingWriter(first, specs, metadata={"format": "pt", "role": ROLE_EXPERT})
        w.write(iter(random_expert(specs, 1000 + layer, device)))
        for e in range(lay.num_experts):
            rel = expert_path(layer, e)
            if e:
                (dst / rel).parent.mkdir(parents=True, exist_ok=True)
                try:
                    os.link(first, dst / rel)
                    links += 1
                except OSError:  # a file system without hard links: a copy is as valid, only bigger
                    shutil.copyfile(first, dst / rel)
            artifacts.append(Artifact(rel, ROLE_EXPERT, w.sha256, w.bytes, dtypes, layer, e, params))
    expert_bytes = artifacts[-1].bytes
    manifest = Manifest(
        architecture="gpt_oss",
        config=raw,
        artifacts=tuple(artifacts),
        generation_config=None,
        tokenizer_files=(),
        source="synthetic: benchmarks/gpu_check_large_moe.py",
        layout=LAYOUT_TRANSFORMERS,
        experts_spec=spec,
    )
    manifest.write(dst)
    info = {
        "layers": len(layers),
        "experts_per_layer": next(iter(layers.values())).num_experts,
        "expert_file_bytes": expert_bytes,
        "expert_logical_parameters": params,
        "experts_total": len(artifacts) - 1,
        "hard_links": links,
        "trunk_bytes": writer.bytes,
        "trunk_parameters": trunk_params,
        "expert_file_tensors": [[n, DTYPE_NAMES[d], list(s)] for n, d, s in specs],
        "experts_spec": spec,
        "seconds": time.perf_counter() - started,
    }
    progress(
        f"store written: {info['experts_total']} experts ({info['layers']} distinct files, {links} hard links) "
        f"of {expert_bytes / 2**20:.2f} MiB ({info['seconds']:.0f} s)"
    )
    return info


def _check_spec(spec: dict, ref: dict) -> None:
    same = ("class", "flags", "activation", "default_gate", "swiglu", "format", "block", "shared", "shared_experts")
    diff = [k for k in same if spec.get(k) != ref.get(k)]
    if (
        set(spec) != set(ref)
        or diff
        or set(spec["parameters"]) != set(ref["parameters"])
        or any(len(spec["parameters"][k]) != len(ref["parameters"][k]) for k in ref["parameters"])
    ):
        raise SystemExit(
            f"experts_spec differs from the sharder's: keys {sorted(set(spec) ^ set(ref))}, "
            f"fields {diff}, "
            f"parameters {spec['parameters']} vs {ref['parameters']}"
        )


def _check_trunk_names(shapes: dict, ref: dict, dtype: torch.dtype) -> None:
    import re

    from neuro_dask.store.safetensors_io import DTYPE_NAMES

    def pattern(name: str) -> str:
        return re.sub(r"layers\.\d+\.", "layers.N.", name)

    mine, theirs = {pattern(n) for n in shapes}, {pattern(n) for n in ref}
    dtypes = {d for d, _ in ref.values()}
    if mine != theirs or dtypes != {DTYPE_NAMES[dtype]}:
        raise SystemExit(f"trunk differs from the sharder's: {sorted(mine ^ theirs)[:6]}, dtypes {dtypes}")


def check_exact(store: Path, ref: Path) -> list[str]:
    """Tiny shape: the synthetic store must equal the sharder's in everything but the random values."""
    from neuro_dask.store.manifest import Manifest

    a, b = Manifest.read(store), Manifest.read(ref)
    problems = []
    if a.experts_spec != b.experts_spec:
        problems.append(f"experts_spec {a.experts_spec} != {b.experts_spec}")
    if header(store / a.experts[0].path) != header(ref / b.experts[0].path):
        problems.append("expert file header differs")
    if sorted(header(store / a.trunk.path)) != sorted(header(ref / b.trunk.path)):
        problems.append("trunk header differs")

    def order(t):
        return t.layer, t.expert

    def facts(t):
        return t.path, t.bytes, t.dtype, t.parameters, t.layer, t.expert

    for x, y in zip(sorted(a.experts, key=order), sorted(b.experts, key=order)):
        if facts(x) != facts(y):
            problems.append(f"artifact {x} != {y}")
            break
    if (a.trunk.bytes, a.trunk.dtype, a.trunk.parameters) != (b.trunk.bytes, b.trunk.dtype, b.trunk.parameters):
        problems.append(f"trunk artifact {a.trunk} != {b.trunk}")
    return problems


def build_checked_store(dst: Path, raw: dict, tiny_raw: dict, work: Path, device: str, exact: bool) -> dict:
    ref = reference_store(work / "reference", tiny_raw)
    log("reference: tiny gpt_oss MXFP4 checkpoint sharded by neuro_dask's sharder")
    info = synthetic_store(dst, raw, ref, device)
    if exact:
        problems = check_exact(dst, ref)
        if problems:
            raise SystemExit("the synthetic store differs from the sharder's: " + "; ".join(problems))
        info["exact_match_with_sharder"] = True
        log("synthetic store matches the sharder's exactly (headers, sizes, dtypes, experts_spec)")
    return info


# ---------------------------------------------------------------- small helpers


def write_json(path: Path, key: str | None, value: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if key is None:
        path.write_text(json.dumps(value, indent=2, default=str))
        return
    old = {}
    if path.exists():
        with contextlib.suppress(json.JSONDecodeError):
            old = json.loads(path.read_text())
    old[key] = value
    path.write_text(json.dumps(old, indent=2, default=str))


@contextlib.contextmanager
def process_cluster(workers: int, worker_args: list[str], cache: Path):
    import dask
    from distributed import Client

    from neuro_dask.client.cluster import local_cluster

    # replicas 1: one copy of each expert (memory); hot-extra-replicas 0: no re-plans while measuring.
    # deadline 120 s: a CPU test of full-shape MXFP4 experts dequantizes at every call and takes seconds a
    # message; a call past the deadline is hedged and its worker probed (and asked to reload what
    # the probe failed), which would measure the fallbacks instead of the experts.
    with dask.config.set(
        {
            "neuro.worker.cache-dir": str(cache),
            "neuro.client.transport": "direct",
            "neuro.scheduler.hot-extra-replicas": 0,
            "neuro.client.load-timeout": 1800.0,
            "neuro.client.deadline": 120.0,
            "neuro.scheduler.probe-timeout": 120.0,
            "distributed.comm.timeouts.connect": 60,
        }
    ):
        with (
            local_cluster(
                n_workers=workers,
                processes=True,
                replicas=1,
                worker_args=["--neuro-no-benchmark", "--neuro-cache-dir", str(cache), *worker_args],
                dashboard_address=None,
                memory_limit=0,
            ) as cluster,
            Client(cluster) as client,
        ):
            client.wait_for_workers(workers, timeout=300)
            yield client


@contextlib.contextmanager
def served_progress(client, model_id: str, every: float = 20.0):
    """Print how many experts are served every `every` seconds while the block runs."""
    import threading

    stop = threading.Event()

    def run() -> None:
        while not stop.wait(every):
            try:
                msg = client.sync(client.scheduler.neuro_routes, model=model_id)
                routes = msg.get("routes") or []
                log(f"  experts served: {sum(1 for *_, ws in routes if ws)} of {len(routes)}")
            except Exception:  # noqa: BLE001 - progress only
                pass

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=5)


def worker_statuses(client) -> dict:
    """neuro_status of every worker, plus the precision each model resolved to: neuro_status's own
    "precision" is the configured setting (its per-model value is overwritten, plugins/neuro_worker.py)."""
    resolved = client.run(_resolved_precisions)
    out = {}
    for w in sorted(client.scheduler_info()["workers"]):
        st = client.sync(client.rpc(w).neuro_status)
        out[w] = {k: st.get(k) for k in ("memory_bytes", "device", "models", "calls_served", "rows_served")}
        out[w]["precision_setting"] = st.get("precision")
        out[w]["precision"] = resolved.get(w, {})
    return out


def _resolved_precisions(dask_worker) -> dict:
    host = dask_worker.extensions["neuro"].host
    return {m: h.precision for m, h in host.models.items()}


def gpu_memory_of_this_process() -> dict:
    if not torch.cuda.is_available():
        return {}
    return {"max_allocated": torch.cuda.max_memory_allocated(), "reserved": torch.cuda.memory_reserved()}


def nvidia_smi() -> list[dict]:
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,memory.used,memory.total", "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
            timeout=20,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [
        dict(zip(("name", "memory_used_mib", "memory_total_mib"), (p.strip() for p in line.split(","))))
        for line in out.strip().splitlines()
    ]


def per_expert_bytes(spec: dict, stored_bytes: int, precision: str) -> int:
    """What one expert holds on a worker at `precision` (hf_experts.precision_sizes when installed)."""
    try:
        from neuro_dask.runtime.hf_experts import precision_sizes

        sizes = dict(precision_sizes(spec, stored_bytes))
    except ImportError:
        params = sum(math.prod(s) for s in spec["parameters"].values())
        sizes = {"float32": 4 * params, "bfloat16": 2 * params}
    if precision == "auto":
        return min(sizes.values())
    return sizes[precision]


# ---------------------------------------------------------------- --gpu


def gpu_check(args) -> int:
    import neuro_dask as nd

    began = time.perf_counter()
    deadline = began + args.budget_s
    left = lambda: deadline - time.perf_counter()  # noqa: E731
    device = args.device
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("--gpu --device cuda: no CUDA GPU here (use --shape tiny --device cpu to test on a CPU)")
    base = FULL if args.shape == "full" else TINY
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    out_path = Path(args.out) if args.out else RESULT
    key = None if args.out else "gpu_check"
    res: dict[str, Any] = {
        "mode": "gpu",
        "shape": args.shape,
        "device": device,
        "workers": args.workers,
        "precision_requested": args.precision,
        "budget_s": args.budget_s,
        "torch": torch.__version__,
        "gpus": nvidia_smi(),
        "phases_skipped": [],
    }

    def save() -> None:
        res["elapsed_s"] = time.perf_counter() - began
        write_json(out_path, key, res)

    tiny_raw = gpt_oss_config(TINY)
    full_layers = base["num_hidden_layers"]
    # How many whole layers (128 experts each, full shapes) fit the GPU next to the trunk.
    layers = full_layers if args.layers == "auto" else int(args.layers)
    if args.layers == "auto" and device.startswith("cuda"):
        res["fit"] = fit_layers(base, args.precision, args.workers, args.gpu_fraction, torch.cuda.mem_get_info()[0])
        layers = res["fit"]["layers_that_fit"]
        log(
            f"GPU free {res['fit']['gpu_free_bytes'] / 2**30:.1f} GiB; an expert at {args.precision} holds "
            f"{res['fit']['per_expert_bytes'] / 2**20:.1f} MiB; {layers} of {full_layers} layers fit"
        )
    # Loading time: every worker builds each of its experts at load; the budget must hold it.
    experts_per_layer = base["num_local_experts"]
    budget_bytes = (
        _bytes(args.memory_budget)
        if args.memory_budget
        else (int(res["fit"]["room_for_experts"] // args.workers) if "fit" in res else None)
    )
    probe = expert_load_probe(
        gpt_oss_config(base, num_hidden_layers=max(layers, 1)),
        tiny_raw,
        Path(tempfile.mkdtemp(dir=args.store_dir)),
        device,
        lambda spec, stored: predicted_precision(
            spec, stored, layers * experts_per_layer // args.workers, budget_bytes, args.precision, device
        ),
    )
    per_expert = 1.5 * probe["seconds_per_expert"]  # + the cache copy, the report to the scheduler
    parallel = max(1, min(args.workers, (os.cpu_count() or 2) // 2))  # workers load at once, given the cores
    allow = left() - 150.0 - (60.0 if args.shape == "full" else 5.0)  # cluster, trunk load, generation; store
    planned = layers
    estimate = per_expert * layers * experts_per_layer / parallel
    res["load_estimate"] = {
        **probe,
        "estimated_load_s": estimate,
        "allowed_s": allow,
        "layers_planned": planned,
        "loading_in_parallel": parallel,
    }
    if args.layers == "auto" and estimate > allow:
        timed_layers = max(1, int(allow * parallel / (per_expert * experts_per_layer)))
        if timed_layers < layers:
            res["load_estimate"]["layers_cut_for_time"] = {"from": layers, "to": timed_layers}
            layers = timed_layers
    log(
        f"one expert loads in {probe['seconds_per_expert'] * 1000:.0f} ms at {probe['precision']}: about "
        f"{estimate:.0f} s to load {planned} layers on {args.workers} workers ({parallel} loading at once), "
        f"{allow:.0f} s allowed; serving {layers} of {full_layers} layers"
    )
    res["layers_served"] = layers
    res["scaled_to_full_depth"] = layers < full_layers
    raw = gpt_oss_config(base, num_hidden_layers=layers)

    with tempfile.TemporaryDirectory(prefix="gpu-check-", dir=args.store_dir) as work:
        work = Path(work)
        res["store"] = build_checked_store(work / "store", raw, tiny_raw, work, device, exact=args.shape == "tiny")
        res["store"].pop("experts_spec", None)
        save()
        budget = args.memory_budget
        room = res.get("fit", {}).get("room_for_experts", 0)
        if budget is None and room > 0:
            budget = str(int(room // args.workers))
        worker_args = ["--neuro-device", device.split(":")[0], "--neuro-precision", args.precision]
        if budget:
            worker_args += ["--neuro-memory-budget", str(budget)]
        res["worker_args"] = worker_args
        log(f"starting {args.workers} worker processes: {' '.join(worker_args)}")
        with process_cluster(args.workers, worker_args, work / "cache") as client:
            import dask

            from neuro_dask.store.manifest import Manifest

            wait = max(60.0, left() - 90.0)  # what is left of the budget, less time to generate
            log(f"workers up; nd.load (publish, workers load their experts, trunk here; at most {wait:.0f} s)")
            start = time.perf_counter()
            with (
                served_progress(client, Manifest.read(work / "store").model_id),
                dask.config.set({"neuro.client.load-timeout": wait}),
            ):
                try:
                    model = nd.load(work / "store", client=client, device=device, dtype=dtype)
                except Exception as exc:  # noqa: BLE001 - recorded: the JSON says how far it got
                    res["load_error"] = f"{type(exc).__name__}: {exc}"
                    res["worker_status_at_failure"] = worker_statuses(client)
                    save()
                    raise SystemExit(f"nd.load failed after {time.perf_counter() - start:.0f} s: {exc}") from exc
            res["load_s"] = time.perf_counter() - start
            log(f"loaded in {res['load_s']:.0f} s")
            res["worker_status_after_load"] = worker_statuses(client)
            save()
            res["layer_check"] = layer_check(model, work / "store", raw, res["worker_status_after_load"], device)
            log(f"layer check: {res['layer_check']}")
            save()
            vocab = base["vocab_size"]
            g = torch.Generator().manual_seed(1)
            for batch in (1, 8):
                ids = torch.randint(3, vocab, (batch, args.prompt_len), generator=g)
                est = res.get("decode_b1", {}).get("generate_s", 30.0) * (2 if batch == 8 else 1) * 2.5
                if left() < est:
                    res["phases_skipped"].append(f"batch {batch}: {left():.0f} s left, about {est:.0f} s needed")
                    log(res["phases_skipped"][-1])
                    save()
                    continue
                try:
                    res[f"decode_b{batch}"] = time_generation(model, ids, args.new_tokens, left, layers, full_layers)
                except Exception as exc:  # noqa: BLE001 - recorded with the scheduler's events, then stop
                    res[f"decode_b{batch}_error"] = f"{type(exc).__name__}: {exc}"
                    res["scheduler_events"] = [e for _, e in client.get_events("neuro")][-30:]
                    save()
                    raise
                log(f"batch {batch}: {res[f'decode_b{batch}']}")
                save()
            res["memory"] = {
                "client": gpu_memory_of_this_process(),
                "nvidia_smi": nvidia_smi(),
                "workers": worker_statuses(client),
            }
            if device.startswith("cuda"):
                res["memory"]["workers_cuda"] = client.run(_cuda_memory)
            model.close()
    res["total_s"] = time.perf_counter() - began
    save()
    print(f"command: {' '.join([Path(sys.executable).name, *sys.argv])}")
    print(
        json.dumps(
            {
                k: res[k]
                for k in res
                if k.startswith(
                    (
                        "decode",
                        "layer_check",
                        "load_s",
                        "layers_served",
                        "scaled",
                        "memory",
                        "phases_skipped",
                        "total_s",
                    )
                )
            },
            indent=1,
            default=str,
        )
    )
    return 0


def _bytes(text: str) -> int:
    """'4GiB', '500MB', '123' -> bytes (what --neuro-memory-budget takes)."""
    from dask.utils import parse_bytes

    return int(parse_bytes(text))


def stored_expert_bytes(d: int, i: int) -> int:
    """An MXFP4 expert file of hidden d, intermediate i: blocks and scales of gate_up [2i, d] and
    down [d, i], bfloat16 biases, about 1 KiB of header."""
    return (2 * i * d // 2 + 2 * i * d // 32) + (d * i // 2 + d * i // 32) + 2 * (2 * i + d) + 1024


def fit_layers(base: dict, precision: str, workers: int, fraction: float, free_bytes: int) -> dict:
    """How many whole layers (all their experts) fit `fraction` of `free_bytes` beside a bf16 trunk of the
    full depth, a CUDA context per worker (0.7 GiB, assumed) and 3 GiB for the cache and activations."""
    from neuro_dask.model.hf_trunk import build_skeleton
    from neuro_dask.store.hf_sharder import expert_spec, experts_layout

    skel = build_skeleton(gpt_oss_config(base, num_hidden_layers=1), torch.float32)  # on meta
    spec = expert_spec(skel, experts_layout(skel), "mxfp4", None)
    d, i, full = base["hidden_size"], base["intermediate_size"], base["num_hidden_layers"]
    one = per_expert_bytes(spec, stored_expert_bytes(d, i), precision)
    heads, kv, hd = base["num_attention_heads"], base["num_key_value_heads"], base["head_dim"]
    attention = 2 * d * heads * hd + 2 * d * kv * hd
    trunk = 2 * (2 * base["vocab_size"] * d + full * attention)
    room = free_bytes * fraction - trunk - workers * 700 * 2**20 - 3 * 2**30
    layers = max(1, min(full, int(room // (one * base["num_local_experts"]))))
    return {
        "gpu_free_bytes": free_bytes,
        "per_expert_bytes": one,
        "trunk_bytes_estimate": trunk,
        "room_for_experts": room,
        "layers_that_fit": layers,
    }


def predicted_precision(
    spec: dict, stored: int, experts_per_worker: int, budget: int | None, requested: str, device: str
) -> str:
    """The precision a worker's `auto` rule will pick (hf_experts.choose_precision when installed)."""
    if requested != "auto":
        return requested
    try:
        from neuro_dask.runtime.hf_experts import choose_precision
    except ImportError:
        return "bfloat16" if device.startswith("cuda") else "float32"
    return choose_precision(spec, stored, max(experts_per_worker, 1), budget or 2**62)


def expert_load_probe(
    raw: dict, tiny_raw: dict, work: Path, device: str, precision_of: Callable[[dict, int], str]
) -> dict:
    """Seconds a worker spends on one expert of this shape at load: re-hash of the cached file, then
    transformers_runner at the precision the workers will pick (the second of two tries: the first
    builds the experts template, which a worker does once)."""
    from neuro_dask.model.hf_trunk import build_skeleton
    from neuro_dask.runtime.hf_experts import transformers_runner
    from neuro_dask.store.hf_sharder import expert_spec, experts_layout
    from neuro_dask.store.manifest import Manifest
    from neuro_dask.store.safetensors_io import StreamingWriter, sha256_file

    ref = reference_store(work / "reference", tiny_raw)
    reference = Manifest.read(ref)
    one = {**raw, "num_hidden_layers": 1, "layer_types": raw["layer_types"][:1]}
    skel = build_skeleton(one, torch.float32)
    spec = expert_spec(skel, experts_layout(skel), reference.experts_spec["format"], reference.experts_spec["block"])
    specs = expert_file_specs(header(ref / reference.experts[0].path), spec)
    path = work / "probe" / "expert.safetensors"
    writer = StreamingWriter(path, specs, metadata={"format": "pt", "role": "expert"})
    writer.write(iter(random_expert(specs, 7, device)))
    precision = precision_of(spec, writer.bytes)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    seconds = []
    for _ in range(2):
        start = time.perf_counter()
        sha256_file(path)
        runner = transformers_runner(path, spec, one, 0, precision, device)
        sync()
        seconds.append(time.perf_counter() - start)
        del runner
    shutil.rmtree(path.parent, ignore_errors=True)
    return {
        "precision": precision,
        "seconds_per_expert": seconds[-1],
        "first_try_s": seconds[0],
        "stored_bytes": writer.bytes,
    }


def _cuda_memory() -> dict:
    import torch as t

    return {"max_allocated": t.cuda.max_memory_allocated(), "reserved": t.cuda.memory_reserved()}


def layer_check(model, store: Path, raw: dict, statuses: dict, device: str) -> dict:
    """Layer 0, experts 0-3: the workers' answers against the same expert files run here."""
    from neuro_dask.runtime.hf_experts import transformers_runner
    from neuro_dask.store.manifest import Manifest

    manifest = Manifest.read(store)
    precisions = {p for st in statuses.values() for p in (st.get("precision") or {}).values()}
    precision = precisions.pop() if len(precisions) == 1 else "bfloat16" if device.startswith("cuda") else "float32"
    hidden = manifest.experts_spec["hidden_size"]
    g = torch.Generator().manual_seed(5)
    groups = {e: torch.randn(2, hidden, generator=g).to(model.dtype) for e in range(4)}
    remote = model.executor.run_layer(0, groups)
    diffs = {}
    for e, x in groups.items():
        try:
            runner = transformers_runner(
                store / manifest.expert(0, e).path, manifest.experts_spec, raw, 0, precision, device
            )
        except Exception as exc:  # noqa: BLE001 - reported, not fatal: the timing still means something
            return {"precision": precision, "error": f"{type(exc).__name__}: {exc}"}
        with torch.inference_mode():
            local = runner(x.to(device)).float().cpu()
        diffs[e] = float((remote[e].float() - local).abs().max())
    return {"precision": precision, "max_abs_diff": max(diffs.values()), "per_expert": diffs}


def time_generation(
    model, ids: torch.Tensor, new_tokens: int, left: Callable[[], float], layers: int, full_layers: int
) -> dict:
    """generate(new) and generate(1), twice each when time allows: decode = (t_new - t_1) / (new - 1)."""
    model.generation = dataclasses.replace(model.generation, eos_token_ids=())
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)

    def gen(n: int) -> float:
        sync()
        start = time.perf_counter()
        model.generate(ids, max_new_tokens=n)
        sync()
        return time.perf_counter() - start

    gen(2)  # warm-up
    full, one = [gen(new_tokens)], [gen(1)]
    if left() > 3 * (full[0] + one[0]):
        full.append(gen(new_tokens))
        one.append(gen(1))
    t_full, t_one = statistics.median(full), statistics.median(one)
    decode_ms = 1000 * (t_full - t_one) / (new_tokens - 1)
    out = {
        "batch": ids.shape[0],
        "prompt": ids.shape[1],
        "new_tokens": new_tokens,
        "generate_s": t_full,
        "first_token_s": t_one,
        "decode_ms_per_step": decode_ms,
        "ms_per_token_incl_prefill": 1000 * t_full / new_tokens,
    }
    if layers < full_layers:
        out[f"decode_ms_per_step_scaled_to_{full_layers}_layers"] = decode_ms * full_layers / layers
    return out


# ---------------------------------------------------------------- --project


class InstantExperts:
    """Answers every expert call with zeros at once: isolates the client's own work."""

    def run_layer(self, layer, groups):
        return {e: torch.zeros_like(x) for e, x in groups.items()}


def project(args) -> int:
    from neuro_dask.store.manifest import Manifest

    began = time.perf_counter()
    repeats = 3 if args.quick else args.repeats
    tiny_raw = gpt_oss_config(TINY)
    res: dict[str, Any] = {
        "mode": "project",
        "label": "PROJECTION from costs measured on this CPU and published "
        "H100 figures; not a measurement of gpt-oss-120b",
        "h100": H100,
    }
    with tempfile.TemporaryDirectory(prefix="gpu-projection-") as work:
        work = Path(work)
        # Full widths, few layers, small vocabulary: the client's layers at their real size.
        stores = {}
        for n in (1, 3):
            raw = gpt_oss_config(FULL, num_hidden_layers=n, vocab_size=4096, num_local_experts=4)
            info = build_checked_store(work / f"client-{n}", raw, tiny_raw, work / f"w{n}", "cpu", exact=False)
            stores[n] = (work / f"client-{n}", raw, info)
        res["store_check"] = {
            "expert_file_tensors": stores[1][2]["expert_file_tensors"],
            "expert_file_bytes": stores[1][2]["expert_file_bytes"],
        }
        g = torch.Generator().manual_seed(1)
        ctx = torch.randint(3, 4096, (8, args.context), generator=g)
        client = {}
        for batch in (1, 8):
            per = {n: client_step_ms(path, ctx[:batch], repeats) for n, (path, _, _) in stores.items()}
            layer = max((per[3] - per[1]) / 2, 0.0)
            client[batch] = {
                "client_layer_ms": layer,
                "one_layer_model_step_ms": per[1],
                "three_layer_model_step_ms": per[3],
            }
            log(f"client, batch {batch}: {layer:.2f} ms per layer (1-layer model {per[1]:.2f} ms per step)")
        head = lm_head_ms(FULL["vocab_size"], FULL["hidden_size"], repeats)
        for batch, c in client.items():
            # the 1-layer model's step minus its layer, with its head at vocabulary 4096 replaced by the full one
            small_head = lm_head_ms(4096, FULL["hidden_size"], repeats, batch=batch)
            c["client_head_ms"] = (
                max(c["one_layer_model_step_ms"] - c["client_layer_ms"] - small_head, 0.0) + head["ms"][batch]
            )
        res["client"] = {"context": args.context, "by_batch": client, "lm_head_full_vocab": head}

        # one expert at the full shape, with neuro_dask's runner
        path, raw, _ = stores[1]
        manifest = Manifest.read(path)
        res["expert"] = expert_costs(path / manifest.expert(0, 0).path, manifest.experts_spec, raw, repeats)
        log(f"expert: {res['expert']}")

        # wire: one worker process on loopback, an expert of intermediate 32
        wire_raw = gpt_oss_config(FULL, num_hidden_layers=1, vocab_size=256, intermediate_size=32, num_local_experts=4)
        wire_tiny = gpt_oss_config(TINY, intermediate_size=32)
        build_checked_store(work / "wire", wire_raw, wire_tiny, work / "wire-ref", "cpu", exact=False)
        res["wire"] = wire_costs(work / "wire", work / "wire-cache", args.quick)
        log(f"wire: {res['wire']['by_rows']}")
    res["projection"] = projection(res, args)
    res["setup"] = {
        "quick": args.quick,
        "repeats": repeats,
        "context": args.context,
        "mbit": args.mbit,
        "volunteers": args.volunteers,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpus": os.cpu_count(),
        "machine": platform.machine(),
        "load_average_at_end": os.getloadavg(),
    }
    res["total_s"] = time.perf_counter() - began
    print(f"command: {' '.join([Path(sys.executable).name, *sys.argv])}")
    print(project_table(res))
    print(f"total run time {res['total_s']:.0f} s")
    out = Path(args.out) if args.out else RESULT
    old = {}
    if out.exists():
        with contextlib.suppress(json.JSONDecodeError):
            old = json.loads(out.read_text())
    if "gpu_check" in old:
        res["gpu_check"] = old["gpu_check"]  # a --gpu run's measurements stay beside the projection
    write_json(out, None, res)
    return 0


def client_step_ms(store: Path, ids: torch.Tensor, repeats: int) -> float:
    """One decode step of the store's transformers trunk (experts answered at once), after a prefill of
    `ids`: each repeat runs on a fresh copy of the prefilled cache; the copy is not timed."""
    import copy

    import neuro_dask as nd

    model = nd.load(store, executor=InstantExperts())
    hf = model.hf
    with torch.inference_mode():
        out = hf(input_ids=ids, use_cache=True, logits_to_keep=1)
        cache, token = out.cache, out.logits[:, -1:].argmax(-1)
        times = []
        for r in range(repeats + 1):
            c = copy.deepcopy(cache)
            start = time.perf_counter()
            hf(input_ids=token, cache=c, use_cache=True, logits_to_keep=1)
            if r:  # the first is a warm-up
                times.append(time.perf_counter() - start)
    del model, hf, cache
    gc.collect()
    return 1000 * statistics.median(times)


def lm_head_ms(vocab: int, hidden: int, repeats: int, batch: int | None = None) -> dict | float:
    """float32 [batch, hidden] x [hidden, vocab / 8], scaled by 8 (memory-bound: linear in vocab)."""
    part = max(vocab // 8, 1) if vocab > 8192 else vocab
    scale = vocab / part
    w = torch.randn(part, hidden) / math.sqrt(hidden)
    out = {}
    for b in (batch,) if batch else (1, 8):
        x = torch.randn(b, hidden)
        with torch.inference_mode():
            out[b] = scale * median_ms(lambda x=x, w=w: torch.nn.functional.linear(x, w), max(repeats, 5), warmup=1)
    del w
    if batch:
        return out[batch]
    return {"ms": out, "measured_vocab": part, "scale": scale}


def expert_costs(path: Path, spec: dict, raw: dict, repeats: int) -> dict:
    from neuro_dask.runtime.hf_experts import transformers_runner

    out: dict[str, Any] = {"shape": {k: v for k, v in spec["parameters"].items()}}
    try:
        from neuro_dask.runtime.hf_experts import STORED
    except ImportError:  # a neuro_dask without MXFP4-resident experts
        STORED = None  # noqa: N806
    for precision in ("float32", "bfloat16", *((STORED,) if STORED else ())):
        start = time.perf_counter()
        runner = transformers_runner(path, spec, raw, 0, precision)
        load = time.perf_counter() - start
        calls = {}
        for rows in (1, 8):
            x = torch.randn(rows, spec["hidden_size"])
            with torch.inference_mode():
                calls[rows] = median_ms(lambda r=runner, x=x: r(x), max(repeats, 5), warmup=1)
        out[precision] = {"load_ms": 1000 * load, "call_ms": calls}
        del runner
        gc.collect()
    if STORED:
        # What StoredExpert runs per call besides the math: the experts template of a 36-layer model
        # (hf_experts.experts_template: json.dumps of the config, a walk over the model's modules).
        from neuro_dask.runtime.hf_experts import experts_template

        deep = gpt_oss_config(FULL)
        experts_template(deep, 0)  # built once (the skeleton), as on a worker
        out["stored_python_ms_per_call"] = median_ms(lambda: experts_template(deep, 35), max(repeats, 20), warmup=1)
    return out


def wire_costs(store: Path, cache: Path, quick: bool) -> dict:
    """DistributedExecutor.run_layer to 1 worker process vs in-process, one expert, [rows, 2880] float32."""
    import neuro_dask as nd

    local = nd.load(store)
    repeats = 10 if quick else 30
    by_rows = {}
    with process_cluster(1, ["--neuro-device", "cpu", "--neuro-precision", "float32"], cache) as client:
        remote = nd.load(store, client=client)
        for rows in (1, 4, 8, 32, 128):
            x = {0: torch.randn(rows, 2880)}
            d = median_ms(lambda x=x: remote.executor.run_layer(0, x), repeats, warmup=3)
            lo = median_ms(lambda x=x: local.executor.run_layer(0, x), repeats, warmup=3)
            by_rows[rows] = {
                "distributed_ms": d,
                "local_ms": lo,
                "wire_ms": max(d - lo, 0.0),
                "payload_bytes_each_way": rows * 2880 * 4,
            }
        remote.close()
    return {"by_rows": by_rows, "repeats": repeats, "transport": "direct, loopback TCP, 1 worker process"}


def expected_batch8(workers: int, experts: int = 128, top_k: int = 4, tokens: int = 8, trials: int = 4000) -> dict:
    """Uniform routing of `tokens` x top_k over `experts`, experts spread evenly over `workers`:
    the mean number of distinct experts, of workers hit, and of the largest experts-per-worker."""
    rng = random.Random(0)
    owner = [e % workers for e in range(experts)]
    distinct, hit, largest = [], [], []
    for _ in range(trials):
        chosen = set()
        for _ in range(tokens):
            chosen.update(rng.sample(range(experts), top_k))
        per: dict[int, int] = {}
        for e in chosen:
            per[owner[e]] = per.get(owner[e], 0) + 1
        distinct.append(len(chosen))
        hit.append(len(per))
        largest.append(max(per.values()))
    return {
        "distinct_experts": statistics.mean(distinct),
        "workers_hit": statistics.mean(hit),
        "largest_per_worker": statistics.mean(largest),
    }


def projection(res: dict, args) -> dict:
    layers = FULL["num_hidden_layers"]
    d, i = FULL["hidden_size"], FULL["intermediate_size"]
    expert_params = 2 * d * 2 * i + d * i + 2 * i + d  # gate_up, down, biases
    wire = res["wire"]["by_rows"]

    def wire_ms(rows: float) -> float:  # interpolate the measured loopback cost
        keys = sorted(wire)
        lo = max([k for k in keys if k <= rows] or [keys[0]])
        hi = min([k for k in keys if k >= rows] or [keys[-1]])
        if hi == lo:
            return wire[lo]["wire_ms"]
        f = (rows - lo) / (hi - lo)
        return wire[lo]["wire_ms"] * (1 - f) + wire[hi]["wire_ms"] * f

    cpu_expert = {rows: min(res["expert"][p]["call_ms"][rows] for p in ("float32", "bfloat16")) for rows in (1, 8)}
    cpu_stored = res["expert"]["stored"]["call_ms"][1] if "stored" in res["expert"] else None
    weights = 2 * d * 2 * i + d * i
    gpu_expert = {
        "bfloat16": 2 * expert_params / H100["hbm_bytes_per_s"] * 1000 + H100["assumed_call_overhead_ms"],
        # StoredExpert dequantizes the whole expert at every call (expert_formats.dequantize_mxfp4: nibble
        # masks, int32 indices, table gathers, a float32 ldexp, a cast, a transposed copy): about 31 bytes
        # of memory traffic per weight, about 20 kernels, plus the Python it runs per call (measured here).
        "mxfp4_stored": H100["assumed_stored_bytes_per_weight"] * weights / H100["hbm_bytes_per_s"] * 1000
        + H100["assumed_stored_kernels"] * H100["assumed_kernel_launch_ms"]
        + H100["assumed_call_overhead_ms"]
        + res["expert"].get("stored_python_ms_per_call", 0.0),
    }
    gpu_client_layer = 2 * 26.6e6 / H100["hbm_bytes_per_s"] * 1000 + H100["assumed_client_layer_launch_ms"]
    gpu_head = 2 * FULL["vocab_size"] * d / H100["hbm_bytes_per_s"] * 1000 + H100["assumed_head_launch_ms"]
    b8 = expected_batch8(args.volunteers)
    rows = []
    for rtt in (0.0, 1.0, 5.0, 20.0, 50.0):
        for batch in (1, 8):
            c = res["client"]["by_batch"][batch]
            if batch == 1:
                msg_rows, per_worker = 1.0, 1.0
            else:
                msg_rows, per_worker = 8 * 4 / b8["workers_hit"], b8["largest_per_worker"]
            transfer = 2 * msg_rows * d * 4 * 8 / (args.mbit * 1e6) * 1000 if rtt > 0 else 0.0
            net = wire_ms(msg_rows) + rtt + transfer
            row = {
                "rtt_ms": rtt,
                "batch": batch,
                "rows_per_message": msg_rows,
                "experts_on_slowest_worker": per_worker,
                "network_ms_per_layer": net,
            }
            row["a_cpu_client_cpu_workers"] = c["client_head_ms"] + layers * (
                c["client_layer_ms"] + net + per_worker * cpu_expert[1]
            )
            if cpu_stored is not None:
                row["a2_cpu_client_cpu_workers_mxfp4_stored"] = c["client_head_ms"] + layers * (
                    c["client_layer_ms"] + net + per_worker * cpu_stored
                )
            row["b_cpu_client_h100_workers"] = c["client_head_ms"] + layers * (
                c["client_layer_ms"] + net + per_worker * gpu_expert["bfloat16"]
            )
            row["c_h100_client_h100_workers"] = gpu_head + layers * (
                gpu_client_layer + net + per_worker * gpu_expert["bfloat16"]
            )
            row["c_h100_client_h100_workers_mxfp4_stored"] = gpu_head + layers * (
                gpu_client_layer + net + per_worker * gpu_expert["mxfp4_stored"]
            )
            rows.append(row)
    return {
        "unit": "ms per decode step (batch 8: a step makes 8 tokens)",
        "layers": layers,
        "cpu_expert_ms": cpu_expert,
        "cpu_expert_stored_ms": cpu_stored,
        "gpu_expert_ms": gpu_expert,
        "gpu_client_layer_ms": gpu_client_layer,
        "gpu_head_ms": gpu_head,
        "batch8_routing": b8,
        "volunteers": args.volunteers,
        "mbit": args.mbit,
        "rows": rows,
    }


def project_table(res: dict) -> str:
    c = res["client"]["by_batch"]
    e = res["expert"]
    p = res["projection"]
    lines = [
        "PROJECTION for gpt-oss-120b (36 layers, 128 experts, top-4, hidden 2880) from costs measured here:",
        f"  client layer (float32, this CPU, context {res['client']['context']}): "
        f"batch 1 {c[1]['client_layer_ms']:.2f} ms, batch 8 {c[8]['client_layer_ms']:.2f} ms; "
        f"head at vocabulary 201,088: batch 1 {c[1]['client_head_ms']:.1f} ms, "
        f"batch 8 {c[8]['client_head_ms']:.1f} ms",
        "  one expert call at 2880 x 2880 (neuro_dask runner, this CPU): "
        f"float32 1 row {e['float32']['call_ms'][1]:.2f} ms, "
        f"8 rows {e['float32']['call_ms'][8]:.2f} ms; bfloat16 1 row {e['bfloat16']['call_ms'][1]:.2f} ms, "
        f"8 rows {e['bfloat16']['call_ms'][8]:.2f} ms; load (MXFP4 -> float32) {e['float32']['load_ms']:.0f} ms, "
        f"(-> bfloat16) {e['bfloat16']['load_ms']:.0f} ms",
        "  loopback wire per message (direct transport, minus in-process): "
        + ", ".join(f"{r} rows {v['wire_ms']:.2f} ms" for r, v in res["wire"]["by_rows"].items()),
        f"  MXFP4-resident (`stored`) expert on this CPU: {e['stored']['call_ms'][1]:.1f} ms a call (dequantized at "
        f"every call), of which Python per call {e.get('stored_python_ms_per_call', float('nan')):.2f} ms"
        if "stored" in e
        else "  (this neuro_dask has no MXFP4-resident experts)",
        "  H100 (published 3.35 TB/s): "
        f"expert call {p['gpu_expert_ms']['bfloat16']:.3f} ms at bf16 (incl. an assumed "
        f"0.05 ms), {p['gpu_expert_ms']['mxfp4_stored']:.3f} ms MXFP4-resident (estimated dequantization traffic "
        f"and kernels, and the Python measured here); client layer "
        f"{p['gpu_client_layer_ms']:.3f} ms, head {p['gpu_head_ms']:.3f} ms (incl. assumed launch costs)",
        f"  batch 8 over {p['volunteers']} workers (uniform routing): "
        f"{p['batch8_routing']['distinct_experts']:.1f} experts, "
        f"{p['batch8_routing']['workers_hit']:.1f} messages, slowest worker runs "
        f"{p['batch8_routing']['largest_per_worker']:.2f} experts; uplink {p['mbit']:.0f} Mbit/s",
        "",
        "| RTT ms | batch | (a) CPU client, CPU workers, experts resident dequantized | (a') same, MXFP4-resident "
        "experts | (b) CPU client, H100 workers | (c) H100 client + workers, bf16 "
        "| (c') same, MXFP4-resident experts |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in p["rows"]:
        a2 = r.get("a2_cpu_client_cpu_workers_mxfp4_stored")
        lines.append(
            f"| {r['rtt_ms']:g} | {r['batch']} | {r['a_cpu_client_cpu_workers']:.0f} | "
            f"{'-' if a2 is None else format(a2, '.0f')} | "
            f"{r['b_cpu_client_h100_workers']:.0f} | {r['c_h100_client_h100_workers']:.1f} | "
            f"{r['c_h100_client_h100_workers_mxfp4_stored']:.1f} |"
        )
    lines.append("(ms per decode step, projected; RTT 0 = same machine: the measured loopback cost only)")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument("--gpu", action="store_true", help="serve the synthetic store on this machine's GPU and time it")
    mode.add_argument("--project", action="store_true", help="measure costs on this CPU and project (no GPU)")
    p.add_argument("--shape", choices=("full", "tiny"), default="full", help="--gpu: gpt-oss-120b's shape, or tiny")
    p.add_argument("--device", default="cuda", help="--gpu: cuda (the check) or cpu (a test of the code paths)")
    p.add_argument("--workers", type=int, default=4, help="--gpu: worker processes")
    p.add_argument("--layers", default="auto", help="--gpu: layers to serve; auto = as many as fit the GPU")
    p.add_argument("--precision", default="auto", help="--gpu: the workers' --neuro-precision")
    p.add_argument(
        "--memory-budget",
        default=None,
        help="--gpu: the workers' --neuro-memory-budget (default: the GPU room left for experts / workers)",
    )
    p.add_argument("--gpu-fraction", type=float, default=0.85, help="--gpu: share of free GPU memory to plan with")
    p.add_argument("--budget-s", type=float, default=450.0, help="--gpu: wall-clock budget of the whole run")
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=16)
    p.add_argument("--store-dir", default=None, help="--gpu: where to write the store (a local disk)")
    p.add_argument("--out", default=None, help="JSON file (default benchmarks/results/gpu-projection.json)")
    p.add_argument("--quick", action="store_true", help="--project: fewer repeats")
    p.add_argument("--repeats", type=int, default=5, help="--project: repeats per measure (medians)")
    p.add_argument("--context", type=int, default=512, help="--project: tokens in the KV cache at decode")
    p.add_argument("--mbit", type=float, default=100.0, help="--project: volunteers' uplink, Mbit/s")
    p.add_argument("--volunteers", type=int, default=32, help="--project: workers sharing the experts (batch 8)")
    args = p.parse_args(argv)
    return gpu_check(args) if args.gpu else project(args)


if __name__ == "__main__":
    sys.exit(main())
