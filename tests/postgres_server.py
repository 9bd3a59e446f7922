"""A throwaway PostgreSQL server for the ledger's tests, when this machine has one installed.

`NEURO_TEST_POSTGRES_URL` points the tests at an existing server instead (CI can start one).
Otherwise, if `initdb` and `pg_ctl` are on PATH and psycopg is importable, a server is started in
a temporary folder on a free loopback port (as the `postgres` user when running as root, since
PostgreSQL refuses root) and stopped afterwards. Without either, the PostgreSQL tests skip.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def unavailable() -> str | None:
    """Why no PostgreSQL can be had here, or None."""
    if os.environ.get("NEURO_TEST_POSTGRES_URL"):
        return None
    try:
        import psycopg  # noqa: F401
    except ImportError:
        return "psycopg is not installed"
    if not (shutil.which("initdb") and shutil.which("pg_ctl")):
        return "no initdb/pg_ctl on PATH and NEURO_TEST_POSTGRES_URL is not set"
    if os.geteuid() == 0 and not shutil.which("runuser"):
        return "running as root without runuser to drop to the postgres user"
    return None


@contextlib.contextmanager
def postgres_server() -> Iterator[str]:
    """Yields a `postgresql://` URL of an empty database."""
    if url := os.environ.get("NEURO_TEST_POSTGRES_URL"):
        yield url
        return
    # Not under pytest's tmp_path: its root-only parents would keep the postgres user out.
    folder = Path(tempfile.mkdtemp(prefix="neuro-ledger-pg-"))
    data, port = folder / "pgdata", _free_port()
    prefix: list[str] = []
    if os.geteuid() == 0:
        shutil.chown(folder, "postgres", "postgres")
        prefix = ["runuser", "-u", "postgres", "--"]
    subprocess.run(
        prefix + ["initdb", "-D", str(data), "--auth=trust", "-U", "postgres", "--no-sync"],
        check=True,
        capture_output=True,
    )
    subprocess.run(
        prefix
        + [
            "pg_ctl",
            "-D",
            str(data),
            "-l",
            str(folder / "server.log"),
            "-w",
            "-o",
            f"-p {port} -k {folder} -h 127.0.0.1 -c fsync=on",
            "start",
        ],
        check=True,
        capture_output=True,
    )
    try:
        yield f"postgresql://postgres@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run(prefix + ["pg_ctl", "-D", str(data), "-m", "immediate", "-w", "stop"], capture_output=True)
        shutil.rmtree(folder, ignore_errors=True)
