"""Idle-only volunteering on a Dask worker: sample the machine, pause while its owner uses it.

The shell around neuro_dask/volunteer/idle_policy.py's IdleMonitor. `IdleGuard` samples the machine every
`neuro.worker.idle-interval` seconds (off the event loop), and when the monitor says so:

- pauses the worker's NeuroWorker adapter: new expert calls, and calls queued behind the one
  running, are answered `paused: ...`, which a client treats as a failed call and re-sends to
  another replica; the call already computing finishes normally;
- tells the scheduler (`neuro_pause`), which leaves the worker out of the routes it serves and
  logs a `neuro` event (action pause or resume);
- on resume, tells the scheduler again and reports its experts as loaded once more (a client that
  met a paused worker reported them unreachable).

`apply_limits` lowers the process's OS priority and caps its CPU threads and VRAM.

Signals: CPU use by other processes (psutil: the machine's use minus this process tree's), the
busiest GPU's use when another process runs on it (pynvml, else nvidia-smi), and seconds since the
last keyboard or mouse input (X11 `xprintidle`, macOS `ioreg -c IOHIDSystem`, Windows
GetLastInputInfo). A signal this machine cannot give is None and ignored.

Tests drive a worker with `register_sampler(worker_name, fn)`: that worker's samples come from
`fn()` instead of the machine (`"*"`: every worker without a sampler of its own).
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

from neuro_dask import console
from neuro_dask.console import pause_line, resume_line
from neuro_dask.protocol.messages import ExpertsLoaded, Pause
from neuro_dask.volunteer.idle_policy import IdleMonitor, IdleSignals

log = logging.getLogger("neuro_dask.worker.idle")

Sampler = Callable[[], IdleSignals]

# worker name -> sampler: a test hook (see the module docstring)
SAMPLERS: dict[str, Sampler] = {}


def register_sampler(name: str, sampler: Sampler) -> Callable[[], None]:
    """Feed the worker called `name` from `sampler`; returns a function that undoes it."""
    SAMPLERS[str(name)] = sampler
    return lambda: SAMPLERS.pop(str(name), None)


# ---- signals -------------------------------------------------------------------------------------


class CpuWatch:
    """CPU use by other processes, percent of the whole machine, between two calls.

    "Other" leaves out this worker's process tree and every other neuro-dask worker on the
    machine (a volunteer may run several): otherwise each would count its siblings' expert math
    as the owner's work, and all of them would pause whenever any one served."""

    def __init__(self):
        import psutil

        self.psutil = psutil
        self.me = psutil.Process()
        self.cores = psutil.cpu_count() or 1
        self._procs: dict[int, Any] = {}
        psutil.cpu_percent(None)  # the first call only sets the starting point
        self._mine()

    def _mine(self) -> float:
        """This process tree's use, percent of one core summed over its processes."""
        total, seen = 0.0, {}
        for p in self._volunteer_tree():
            proc = self._procs.get(p.pid, p)
            try:
                total += proc.cpu_percent(None)
            except self.psutil.Error:
                continue
            seen[p.pid] = proc
        self._procs = seen
        return total

    def _volunteer_tree(self) -> list:
        """This process, the machine's neuro-dask workers (their command line names the
        neuro_worker preload: nannies, or workers started without one) and all their children."""
        roots = {self.me.pid: self.me}
        for p in self.psutil.process_iter(["cmdline"]):
            if any("neuro_worker" in part for part in (p.info.get("cmdline") or ())):
                roots.setdefault(p.pid, p)
        tree = dict(roots)
        for root in roots.values():
            try:
                tree.update((c.pid, c) for c in root.children(recursive=True))
            except self.psutil.Error:
                continue  # it exited between the two calls
        return list(tree.values())

    def __call__(self) -> float:
        machine = self.psutil.cpu_percent(None)
        mine = self._mine() / self.cores
        return max(0.0, machine - mine)


