"""The certificates of `neuro-dask certs` work with Dask's own TLS: mutual TLS, the peer's role and
name read on the server's side of a comm, and peers of another CA refused at the handshake."""

from __future__ import annotations

import asyncio
import shutil
import ssl

import pytest
from distributed import Client, Scheduler, Worker
from distributed.comm import connect
from distributed.core import Server

from neuro_dask.cli.certs import main as certs_main
from neuro_dask.security.identity import PeerIdentity
from neuro_dask.security.tls import peer_identity, security_for

CONNECT_TIMEOUT = 2  # seconds; a refused handshake fails at once, this only bounds a hang


@pytest.fixture(scope="module")
def network(tmp_path_factory):
    """A quickstart folder: CA, scheduler, client, operator and worker-1 certificates."""
    folder = tmp_path_factory.mktemp("tls")
    assert certs_main(["certs", "quickstart", str(folder)]) == 0
    return folder


@pytest.fixture(scope="module")
def rogue(tmp_path_factory):
    """Another network's folder: same file names, another CA."""
    folder = tmp_path_factory.mktemp("rogue")
    assert certs_main(["certs", "quickstart", str(folder)]) == 0
    return folder


class WhoAmI:
    """A Dask server on tls://127.0.0.1:0 whose handler answers with the caller's identity."""

    def __init__(self, security):
        self.security = security
        self.calls: list[PeerIdentity | None] = []
        self.extra_info: list[dict] = []
        self.server = Server({"whoami": self.whoami})

    def whoami(self, comm) -> tuple | None:
        self.extra_info.append(dict(comm.extra_info))
        identity = peer_identity(comm)
        self.calls.append(identity)
        return None if identity is None else (identity.role, identity.name)

    async def __aenter__(self) -> WhoAmI:
        await self.server.listen("tls://127.0.0.1:0", **self.security.get_listen_args("scheduler"))
        return self

    async def __aexit__(self, *exc) -> None:
        await self.server.close()


async def ask(address: str, security, dask_role: str):
    comm = await connect(address, timeout=CONNECT_TIMEOUT, **security.get_connection_args(dask_role))
    try:
        await comm.write({"op": "whoami"})
        return await comm.read(), peer_identity(comm)
    finally:
        await comm.close()


def run(coro, timeout: float = 10):
    return asyncio.run(asyncio.wait_for(coro, timeout))


@pytest.mark.parametrize(
    ("role", "dask_role", "name"),
    [
        ("client", "client", "client"),
        ("operator", "client", "operator"),
        ("worker", "worker", "worker-1"),
    ],
)
def test_server_reads_the_peers_role_and_name(network, role, dask_role, name):
    async def main():
        async with WhoAmI(security_for("scheduler", network)) as server:
            answer, server_seen_by_client = await ask(server.server.address, security_for(role, network), dask_role)
            return answer, server_seen_by_client, server

    answer, server_seen_by_client, server = run(main())
    assert server.calls == [PeerIdentity(role, name)]
    assert answer == (role, name)
    # Mutual: the connecting side reads the scheduler's certificate the same way.
    assert server_seen_by_client == PeerIdentity("scheduler", "scheduler")
    # What distributed keeps for an incoming TLS comm: getpeercert()'s dict and the cipher.
    extra = server.extra_info[0]
    assert set(extra) == {"peercert", "cipher"}
    assert ("URI", f"neuro-dask://{role}/{name}") in extra["peercert"]["subjectAltName"]


def test_a_peer_of_another_ca_is_refused(network, rogue):
    """Another CA's client fails the handshake both ways: it distrusts the scheduler, and the
    scheduler distrusts it."""

    async def main():
        async with WhoAmI(security_for("scheduler", network)) as server:
            # FatalCommClosedError (a CommClosedError, an OSError): fatal, so connect() does not retry.
            with pytest.raises(OSError, match="TLS certificate does not match") as err:
                await ask(server.server.address, security_for("client", rogue), "client")
            assert isinstance(err.value.__cause__, ssl.SSLCertVerificationError)
            return server

    server = run(main())
    assert server.calls == []


def test_a_certificate_of_another_ca_is_refused_even_when_trusting_ours(network, rogue, tmp_path):
    """The attack that matters: our (public) ca.pem, a certificate signed by a CA of one's own."""
    shutil.copy(network / "ca.pem", tmp_path / "ca.pem")
    for suffix in (".pem", ".key"):
        shutil.copy(rogue / f"client-client{suffix}", tmp_path / f"client-client{suffix}")

    async def main():
        async with WhoAmI(security_for("scheduler", network)) as server:
            # TLS 1.3 finishes the client's half of the handshake before the server checks the
            # client's certificate: the refusal arrives on Dask's handshake read, not on connect.
            with pytest.raises(OSError, match="(?i)unknown.ca"):
                await ask(server.server.address, security_for("client", tmp_path), "client")
            return server

    server = run(main())
    assert server.calls == []


def test_a_dask_cluster_runs_on_role_certificates(network):
    """Scheduler, worker and client from one folder: the role mapping of security_for is what
    Dask's components need, and the scheduler reads each connection's identity."""

    async def main():
        seen: list[PeerIdentity | None] = []
        async with Scheduler(
            security=security_for("scheduler", network),
            protocol="tls",
            host="127.0.0.1",
            port=0,
            dashboard_address="127.0.0.1:0",
        ) as scheduler:
            scheduler.handlers["whoami"] = lambda comm: seen.append(peer_identity(comm))
            async with Worker(
                scheduler.address, security=security_for("worker", network), host="127.0.0.1", nthreads=1
            ) as worker:
                async with Client(
                    scheduler.address, security=security_for("client", network), asynchronous=True
                ) as client:
                    assert await client.submit(sum, [1, 2, 3]) == 6
                    await client.scheduler.whoami()
                    await worker.scheduler.whoami()
        return seen

    assert run(main(), timeout=30) == [PeerIdentity("client", "client"), PeerIdentity("worker", "worker-1")]
