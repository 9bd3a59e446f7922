"""Machine profile, expert FFN benchmark and device choice."""

from __future__ import annotations

import json
import pickle

import pytest
import torch

from neuro_dask.runtime import machine
from neuro_dask.runtime.machine import (
    CudaDevice,
    DeviceUnavailableError,
    MachineProfile,
    benchmark_expert_ffn,
    memory_bytes,
    pick_device,
    profile_machine,
)


def test_profile_fields_are_sane_and_round_trip_through_json():
    p = profile_machine()
    assert p.cores >= 1
    assert p.memory_total >= p.memory_available > 0
    assert p.platform and p.machine and p.torch_version == str(torch.__version__)
    assert all(d.total_memory >= d.free_memory >= 0 for d in p.cuda)
    d = p.to_dict()
    assert json.loads(json.dumps(d)) == d
    assert MachineProfile.from_dict(json.loads(json.dumps(d))) == p


def test_to_dict_lists_cuda_devices_as_plain_dicts():
    p = MachineProfile(4, 8 << 30, 4 << 30, "Linux", "x86_64", "2.4", (CudaDevice(0, "H100", 80 << 30, 70 << 30),))
    d = json.loads(json.dumps(p.to_dict()))
    assert d["cuda"] == [{"index": 0, "name": "H100", "total_memory": 80 << 30, "free_memory": 70 << 30}]
    assert MachineProfile.from_dict(d) == p


def test_memory_reads_meminfo_and_clamps_to_a_cgroup_limit(tmp_path):
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       16000 kB\nMemFree:         1000 kB\nMemAvailable:    8000 kB\n")
    cgroup = tmp_path / "cgroup"
    cgroup.mkdir()
    assert memory_bytes(meminfo, cgroup) == (16000 * 1024, 8000 * 1024)
    (cgroup / "memory.max").write_text("max\n")
    (cgroup / "memory.current").write_text("100\n")
    assert memory_bytes(meminfo, cgroup) == (16000 * 1024, 8000 * 1024)
    (cgroup / "memory.max").write_text(f"{4000 * 1024}\n")
    (cgroup / "memory.current").write_text(f"{1000 * 1024}\n")
    assert memory_bytes(meminfo, cgroup) == (4000 * 1024, 3000 * 1024)


def test_benchmark_is_positive_on_a_tiny_expert():
    gflops = benchmark_expert_ffn(hidden=64, intermediate=128, tokens=4, min_seconds=0.01)
    assert isinstance(gflops, float) and gflops > 0


def test_benchmark_uses_the_injected_clock():
    ticks = iter(i * 0.004 for i in range(100))
    calls = []

    def clock() -> float:
        calls.append(1)
        return next(ticks)

    gflops = benchmark_expert_ffn(hidden=64, intermediate=128, tokens=4, min_seconds=0.01, clock=clock)
    # Start at 0.0; after calls 1, 2, 3 the clock shows 0.004, 0.008, 0.012 >= 0.01: three calls.
    assert len(calls) == 4
    assert gflops == pytest.approx(3 * 2 * 4 * 3 * 64 * 128 / 0.012 / 1e9)


def test_pick_device(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(machine, "_mps_available", lambda: False)
    assert pick_device("auto") == "cpu"
    assert pick_device("CPU") == "cpu"
    with pytest.raises(DeviceUnavailableError, match="CUDA build of torch") as info:
        pick_device("cuda")
    assert pickle.loads(pickle.dumps(info.value)).device == "cuda"
    with pytest.raises(DeviceUnavailableError, match="Apple silicon"):
        pick_device("mps")
    with pytest.raises(DeviceUnavailableError, match="'auto', 'cpu'"):
        pick_device("tpu")


def test_pick_device_prefers_cuda_then_mps(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert pick_device("auto") == "cuda" and pick_device("cuda:1") == "cuda:1"
    with pytest.raises(DeviceUnavailableError, match="2 CUDA device"):
        pick_device("cuda:2")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(machine, "_mps_available", lambda: True)
    assert pick_device("auto") == "mps"


def test_pick_device_on_this_machine():
    """Unpatched: 'auto' names what torch can really use here."""
    expected = "cuda" if torch.cuda.is_available() else "mps" if machine._mps_available() else "cpu"
    assert pick_device("auto") == expected
    if not torch.cuda.is_available():
        with pytest.raises(DeviceUnavailableError):
            pick_device("cuda")
