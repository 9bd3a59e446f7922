"""`neuro-dask certs`: identities read from peer certificates, the CA, role certificates and their files."""

from __future__ import annotations

import hashlib
import ssl
import stat
from datetime import UTC, datetime, timedelta

import dask.config
import pytest
from cryptography import x509
from hypothesis import given, settings
from hypothesis import strategies as st

from neuro_dask.cli.certs import main as certs_main
from neuro_dask.errors import CertificateError, NeuroDaskError
from neuro_dask.security.certs import (
    as_peercert,
    cert_paths,
    certificates,
    create_ca,
    describe,
    issue,
    load_certificate,
    role_certificates,
)
from neuro_dask.security.identity import ROLES, PeerIdentity, check_name, identity_from_peercert

T0 = datetime(2030, 1, 1, 12, 0, tzinfo=UTC)


def at(when: datetime):
    return lambda: when


def peercert(cn="alice", ou="neuro-dask-worker", uri="neuro-dask://worker/alice", extra_subject=(), extra_san=()):
    subject = [(("organizationName", "neuro-dask"),)]
    subject += [(("organizationalUnitName", v),) for v in ([ou] if isinstance(ou, str) else ou)]
    subject += [(("commonName", v),) for v in ([cn] if isinstance(cn, str) else cn)]
    san = [("URI", v) for v in ([uri] if isinstance(uri, str) else uri)]
    return {
        "subject": tuple(subject) + tuple(extra_subject),
        "subjectAltName": tuple(san) + (("DNS", "localhost"), ("IP Address", "127.0.0.1")) + tuple(extra_san),
    }


@pytest.fixture
def ca_dir(tmp_path):
    create_ca(tmp_path, clock=at(T0))
    return tmp_path


# ---- identities -----------------------------------------------------------------------------------


@pytest.mark.parametrize("role", ROLES)
def test_identity_of_each_role(role):
    cert = peercert(cn="n-1", ou=f"neuro-dask-{role}", uri=f"neuro-dask://{role}/n-1")
    assert identity_from_peercert(cert) == PeerIdentity(role, "n-1")


def test_identity_ignores_other_attributes_and_uris():
    cert = peercert(extra_subject=[(("countryName", "NL"),)], extra_san=[("URI", "https://example.org/x")])
    assert identity_from_peercert(cert) == PeerIdentity("worker", "alice")


def test_multi_valued_rdn_is_read():
    cert = {
        "subject": ((("organizationalUnitName", "neuro-dask-client"), ("commonName", "bob")),),
        "subjectAltName": (("URI", "neuro-dask://client/bob"),),
    }
    assert identity_from_peercert(cert) == PeerIdentity("client", "bob")


@pytest.mark.parametrize(
    "cert",
    [
        None,
        {},
        {"subject": (), "subjectAltName": ()},
        peercert(ou="neuro-dask-client"),  # OU and URI disagree on the role
        peercert(cn="mallory"),  # CN is not the URI's name
        peercert(uri="neuro-dask://client/alice"),  # URI's role is not the OU's
        peercert(ou="neuro-dask-admin", uri="neuro-dask://admin/alice"),  # agree, but no such role
        peercert(ou=[]),  # no OU
        peercert(cn=[]),  # no CN
        peercert(uri=[]),  # no role URI
        peercert(ou=["neuro-dask-worker", "neuro-dask-operator"]),  # two OUs: ambiguous
        peercert(cn=["alice", "alice"]),  # two CNs
        peercert(uri=["neuro-dask://worker/alice", "neuro-dask://worker/alice"]),  # two role URIs
        peercert(uri="neuro-dask://worker"),  # no name
        peercert(uri="neuro-dask://worker/"),  # empty name
        peercert(cn="alice/x", uri="neuro-dask://worker/alice/x"),  # extra path
        peercert(cn="a b", uri="neuro-dask://worker/a b"),  # unsafe name
        peercert(cn="a" * 65, uri="neuro-dask://worker/" + "a" * 65),  # too long
        peercert(uri="NEURO-DASK://worker/alice"),  # scheme is exact
        {"subject": "CN=alice", "subjectAltName": (("URI", "neuro-dask://worker/alice"),)},
        {"subject": ((("commonName",),),), "subjectAltName": (("URI", "neuro-dask://worker/alice"),)},
        {
            "subject": ((("commonName", 5),), (("organizationalUnitName", b"neuro-dask-worker"),)),
            "subjectAltName": (("URI", "neuro-dask://worker/5"),),
        },
        {"subject": [None, 3, "x", [["commonName", "alice", "extra"]]], "subjectAltName": [("URI",), None, ("URI", 7)]},
        {"subject": peercert()["subject"], "subjectAltName": "URI:neuro-dask://worker/alice"},
        {"subject": peercert()["subject"], "subjectAltName": None},
        {"subjectAltName": (("URI", "neuro-dask://worker/alice"),)},
        {1: 2},
    ],
    ids=lambda c: repr(c)[:60],
)
def test_no_identity_unless_everything_agrees(cert):
    assert identity_from_peercert(cert) is None


