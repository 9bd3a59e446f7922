"""Signatures on evidence: ECDSA P-256 with SHA-256, keys as neuro-dask certs makes them.

Workers sign every expert answer (a receipt), the scheduler signs every ticket; the other side
checks with the signer's public key, taken from its certificate (`public_der_from_certificate`).
Keys are the EC P-256 keys that `neuro-dask certs` writes (neuro_dask/security/certs.py), so a
peer's signing key is the one its TLS certificate vouches for: the name a scheduler knows a worker
by and the key it checks that worker's receipts with come from one certificate.

Rules
-----
1. `Signer` holds one EC P-256 private key and only signs: `sign(data)` is ECDSA(SHA-256) over
   `data`, DER-encoded (70-72 bytes). The key never appears in a repr, a log line or a pickle:
   a Signer refuses to be pickled, so it cannot ride a Dask message off the machine by mistake.
2. `Signer.from_pem_file` reads one unencrypted private key in PEM (PKCS#8 as certs.py writes, or
   SEC1 "EC PRIVATE KEY"), alone or in one file with its certificate. A file with two keys, an
   encrypted key, a key of another type or curve, or a certificate that is not the key's own is
   refused (SigningError): a worker must not sign with a key its certificate does not vouch for.
3. `verify(public_der, data, signature)` answers True or False and never raises, whatever a peer
   sent: wrong types, garbage DER, a non-EC or non-P-256 key, a public key over MAX_PUBLIC_DER
   bytes or a signature over MAX_SIGNATURE bytes are all False. It checks `data` exactly as given
   (no normalisation): callers sign and verify canonical payloads.
4. Loaded public keys are kept in a bounded LRU (KEY_CACHE entries, keyed by the exact DER
   bytes, unusable keys cached as such), so a scheduler checking thousands of receipts from a
   few hundred workers parses each key once. A flood of distinct keys only evicts entries.
5. `public_der_from_certificate` turns a DER or PEM certificate into its SubjectPublicKeyInfo
   DER, and refuses (SigningError) anything that is not a certificate with an EC P-256 key: such
   a key could never verify anything here, so failing early says what is wrong.

6. `Signer.kept_in(path)` reads the key in `path`, or makes one and writes it there (PKCS#8,
   mode 0600, atomically) when the file does not exist: the key of a scheduler without a TLS
   certificate, kept next to its state file so that tickets it signed stay valid across its
   restart.

ECDSA signatures are malleable ((r, s) and (r, n - s) both verify): never use a signature's
bytes as the identity of what it signs, except as a cache key whose value is checked equal to
the signed content (trust/receipts.py's ticket cache does so).

Cost, measured on this project's 2-core AMD EPYC dev machine (cryptography 51.0.1, OpenSSL 4.1.1,
200-byte payloads, 5 x 5,000 runs): sign ~16 us, verify ~44 us, loading a public key from DER
~5 us (so the key cache saves ~10% of a verify, not more); `verify_cost()` reproduces the first
two. With trust/receipts.py on top: build and sign a receipt ~26 us, parse and verify one ~54 us,
a cached ticket check ~3 us, sha256 of the rows ~2 GB/s. A worker signs one receipt per call
(48 per pass of a 48-layer model: ~1.3 ms of a core); receipts are cumulative, so a client
forwards only each worker's newest and the scheduler verifies a handful per request.

Imports cryptography only: no distributed here.
"""

from __future__ import annotations

import hashlib
import os
import re
import threading
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from neuro_dask.errors import NeuroDaskError

MAX_PUBLIC_DER = 4096  # a P-256 SubjectPublicKeyInfo is 91 bytes
MAX_SIGNATURE = 256  # a DER ECDSA P-256 signature is at most 72 bytes
MAX_PEM_FILE = 1 << 20
MAX_CERTIFICATE = 64 << 10
KEY_CACHE = 1024

_ECDSA = ec.ECDSA(hashes.SHA256())
_PEM_BEGIN = re.compile(rb"-----BEGIN ([A-Z0-9 ]{1,64})-----")
_BYTES = (bytes, bytearray, memoryview)


class SigningError(NeuroDaskError, ValueError):
    """A signing key or a certificate cannot be used to sign or to check signatures."""


def _spki(public_key: Any) -> bytes:
    return public_key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def _is_p256(key: Any) -> bool:
    return isinstance(key, (ec.EllipticCurvePublicKey, ec.EllipticCurvePrivateKey)) and isinstance(
        key.curve, ec.SECP256R1
    )


