"""Fetching a sharded store through fsspec into a content-addressed, verified on-disk cache."""

from __future__ import annotations

import logging
import shutil
import uuid
from pathlib import Path

import fsspec
import pytest

import neuro_dask
from neuro_dask.errors import IntegrityError, ManifestError
from neuro_dask.store.manifest import MANIFEST_NAME, Manifest
from neuro_dask.store.remote import (
    ExpertFileCache,
    StoreUnreachableError,
    read_manifest,
)
from neuro_dask.store.safetensors_io import read_tensors, sha256_file

ADDER = Path(neuro_dask.__file__).parent / "assets" / "adder"


@pytest.fixture
def store(tmp_path) -> Path:
    """A private copy of the bundled store, safe to damage."""
    return Path(shutil.copytree(ADDER, tmp_path / "store"))


@pytest.fixture
def cache(tmp_path) -> ExpertFileCache:
    return ExpertFileCache(tmp_path / "cache")


def _partials(cache: ExpertFileCache) -> list[Path]:
    return [p for p in cache.root.rglob("*") if p.is_file() and p.name.endswith(".partial")]


def test_read_manifest_from_path_and_file_url():
    expected = Manifest.read(ADDER)
    assert read_manifest(str(ADDER)) == expected
    assert read_manifest(ADDER.as_uri()) == expected
    assert read_manifest(ADDER.as_uri() + "/") == expected


def test_read_manifest_missing_names_the_url(tmp_path):
    with pytest.raises(ManifestError, match="neuro-dask shard") as info:
        read_manifest(str(tmp_path))
    assert info.value.path == f"{tmp_path}/{MANIFEST_NAME}"


def test_read_manifest_invalid_json_and_unknown_protocol(tmp_path):
    (tmp_path / MANIFEST_NAME).write_text("{not json")
    with pytest.raises(ManifestError, match="not valid JSON"):
        read_manifest(str(tmp_path))
    with pytest.raises(ManifestError, match="cannot be read"):
        read_manifest("nosuchprotocol://host/store")


def test_fetch_stores_a_verified_content_addressed_copy(cache):
    artifact = Manifest.read(ADDER).expert(0, 1)
    assert not cache.cached(artifact) and cache.total_bytes() == 0
    path = cache.fetch(str(ADDER), artifact)
    sha = artifact.sha256
    assert path == cache.root / sha[:2] / f"{sha}.safetensors" == cache.path_for(artifact)
    assert sha256_file(path) == sha and cache.cached(artifact)
    assert cache.total_bytes() == artifact.bytes
    assert set(read_tensors(path)) == {"gate_proj", "up_proj", "down_proj"}
    assert not _partials(cache)


def test_second_fetch_does_not_read_the_source(store, cache):
    artifact = Manifest.read(store).expert(1, 2)
    first = cache.fetch(str(store), artifact)
    (store / artifact.path).unlink()
    assert cache.fetch(str(store), artifact) == first
    # A fresh cache object over the same folder (a restarted worker) finds it too.
    assert ExpertFileCache(cache.root).fetch(str(store), artifact) == first


def test_corrupt_cached_file_is_fetched_again(cache, caplog):
    artifact = Manifest.read(ADDER).expert(0, 0)
    path = cache.fetch(str(ADDER), artifact)
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING, logger="neuro_dask.store.remote"):
        assert cache.fetch(str(ADDER), artifact) == path
    assert sha256_file(path) == artifact.sha256
    assert any("fetching again" in r.getMessage() for r in caplog.records)


def test_wrong_source_bytes_raise_and_leave_nothing(store, cache):
    artifact = Manifest.read(store).expert(2, 3)
    source = store / artifact.path
    data = bytearray(source.read_bytes())
    data[len(data) // 2] ^= 0x01
    source.write_bytes(bytes(data))
    with pytest.raises(IntegrityError) as info:
        cache.fetch(str(store), artifact)
    assert info.value.path == f"{store}/{artifact.path}"
    assert not cache.path_for(artifact).exists() and not _partials(cache)
    assert cache.total_bytes() == 0


def test_oversized_source_is_cut_off_and_rejected(store, cache):
    artifact = Manifest.read(store).expert(3, 0)
    with open(store / artifact.path, "ab") as fh:
        fh.write(b"\0" * 4096)
    with pytest.raises(IntegrityError):
        cache.fetch(str(store), artifact)
    assert cache.total_bytes() == 0


def test_missing_source_raises_store_unreachable(store, cache):
    artifact = Manifest.read(store).expert(0, 2)
    (store / artifact.path).unlink()
    with pytest.raises(StoreUnreachableError, match="no such file") as info:
        cache.fetch(store.as_uri(), artifact)
    assert info.value.url == f"{store.as_uri()}/{artifact.path}"
    assert cache.total_bytes() == 0


def test_unsafe_sha_in_a_manifest_cannot_escape_the_cache(cache):
    artifact = Manifest.read(ADDER).expert(0, 0)
    unsafe = {**artifact.__dict__, "sha256": "../../" + "a" * 58}
    with pytest.raises(ValueError, match="64 hex"):  # a manifest cannot even hold it
        type(artifact)(**unsafe)
    bad = object.__new__(type(artifact))  # and were one built around that check, the cache refuses it
    for name, value in unsafe.items():
        object.__setattr__(bad, name, value)
    with pytest.raises(ManifestError, match="64 lowercase hex"):
        cache.path_for(bad)


def test_fetch_through_the_memory_filesystem(cache):
    fs = fsspec.filesystem("memory")
    root = f"/neuro-dask-test-{uuid.uuid4().hex}"
    try:
        fs.put(str(ADDER), root, recursive=True)
        url = f"memory://{root}"
        manifest = read_manifest(url)
        assert manifest == Manifest.read(ADDER)
        tokenizer = manifest.tokenizer()
        for artifact in (manifest.trunk, manifest.expert(1, 1), tokenizer):
            path = cache.fetch(url, artifact)
            assert sha256_file(path) == artifact.sha256
        assert cache.path_for(tokenizer).suffix == ".json"
    finally:
        fs.rm(root, recursive=True)