@pytest.mark.parametrize("not_a_dict", ["subject", 42, [("subject", ())], object()])
def test_no_identity_from_non_dicts(not_a_dict):
    assert identity_from_peercert(not_a_dict) is None


_junk = st.recursive(
    st.none()
    | st.integers()
    | st.text(max_size=30)
    | st.binary(max_size=8)
    | st.sampled_from(["commonName", "organizationalUnitName", "URI", "neuro-dask-worker", "neuro-dask://worker/a"]),
    lambda inner: (
        st.lists(inner, max_size=4).map(tuple)
        | st.lists(inner, max_size=4)
        | st.dictionaries(st.text(max_size=5), inner, max_size=3)
    ),
    max_leaves=20,
)


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.sampled_from(["subject", "subjectAltName", "issuer", "x"]), _junk, max_size=4))
def test_identity_never_raises(cert):
    result = identity_from_peercert(cert)
    assert result is None or isinstance(result, PeerIdentity)


# ---- names ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["alice", "worker-1", "a", "A.b_c-9", "x" * 64, "..", "-"])
def test_safe_names(name):
    assert check_name(name) == name


@pytest.mark.parametrize("name", ["", "x" * 65, "a/b", "../etc", "a b", "al\x00ice", "älice", "a\n", None, 7])
def test_unsafe_names_are_refused(name):
    with pytest.raises(CertificateError, match="1 to 64 characters") as err:
        check_name(name)
    assert isinstance(err.value, ValueError) and isinstance(err.value, NeuroDaskError)


# ---- the CA and role certificates -----------------------------------------------------------------


def test_ca_files_and_modes(ca_dir):
    assert sorted(p.name for p in ca_dir.iterdir()) == ["ca-key.pem", "ca.pem"]
    assert stat.S_IMODE((ca_dir / "ca-key.pem").stat().st_mode) == 0o600
    assert stat.S_IMODE((ca_dir / "ca.pem").stat().st_mode) == 0o644
    info = describe(ca_dir / "ca.pem", clock=at(T0))
    assert info["is_ca"] and info["role"] is None and info["name"] is None
    assert info["common_name"] == "neuro-dask-ca"
    assert info["not_after"] == T0 + timedelta(days=3650)
    assert not info["expired"]


def test_issue_writes_a_role_certificate_signed_by_the_ca(ca_dir):
    cert_path, key_path = issue(ca_dir, "worker", "alice", clock=at(T0))
    assert (cert_path.name, key_path.name) == ("worker-alice.pem", "worker-alice.key")
    assert stat.S_IMODE(key_path.stat().st_mode) == 0o600
    cert, ca = load_certificate(cert_path), load_certificate(ca_dir / "ca.pem")
    cert.verify_directly_issued_by(ca)  # raises unless the CA's key signed it
    info = describe(cert_path, clock=at(T0))
    assert (info["role"], info["name"], info["is_ca"], info["expired"]) == ("worker", "alice", False, False)
    assert info["not_after"] == T0 + timedelta(days=825)
    assert info["not_before"] <= T0
    der = ssl.PEM_cert_to_DER_cert(cert_path.read_text())
    assert info["fingerprint"] == hashlib.sha256(der).hexdigest()
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert {o.dotted_string for o in eku} == {"1.3.6.1.5.5.7.3.1", "1.3.6.1.5.5.7.3.2"}  # serverAuth, clientAuth


