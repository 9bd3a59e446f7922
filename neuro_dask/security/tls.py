"""Dask's side of neuro_dask's mutual TLS: a `distributed.Security` from a `neuro-dask certs` folder,
and the role and name of the peer on a TLS comm.

Dask's TLS contexts require a certificate from the other side (verify_mode=CERT_REQUIRED) signed
by the folder's CA, and skip hostname checks (volunteers connect by IP address). So the CA is the
only gate at the handshake; what a peer may do once connected is decided from its certificate's
role (`peer_identity`), checked by the scheduler's handlers.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from distributed import Security

from neuro_dask.errors import CertificateError
from neuro_dask.security.certs import CA_CERT, cert_paths, check_pair, describe, role_certificates
from neuro_dask.security.identity import PeerIdentity, check_role, identity_from_peercert

log = logging.getLogger(__name__)

# Our role -> the Dask roles (Security's tls_<role>_cert/key) it plays. Dask's Worker and Nanny
# listen and connect as "worker", the Scheduler as "scheduler", a Client as "client"; a worker or
# scheduler process may also open a plain Client (tooling, preloads), hence "client" for them too.
DASK_ROLES: dict[str, tuple[str, ...]] = {
    "scheduler": ("scheduler", "client"),
    "worker": ("worker", "client"),
    "client": ("client",),
    "operator": ("client",),
}


def security_for(role: str, directory: str | os.PathLike, name: str | None = None) -> Security:
    """The `distributed.Security` with which a `role` peer speaks mutual TLS, from `directory`.

    Uses `<role>-<name>.pem` and its key; with name=None, the one certificate of that role in the
    folder (an error names the candidates when there are several or none).
    """
    ca, cert, key, name = certificate_files(role, directory, name)
    # Every Dask role named: one left out would be read from Dask's config (distributed.comm.tls.*).
    files: dict[str, str | None] = {}
    for dask_role in ("scheduler", "worker", "client"):
        plays = dask_role in DASK_ROLES[role]
        files[f"tls_{dask_role}_cert"] = str(cert) if plays else None
        files[f"tls_{dask_role}_key"] = str(key) if plays else None
    log.debug("TLS as %s with %s", role, cert)
    return Security(tls_ca_file=str(ca), require_encryption=True, **files)


def certificate_files(role: str, directory: str | os.PathLike, name: str | None = None) -> tuple[Path, Path, Path, str]:
    """(ca.pem, certificate, key, name) of a `role` peer in `directory`, checked to be usable:
    what `dask scheduler|worker --tls-ca-file --tls-cert --tls-key` take."""
    folder = Path(directory).absolute()  # a process that changes directory keeps its certificates
    check_role(role)
    ca = folder / CA_CERT
    if not ca.is_file():
        raise CertificateError(
            f"{folder}: no {CA_CERT}; copy the network's {CA_CERT} here, or create a "
            f"network with `neuro-dask certs quickstart {folder}`"
        )
    cert, key, name = _certificate_for(folder, role, name)
    _check_usable(cert, key, role, name)
    return ca, cert, key, name


def peer_identity(comm: object) -> PeerIdentity | None:
    """The role and name the peer's certificate states on a TLS comm; None on TCP or inproc comms,
    or when the certificate states none (distributed keeps getpeercert() in extra_info)."""
    extra = getattr(comm, "extra_info", None)
    if not isinstance(extra, dict):
        return None
    return identity_from_peercert(extra.get("peercert"))


def _certificate_for(folder: Path, role: str, name: str | None) -> tuple[Path, Path, str]:
    if name is None:
        found = role_certificates(folder, role)
        if len(found) != 1:
            candidates = ", ".join(p.name for p in found.values()) or "none"
            raise CertificateError(
                f"{folder}: expected exactly one {role} certificate ({role}-NAME.pem), found {candidates}; "
                f"name the one to use, or issue one with `neuro-dask certs issue {folder} --role {role} --name NAME`"
            )
        name = next(iter(found))
    cert, key = cert_paths(folder, role, name)
    for path in (cert, key):
        if not path.is_file():
            raise CertificateError(
                f"{path}: missing; issue it with "
                f"`neuro-dask certs issue DIR --role {role} --name {name}` and copy both files here"
            )
    return cert, key, name


def _check_usable(cert: Path, key: Path, role: str, name: str) -> None:
    """Refuse a certificate that cannot work, here, rather than as a handshake failure or a wrong
    identity elsewhere."""
    check_pair(cert, key)
    info = describe(cert)
    if (info["role"], info["name"]) != (role, name):
        raise CertificateError(
            f"{cert} states role {info['role']!r} and name {info['name']!r} (subject "
            f"{info['subject']}), not {role!r} and {name!r}: it was renamed or not made by "
            "`neuro-dask certs`; issue a new one"
        )
    if info["expired"]:
        raise CertificateError(
            f"{cert} expired on {info['not_after']:%Y-%m-%d}: issue a new one "
            f"(`neuro-dask certs issue DIR --role {role} --name {info['name']} --overwrite`)"
        )
