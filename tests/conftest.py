from __future__ import annotations

import logging
from pathlib import Path

import pytest
from tiny_models import VARIANTS, write_checkpoint

logging.getLogger("neuro_dask").setLevel(logging.INFO)


@pytest.fixture(scope="session")
def hf_checkpoint(tmp_path_factory):
    """variant -> a tiny HF checkpoint folder written by transformers (built once per session)."""
    cache: dict[str, Path] = {}

    def get(variant: str) -> Path:
        if variant not in cache:
            assert variant in VARIANTS, variant
            cache[variant] = write_checkpoint(variant, tmp_path_factory.mktemp(f"hf-{variant}"))
        return cache[variant]

    return get


@pytest.fixture(scope="session")
def sharded(hf_checkpoint, tmp_path_factory):
    """variant -> that checkpoint sharded through the CLI (`neuro-dask shard SRC DST`)."""
    from neuro_dask.cli.main import main

    cache: dict[str, Path] = {}

    def get(variant: str) -> Path:
        if variant not in cache:
            dst = tmp_path_factory.mktemp(f"sharded-{variant}")
            assert main(["shard", str(hf_checkpoint(variant)), str(dst), "--quiet"]) == 0
            cache[variant] = dst
        return cache[variant]

    return get