def test_what_python_ssl_decodes_names_the_identity(ca_dir):
    """The exact dict getpeercert() gives for the certificate (CPython's decoder), not our copy of it."""
    decode = getattr(ssl._ssl, "_test_decode_cert", None)
    if decode is None:
        pytest.skip("this Python has no ssl._ssl._test_decode_cert")
    cert_path, _ = issue(ca_dir, "operator", "ops.team_1", clock=at(T0))
    decoded = decode(str(cert_path))
    assert identity_from_peercert(decoded) == PeerIdentity("operator", "ops.team_1")
    assert as_peercert(load_certificate(cert_path))["subject"] == decoded["subject"]
    assert as_peercert(load_certificate(cert_path))["subjectAltName"] == decoded["subjectAltName"]


def test_names_that_look_like_key_files_do_not_collide(ca_dir):
    plain = issue(ca_dir, "worker", "a", clock=at(T0))
    keyish = issue(ca_dir, "worker", "a-key", clock=at(T0))
    assert len({*plain, *keyish}) == 4
    assert role_certificates(ca_dir, "worker") == {"a": plain[0], "a-key": keyish[0]}
    assert describe(keyish[0])["name"] == "a-key"


def test_existing_files_are_not_overwritten(ca_dir):
    cert_path, key_path = issue(ca_dir, "client", "bob", clock=at(T0))
    before = cert_path.read_bytes(), key_path.read_bytes()
    with pytest.raises(CertificateError, match="--overwrite"):
        issue(ca_dir, "client", "bob", clock=at(T0))
    assert (cert_path.read_bytes(), key_path.read_bytes()) == before
    key_path.unlink()  # one of the pair is enough to refuse
    with pytest.raises(CertificateError, match="already there"):
        issue(ca_dir, "client", "bob", clock=at(T0))
    assert cert_path.read_bytes() == before[0]

    issue(ca_dir, "client", "bob", clock=at(T0), overwrite=True)
    assert cert_path.read_bytes() != before[0]
    assert stat.S_IMODE(key_path.stat().st_mode) == 0o600
    assert not [p for p in ca_dir.iterdir() if p.name.startswith(".")]  # no temporary files left


def test_a_second_ca_is_refused(ca_dir):
    ca = (ca_dir / "ca.pem").read_bytes()
    with pytest.raises(CertificateError, match="holds a CA already"):
        create_ca(ca_dir)
    assert (ca_dir / "ca.pem").read_bytes() == ca


def test_issue_needs_a_ca(tmp_path):
    with pytest.raises(CertificateError, match="certs init"):
        issue(tmp_path, "worker", "alice")
    assert list(tmp_path.iterdir()) == []


def test_mismatched_ca_key_is_refused(ca_dir, tmp_path_factory):
    other = tmp_path_factory.mktemp("other")
    create_ca(other, clock=at(T0))
    (ca_dir / "ca-key.pem").write_bytes((other / "ca-key.pem").read_bytes())
    with pytest.raises(CertificateError, match="is not the key of"):
        issue(ca_dir, "worker", "alice", clock=at(T0))


@pytest.mark.parametrize(
    ("role", "name", "days", "match"),
    [
        ("admin", "alice", 10, "not one of scheduler, worker, client, operator"),
        ("worker", "a/b", 10, "1 to 64 characters"),
        ("worker", "alice", 0, "at least 1"),
        ("worker", "alice", 1.5, "whole number"),
    ],
)
def test_bad_requests_are_refused(ca_dir, role, name, days, match):
    with pytest.raises(CertificateError, match=match):
        issue(ca_dir, role, name, days=days, clock=at(T0))
    assert certificates(ca_dir) == [ca_dir / "ca.pem"]


def test_an_expired_ca_signs_nothing(tmp_path):
    create_ca(tmp_path, days=10, clock=at(T0))
    with pytest.raises(CertificateError, match="expired on 2030-01-11"):
        issue(tmp_path, "worker", "alice", clock=at(T0 + timedelta(days=11)))
    with pytest.raises(CertificateError, match="check this machine's clock"):
        issue(tmp_path, "worker", "alice", clock=at(T0 - timedelta(days=1)))


