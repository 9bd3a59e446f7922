"""A certificate authority and role certificates for neuro_dask's mutual TLS.

One folder holds a network's certificates (`neuro-dask certs` writes it):

    ca.pem                  the CA's certificate: every peer needs it, it is public
    ca-key.pem              the CA's private key (mode 0600): keep it on the operator's machine only
    <role>-<name>.pem       a peer's certificate, e.g. worker-alice.pem
    <role>-<name>.key       that certificate's private key (mode 0600), e.g. worker-alice.key

A role certificate's key ends in `.key`, not `-key.pem`: names may contain '-', so `worker-a-key.pem`
would be both the certificate of "a-key" and the key of "a". Keys are unencrypted PKCS#8 PEM
because Dask loads them without asking for a passphrase; the file mode is their protection.

Keys are EC P-256 (fast to make and to handshake with). Each role certificate states its role as
OU `neuro-dask-<role>` and SAN URI `neuro-dask://<role>/<name>`, and its name as CN
(neuro_dask/security/identity.py reads them back). It is good for both serverAuth and clientAuth
because every Dask peer both listens and connects.

Uses cryptography only: no distributed here (neuro_dask/security/tls.py is the Dask side).
"""

from __future__ import annotations

import hashlib
import ipaddress
import logging
import os
import tempfile
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from neuro_dask.errors import CertificateError
from neuro_dask.security.identity import (
    OU_PREFIX,
    ROLES,
    check_name,
    check_role,
    identity_from_peercert,
    owner_uri,
    role_uri,
)

log = logging.getLogger(__name__)

Clock = Callable[[], datetime]

CA_CERT = "ca.pem"
CA_KEY = "ca-key.pem"
CERT_SUFFIX = ".pem"
KEY_SUFFIX = ".key"
ORGANIZATION = "neuro-dask"

# Peers' clocks differ: a certificate made a minute ago must not look "not yet valid" next door.
_BACKDATE = timedelta(minutes=5)
_PUBLIC_MODE = 0o644
_PRIVATE_MODE = 0o600


# ---- names and paths ----------------------------------------------------------------------------


def cert_paths(directory: str | os.PathLike, role: str, name: str) -> tuple[Path, Path]:
    """(certificate, key) paths of role/name in `directory`; checks role and name."""
    stem = f"{check_role(role)}-{check_name(name)}"
    folder = Path(directory)
    return folder / (stem + CERT_SUFFIX), folder / (stem + KEY_SUFFIX)


def role_certificates(directory: str | os.PathLike, role: str) -> dict[str, Path]:
    """name -> certificate path of every `<role>-<name>.pem` in `directory` (by file name only)."""
    prefix = f"{check_role(role)}-"
    found: dict[str, Path] = {}
    for path in sorted(Path(directory).glob(f"{prefix}*{CERT_SUFFIX}")):
        name = path.name[len(prefix) : -len(CERT_SUFFIX)]
        try:
            found[check_name(name)] = path
        except CertificateError:
            continue  # not a file this module writes
    return found


def certificates(directory: str | os.PathLike) -> list[Path]:
    """Every certificate in `directory` this module knows: the CA's first, then by role and name."""
    folder = Path(directory)
    paths = [folder / CA_CERT] if (folder / CA_CERT).is_file() else []
    for role in ROLES:
        paths.extend(role_certificates(folder, role).values())
    return paths


# ---- making certificates ------------------------------------------------------------------------


def create_ca(
    directory: str | os.PathLike,
    *,
    name: str = "neuro-dask-ca",
    days: int = 3650,
    clock: Clock | None = None,
    overwrite: bool = False,
) -> Path:
    """Create a CA in `directory` (ca.pem, ca-key.pem); returns the path of ca.pem.

    Refuses to replace an existing CA unless overwrite=True: every certificate it signed would
    stop working.
    """
    folder = Path(directory)
    cert_path, key_path = folder / CA_CERT, folder / CA_KEY
    _refuse_existing(
        [cert_path, key_path],
        overwrite,
        "this folder holds a CA already; replacing it invalidates every certificate it signed, "
        "so use another folder (or delete both files if that is what you mean)",
    )
    now = _now(clock)
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, ORGANIZATION),
            x509.NameAttribute(NameOID.COMMON_NAME, check_name(name)),
        ]
    )
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        _validity(x509.CertificateBuilder(), now, _days(days))
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        # path_length=0: the CA signs peers only, never another CA.
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(cert_sign=True), critical=True)
        .add_extension(ski, critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False)
        .sign(key, hashes.SHA256())
    )
    folder.mkdir(parents=True, exist_ok=True)
    _write(key_path, _key_pem(key), _PRIVATE_MODE, overwrite)
    _write(cert_path, cert.public_bytes(serialization.Encoding.PEM), _PUBLIC_MODE, overwrite)
    log.info("created CA %s in %s, valid until %s", name, folder, cert.not_valid_after_utc)
    return cert_path


