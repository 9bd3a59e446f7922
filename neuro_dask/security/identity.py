"""Who is on the other end of a TLS connection: a role and a name read from the peer's certificate.

A neuro_dask certificate (made by `neuro-dask certs`) states its role twice: as the subject's
OrganizationalUnitName `neuro-dask-<role>` and in a SubjectAlternativeName URI
`neuro-dask://<role>/<name>`; its name is the subject's CommonName. An identity is granted only
when all three agree, so a certificate that is merely signed by the CA for some other purpose
(or crafted with one field changed) names nobody. A worker certificate may also name the person
who owns the machine, in one SAN URI `neuro-dask-owner://<owner>`: on a TLS network that, not
what the worker declares, is the owner that replicas and the private tier's share holders must
differ by (two such URIs name nobody).

Pure: imports neither distributed nor cryptography. It reads the dict that Python's
`ssl.SSLSocket.getpeercert()` returns, which is what distributed keeps in a TLS comm's
`extra_info["peercert"]`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from neuro_dask.errors import CertificateError

ROLES = ("scheduler", "worker", "client", "operator")

OU_PREFIX = "neuro-dask-"
URI_SCHEME = "neuro-dask://"
OWNER_URI_SCHEME = "neuro-dask-owner://"

# A worker's name is its volunteer's ledger identity and part of file names: keep it dull.
_NAME = re.compile(r"[A-Za-z0-9._-]{1,64}")


@dataclass(frozen=True)
class PeerIdentity:
    role: str
    name: str
    owner: str = ""  # from a neuro-dask-owner:// SAN URI; "" when the certificate names none


def describe(identity: PeerIdentity | None) -> str | None:
    """ "role:name", as security events name a peer (None without a certificate)."""
    return f"{identity.role}:{identity.name}" if identity is not None else None


def peer_key(identity: PeerIdentity | None, peer: str | None) -> str:
    """Whom limits and strikes count against: a certificate wherever it connects from; without
    one, the host (its port changes per connection)."""
    if identity is not None:
        return f"{identity.role}:{identity.name}"
    return (peer or "").rsplit(":", 1)[0]


def check_name(name: object) -> str:
    """`name` when it is a safe certificate name (1-64 of A-Z a-z 0-9 . _ -); CertificateError otherwise."""
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise CertificateError(
            f"certificate name {name!r} is not allowed: use 1 to 64 characters of letters, digits, "
            "'.', '_' and '-' (for a worker, its ledger identity, e.g. alice or worker-1)"
        )
    return name


def check_role(role: object) -> str:
    """`role` when it is one of ROLES; CertificateError otherwise."""
    if role not in ROLES:
        raise CertificateError(f"role {role!r} is not one of {', '.join(ROLES)}: pick one of those")
    return role  # type: ignore[return-value]


def role_uri(role: str, name: str) -> str:
    """The SubjectAlternativeName URI that carries a certificate's role and name."""
    return f"{URI_SCHEME}{role}/{name}"


def owner_uri(owner: str) -> str:
    """The SubjectAlternativeName URI that carries the owner of a worker's machine."""
    return f"{OWNER_URI_SCHEME}{check_name(owner)}"


def identity_from_peercert(peercert: dict | None) -> PeerIdentity | None:
    """The identity a verified peer certificate states, or None when it states none unambiguously.

    Never raises: whatever the dict holds, a malformed or disagreeing certificate yields None.
    """
    try:
        return _identity(peercert)
    except Exception:  # a hostile or odd certificate must never crash the comm that reads it
        return None


def _identity(peercert: Any) -> PeerIdentity | None:
    if not isinstance(peercert, Mapping) or not peercert:
        return None
    subject = _subject_values(peercert.get("subject"))
    cns, ous = subject.get("commonName", []), subject.get("organizationalUnitName", [])
    uris = [v for v in _san_values(peercert.get("subjectAltName"), "URI") if v.startswith(URI_SCHEME)]
    # Exactly one of each: two OUs or two role URIs would let a reader pick the one it likes.
    if len(cns) != 1 or len(ous) != 1 or len(uris) != 1:
        return None
    parsed = _parse_uri(uris[0])
    if parsed is None:
        return None
    role, name = parsed
    if ous[0] != OU_PREFIX + role or cns[0] != name:
        return None
    owners = [
        v[len(OWNER_URI_SCHEME) :]
        for v in _san_values(peercert.get("subjectAltName"), "URI")
        if v.startswith(OWNER_URI_SCHEME)
    ]
    if len(owners) > 1 or (owners and not _NAME.fullmatch(owners[0])):
        return None
    return PeerIdentity(role, name, owners[0] if owners else "")


def _subject_values(subject: Any) -> dict[str, list[str]]:
    """getpeercert()'s subject, a tuple of RDNs of (key, value) pairs, as key -> values."""
    values: dict[str, list[str]] = {}
    if not isinstance(subject, (tuple, list)):
        return values
    for rdn in subject:
        if not isinstance(rdn, (tuple, list)):
            continue
        for pair in rdn:
            if isinstance(pair, (tuple, list)) and len(pair) == 2 and all(isinstance(p, str) for p in pair):
                values.setdefault(pair[0], []).append(pair[1])
    return values


def _san_values(san: Any, kind: str) -> list[str]:
    """The values of one kind ("URI", "DNS", ...) in getpeercert()'s subjectAltName."""
    if not isinstance(san, (tuple, list)):
        return []
    return [
        entry[1]
        for entry in san
        if isinstance(entry, (tuple, list)) and len(entry) == 2 and entry[0] == kind and isinstance(entry[1], str)
    ]


def _parse_uri(uri: str) -> tuple[str, str] | None:
    role, sep, name = uri[len(URI_SCHEME) :].partition("/")
    if not sep or role not in ROLES or not _NAME.fullmatch(name):
        return None
    return role, name