def test_certificates_end_with_their_ca(tmp_path):
    create_ca(tmp_path, days=100, clock=at(T0))
    cert_path, _ = issue(tmp_path, "worker", "alice", days=825, clock=at(T0 + timedelta(days=50)))
    assert describe(cert_path)["not_after"] == T0 + timedelta(days=100)


def test_a_certificate_made_long_ago_reads_as_expired(tmp_path):
    past = datetime(2001, 1, 1, tzinfo=UTC)
    create_ca(tmp_path, clock=at(past))
    cert_path, _ = issue(tmp_path, "worker", "alice", days=1, clock=at(past))
    assert describe(cert_path)["expired"]  # real clock
    assert not describe(cert_path, clock=at(past))["expired"]


def test_naive_clock_means_utc(tmp_path):
    create_ca(tmp_path, days=1, clock=at(T0.replace(tzinfo=None)))
    assert describe(tmp_path / "ca.pem")["not_after"] == T0 + timedelta(days=1)


def test_cert_paths_refuse_unsafe_names(tmp_path):
    with pytest.raises(CertificateError):
        cert_paths(tmp_path, "worker", "../../etc/passwd")


# ---- the security_for side (Security objects, no network) -----------------------------------------


def test_security_for_maps_roles_to_dask_roles(tmp_path):
    from neuro_dask.security.tls import security_for

    assert certs_main(["certs", "quickstart", str(tmp_path)]) == 0
    worker = security_for("worker", tmp_path)
    assert worker.require_encryption and worker.tls_ca_file == str(tmp_path / "ca.pem")
    assert worker.tls_worker_cert == worker.tls_client_cert == str(tmp_path / "worker-worker-1.pem")
    assert worker.tls_worker_key == str(tmp_path / "worker-worker-1.key")
    scheduler = security_for("scheduler", tmp_path)
    assert scheduler.tls_scheduler_cert == scheduler.tls_client_cert == str(tmp_path / "scheduler-scheduler.pem")
    with dask.config.set({"distributed.comm.tls.worker.cert": "/elsewhere/worker.pem"}):
        operator = security_for("operator", tmp_path)  # Dask's config cannot add a role
    assert operator.tls_client_cert == str(tmp_path / "operator-operator.pem")
    assert operator.tls_worker_cert is None and operator.tls_scheduler_cert is None


def test_security_for_needs_exactly_one_or_a_name(tmp_path):
    from neuro_dask.security.tls import security_for

    create_ca(tmp_path)
    with pytest.raises(CertificateError, match="found none"):
        security_for("worker", tmp_path)
    issue(tmp_path, "worker", "alice")
    issue(tmp_path, "worker", "bob")
    with pytest.raises(CertificateError, match="worker-alice.pem, worker-bob.pem"):
        security_for("worker", tmp_path)
    assert security_for("worker", tmp_path, "bob").tls_worker_cert == str(tmp_path / "worker-bob.pem")
    with pytest.raises(CertificateError, match="missing"):
        security_for("worker", tmp_path, "carol")


def test_security_for_refuses_unusable_certificates(tmp_path):
    from neuro_dask.security.tls import security_for

    with pytest.raises(CertificateError, match="no ca.pem"):
        security_for("client", tmp_path)
    past = datetime(2001, 1, 1, tzinfo=UTC)
    create_ca(tmp_path, clock=at(past))
    issue(tmp_path, "client", "old", days=1, clock=at(past))
    with pytest.raises(CertificateError, match="expired on 2001-01-02"):
        security_for("client", tmp_path)
    issue(tmp_path, "worker", "alice", clock=at(past + timedelta(days=1)))
    cert, key = cert_paths(tmp_path, "worker", "alice")
    cert.rename(tmp_path / "client-alice.pem")  # a worker's certificate posing as a client's
    key.rename(tmp_path / "client-alice.key")
    with pytest.raises(CertificateError, match="states role 'worker'"):
        security_for("client", tmp_path, "alice")
    issue(tmp_path, "client", "carol", clock=at(past + timedelta(days=1)))
    (tmp_path / "client-carol.key").write_bytes((tmp_path / "client-alice.key").read_bytes())
    with pytest.raises(CertificateError, match="is not the key of"):
        security_for("client", tmp_path, "carol")


