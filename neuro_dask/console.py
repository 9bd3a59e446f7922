"""What the long-running commands tell the person who started them, in a few lines.

Dask's own INFO logs are off under `neuro-dask` (long, and about Dask rather than the network), and
a worker or scheduler that prints nothing leaves its volunteer or operator guessing. The lines
that matter (where the scheduler listens and how to join it, a worker's connection, the experts it
loads, why it paused and how to change that) go to the `neuro_dask.console` logger, which
`enable()` sends to stderr at INFO in the processes the preloads set up. `neuro.console: false`
keeps a process quiet (the demo's own local cluster does, so its output stays the demo's).

The text is built by the pure functions below; the preloads only call `say`.
"""

from __future__ import annotations

import logging
import sys

CONSOLE = logging.getLogger("neuro_dask.console")
_FORMAT = "%(asctime)s %(message)s"


def enable(enabled: bool = True) -> None:
    """Send console lines to stderr (once per process); `enabled=False` silences them."""
    if not enabled:
        CONSOLE.disabled = True
        return
    CONSOLE.disabled = False
    CONSOLE.setLevel(logging.INFO)
    if not any(isinstance(h, _Stderr) for h in CONSOLE.handlers):
        handler = _Stderr()
        handler.setFormatter(logging.Formatter(_FORMAT, datefmt="%H:%M:%S"))
        CONSOLE.addHandler(handler)
    CONSOLE.propagate = False  # Dask's handler on the root would print each line twice


class _Stderr(logging.StreamHandler):
    """stderr as it is when a line is written, not when the handler was made (a test's capture
    may have replaced it since)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _value) -> None:
        pass


def say(message: str, *args) -> None:
    CONSOLE.info(message, *args)


def mib(n: int | float) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"


# ---- the scheduler -----------------------------------------------------------------------------


def scheduler_banner(
    address: str,
    dashboard: str | None,
    hardened: bool,
    ledger: str | None,
    replicas: int,
    tls_dir_hint: str = "DIR",
    relay: str | None = None,
) -> list[str]:
    """The scheduler's first lines: where it listens, where its dashboard is, how workers join
    and how a model gets published."""
    tls = address.startswith("tls://")
    mode = ("hardened" if hardened else "NOT hardened") + (", mutual TLS" if tls else ", no TLS")
    lines = [
        f"neuro-dask scheduler at {address} ({mode}; {replicas} replica(s) per expert; ledger: {ledger or 'none'})"
    ]
    if dashboard:
        lines.append(f"dashboard: {dashboard}/neuro/overview")
    tls_flag = f" --tls {tls_dir_hint}" if tls else ""
    lines.append(
        f"volunteers join with:  neuro-dask worker {address}{tls_flag}"
        f"   (or: dask worker {address} --preload neuro_worker)"
    )
    if relay:
        lines.append(
            f"volunteers behind a NAT (no port opened) add:  --relay {relay}"
            "   (the relay copies bytes between the endpoints; it cannot read them under TLS)"
        )
    lines.append(f"publish a model with:  neuro-dask publish MODEL_DIR --scheduler {address}{tls_flag}")
    if tls:
        lines.append(
            f"(a worker's {tls_dir_hint} holds ca.pem and its own worker-NAME.pem/.key: "
            "`neuro-dask certs issue CA_DIR --role worker --name NAME`)"
        )
    return lines


# ---- a worker ----------------------------------------------------------------------------------


def worker_banner(
    name: str, address: str, scheduler: str, device: str, budget: int, idle_only: bool, hardened: bool
) -> str:
    idle = "idle-only (pauses while this machine's owner uses it)" if idle_only else "serving even while busy"
    who = address if name in ("", address) else f"{name} ({address})"
    return (
        f"worker {who} connected to {scheduler}: device {device}, expert budget {mib(budget)}, "
        f"{idle}{', hardened' if hardened else ''}"
    )


def loaded_line(model: str, loaded: int, failed: dict, seconds: float, hosted_bytes: int) -> list[str]:
    lines = [
        f"loaded {loaded} experts of {model} in {seconds:.1f} s ({mib(hosted_bytes)} of expert weights "
        f"in memory); serving"
    ]
    for (layer, expert), why in list(failed.items())[:5]:
        lines.append(f"could not load expert {expert} of layer {layer}: {why}")
    if len(failed) > 5:
        lines.append(f"... and {len(failed) - 5} more experts failed to load")
    return lines


def pause_line(reason: str) -> str:
    return (
        f"paused: {reason}. Expert calls go to other workers until this machine is idle again. "
        "To serve while busy: restart with --no-idle-only, or raise neuro.worker.idle-busy-cpu "
        "(DASK_NEURO__WORKER__IDLE_BUSY_CPU; docs/distributed.md)"
    )


def resume_line(reason: str) -> str:
    return f"resumed: {reason}; serving again"