class Signer:
    """One EC P-256 private key that signs (rule 1). `public_der` is its SubjectPublicKeyInfo DER."""

    __slots__ = ("_key", "public_der")

    def __init__(self, private_key: ec.EllipticCurvePrivateKey):
        if not isinstance(private_key, ec.EllipticCurvePrivateKey) or not _is_p256(private_key):
            raise SigningError(
                f"a Signer needs an EC P-256 private key, got {type(private_key).__name__}: "
                "use the key `neuro-dask certs` wrote, or Signer.generate()"
            )
        self._key = private_key
        self.public_der: bytes = _spki(private_key.public_key())

    @classmethod
    def generate(cls) -> Signer:
        return cls(ec.generate_private_key(ec.SECP256R1()))

    @classmethod
    def kept_in(cls, path: str | os.PathLike) -> Signer:
        """The key in `path`, made and written there first if the file does not exist (rule 6):
        a scheduler without a certificate keeps its ticket key across restarts this way."""
        path = Path(path)
        if path.exists():
            return cls.from_pem_file(path)
        signer = cls.generate()
        pem = signer._key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        tmp = path.with_name(f"{path.name}.partial")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(pem)
        os.replace(tmp, path)  # atomic: a crash mid-write leaves no half key behind
        return signer

    @classmethod
    def from_pem_file(cls, path: str | os.PathLike) -> Signer:
        """The key in `path` (rule 2): a `<role>-<name>.key` file, or one PEM file with the
        certificate and its key together."""
        path = Path(path)
        try:
            with path.open("rb") as f:
                text = f.read(MAX_PEM_FILE + 1)
        except OSError as exc:
            raise SigningError(
                f"{path}: cannot read the signing key ({exc.strerror or exc}); point at the "
                "<role>-<name>.key file `neuro-dask certs` wrote"
            ) from None
        if len(text) > MAX_PEM_FILE:
            raise SigningError(f"{path}: over {MAX_PEM_FILE} bytes, not a PEM key file")
        blocks = _pem_blocks(text)
        if any(label == "ENCRYPTED PRIVATE KEY" for label, _ in blocks):
            raise SigningError(
                f"{path}: the private key is encrypted; neuro_dask signs with the unencrypted "
                "key `neuro-dask certs` writes (its file mode protects it)"
            )
        keys = [block for label, block in blocks if label.endswith("PRIVATE KEY")]
        certs = [block for label, block in blocks if label == "CERTIFICATE"]
        if len(keys) != 1:
            raise SigningError(
                f"{path}: expected exactly one PEM private key, found {len(keys)}; point at the "
                "<role>-<name>.key file `neuro-dask certs` wrote"
            )
        try:
            key = serialization.load_pem_private_key(keys[0], password=None)
        except Exception as exc:  # noqa: BLE001  (a damaged file raises ValueError, TypeError, or others)
            raise SigningError(
                f"{path}: not a usable unencrypted PEM private key ({type(exc).__name__}); "
                "copy the key `neuro-dask certs` wrote, or issue a new pair"
            ) from None
        if not _is_p256(key):
            raise SigningError(
                f"{path}: the key is {type(key).__name__}, not EC P-256; issue a new pair with `neuro-dask certs`"
            )
        signer = cls(key)  # type: ignore[arg-type]
        if len(certs) > 1:
            raise SigningError(f"{path}: holds {len(certs)} certificates; keep only the key's own next to it")
        if certs:
            try:
                cert_key = _spki(x509.load_pem_x509_certificate(certs[0]).public_key())
            except Exception:  # noqa: BLE001
                raise SigningError(f"{path}: the certificate in it cannot be read; issue the pair again") from None
            if cert_key != signer.public_der:
                raise SigningError(
                    f"{path}: the certificate in it is not the key's own: keep a matching pair "
                    "together, or point at the key file alone"
                )
        return signer

    def sign(self, data: bytes) -> bytes:
        """ECDSA(SHA-256) of `data`, DER-encoded."""
        if not isinstance(data, _BYTES):
            raise TypeError(f"sign() takes bytes, got {type(data).__name__}")
        return self._key.sign(bytes(data), _ECDSA)

    def fingerprint(self) -> str:
        """sha256 of the public key's DER, 16 hex digits: safe to log."""
        return hashlib.sha256(self.public_der).hexdigest()[:16]

    def __repr__(self) -> str:
        return f"Signer(public key sha256 {self.fingerprint()})"

    def __reduce_ex__(self, protocol: object) -> Any:
        raise TypeError("a Signer holds a private key and is never pickled: load it where it signs")


