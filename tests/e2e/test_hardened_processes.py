"""A hardened network for real (docs/security.md): `neuro-dask certs`, then `neuro-dask scheduler
--tls DIR` and two `neuro-dask worker --tls` processes (hardened by default), the operator's
`neuro-dask publish`, and a client with a client certificate in this process.

This process stays an ordinary, unhardened client throughout (nd.load hardens only when
`neuro.security.hardened` is set): the tests check that nd.load left it as it was.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest
import torch
from distributed import Client
from distributed.core import rpc
from distributed.protocol.pickle import dumps
from polling import PollTimeout, poll_until
from process_helpers import NEURO_DASK, Processes, free_port, run_cli
from tiny_models import padded_batch

import neuro_dask as nd
from neuro_dask.security.hardening import is_installed
from neuro_dask.store.manifest import Manifest

MODEL = "qwen2_moe"


@dataclass
class Network:
    address: str
    certs: Path
    model_id: str
    published: str  # what `neuro-dask publish` printed
    processes: Processes
    hardened_before: bool  # whether this process was hardened before (by a test that leaked it)

    def client(self, role: str = "client") -> Client:
        return Client(self.address, security=nd.security_for(role, self.certs), timeout=60)


def _volunteer_folder(certs: Path, folder: Path, name: str) -> Path:
    """What a volunteer is given: the CA's public certificate and its own pair, nothing else."""
    folder.mkdir()
    for file in ("ca.pem", f"worker-{name}.pem", f"worker-{name}.key"):
        shutil.copy2(certs / file, folder / file)  # copy2 keeps the key's 0600
    return folder


@pytest.fixture(scope="module")
def network(tmp_path_factory, sharded):
    tmp = tmp_path_factory.mktemp("hardened-processes")
    hardened_before = is_installed()
    certs = tmp / "certs"
    for args in (
        ("certs", "quickstart", str(certs)),
        ("certs", "issue", str(certs), "--role", "worker", "--name", "worker-2"),
    ):
        done = run_cli(*args, timeout=60)
        assert done.returncode == 0, done.stdout
    port = free_port()
    address = f"tls://127.0.0.1:{port}"
    with Processes(tmp) as spawn:
        spawn(
            *NEURO_DASK,
            "scheduler",
            "--tls",
            str(certs),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--dashboard-address",
            "127.0.0.1:0",
        )
        # --no-idle-only: this test keeps the machine busy, which an idle-only volunteer would yield to.
        worker = (
            "worker",
            address,
            "--memory-budget",
            "512MiB",
            "--no-dashboard",
            "--no-idle-only",
            "--neuro-no-benchmark",
        )
        spawn(*NEURO_DASK, *worker, "--tls", str(certs), "--name", "worker-1")
        # worker-2 is named by nothing but the only certificate in its own folder.
        spawn(*NEURO_DASK, *worker, "--tls", str(_volunteer_folder(certs, tmp / "volunteer-2", "worker-2")))
        security = nd.security_for("client", certs)
        spawn.wait_for_port("127.0.0.1", port, ssl_context=security.get_connection_args("client")["ssl_context"])
        with Client(address, security=security, timeout=60) as client:
            spawn.wait_for(lambda: len(client.scheduler_info()["workers"]) == 2, 120, "two workers")
        path = sharded(MODEL)
        published = run_cli("publish", str(path), "--scheduler", address, "--tls", str(certs), timeout=180)
        assert published.returncode == 0, published.stdout
        yield Network(address, certs, Manifest.read(path).model_id, published.stdout, spawn, hardened_before)
    assert is_installed() == hardened_before, "this test process was hardened"