def issue(
    directory: str | os.PathLike,
    role: str,
    name: str,
    *,
    days: int = 825,
    clock: Clock | None = None,
    overwrite: bool = False,
    owner: str = "",
) -> tuple[Path, Path]:
    """Sign a certificate for role/name with the CA in `directory`; returns (certificate, key) paths.

    `owner` (workers only): who owns the machine, as the CA vouches for it; replicas and the
    private tier's share holders are kept on different owners. The certificate ends no later
    than the CA does. Refuses to replace existing files unless overwrite=True.
    """
    if owner and role != "worker":
        raise CertificateError(f"--owner is for worker certificates (it says who owns the machine), not {role}")
    if owner:
        check_name(owner)
    cert_path, key_path = cert_paths(directory, role, name)
    _refuse_existing(
        [cert_path, key_path],
        overwrite,
        f"a {role} certificate for {name!r} exists; pass --overwrite (overwrite=True) to replace it",
    )
    now = _now(clock)
    ca_cert, ca_key = load_ca(directory)
    _check_ca_valid(ca_cert, now, Path(directory))
    not_after = min(now + _days(days), ca_cert.not_valid_after_utc)
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(_role_subject(role, name))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(max(now - _BACKDATE, ca_cert.not_valid_before_utc))
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(cert_sign=False), critical=True)
        # Every Dask peer both listens (server) and connects (client).
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False
        )
        .add_extension(_role_san(role, name, owner), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    _write(key_path, _key_pem(key), _PRIVATE_MODE, overwrite)
    _write(cert_path, cert.public_bytes(serialization.Encoding.PEM), _PUBLIC_MODE, overwrite)
    log.info("issued %s certificate for %s in %s, valid until %s", role, name, cert_path.parent, not_after)
    return cert_path, key_path


def load_ca(directory: str | os.PathLike) -> tuple[x509.Certificate, Any]:
    """The CA certificate and key in `directory`, checked to belong together."""
    folder = Path(directory)
    cert_path, key_path = folder / CA_CERT, folder / CA_KEY
    if not cert_path.is_file() or not key_path.is_file():
        raise CertificateError(
            f"{folder}: no CA here ({CA_CERT} and {CA_KEY}); run `neuro-dask certs init {folder}` first, "
            "or issue certificates in the folder that holds the CA's key"
        )
    return check_pair(cert_path, key_path)


def check_pair(cert_path: str | os.PathLike, key_path: str | os.PathLike) -> tuple[x509.Certificate, Any]:
    """(certificate, private key) from their PEM files, checked to belong together."""
    cert = load_certificate(cert_path)
    try:
        key = serialization.load_pem_private_key(Path(key_path).read_bytes(), password=None)
    except FileNotFoundError:
        raise CertificateError(f"{key_path}: no such key; copy it next to {cert_path}") from None
    except (ValueError, TypeError) as exc:
        raise CertificateError(
            f"{key_path}: not an unencrypted PEM private key ({exc}); "
            "copy the key `neuro-dask certs` wrote, or issue a new pair"
        ) from None
    if key.public_key() != cert.public_key():
        raise CertificateError(f"{key_path} is not the key of {cert_path}: copy the matching pair, or issue a new one")
    return cert, key


def load_certificate(path: str | os.PathLike) -> x509.Certificate:
    path = Path(path)
    try:
        return x509.load_pem_x509_certificate(path.read_bytes())
    except FileNotFoundError:
        raise CertificateError(
            f"{path}: no such certificate; `neuro-dask certs show {path.parent}` lists the ones there"
        ) from None
    except ValueError as exc:
        raise CertificateError(f"{path}: not a PEM certificate ({exc}); issue it again") from None


# ---- reading certificates -----------------------------------------------------------------------


def describe(cert_path: str | os.PathLike, *, clock: Clock | None = None) -> dict[str, Any]:
    """What a certificate says: role and name (both None for the CA or a foreign certificate),
    common_name, subject, is_ca, not_before and not_after (aware UTC datetimes), expired (at
    `clock`), and fingerprint (sha256 of the DER certificate, lowercase hex)."""
    cert = load_certificate(cert_path)
    identity = identity_from_peercert(as_peercert(cert))
    now = _now(clock)
    return {
        "path": Path(cert_path),
        "role": identity.role if identity else None,
        "name": identity.name if identity else None,
        "owner": (identity.owner or None) if identity else None,
        "common_name": _common_name(cert),
        "subject": cert.subject.rfc4514_string(),
        "is_ca": _is_ca(cert),
        "not_before": cert.not_valid_before_utc,
        "not_after": cert.not_valid_after_utc,
        "expired": now >= cert.not_valid_after_utc,
        "fingerprint": hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest(),
    }


def as_peercert(cert: x509.Certificate) -> dict[str, Any]:
    """The subject and subjectAltName of `cert` in the shape ssl.SSLSocket.getpeercert() gives."""
    subject = tuple(
        tuple((_ATTRIBUTE_NAMES.get(a.oid, a.oid.dotted_string), a.value) for a in rdn) for rdn in cert.subject.rdns
    )
    san: list[tuple[str, str]] = []
    try:
        names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        names = []
    for general in names:
        if isinstance(general, x509.UniformResourceIdentifier):
            san.append(("URI", general.value))
        elif isinstance(general, x509.DNSName):
            san.append(("DNS", general.value))
        elif isinstance(general, x509.IPAddress):
            san.append(("IP Address", str(general.value)))
    return {"subject": subject, "subjectAltName": tuple(san)}


# The names OpenSSL (and so getpeercert) gives the attributes neuro_dask writes.
_ATTRIBUTE_NAMES = {
    NameOID.COMMON_NAME: "commonName",
    NameOID.ORGANIZATIONAL_UNIT_NAME: "organizationalUnitName",
    NameOID.ORGANIZATION_NAME: "organizationName",
}


# ---- helpers ------------------------------------------------------------------------------------


def _now(clock: Clock | None) -> datetime:
    now = clock() if clock is not None else datetime.now(UTC)
    return now if now.tzinfo is not None else now.replace(tzinfo=UTC)  # naive means UTC


def _days(days: int) -> timedelta:
    if isinstance(days, bool) or not isinstance(days, int) or days < 1:
        raise CertificateError(f"days={days!r}: a certificate must be valid for a whole number of days, at least 1")
    return timedelta(days=days)


def _validity(builder: x509.CertificateBuilder, now: datetime, length: timedelta) -> x509.CertificateBuilder:
    return builder.not_valid_before(now - _BACKDATE).not_valid_after(now + length)


def _key_usage(*, cert_sign: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=cert_sign,
        crl_sign=cert_sign,
        encipher_only=False,
        decipher_only=False,
    )


def _role_subject(role: str, name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, ORGANIZATION),
            x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, OU_PREFIX + role),
            x509.NameAttribute(NameOID.COMMON_NAME, name),
        ]
    )