def test_peer_identity_without_tls_is_none():
    from neuro_dask.security.tls import peer_identity

    class PlainComm:
        extra_info: dict = {}

    assert peer_identity(PlainComm()) is None
    assert peer_identity(object()) is None


# ---- the command line ----------------------------------------------------------------------------


def test_cli_init_issue_show(tmp_path, capsys):
    folder = tmp_path / "net"
    assert certs_main(["certs", "init", str(folder)]) == 0
    assert "ca-key.pem" in capsys.readouterr().out
    assert certs_main(["certs", "init", str(folder)]) == 2
    assert "holds a CA already" in capsys.readouterr().err
    assert certs_main(["certs", "issue", str(folder), "--role", "worker", "--name", "alice", "--days", "30"]) == 0
    assert "worker-alice.key" in capsys.readouterr().out
    assert certs_main(["certs", "issue", str(folder), "--role", "worker", "--name", "alice"]) == 2
    assert certs_main(["certs", "issue", str(folder), "--role", "worker", "--name", "alice", "--overwrite"]) == 0
    capsys.readouterr()
    assert certs_main(["certs", "show", str(folder)]) == 0
    rows = capsys.readouterr().out.splitlines()
    fingerprint = describe(folder / "worker-alice.pem")["fingerprint"]
    assert rows[1].split()[:2] == ["ca", "neuro-dask-ca"]
    assert rows[2].split()[:2] == ["worker", "alice"] and rows[2].split()[-1] == fingerprint


def test_cli_quickstart(tmp_path, capsys):
    assert certs_main(["certs", "quickstart", str(tmp_path)]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "ca-key.pem",
        "ca.pem",
        "client-client.key",
        "client-client.pem",
        "operator-operator.key",
        "operator-operator.pem",
        "scheduler-scheduler.key",
        "scheduler-scheduler.pem",
        "worker-worker-1.key",
        "worker-worker-1.pem",
    ]
    out = capsys.readouterr().out
    # the form the README teaches: each neuro-dask command picks its role's certificate from the folder
    assert f"neuro-dask scheduler --tls {tmp_path}" in out
    assert f"neuro-dask worker tls://127.0.0.1:8786 --tls {tmp_path}" in out
    assert "--tls-cert" not in out
    assert certs_main(["certs", "quickstart", str(tmp_path)]) == 2


def test_cli_show_on_an_empty_folder(tmp_path, capsys):
    assert certs_main(["certs", "show", str(tmp_path)]) == 2
    assert "certs init" in capsys.readouterr().err


# ---- owners -----------------------------------------------------------------------------------------


def test_a_worker_certificate_names_its_owner(ca_dir):
    """Issued with --owner, read back by CPython's own decoder (what getpeercert gives a comm)."""
    cert_path, _ = issue(ca_dir, "worker", "gpu1", clock=at(T0), owner="alice")
    assert describe(cert_path, clock=at(T0))["owner"] == "alice"
    decode = getattr(ssl._ssl, "_test_decode_cert", None)
    peer = decode(str(cert_path)) if decode is not None else as_peercert(load_certificate(cert_path))
    assert identity_from_peercert(peer) == PeerIdentity("worker", "gpu1", "alice")
    plain, _ = issue(ca_dir, "worker", "gpu2", clock=at(T0))
    assert describe(plain, clock=at(T0))["owner"] is None
    assert identity_from_peercert(as_peercert(load_certificate(plain))) == PeerIdentity("worker", "gpu2")


@pytest.mark.parametrize("owners", [["alice", "bob"], ["a b"], [""], ["x" * 65]])
def test_two_or_malformed_owner_uris_name_nobody(owners):
    cert = peercert(extra_san=[("URI", f"neuro-dask-owner://{o}") for o in owners])
    assert identity_from_peercert(cert) is None


@pytest.mark.parametrize(
    "role, owner, match", [("client", "alice", "for worker certificates"), ("worker", "a/b", "not allowed")]
)
def test_bad_owners_are_refused(ca_dir, role, owner, match):
    with pytest.raises(CertificateError, match=match):
        issue(ca_dir, role, "n", clock=at(T0), owner=owner)