def gpu_use_by_others(own_pids: set[int]) -> float | None:
    """The busiest GPU's utilization, counted only where another process computes on it."""
    try:
        import pynvml
    except ImportError:
        return _gpu_use_from_smi(own_pids)
    try:
        pynvml.nvmlInit()
        try:
            busiest = 0.0
            for i in range(pynvml.nvmlDeviceGetCount()):
                handle = pynvml.nvmlDeviceGetHandleByIndex(i)
                pids = {p.pid for p in pynvml.nvmlDeviceGetComputeRunningProcesses(handle)}
                pids |= {p.pid for p in pynvml.nvmlDeviceGetGraphicsRunningProcesses(handle)}
                if pids - own_pids:
                    busiest = max(busiest, float(pynvml.nvmlDeviceGetUtilizationRates(handle).gpu))
            return busiest
        finally:
            pynvml.nvmlShutdown()
    except Exception as exc:  # no driver, no permission: no GPU signal
        log.debug("pynvml: %s", exc)
        return None


def _gpu_use_from_smi(own_pids: set[int]) -> float | None:
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return None
    try:
        gpus = _run([smi, "--query-gpu=index,uuid,utilization.gpu", "--format=csv,noheader,nounits"])
        apps = _run([smi, "--query-compute-apps=gpu_uuid,pid", "--format=csv,noheader"])
    except (OSError, subprocess.SubprocessError):
        return None
    others = {
        uuid.strip()
        for uuid, _, pid in (line.partition(",") for line in apps.splitlines() if line.strip())
        if pid.strip().isdigit() and int(pid) not in own_pids
    }
    busiest = 0.0
    for line in gpus.splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) == 3 and parts[1] in others:
            try:
                busiest = max(busiest, float(parts[2]))
            except ValueError:
                continue
    return busiest


def _run(cmd: list[str]) -> str:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=5, check=True).stdout


def input_idle_seconds() -> float | None:
    """Seconds since the last keyboard or mouse input, where this platform tells; else None."""
    try:
        if sys.platform == "win32":
            return _windows_input_idle()
        if sys.platform == "darwin":
            out = _run(["ioreg", "-c", "IOHIDSystem"])
            match = re.search(r'"HIDIdleTime"\s*=\s*(\d+)', out)
            return int(match.group(1)) / 1e9 if match else None
        if os.environ.get("DISPLAY") and shutil.which("xprintidle"):
            return int(_run(["xprintidle"]).strip()) / 1e3
    except (OSError, ValueError, subprocess.SubprocessError) as exc:
        log.debug("input idle time: %s", exc)
    return None


def _windows_input_idle() -> float | None:
    import ctypes

    class LASTINPUTINFO(ctypes.Structure):
        _fields_ = [("cbSize", ctypes.c_uint), ("dwTime", ctypes.c_uint)]

    info = LASTINPUTINFO()
    info.cbSize = ctypes.sizeof(info)
    if not ctypes.windll.user32.GetLastInputInfo(ctypes.byref(info)):  # type: ignore[attr-defined]
        return None
    return ((ctypes.windll.kernel32.GetTickCount() - info.dwTime) & 0xFFFFFFFF) / 1e3  # type: ignore[attr-defined]


class MachineSampler:
    """Samples this machine; signals it cannot read stay None."""

    def __init__(self, gpu: bool = True):
        self.cpu = CpuWatch()
        self.gpu = gpu

    def __call__(self) -> IdleSignals:
        own = {self.cpu.me.pid, *self.cpu._procs}
        return IdleSignals(
            cpu=self.cpu(), gpu=gpu_use_by_others(own) if self.gpu else None, input_idle=input_idle_seconds()
        )


# ---- limits --------------------------------------------------------------------------------------