def test_hardened_tls_network_of_processes_generates_like_local(network, sharded):
    assert f"published {network.model_id} from " in network.published
    assert f"{network.model_id}: every expert is served" in network.published
    ids, mask = padded_batch((5, 9, 13), seed=6)
    expected = nd.load(sharded(MODEL)).generate(ids, mask, max_new_tokens=24)
    with network.client() as client:
        with nd.load(sharded(MODEL), client=client) as model:  # finds the operator's model: a client cannot publish
            assert torch.equal(model.generate(ids, mask, max_new_tokens=24), expected)
        with pytest.raises(Exception, match="only the operator"):  # the network's map is the operator's
            client.sync(client.scheduler.neuro_status)
    with network.client("operator") as operator:
        status = operator.sync(operator.scheduler.neuro_status)
    assert is_installed() == network.hardened_before  # nd.load left this process as it was
    workers = status["workers"].values()
    assert sorted(w["name"] for w in workers) == ["worker-1", "worker-2"]  # the names on their certificates
    assert all(w["serving"] for w in workers)
    assert all(w["memory_budget"] == 512 * 2**20 for w in workers)
    assert list(status["models"]) == [network.model_id]


def _refusals(client, since: float, op: str, count: int = 1) -> list[dict]:
    """The refusals of `op` on the scheduler's security event log (a worker forwards its own
    there) since `since`, once there are `count` of them (at most 10 s), read with the
    operator's certificate (the log is the operator's)."""
    found: list[dict] = []
    address = client.scheduler.address
    certs = Path(client.security.tls_ca_file).parent

    with Client(address, security=nd.security_for("operator", certs), timeout=60) as operator:

        def arrived() -> bool:
            found[:] = [
                e
                for _, e in operator.get_events("neuro-security")
                if e["time"] >= since and e["kind"] == "refused-op" and e["detail"].startswith(f"{op}:")
            ]
            return len(found) >= count

        with contextlib.suppress(PollTimeout):  # fewer arrived: the caller's assertion judges what did
            poll_until(arrived, 30, f"{count} refusals of {op}")
    return found


def test_a_client_without_the_operator_certificate_cannot_publish(network, sharded):
    with network.client() as client:
        since = time.time()
        with pytest.raises(Exception, match="only the operator"):
            client.sync(client.scheduler.neuro_publish, store_url=str(sharded(MODEL)))
        refused = _refusals(client, since, "neuro_publish")
    assert [e["identity"] for e in refused] == ["client:client"], refused


def test_a_hardened_worker_refuses_client_run(network, tmp_path):
    marker = tmp_path / "pwned"

    def payload(path=str(marker)):
        open(path, "w").close()

    with network.client() as client:
        since = time.time()
        with pytest.raises(Exception, match="refused 'broadcast'"):  # the scheduler relays it to no worker
            client.run(payload)
        info = client.scheduler_info()["workers"]
        workers = list(info)
        nannies = [w["nanny"] for w in info.values()]
        assert len(workers) == 2 and all(nannies), info
        # A client that skips the scheduler and asks each worker, or the nanny that runs it,
        # directly is refused there.
        args = nd.security_for("client", network.certs).get_connection_args("client")
        for address in workers + nannies:

            async def run_on_worker(address=address):
                async with rpc(address, connection_args=args) as worker:
                    return await worker.run(function=dumps(payload))

            with pytest.raises(Exception, match="refused 'run'"):
                client.sync(run_on_worker)
        assert [e["identity"] for e in _refusals(client, since, "broadcast")] == ["client:client"]
        by_workers = _refusals(client, since, "run", count=4)  # two workers, two nannies, all forwarded
        assert [e["identity"] for e in by_workers] == ["client:client"] * 4, by_workers
    network.processes.check_alive()
    assert not marker.exists(), "client.run ran on a hardened network"


def _non_loopback_ipv4() -> list[str]:
    return [
        a.address
        for addresses in psutil.net_if_addrs().values()
        for a in addresses
        if a.family == socket.AF_INET and not a.address.startswith("127.")
    ]


def _connects(host: str, port: int) -> bool:
    try:
        socket.create_connection((host, port), timeout=5).close()
        return True
    except OSError:
        return False