def _role_san(role: str, name: str, owner: str = "") -> x509.SubjectAlternativeName:
    # localhost and 127.0.0.1 are harmless (Dask turns hostname checks off) and let tools that do
    # check hostnames (curl, openssl s_client -verify_hostname) talk to a peer on this machine.
    owners = [x509.UniformResourceIdentifier(owner_uri(owner))] if owner else []
    return x509.SubjectAlternativeName(
        [
            x509.UniformResourceIdentifier(role_uri(role, name)),
            *owners,
            x509.DNSName("localhost"),
            x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
        ]
    )


def _common_name(cert: x509.Certificate) -> str | None:
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(names[0].value) if names else None


def _is_ca(cert: x509.Certificate) -> bool:
    try:
        return bool(cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca)
    except x509.ExtensionNotFound:
        return False


def _check_ca_valid(ca_cert: x509.Certificate, now: datetime, folder: Path) -> None:
    if now >= ca_cert.not_valid_after_utc:
        raise CertificateError(
            f"{folder / CA_CERT} expired on {ca_cert.not_valid_after_utc:%Y-%m-%d}: "
            "create a new CA (`neuro-dask certs init` in a new folder) and reissue every certificate"
        )
    if now < ca_cert.not_valid_before_utc:
        raise CertificateError(
            f"{folder / CA_CERT} is valid only from {ca_cert.not_valid_before_utc:%Y-%m-%d %H:%M} "
            "UTC: check this machine's clock"
        )


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _refuse_existing(paths: list[Path], overwrite: bool, fix: str) -> None:
    existing = [str(p) for p in paths if p.exists()]
    if existing and not overwrite:
        raise CertificateError(f"{' and '.join(existing)} already there: {fix}")


def _write(path: Path, data: bytes, mode: int, overwrite: bool) -> None:
    """Write `data` to `path` with `mode` from the first byte on: a key is never readable by others,
    not even for a moment."""
    if not overwrite:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)  # O_EXCL: no race with another writer
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(path, mode)  # the umask may have taken bits off a public file's mode
        return
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")  # mkstemp creates it 0600
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
