"""Secrets out of log lines and error messages (pure).

`redact_url("postgresql://bob:s3cret@db/neuro")` is `"postgresql://bob:***@db/neuro"`: the
password of a URL's user info, and the values of query parameters that carry secrets
(`?password=...`, `sslpassword`, `token`, `secret`, `api_key`), become `***`; a libpq
"key=value" connection string has its `password=` redacted the same way. Anything else is
returned as given, and nothing here raises: a URL that cannot be parsed is still redacted as far
as it can be.

`redact_secrets(text, url)` removes the URL's secrets from another text, such as a database
driver's error message that quotes part of the URL.
"""

from __future__ import annotations

import logging
import re
from urllib.parse import unquote

MASK = "***"
_SECRET_NAMES = (
    "password",
    "passwd",
    "pwd",
    "sslpassword",
    "secret",
    "token",
    "access_token",
    "api_key",
    "apikey",
    "api-key",
)
_DSN_SECRET = re.compile(r"(?i)\b(password|passwd|sslpassword)(\s*=\s*)('(?:\\.|[^'\\])*'|\S+)")
_SEPARATORS = "/?#"


def _is_secret_name(name: str) -> bool:
    name = unquote(name).strip().lower()
    return name in _SECRET_NAMES or "password" in name or "secret" in name


def _split(url: str) -> tuple[str, str, str, str] | None:
    """(scheme + "://", user, password, rest after "@"), or None when the URL has no password."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        return None
    end = min((i for i in (rest.find(c) for c in _SEPARATORS) if i >= 0), default=len(rest))
    at = rest.rfind("@", 0, end)
    if at < 0:
        # Not a well-formed URL, but one a user may well type: a password holding an unencoded
        # "/", "?" or "#" (so the host seems to start later). "host:8080/path@x" is a port, not this.
        at = rest.find("@")
        if at < 0:
            return None
        user, colon, password = rest[:at].partition(":")
        first = min((i for i in (password.find(c) for c in _SEPARATORS) if i >= 0), default=len(password))
        if not colon or any(c in user for c in _SEPARATORS) or password[:first].isdigit():
            return None
    else:
        user, colon, password = rest[:at].partition(":")
        if not colon:
            return None
    return scheme + sep, user, password, rest[at + 1 :]


def _redact_query(url: str) -> str:
    head, sep, query = url.partition("?")
    if not sep:
        return url
    query, hash_, fragment = query.partition("#")
    parts = re.split(r"([&;])", query)
    for i in range(0, len(parts), 2):
        name, eq, value = parts[i].partition("=")
        if eq and value and _is_secret_name(name):
            parts[i] = f"{name}={MASK}"
    return head + sep + "".join(parts) + hash_ + fragment


def redact_url(url: object) -> str:
    """The URL (or libpq connection string) with its password and secret parameters as ***."""
    text = "" if url is None else str(url)
    if "://" not in text:
        return _DSN_SECRET.sub(lambda m: m.group(1) + m.group(2) + MASK, text)
    split = _split(text)
    if split is not None:
        scheme, user, password, rest = split
        text = f"{scheme}{user}:{MASK if password else ''}@{rest}"
    return _redact_query(text)


def url_secrets(url: object) -> list[str]:
    """The secrets a URL carries, as written and percent-decoded, longest first."""
    text = "" if url is None else str(url)
    found: set[str] = set()
    split = _split(text) if "://" in text else None
    if split is not None and split[2]:
        found.add(split[2])
    query = text.partition("?")[2].partition("#")[0] if "://" in text else ""
    for part in re.split(r"[&;]", query):
        name, eq, value = part.partition("=")
        if eq and value and _is_secret_name(name):
            found.add(value)
    if "://" not in text:
        for match in _DSN_SECRET.finditer(text):
            found.add(match.group(3).strip("'"))
    found |= {unquote(s) for s in found}
    return sorted((s for s in found if s), key=len, reverse=True)


def redact_secrets(text: object, url: object) -> str:
    """`text` with every secret of `url` replaced by ***; the URL itself, if quoted, redacted."""
    out = "" if text is None else str(text)
    if url:
        out = out.replace(str(url), redact_url(url))
    for secret in url_secrets(url):
        out = out.replace(secret, MASK)
    return out


_URL_IN_TEXT = re.compile(r"\b[a-zA-Z][a-zA-Z0-9+.-]*://[^\s'\"<>]+")


def redact_text(text: object) -> str:
    """Every URL inside a free text, redacted (a third-party log line that quotes a URL)."""
    return _URL_IN_TEXT.sub(lambda m: redact_url(m.group(0)), str(text))


class RedactingFilter(logging.Filter):
    """A logging filter that redacts URLs in the records of a logger it is attached to."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a broken record is the logger's problem, not a reason to drop it
            return True
        if "://" in message:
            record.msg, record.args = redact_text(message), ()
        return True


# Loggers of libraries that quote the URLs they open (fsspec logs "Retrieve file size for URL").
THIRD_PARTY_URL_LOGGERS = ("fsspec", "fsspec.http", "fsspec.implementations.http", "fsspec.implementations.local")


def redact_library_logs(names=THIRD_PARTY_URL_LOGGERS) -> None:
    """Attach RedactingFilter to those loggers once (a filter sees only its own logger's records)."""
    for name in names:
        logger = logging.getLogger(name)
        if not any(isinstance(f, RedactingFilter) for f in logger.filters):
            logger.addFilter(RedactingFilter())