def apply_limits(settings, device: str, cores: int) -> dict[str, Any]:
    """Lower priority (idle-only), cap CPU threads and VRAM; returns what was applied."""
    applied: dict[str, Any] = {}
    if settings.idle_only and settings.nice:
        applied["priority"] = lower_priority(settings.nice)
    threads = settings.threads(cores)
    if threads is not None:
        import torch

        torch.set_num_threads(threads)
        applied["threads"] = threads
    cap = settings.vram_cap()
    if cap is not None and device == "cuda":
        import torch

        for i in range(torch.cuda.device_count()):
            torch.cuda.set_per_process_memory_fraction(cap, i)
        applied["vram_fraction"] = cap
    return applied


def lower_priority(nice: int) -> str:
    try:
        if sys.platform == "win32":
            import psutil

            psutil.Process().nice(psutil.BELOW_NORMAL_PRIORITY_CLASS)
            return "below normal"
        return f"nice {os.nice(nice)}"
    except (OSError, AttributeError) as exc:
        log.warning("could not lower this worker's priority: %s", exc)
        return "unchanged"


# ---- the guard -----------------------------------------------------------------------------------


class IdleGuard:
    """Samples the machine and pauses or resumes a NeuroWorker adapter (see the module docstring)."""

    RESEND_EVERY = 5  # while paused, remind the scheduler every this many samples (it may have restarted)

    def __init__(self, adapter, settings, sampler: Sampler | None = None, clock: Callable[[], float] = time.monotonic):
        self.adapter = adapter
        self.worker = adapter.worker
        self.settings = settings
        self.monitor = IdleMonitor(settings.idle_policy())
        self.clock = clock
        self._sampler = sampler
        self._task: asyncio.Task | None = None
        self._ticks = 0

    def sampler(self) -> Sampler:
        hook = SAMPLERS.get(str(self.worker.name)) or SAMPLERS.get("*")
        if hook is not None:
            return hook
        if self._sampler is None:
            self._sampler = MachineSampler(gpu=True)
            probe = self._sampler()
            if probe.input_idle is None:
                log.info(
                    "idle-only: this machine does not tell when its keyboard or mouse was last used; "
                    "watching CPU%s use only",
                    " and GPU" if probe.gpu is not None else "",
                )
        return self._sampler

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())
        log.info("idle-only: pausing while the owner uses this machine (%s)", self.monitor.policy)

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.settings.idle_interval)
            try:
                await self.tick()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("idle-only: sampling failed")

    async def tick(self) -> None:
        sampler = self.sampler()
        signals = await asyncio.get_running_loop().run_in_executor(None, sampler)
        decision = self.monitor.observe(signals, self.clock())
        self._ticks += 1
        if decision.changed:
            self.adapter.paused = decision.reason if decision.paused else ""
            log.info("idle-only: %s (%s)", "pausing" if decision.paused else "resuming", decision.reason)
            console.say(pause_line(decision.reason) if decision.paused else resume_line(decision.reason))
            await self.tell_scheduler(decision.paused, decision.reason)
            if not decision.paused:
                await self.report_hosted()
        elif decision.paused and self._ticks % self.RESEND_EVERY == 0:
            await self.tell_scheduler(True, decision.reason)

    async def tell_scheduler(self, paused: bool, reason: str) -> None:
        try:
            await Pause(self.worker.address, paused, reason).send(self.worker.scheduler)
        except Exception as exc:  # the scheduler is away: calls are refused here anyway
            log.warning("idle-only: could not tell the scheduler: %s", exc)

    async def report_hosted(self) -> None:
        """Clients that met the paused worker reported its experts unreachable: serve them again."""
        host = self.adapter.host
        for model, pairs in host.hosted().items():
            try:
                await ExpertsLoaded(
                    self.worker.address,
                    model,
                    tuple(pairs),
                    precision=host.status().get("precision", {}).get(model, "float32"),
                ).send(self.worker.scheduler)
            except Exception as exc:
                log.warning("idle-only: could not re-report experts of %s: %s", model, exc)
