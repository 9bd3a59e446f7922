"""What a volunteer's machine can offer: cores, memory, GPUs, and measured expert throughput."""

from __future__ import annotations

import logging
import os
import platform
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from neuro_dask.errors import ConfigError, NeuroDaskError
from neuro_dask.model.moe import ExpertWeights, run_expert

log = logging.getLogger(__name__)

DEVICE_KINDS = ("cpu", "cuda", "mps")


class DeviceUnavailableError(NeuroDaskError, ValueError):
    """A requested torch device is unknown or not usable on this machine."""

    def __init__(self, device: str, problem: str):
        self.device = device
        self.problem = problem
        super().__init__(f"device {device!r} {problem}")

    def __reduce__(self):  # may be raised on workers: must survive pickling back to the client
        return type(self), (self.device, self.problem)


@dataclass(frozen=True)
class CudaDevice:
    index: int
    name: str
    total_memory: int  # bytes
    free_memory: int  # bytes, when profiled


@dataclass(frozen=True)
class MachineProfile:
    cores: int  # usable by this process (its CPU affinity), not the host's count
    memory_total: int  # bytes
    memory_available: int  # bytes
    platform: str
    machine: str
    torch_version: str
    cuda: tuple[CudaDevice, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        """Plain ints, strs, lists and dicts: safe for JSON and msgpack."""
        d = asdict(self)
        d["cuda"] = [asdict(c) for c in self.cuda]
        return d

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> MachineProfile:
        fields = {k: v for k, v in raw.items() if k != "cuda"}
        return cls(**fields, cuda=tuple(CudaDevice(**c) for c in raw.get("cuda", ())))


def profile_machine() -> MachineProfile:
    total, available = memory_bytes()
    return MachineProfile(
        cores=usable_cores(),
        memory_total=total,
        memory_available=available,
        platform=platform.system(),
        machine=platform.machine(),
        torch_version=str(torch.__version__),
        cuda=cuda_devices(),
    )


def usable_cores() -> int:
    """Cores this process may run on: a taskset or container cpuset counts, the host's total not."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return os.cpu_count() or 1


def memory_bytes(meminfo: str | Path = "/proc/meminfo", cgroup: str | Path = "/sys/fs/cgroup") -> tuple[int, int]:
    """(total, available) bytes, clamped to a cgroup v2 limit where one applies.

    /proc/meminfo shows the host inside a container; without the clamp a volunteer's
    docker container with a 4 GiB limit would advertise the host's 64 GiB.
    """
    total, available = _meminfo(Path(meminfo)) or _sysconf_memory()
    limit = _cgroup_limit(Path(cgroup))
    if limit is not None:
        total = min(total, limit[0])
        available = min(available, max(0, limit[0] - limit[1]))
    return total, min(available, total)


def _meminfo(path: Path) -> tuple[int, int] | None:
    try:
        text = path.read_text()
    except OSError:
        return None
    kib: dict[str, int] = {}
    for line in text.splitlines():
        name, _, rest = line.partition(":")
        parts = rest.split()
        if parts and parts[0].isdigit():
            kib[name.strip()] = int(parts[0])
    if "MemTotal" not in kib:
        return None
    # MemAvailable is missing on kernels before 3.14; MemFree underestimates, which is the safe side.
    available = kib.get("MemAvailable", kib.get("MemFree", 0))
    return kib["MemTotal"] * 1024, available * 1024


def _sysconf_memory() -> tuple[int, int]:
    page = os.sysconf("SC_PAGE_SIZE")
    total = page * os.sysconf("SC_PHYS_PAGES")
    try:
        available = page * os.sysconf("SC_AVPHYS_PAGES")
    except (ValueError, OSError):  # macOS has no SC_AVPHYS_PAGES
        available = total
    return total, available


def _cgroup_limit(root: Path) -> tuple[int, int] | None:
    """(memory.max, memory.current) of this process's cgroup v2, or None when unlimited/absent."""
    try:
        limit = (root / "memory.max").read_text().strip()
        current = (root / "memory.current").read_text().strip()
    except OSError:
        return None
    if not limit.isdigit() or not current.isdigit():
        return None  # "max" means no limit
    return int(limit), int(current)


def cuda_devices() -> tuple[CudaDevice, ...]:
    """Every visible CUDA device; one that cannot be queried is left out with a warning."""
    if not torch.cuda.is_available():
        return ()
    devices = []
    for index in range(torch.cuda.device_count()):
        try:
            props = torch.cuda.get_device_properties(index)
            free, total = torch.cuda.mem_get_info(index)
        except RuntimeError as exc:  # e.g. a GPU in exclusive-process mode held by another process
            log.warning("cuda:%d cannot be queried, leaving it out: %s", index, exc)
            continue
        devices.append(CudaDevice(index, props.name, int(total), int(free)))
    return tuple(devices)


def benchmark_expert_ffn(
    hidden: int = 1024,
    intermediate: int = 3584,
    tokens: int = 16,
    device: str = "cpu",
    min_seconds: float = 0.2,
    clock: Callable[[], float] = time.perf_counter,
) -> float:
    """GFLOP/s of one SwiGLU expert over `tokens` rows, on seeded random weights.

    One warm-up call, then calls until `clock` shows at least min_seconds; each call counts
    2 * tokens * 3 * hidden * intermediate FLOPs. clock is read once before the timed calls and
    once after each, and must advance, or this never returns.
    """
    if min(hidden, intermediate, tokens) < 1 or not min_seconds > 0:
        raise ConfigError(
            f"benchmark_expert_ffn(hidden={hidden}, intermediate={intermediate}, tokens={tokens}, "
            f"min_seconds={min_seconds}): sizes must be >= 1 and min_seconds > 0"
        )
    dev = torch.device(device)
    weights, x = _benchmark_inputs(hidden, intermediate, tokens, dev)
    flops_per_call = 2 * tokens * 3 * hidden * intermediate
    with torch.inference_mode():
        run_expert(x, weights)
        _synchronize(dev)
        calls, start = 0, clock()
        while True:
            run_expert(x, weights)
            _synchronize(dev)  # without it a GPU would only be queueing work
            calls += 1
            elapsed = clock() - start
            if elapsed >= min_seconds:
                break
    gflops = flops_per_call * calls / elapsed / 1e9
    log.debug(
        "expert FFN %dx%d, %d tokens on %s: %d calls in %.3f s, %.1f GFLOP/s",
        hidden,
        intermediate,
        tokens,
        device,
        calls,
        elapsed,
        gflops,
    )
    return gflops


def _benchmark_inputs(
    hidden: int, intermediate: int, tokens: int, device: torch.device
) -> tuple[ExpertWeights, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)  # seeded on the CPU: the same numbers on every device

    def rand(*shape: int) -> torch.Tensor:
        # Scaled like a trained layer so activations stay finite and the timing is representative.
        return (torch.randn(shape, generator=gen) / shape[-1] ** 0.5).to(device)

    weights = ExpertWeights(rand(intermediate, hidden), rand(intermediate, hidden), rand(hidden, intermediate))
    return weights, rand(tokens, hidden)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def pick_device(requested: str) -> str:
    """'auto' -> 'cuda' if available, else 'mps' if available, else 'cpu'.

    'cpu', 'cuda', 'cuda:N' and 'mps' are returned as given when usable on this machine;
    anything else, or a device this machine lacks, raises DeviceUnavailableError.
    """
    name = requested.strip().lower()
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "mps" if _mps_available() else "cpu"
    kind, _, index = name.partition(":")
    if kind not in DEVICE_KINDS or (index and (kind != "cuda" or not index.isdigit())):
        raise DeviceUnavailableError(
            requested, "is not a device neuro_dask runs on; use 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps'"
        )
    if kind == "cuda":
        _check_cuda(requested, int(index) if index else 0)
    elif kind == "mps" and not _mps_available():
        raise DeviceUnavailableError(
            requested, "is not available: MPS needs Apple silicon and a torch build with MPS; use 'cpu' or 'auto'"
        )
    return name


def _check_cuda(requested: str, index: int) -> None:
    if not torch.cuda.is_available():
        build = "a CPU-only build" if torch.version.cuda is None else f"built for CUDA {torch.version.cuda}"
        raise DeviceUnavailableError(
            requested,
            f"is not available: torch {torch.__version__} ({build}) sees no usable GPU. "
            "Install a CUDA build of torch and a matching NVIDIA driver, or use 'cpu' or 'auto'",
        )
    count = torch.cuda.device_count()
    if index >= count:
        raise DeviceUnavailableError(
            requested, f"does not exist: this machine has {count} CUDA device(s), cuda:0 to cuda:{count - 1}"
        )


def _mps_available() -> bool:
    mps = getattr(torch.backends, "mps", None)
    return bool(mps and mps.is_available())
