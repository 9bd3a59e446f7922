from __future__ import annotations

import pytest
from process_helpers import Processes


@pytest.fixture
def processes(tmp_path):
    """Spawn long-running processes (schedulers, workers) that end with the test."""
    with Processes(tmp_path) as spawn:
        yield spawn
