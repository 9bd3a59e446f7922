"""Helpers for end-to-end tests that run neuro_dask as real processes (tests/e2e/)."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Self

from polling import poll_until

# `neuro-dask` as a subprocess, whether or not the console script is on PATH.
NEURO_DASK = (sys.executable, "-m", "neuro_dask.cli")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """`neuro-dask ARGS` to completion: its exit code and its output (stdout and stderr together)."""
    return subprocess.run(
        [*NEURO_DASK, *args], check=False, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=timeout
    )


class Processes:
    """Long-running processes (schedulers, workers), each in its own session with its own log file
    and expert cache in `folder`; `close()` ends them all (SIGTERM, then SIGKILL after 20 s)."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.procs: list[tuple[subprocess.Popen, Path]] = []

    def __call__(self, *argv: str, env: dict[str, str] | None = None) -> subprocess.Popen:
        n = len(self.procs)
        path = self.folder / f"proc-{n}.log"
        env = dict(os.environ if env is None else env, DASK_NEURO__WORKER__CACHE_DIR=str(self.folder / f"cache{n}"))
        with open(path, "w") as log:  # the child keeps its own copy of the descriptor
            proc = subprocess.Popen(list(argv), stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env)
        self.procs.append((proc, path))
        return proc

    def log(self, proc: subprocess.Popen) -> str:
        return next(path for p, path in self.procs if p is proc).read_text(errors="replace")

    def check_alive(self) -> None:
        """Fail with the log of any process that has exited (rather than time out waiting on it)."""
        for proc, path in self.procs:
            if proc.poll() is not None:
                raise AssertionError(
                    f"{proc.args} exited with {proc.returncode}:\n{path.read_text(errors='replace')[-4000:]}"
                )

    def wait_for(self, condition: Callable[[], object], timeout: float, what: str) -> object:
        """Poll `condition` until it returns something truthy; fail early if a process died."""

        def alive_and_ready() -> object:
            self.check_alive()
            return condition()

        return poll_until(alive_and_ready, timeout, what, interval=0.1)

    def wait_for_port(self, host: str, port: int, timeout: float = 60, ssl_context=None) -> None:
        """Wait until `host:port` accepts connections; with `ssl_context` (a TLS listener), until a
        TLS handshake with it succeeds, so that the server sees no failed handshake."""

        def accepting() -> bool:
            try:
                with socket.create_connection((host, port), timeout=1) as sock:
                    if ssl_context is not None:
                        ssl_context.wrap_socket(sock).close()
                return True
            except OSError:
                return False

        self.wait_for(accepting, timeout, f"{host}:{port} to accept connections")

    def close(self) -> None:
        for proc, _ in self.procs:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGTERM)
        for proc, _ in self.procs:
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(20)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
