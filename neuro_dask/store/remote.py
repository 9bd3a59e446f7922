"""A sharded store read through fsspec, with a content-addressed on-disk cache of its files.

A store URL is a sharded model folder: a local path, file://, memory://, http(s):// or any
protocol fsspec knows. Files are always copied into the cache, even from a local folder, so a
worker never depends on the source staying where it was. Cache entries are named by sha256,
which makes them valid across restarts and shared by every model that holds the same bytes.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import tempfile
from pathlib import Path, PurePosixPath
from typing import BinaryIO

import fsspec
import fsspec.core

from neuro_dask.errors import IntegrityError, ManifestError, NeuroDaskError
from neuro_dask.security.redact import redact_library_logs, redact_secrets, redact_url
from neuro_dask.store.manifest import MANIFEST_NAME, Artifact, Manifest
from neuro_dask.store.safetensors_io import sha256_file

log = logging.getLogger(__name__)
redact_library_logs()  # fsspec quotes the URLs it opens, credentials included

_CHUNK = 1 << 22  # 4 MiB: large enough for throughput, small enough that memory stays flat
_SHA256 = re.compile(r"[0-9a-f]{64}")
_SUFFIX = re.compile(r"\.[A-Za-z0-9_-]{1,16}")
_PARTIAL = ".partial"


class StoreUnreachableError(NeuroDaskError):
    """A file of a sharded store could not be opened or read at its URL."""

    def __init__(self, url: str, detail: str):
        self.url = str(url)
        self.detail = detail
        super().__init__(
            f"{self.url}: cannot be read ({detail}). Check the store URL, that this machine can "
            "reach it, and that the store was sharded completely (`neuro-dask shard SRC DST`)."
        )

    def __reduce__(self):  # raised on workers: must survive pickling back to the client
        return type(self), (self.url, self.detail)


def join_url(base: str, relative: str) -> str:
    """base + '/' + relative: valid for local paths and for URLs alike."""
    return f"{base.rstrip('/')}/{relative.lstrip('/')}"


def read_manifest(store_url: str) -> Manifest:
    """The manifest at <store_url>/manifest.json; ManifestError when it is missing or unreadable."""
    url = join_url(str(store_url), MANIFEST_NAME)
    shown = redact_url(url)  # a store URL may carry credentials: errors and logs never do
    try:
        with fsspec.open(url, "rb") as fh:
            data = fh.read()
    except FileNotFoundError:
        raise ManifestError(
            shown,
            f"is missing: {redact_url(store_url)} is not a sharded model folder. Run "
            "`neuro-dask shard SRC DST` and point at DST (a path or a URL that serves it).",
        ) from None
    except (OSError, ValueError, ImportError) as exc:
        raise ManifestError(
            shown,
            f"cannot be read ({redact_secrets(_describe(exc), url)}); check the store URL "
            "and that this machine can reach it",
        ) from None
    try:
        raw = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ManifestError(shown, f"is not valid JSON ({exc}); re-run `neuro-dask shard`") from exc
    if not isinstance(raw, dict):
        raise ManifestError(shown, "is not a JSON object; re-run `neuro-dask shard`")
    return Manifest.from_dict(raw, shown)


class ExpertFileCache:
    """Verified copies of store files under cache_dir/<sha[:2]>/<sha><suffix>.

    Rules: a file is only ever visible under its final name after its sha256 matched the
    manifest (downloads go to a unique temp file in the same folder, then an atomic rename);
    a cached file is re-hashed on every fetch, and one that no longer matches is deleted and
    fetched again.
    """

    def __init__(self, cache_dir: str | Path):
        self.root = Path(cache_dir)
        # Since this object was made (one worker process): bytes downloaded from a store vs
        # bytes found already verified on disk (a restarted worker should only do the latter).
        self.bytes_fetched = 0
        self.bytes_cached = 0
        self.files_fetched = 0
        self.files_cached = 0

    def path_for(self, artifact: Artifact) -> Path:
        """The content-addressed cache path; the sha is checked first, since it comes from a
        manifest that may be remote and must not be able to name a path outside the cache."""
        sha = artifact.sha256
        if not isinstance(sha, str) or not _SHA256.fullmatch(sha):
            raise ManifestError(
                artifact.path, f"has sha256 {sha!r}, not 64 lowercase hex digits; re-run `neuro-dask shard`"
            )
        suffix = PurePosixPath(artifact.path).suffix
        return self.root / sha[:2] / (sha + (suffix if _SUFFIX.fullmatch(suffix) else ""))

    def cached(self, artifact: Artifact) -> bool:
        """A file of the right size is present (cheap: fetch is what verifies the hash)."""
        path = self.path_for(artifact)
        return path.is_file() and path.stat().st_size == artifact.bytes

    def total_bytes(self) -> int:
        """Bytes on disk under the cache folder, in-flight downloads included."""
        if not self.root.is_dir():
            return 0
        return sum(p.stat().st_size for p in self.root.rglob("*") if p.is_file())

    def fetch(self, store_url: str, artifact: Artifact) -> Path:
        """The verified cached copy of artifact, downloaded from <store_url>/<artifact.path> if needed."""
        path = self.path_for(artifact)
        if self._valid_cached(path, artifact):
            self.bytes_cached += artifact.bytes
            self.files_cached += 1
            return path
        url = join_url(str(store_url), artifact.path)
        _download(url, artifact, path)
        self.bytes_fetched += artifact.bytes
        self.files_fetched += 1
        log.info("fetched %s (%d bytes) into %s", redact_url(url), artifact.bytes, path)
        return path

    def _valid_cached(self, path: Path, artifact: Artifact) -> bool:
        if not path.is_file():
            return False
        actual = sha256_file(path)
        if actual == artifact.sha256:
            return True
        log.warning(
            "%s: cached copy of %s has sha256 %s, expected %s; deleting it and fetching again",
            path,
            artifact.path,
            actual[:16],
            artifact.sha256[:16],
        )
        path.unlink(missing_ok=True)
        return False


def _download(url: str, artifact: Artifact, path: Path) -> None:
    """Stream url into path through a temp file; nothing is left behind on any failure."""
    path.parent.mkdir(parents=True, exist_ok=True)
    # A unique name per download: two threads or processes fetching the same file do not clash.
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=_PARTIAL)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as out:
            actual = _copy_hashing(url, out, artifact.bytes)
        if actual != artifact.sha256:
            raise IntegrityError(redact_url(url), artifact.sha256, actual)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _copy_hashing(url: str, out: BinaryIO, limit: int) -> str:
    """Copy url to out chunk by chunk; the sha256 of what was read.

    Reading stops one byte past `limit` (the manifest's size): a source that keeps sending
    cannot fill the disk, and the extra byte already guarantees a hash mismatch.
    """
    digest = hashlib.sha256()
    total = 0
    with _open_source(url) as src:
        while total <= limit and (chunk := _read_source(src, min(_CHUNK, limit + 1 - total), url)):
            digest.update(chunk)
            out.write(chunk)  # a local disk error stays an OSError: it is not the store's fault
            total += len(chunk)
    return digest.hexdigest()


def _open_source(url: str) -> BinaryIO:
    try:
        fs, path = fsspec.core.url_to_fs(url)
        return fs.open(path, "rb")
    except FileNotFoundError:
        raise StoreUnreachableError(redact_url(url), "no such file") from None
    except (OSError, ValueError, ImportError) as exc:
        raise StoreUnreachableError(redact_url(url), redact_secrets(_describe(exc), url)) from None


def _read_source(src: BinaryIO, size: int, url: str) -> bytes:
    try:
        return src.read(size)
    except (OSError, ValueError) as exc:
        raise StoreUnreachableError(redact_url(url), redact_secrets(_describe(exc), url)) from None


def _describe(exc: BaseException) -> str:
    """One line for an fsspec failure; a missing protocol package says what to install."""
    if isinstance(exc, ImportError):
        return f"{exc}; install the packages named to read this protocol"
    return f"{type(exc).__name__}: {exc}"
