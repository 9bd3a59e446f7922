"""neuro_dask.security.signing: ECDSA P-256 signatures on evidence, keys from `neuro-dask certs`."""

from __future__ import annotations

import pickle
from datetime import UTC, datetime

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from hypothesis import given, settings
from hypothesis import strategies as st

from neuro_dask.errors import NeuroDaskError
from neuro_dask.security import signing
from neuro_dask.security.certs import create_ca, issue
from neuro_dask.security.signing import (
    Signer,
    SigningError,
    check_public_der,
    public_der_from_certificate,
    verify,
    verify_cost,
)

T0 = datetime(2030, 1, 1, 12, 0, tzinfo=UTC)
DATA = b"neuro-receipt-v1 some canonical payload"


@pytest.fixture(scope="module")
def signer():
    return Signer.generate()


@pytest.fixture(scope="module")
def rsa_key():
    return rsa.generate_private_key(public_exponent=65537, key_size=1024)


@pytest.fixture
def certs_dir(tmp_path):
    create_ca(tmp_path, clock=lambda: T0)
    issue(tmp_path, "worker", "alice", clock=lambda: T0)
    issue(tmp_path, "worker", "bob", clock=lambda: T0)
    return tmp_path


def spki(key) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def pem(key, fmt=serialization.PrivateFormat.PKCS8, encryption=None) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, fmt, encryption or serialization.NoEncryption())


# ---- sign and verify ----------------------------------------------------------------------------


def test_sign_then_verify(signer):
    sig = signer.sign(DATA)
    assert 64 <= len(sig) <= 72
    assert verify(signer.public_der, DATA, sig)
    assert verify(signer.public_der, memoryview(DATA), bytearray(sig))  # any bytes-like


def test_signing_error_is_a_neuro_dask_error():
    assert issubclass(SigningError, NeuroDaskError)


@pytest.mark.parametrize(
    "attack",
    [
        "other key",
        "data changed",
        "data extended",
        "signature flipped",
        "signature truncated",
        "empty signature",
    ],
)
def test_verify_refuses_tampering(signer, attack):
    sig, key, data = signer.sign(DATA), signer.public_der, DATA
    if attack == "other key":
        key = Signer.generate().public_der
    elif attack == "data changed":
        data = DATA.replace(b"some", b"same")
    elif attack == "data extended":
        data = DATA + b"\x00"
    elif attack == "signature flipped":
        sig = sig[:-1] + bytes([sig[-1] ^ 1])
    elif attack == "signature truncated":
        sig = sig[:-2]
    elif attack == "empty signature":
        sig = b""
    assert verify(key, data, sig) is False


@pytest.mark.parametrize(
    "public_der, data, signature",
    [
        (None, DATA, b"x"),
        ("a string", DATA, b"x"),
        (123, DATA, b"x"),
        ([1, 2], DATA, b"x"),
        (b"", DATA, b"x"),
        (b"\x30\x03garbage DER", DATA, b"x"),
        (b"\x00" * 91, DATA, b"x"),
        (b"\x30" * (signing.MAX_PUBLIC_DER + 1), DATA, b"x"),
    ],
)
def test_verify_never_raises_on_bad_keys(public_der, data, signature):
    assert verify(public_der, data, signature) is False


@pytest.mark.parametrize(
    "data, signature",
    [
        ("text, not bytes", b"x"),
        (None, b"x"),
        (12, b"x"),
        (DATA, None),
        (DATA, "sig"),
        (DATA, 0),
        (DATA, b"\x30" * (signing.MAX_SIGNATURE + 1)),
        (DATA, b"\x00" * (1 << 20)),
    ],
)
def test_verify_never_raises_on_bad_data_or_signature(signer, data, signature):
    assert verify(signer.public_der, data, signature) is False


def test_verify_refuses_keys_of_other_types_and_curves(rsa_key):
    """An RSA or P-384 key never verifies here, even over its own valid signature."""
    rsa_sig = rsa_key.sign(DATA, padding.PKCS1v15(), hashes.SHA256())
    assert verify(spki(rsa_key), DATA, rsa_sig) is False
    p384 = ec.generate_private_key(ec.SECP384R1())
    assert verify(spki(p384), DATA, p384.sign(DATA, ec.ECDSA(hashes.SHA256()))) is False