def test_the_scheduler_dashboard_listens_on_loopback_only_by_default(tmp_path):
    port = free_port()
    # Plain TCP and no dashboard token, whatever this shell's neuro.security settings say.
    env = {k: v for k, v in os.environ.items() if not k.startswith("DASK_NEURO__SECURITY__")}
    with Processes(tmp_path) as spawn:
        # No --host: the scheduler itself listens on every interface, as an operator's would.
        scheduler = spawn(*NEURO_DASK, "scheduler", "--port", str(port), env=env)
        spawn.wait_for_port("127.0.0.1", port)
        with Client(f"tcp://127.0.0.1:{port}", timeout=60) as client:
            dashboard = client.scheduler_info()["services"].get("dashboard")
        # 8787 unless another process holds it: Dask then takes another port on the same address.
        assert dashboard, f"the scheduler started no dashboard:\n{spawn.log(scheduler)}"
        with urllib.request.urlopen(f"http://127.0.0.1:{dashboard}/health", timeout=10) as reply:
            assert reply.status == 200
        # This machine's other addresses that reach the scheduler: there, the dashboard must not answer.
        elsewhere = [a for a in _non_loopback_ipv4() if _connects(a, port)]
        if not elsewhere:
            pytest.skip("this machine has no IPv4 address besides loopback that reaches its own scheduler")
        assert not [a for a in elsewhere if _connects(a, dashboard)], f"the dashboard answers on {elsewhere}"


def test_the_operator_moves_a_channel_to_a_new_version_with_the_cli(network, sharded, tmp_path):
    """`neuro-dask publish --channel`, `adopt` and `channels` as the operator runs them; a client
    certificate cannot adopt; a following client lands on the new version."""
    import json

    import numpy as np

    from neuro_dask.federated.training import get_flat, set_flat, write_version

    base = nd.load(sharded(MODEL))
    flat = get_flat(base)
    versions = []
    for i in (1, 2):  # two new versions of the tiny model (new files, new ids), as rounds would make
        set_flat(base, flat + np.random.default_rng(i).normal(0, 1e-3, flat.shape).astype(flat.dtype))
        versions.append((str(tmp_path / f"v{i}"), write_version(base, sharded(MODEL), tmp_path / f"v{i}", {}).model_id))
    (v1_path, v1), (v2_path, v2) = versions
    tls = ("--scheduler", network.address, "--tls", str(network.certs))
    first = run_cli("publish", v1_path, "--channel", "tiny", *tls, timeout=180)
    assert (
        first.returncode == 0
        and f"published {v1} from {v1_path} as the current version of channel tiny" in first.stdout
    ), first.stdout
    second = run_cli("publish", v2_path, "--channel", "tiny", *tls, timeout=180)
    assert second.returncode == 0 and "as the candidate version" in second.stdout, second.stdout
    assert f"neuro-dask adopt tiny {v2}" in second.stdout
    with network.client() as client:
        with pytest.raises(Exception, match="only the operator"):
            client.sync(client.scheduler.neuro_adopt, channel="tiny", model=v2)
    adopted = run_cli("adopt", "tiny", v2, *tls)
    assert adopted.returncode == 0 and f"{v2} is current; retiring once their requests end: {v1}" in adopted.stdout, (
        adopted.stdout
    )
    again = run_cli("adopt", "tiny", v1, *tls)
    assert again.returncode == 2 and "not the candidate" in again.stdout
    channels = run_cli("channels", "--json", *tls)
    state = json.loads(channels.stdout)
    assert state["channels"]["tiny"]["current"] == v2 and state["channels"]["tiny"]["history"] == [v1, v2]
    assert v1 in state["retiring"] or v1 in state["retired"]
    ids, mask = padded_batch((5, 9), seed=7)
    expected = nd.load(v2_path).generate(ids, mask, max_new_tokens=8)
    with network.client() as client, nd.follow("tiny", client) as model:
        assert model.model_id == v2
        assert torch.equal(model.generate(ids, mask, max_new_tokens=8), expected)
