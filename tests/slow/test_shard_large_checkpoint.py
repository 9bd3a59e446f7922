"""A checkpoint larger than the sharder's memory use: peak RSS stays near one tensor, not the file."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch

from neuro_dask.store.safetensors_io import StreamingWriter

pytestmark = pytest.mark.slow

CONFIG = dict(model_type="mixtral", vocab_size=4096, hidden_size=1024, intermediate_size=3584,
              num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=2, num_local_experts=8,
              num_experts_per_tok=2, max_position_embeddings=512, rms_norm_eps=1e-5)
MiB = 2**20


def _write_synthetic_checkpoint(root) -> tuple[int, int]:
    """~1.2 GB Mixtral-layout checkpoint, two files + index, written one tensor at a time."""
    c = CONFIG
    d, i, e, kv = c["hidden_size"], c["intermediate_size"], c["num_local_experts"], 2 * 128
    specs = [("model.embed_tokens.weight", (c["vocab_size"], d)), ("model.norm.weight", (d,)),
             ("lm_head.weight", (c["vocab_size"], d))]
    for layer in range(c["num_hidden_layers"]):
        p = f"model.layers.{layer}"
        specs += [(f"{p}.input_layernorm.weight", (d,)), (f"{p}.post_attention_layernorm.weight", (d,)),
                  (f"{p}.self_attn.q_proj.weight", (d, d)), (f"{p}.self_attn.k_proj.weight", (kv, d)),
                  (f"{p}.self_attn.v_proj.weight", (kv, d)), (f"{p}.self_attn.o_proj.weight", (d, d)),
                  (f"{p}.block_sparse_moe.gate.weight", (e, d))]
        for x in range(e):
            q = f"{p}.block_sparse_moe.experts.{x}"
            specs += [(f"{q}.w1.weight", (i, d)), (f"{q}.w3.weight", (i, d)), (f"{q}.w2.weight", (d, i))]
    half = len(specs) // 2
    files = {"model-00001-of-00002.safetensors": specs[:half], "model-00002-of-00002.safetensors": specs[half:]}
    g = torch.Generator().manual_seed(0)
    total = 0
    for name, part in files.items():
        writer = StreamingWriter(root / name, [(n, torch.float32, s) for n, s in part])
        writer.write(torch.randn(s, generator=g) * 0.02 for _, s in part)
        total += writer.bytes
    weight_map = {n: f for f, part in files.items() for n, _ in part}
    (root / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (root / "config.json").write_text(json.dumps(CONFIG))
    largest = max(4 * torch.Size(s).numel() for _, s in specs)
    return total, largest


def _extra_peak_rss(setup: str, work: str) -> int:
    """Bytes of peak RSS that `work` adds on top of the process after `setup`, in a fresh interpreter.

    Writing 5 to /proc/self/clear_refs resets the kernel's peak-RSS mark (VmHWM), so the import
    of torch, which peaks higher than the sharder ever should, does not hide what sharding uses.
    """
    probe = textwrap.dedent(f"""
        {setup}
        def status(key):
            for line in open("/proc/self/status"):
                if line.startswith(key):
                    return int(line.split()[1]) * 1024
        open("/proc/self/clear_refs", "w").write("5")
        before = status("VmRSS:")
        {work}
        print("EXTRA", status("VmHWM:") - before)
    """)
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr
    return int(out.stdout.split("EXTRA")[-1])


def test_sharding_1gb_checkpoint_keeps_peak_memory_near_one_tensor(tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    total, largest = _write_synthetic_checkpoint(src)
    assert total >= 1_000_000_000
    extra = _extra_peak_rss("from neuro_dask.store.sharder import shard_checkpoint",
                            f"m = shard_checkpoint({str(src)!r}, {str(dst)!r}); assert len(m.experts) == 32")
    # The probe must be able to see memory: reading one checkpoint file whole through safetensors'
    # mmap (every page touched) shows up in full.
    whole = _extra_peak_rss("from safetensors.torch import load_file",
                            f"t = load_file({str(src / 'model-00001-of-00002.safetensors')!r}); "
                            "s = sum(float(v.sum()) for v in t.values())")
    print(f"checkpoint {total / MiB:.0f} MiB, largest tensor {largest / MiB:.1f} MiB; peak RSS added by "
          f"sharding {extra / MiB:.0f} MiB, by loading one of its two files whole {whole / MiB:.0f} MiB")
    assert whole > total / 3
    # A few tensors' worth (read buffers the allocator keeps for reuse), never the checkpoint.
    assert extra < 10 * largest
    assert extra < total / 8