@settings(max_examples=200, deadline=None)
@given(
    st.one_of(st.binary(max_size=200), st.text(max_size=20), st.integers(), st.none()),
    st.one_of(st.binary(max_size=200), st.text(max_size=20), st.none()),
    st.one_of(st.binary(max_size=100), st.integers(), st.none()),
)
def test_verify_answers_a_bool_whatever_the_input(public_der, data, signature):
    assert verify(public_der, data, signature) in (True, False)


# ---- the key cache ------------------------------------------------------------------------------


def test_key_cache_parses_each_key_once(signer, monkeypatch):
    loads = []
    real = signing.serialization.load_der_public_key
    monkeypatch.setattr(signing.serialization, "load_der_public_key", lambda der: loads.append(der) or real(der))
    signing._keys.clear()
    sig = signer.sign(DATA)
    for _ in range(50):
        assert verify(signer.public_der, DATA, sig)
    assert len(loads) == 1


def test_key_cache_stays_bounded_under_a_flood_of_keys(monkeypatch):
    monkeypatch.setattr(signing, "KEY_CACHE", 16)
    signing._keys.clear()
    for i in range(200):  # garbage keys are cached (as unusable) too, and evicted like the rest
        verify(b"\x30\x10" + i.to_bytes(4, "big") * 4, DATA, b"sig")
    assert len(signing._keys) == 16
    fresh = Signer.generate()
    assert verify(fresh.public_der, DATA, fresh.sign(DATA))  # still works after evictions


# ---- the Signer ---------------------------------------------------------------------------------


def test_signer_never_shows_or_pickles_its_key(signer):
    secret = signer._key.private_numbers().private_value
    for text in (repr(signer), str(signer)):
        assert str(secret) not in text and hex(secret)[2:] not in text and "PRIVATE" not in text
        assert signer.fingerprint() in text
    with pytest.raises(TypeError, match="never pickled"):
        pickle.dumps(signer)


@pytest.mark.parametrize("key", [None, "pem text", 42])
def test_signer_needs_an_ec_p256_key(key):
    with pytest.raises(SigningError, match="P-256"):
        Signer(key)


def test_signer_refuses_p384():
    with pytest.raises(SigningError, match="P-256"):
        Signer(ec.generate_private_key(ec.SECP384R1()))


def test_sign_takes_bytes_only(signer):
    with pytest.raises(TypeError):
        signer.sign("text")  # type: ignore[arg-type]


def test_from_pem_file_reads_a_certs_key(certs_dir):
    signer = Signer.from_pem_file(certs_dir / "worker-alice.key")
    assert signer.public_der == public_der_from_certificate((certs_dir / "worker-alice.pem").read_bytes())
    assert verify(signer.public_der, DATA, signer.sign(DATA))


def test_from_pem_file_reads_a_certificate_and_its_key_together(certs_dir, tmp_path):
    both = tmp_path / "both.pem"
    both.write_bytes((certs_dir / "worker-alice.pem").read_bytes() + (certs_dir / "worker-alice.key").read_bytes())
    assert Signer.from_pem_file(both).public_der == Signer.from_pem_file(certs_dir / "worker-alice.key").public_der
    reversed_order = tmp_path / "reversed.pem"
    reversed_order.write_bytes(
        (certs_dir / "worker-alice.key").read_bytes() + (certs_dir / "worker-alice.pem").read_bytes()
    )
    assert Signer.from_pem_file(reversed_order).public_der == Signer.from_pem_file(both).public_der


def test_from_pem_file_reads_a_sec1_key(tmp_path):
    key = ec.generate_private_key(ec.SECP256R1())
    path = tmp_path / "sec1.pem"
    path.write_bytes(pem(key, serialization.PrivateFormat.TraditionalOpenSSL))
    assert Signer.from_pem_file(path).public_der == spki(key)


def test_kept_in_makes_a_private_key_once_and_reads_it_back(tmp_path):
    import os
    import stat

    path = tmp_path / "state.json.ticket-key"
    first = Signer.kept_in(path)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600  # a private key: its owner's only
    assert not list(tmp_path.glob("*.partial"))
    again = Signer.kept_in(path)
    assert again.public_der == first.public_der
    assert verify(again.public_der, b"ticket", first.sign(b"ticket"))


