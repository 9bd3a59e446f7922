"""Secrets never logged (neuro_dask/security/redact.py): passwords out of URLs and error messages,
and a ledger opened at a PostgreSQL URL with a password that cannot connect says so without it."""

from __future__ import annotations

import logging

import pytest

from neuro_dask.security.redact import redact_secrets, redact_url, url_secrets


@pytest.mark.parametrize(
    "url, redacted",
    [
        ("postgresql://bob:s3cr3t@db.example:5432/neuro", "postgresql://bob:***@db.example:5432/neuro"),
        ("postgres://bob:s3cr3t@db/neuro?sslmode=require", "postgres://bob:***@db/neuro?sslmode=require"),
        ("postgresql://:s3cr3t@db/neuro", "postgresql://:***@db/neuro"),
        ("postgresql://bob:p%40ss@db/neuro", "postgresql://bob:***@db/neuro"),
        ("postgresql://bob:p@ss@db/neuro", "postgresql://bob:***@db/neuro"),  # an unencoded "@"
        ("postgresql://bob:pa/ss@db/neuro", "postgresql://bob:***@db/neuro"),  # an unencoded "/"
        (
            "postgresql://db/neuro?user=bob&password=s3cr3t&sslmode=require",
            "postgresql://db/neuro?user=bob&password=***&sslmode=require",
        ),
        ("https://store.example/adder?token=abc123#frag", "https://store.example/adder?token=***#frag"),
        ("s3://AKIAKEY:wJalrSECRET@bucket/models", "s3://AKIAKEY:***@bucket/models"),
        ("host=db user=bob password=s3cr3t dbname=neuro", "host=db user=bob password=*** dbname=neuro"),
        ("host=db password='s3 cr3t' dbname=neuro", "host=db password=*** dbname=neuro"),
        # nothing secret: unchanged
        ("postgresql://bob@db/neuro", "postgresql://bob@db/neuro"),
        ("postgresql://bob:@db/neuro", "postgresql://bob:@db/neuro"),
        ("sqlite:///var/lib/neuro/ledger.db", "sqlite:///var/lib/neuro/ledger.db"),
        ("sqlite://:memory:", "sqlite://:memory:"),
        ("http://host:8080/path@x", "http://host:8080/path@x"),  # a port and an "@" in the path
        ("/plain/path.db", "/plain/path.db"),
        ("", ""),
        (None, ""),
    ],
)
def test_redact_url(url, redacted):
    assert redact_url(url) == redacted


@pytest.mark.parametrize(
    "url, secrets",
    [
        ("postgresql://bob:p%40ss@db/neuro", ["p%40ss", "p@ss"]),
        ("postgresql://db/neuro?password=x1&token=t2", ["x1", "t2"]),
        ("host=db password=s3cr3t", ["s3cr3t"]),
        ("postgresql://bob@db/neuro", []),
    ],
)
def test_url_secrets_as_written_and_decoded(url, secrets):
    assert sorted(url_secrets(url)) == sorted(secrets)


def test_redact_secrets_removes_a_urls_password_from_any_text():
    url = "postgresql://bob:s3%zzPW@127.0.0.1:1/neuro"
    text = f'invalid percent-encoded token: "s3%zzPW" in {url}'
    out = redact_secrets(text, url)
    assert "s3%zzPW" not in out and "zz" not in out
    assert "postgresql://bob:***@127.0.0.1:1/neuro" in out
    assert redact_secrets("nothing to hide", None) == "nothing to hide"


@pytest.mark.parametrize(
    "url",
    [
        "postgresql://neuro:Hunter2-s3cret@127.0.0.1:1/neuro",  # nothing listens on port 1
        "postgresql://neuro:Hunter2-s3cret%zz@127.0.0.1:1/neuro",  # libpq quotes a bad escape back
    ],
)
def test_a_ledger_that_cannot_connect_never_shows_its_password(url, caplog):
    pytest.importorskip("psycopg")
    from neuro_dask.ledger import LedgerError
    from neuro_dask.ledger.errors import LedgerConnectionError
    from neuro_dask.ledger.service import LedgerService

    with caplog.at_level(logging.DEBUG), pytest.raises(LedgerConnectionError) as err:
        LedgerService.open(url, now=0.0)
    assert isinstance(err.value, LedgerError) and isinstance(err.value, ConnectionError)
    message = str(err.value)
    assert "postgresql://neuro:***@127.0.0.1:1/neuro" in message and "neuro.ledger.url" in message
    assert "Hunter2" not in message and "Hunter2" not in repr(err.value)
    assert err.value.__cause__ is None and err.value.__suppress_context__  # the driver's error is not chained
    assert all("Hunter2" not in record.getMessage() for record in caplog.records)
    assert all("Hunter2" not in str(record.args) for record in caplog.records)


def test_the_ledger_cli_names_the_url_without_its_password(capsys):
    pytest.importorskip("psycopg")
    from neuro_dask.cli.main import main

    code = main(["ledger", "report", "--db", "postgresql://neuro:Hunter2-s3cret@127.0.0.1:1/neuro"])
    err = capsys.readouterr().err
    assert code != 0 and "cannot open the ledger database" in err
    assert "Hunter2" not in err and "neuro:***@127.0.0.1:1" in err


def test_the_database_repr_hides_the_password():
    from neuro_dask.ledger.db import Database

    db = Database("sqlite://:memory:")
    db.url = "postgresql://bob:s3cr3t@db/neuro"  # what a PostgreSQL ledger would hold
    assert repr(db) == "Database('postgresql://bob:***@db/neuro')"
    db.close()


def test_a_store_url_with_credentials_never_reaches_an_error_or_a_log(caplog, tmp_path):
    import logging

    import pytest

    from neuro_dask.errors import ManifestError, NeuroDaskError
    from neuro_dask.store.manifest import Artifact
    from neuro_dask.store.remote import ExpertFileCache, read_manifest

    url = "http://volunteer:s3cret-pass@127.0.0.1:1/store?token=t0ps3cret"
    caplog.set_level(logging.DEBUG)
    with pytest.raises(ManifestError) as manifest_error:
        read_manifest(url)
    artifact = Artifact(path="experts/l0/e0.safetensors", sha256="0" * 64, bytes=4, role="expert", layer=0, expert=0)
    with pytest.raises(NeuroDaskError) as fetch_error:
        ExpertFileCache(tmp_path).fetch(url, artifact)
    seen = [str(manifest_error.value), str(fetch_error.value), *(r.getMessage() for r in caplog.records)]
    assert all("s3cret-pass" not in text and "t0ps3cret" not in text for text in seen), seen
    assert "127.0.0.1:1" in str(manifest_error.value)  # still says where it looked


def test_urls_inside_free_text_are_redacted():
    from neuro_dask.security.redact import redact_text

    line = "Retrieve file size for http://u:pw1@h/x/manifest.json and s3://k?token=abc then done"
    assert redact_text(line) == "Retrieve file size for http://u:***@h/x/manifest.json and s3://k?token=*** then done"
    assert redact_text("no url here: user:pw@host") == "no url here: user:pw@host"
