"""A checkpoint larger than the sharder's memory use: peak RSS stays near one tensor, not the file."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from neuro_dask.store.synthetic import mixtral_config, write_random_mixtral

pytestmark = pytest.mark.slow

CONFIG = mixtral_config(hidden=1024, intermediate=3584, layers=4, experts=8)
MiB = 2**20


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


@pytest.mark.parametrize("layout", ["neuro", "transformers"])
def test_sharding_1gb_checkpoint_keeps_peak_memory_near_one_tensor(tmp_path, layout):
    """Both sharders: the hand-written trunk's, and transformers' conversion rules applied one
    expert at a time (with the trunk streamed to disk tensor by tensor)."""
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    total, largest = write_random_mixtral(src, CONFIG, files=2)
    assert total >= 1_000_000_000
    # transformers' own import (its model classes, conversion rules) is a fixed cost, not sharding's
    setup = "from neuro_dask.store.sharder import shard_checkpoint" + (
        "; import transformers.models.mixtral.modeling_mixtral, transformers.conversion_mapping"
        if layout == "transformers"
        else ""
    )
    extra = _extra_peak_rss(
        setup, f"m = shard_checkpoint({str(src)!r}, {str(dst)!r}, layout={layout!r}); assert len(m.experts) == 32"
    )
    # The probe must be able to see memory: reading one checkpoint file whole through safetensors'
    # mmap (every page touched) shows up in full.
    whole = _extra_peak_rss(
        "from safetensors.torch import load_file",
        f"t = load_file({str(src / 'model-00001-of-00002.safetensors')!r}); "
        "s = sum(float(v.sum()) for v in t.values())",
    )
    print(
        f"{layout}: checkpoint {total / MiB:.0f} MiB, largest tensor {largest / MiB:.1f} MiB; peak RSS added by "
        f"sharding {extra / MiB:.0f} MiB, by loading one of its two files whole {whole / MiB:.0f} MiB"
    )
    assert whole > total / 3
    # A few tensors' worth (read buffers the allocator keeps for reuse), never the checkpoint. The
    # transformers layout builds each expert's gate_up by transformers' own stack-and-concatenate,
    # a few copies of one expert (measured 148 MiB here against 102 MiB).
    assert extra < (10 if layout == "neuro" else 16) * largest
    assert extra < total / (8 if layout == "neuro" else 5)