def test_kept_in_refuses_a_file_that_is_not_a_key_instead_of_replacing_it(tmp_path):
    path = tmp_path / "state.json.ticket-key"
    path.write_text("not a key")
    with pytest.raises(SigningError, match="exactly one PEM private key"):
        Signer.kept_in(path)
    assert path.read_text() == "not a key"  # an operator's file is never overwritten


@pytest.mark.parametrize(
    "case, match",
    [
        ("missing file", "cannot read"),
        ("empty file", "exactly one PEM private key, found 0"),
        ("certificate only", "exactly one PEM private key, found 0"),
        ("two keys", "exactly one PEM private key, found 2"),
        ("another's certificate", "not the key's own"),
        ("two certificates", "2 certificates"),
        ("encrypted key", "encrypted"),
        ("rsa key", "not EC P-256"),
        ("p384 key", "not EC P-256"),
        ("garbage in a key block", "not a usable"),
        ("huge file", "not a PEM key file"),
    ],
)
def test_from_pem_file_refuses(case, match, certs_dir, tmp_path, rsa_key):
    alice_key = (certs_dir / "worker-alice.key").read_bytes()
    alice_cert = (certs_dir / "worker-alice.pem").read_bytes()
    bob_cert = (certs_dir / "worker-bob.pem").read_bytes()
    contents = {
        "empty file": b"",
        "certificate only": alice_cert,
        "two keys": alice_key + (certs_dir / "worker-bob.key").read_bytes(),
        "another's certificate": bob_cert + alice_key,
        "two certificates": alice_cert + bob_cert + alice_key,
        "encrypted key": pem(
            ec.generate_private_key(ec.SECP256R1()), encryption=serialization.BestAvailableEncryption(b"pw")
        ),
        "rsa key": pem(rsa_key),
        "p384 key": pem(ec.generate_private_key(ec.SECP384R1())),
        "garbage in a key block": b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
        "huge file": b"#" * (signing.MAX_PEM_FILE + 1),
    }
    path = tmp_path / "key.pem"
    if case != "missing file":
        path.write_bytes(contents[case])
    with pytest.raises(SigningError, match=match):
        Signer.from_pem_file(path)


# ---- public keys from certificates --------------------------------------------------------------


def test_public_der_from_pem_and_der_certificates(certs_dir):
    pem_bytes = (certs_dir / "worker-alice.pem").read_bytes()
    der_bytes = x509.load_pem_x509_certificate(pem_bytes).public_bytes(serialization.Encoding.DER)
    assert public_der_from_certificate(pem_bytes) == public_der_from_certificate(der_bytes)
    assert public_der_from_certificate(memoryview(der_bytes)) == check_public_der(
        public_der_from_certificate(der_bytes)
    )


@pytest.mark.parametrize(
    "cert",
    [
        None,
        "text",
        b"",
        b"not a certificate",
        b"-----BEGIN CERTIFICATE-----\nAA\n",
        b"\x30" * (signing.MAX_CERTIFICATE + 1),
    ],
)
def test_public_der_from_certificate_refuses_anything_else(cert):
    with pytest.raises(SigningError):
        public_der_from_certificate(cert)


def test_public_der_from_certificate_refuses_a_non_p256_key(rsa_key):
    from cryptography.x509.oid import NameOID

    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "rsa")])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(rsa_key.public_key())
        .serial_number(1)
        .not_valid_before(T0)
        .not_valid_after(T0.replace(year=2031))
        .sign(rsa_key, hashes.SHA256())
    )
    with pytest.raises(SigningError, match="not EC P-256"):
        public_der_from_certificate(cert.public_bytes(serialization.Encoding.DER))


@pytest.mark.parametrize("der", [None, b"", b"garbage", "text"])
def test_check_public_der_refuses_garbage(der):
    with pytest.raises(SigningError):
        check_public_der(der)


def test_verify_cost_measures_something():
    sign_s, verify_s = verify_cost(runs=3)
    assert 0 < sign_s < 0.1 and 0 < verify_s < 0.1