def _pem_blocks(text: bytes) -> list[tuple[str, bytes]]:
    """(label, whole block) of every complete PEM block in `text`, in one pass over its lines."""
    blocks: list[tuple[str, bytes]] = []
    label, lines = None, []
    for line in text.splitlines():
        line = line.strip()
        if label is None:
            begin = _PEM_BEGIN.fullmatch(line)
            if begin:
                label, lines = begin.group(1), [line]
        else:
            lines.append(line)
            if line == b"-----END " + label + b"-----":
                blocks.append((label.decode(), b"\n".join(lines) + b"\n"))
                label = None
    return blocks


# ---- verifying ----------------------------------------------------------------------------------

_keys: OrderedDict[bytes, Any] = OrderedDict()  # DER -> key, or None for a DER that is no P-256 key
_keys_lock = threading.Lock()


def _public_key(der: bytes) -> Any:
    with _keys_lock:
        if der in _keys:
            _keys.move_to_end(der)
            return _keys[der]
    try:
        key = serialization.load_der_public_key(der)
        key = key if _is_p256(key) else None
    except Exception:  # noqa: BLE001  (garbage DER raises ValueError, unsupported algorithms others)
        key = None
    with _keys_lock:
        _keys[der] = key
        _keys.move_to_end(der)
        while len(_keys) > KEY_CACHE:
            _keys.popitem(last=False)
    return key


def verify(public_der: bytes, data: bytes, signature: bytes) -> bool:
    """True when `signature` is a valid ECDSA(SHA-256) signature of `data` by the P-256 key
    `public_der` (SubjectPublicKeyInfo DER); False otherwise, never an exception (rule 3)."""
    try:
        if not (isinstance(public_der, _BYTES) and isinstance(data, _BYTES) and isinstance(signature, _BYTES)):
            return False
        if not 0 < len(public_der) <= MAX_PUBLIC_DER or not 0 < len(signature) <= MAX_SIGNATURE:
            return False
        key = _public_key(bytes(public_der))
        if key is None:
            return False
        key.verify(bytes(signature), bytes(data), _ECDSA)
        return True
    except InvalidSignature:
        return False
    except Exception:  # noqa: BLE001  (rule 3: a peer's bytes never raise out of here)
        return False


def check_public_der(public_der: object) -> bytes:
    """`public_der` as bytes when it is an EC P-256 SubjectPublicKeyInfo; SigningError otherwise."""
    if not isinstance(public_der, _BYTES) or not 0 < len(public_der) <= MAX_PUBLIC_DER:
        raise SigningError(
            f"a public key must be DER bytes of at most {MAX_PUBLIC_DER} bytes, got {type(public_der).__name__}"
        )
    der = bytes(public_der)
    if _public_key(der) is None:
        raise SigningError(
            "not an EC P-256 SubjectPublicKeyInfo: take the key from the signer's certificate "
            "(public_der_from_certificate) or Signer.public_der"
        )
    return der


def public_der_from_certificate(cert: bytes) -> bytes:
    """The SubjectPublicKeyInfo DER of a DER or PEM certificate's EC P-256 key (rule 5)."""
    if not isinstance(cert, _BYTES):
        raise SigningError(f"a certificate must be bytes (DER or PEM), got {type(cert).__name__}")
    raw = bytes(cert)
    if not 0 < len(raw) <= MAX_CERTIFICATE:
        raise SigningError(f"a certificate of {len(raw)} bytes: expected 1 to {MAX_CERTIFICATE}")
    try:
        if raw.lstrip().startswith(b"-----BEGIN"):
            parsed = x509.load_pem_x509_certificate(raw)
        else:
            parsed = x509.load_der_x509_certificate(raw)
        key = parsed.public_key()
    except Exception:  # noqa: BLE001
        raise SigningError(
            "not a DER or PEM X.509 certificate; pass the peer's certificate "
            "(as `neuro-dask certs` wrote it, or from the TLS connection)"
        ) from None
    if not _is_p256(key):
        raise SigningError(
            f"the certificate's key is {type(key).__name__}, not EC P-256: nothing it signs "
            "could be verified; issue the certificate with `neuro-dask certs`"
        )
    return _spki(key)


def verify_cost(runs: int = 2000, size: int = 200) -> tuple[float, float]:
    """(sign, verify) seconds per call on this machine, for the module docstring's figures."""
    signer = Signer.generate()
    data = os.urandom(size)
    sig = signer.sign(data)
    start = time.perf_counter()
    for _ in range(runs):
        signer.sign(data)
    signed = time.perf_counter()
    for _ in range(runs):
        verify(signer.public_der, data, sig)
    done = time.perf_counter()
    return (signed - start) / runs, (done - signed) / runs
