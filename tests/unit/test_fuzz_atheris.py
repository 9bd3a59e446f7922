"""Coverage-guided fuzzing of the parsers of untrusted input (benchmarks/fuzz_atheris.py, atheris):
a short run per target in CI, the same targets and documented errors as test_fuzz_parsers.py, hardened
mode's decoders included (plain: decode_plain_frames, PlainDataRefusedError only; pickle: the bounded
restricted loader, PickleRefusedError or UnpicklingError only, and no crash, hang or runaway memory).

Skipped without atheris (the `fuzz` extra). `python benchmarks/fuzz_atheris.py` runs 100,000 each.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("atheris")

ROOT = Path(__file__).resolve().parents[2]
HARNESS = ROOT / "benchmarks/fuzz_atheris.py"
TARGETS = ("manifest", "safetensors", "frame", "gateway", "plain", "pickle")
RUNS = 2000
TIMEOUT = 240


@pytest.fixture(scope="module")
def fuzzers(request):
    """Every selected target at once (each is mostly one busy core), with a fixed libFuzzer seed."""
    selected = {
        item.callspec.params["target"]
        for item in request.session.items
        if item.module is request.module and hasattr(item, "callspec")
    }
    procs = {
        t: subprocess.Popen(
            [sys.executable, str(HARNESS), "--runs", str(RUNS), "--target", t, "--seed", "1"],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            errors="replace",
        )
        for t in TARGETS
        if t in selected
    }
    yield procs
    for proc in procs.values():
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.timeout(TIMEOUT + 30)
@pytest.mark.parametrize("target", TARGETS)
def test_no_fuzzed_input_raises_an_undocumented_error(fuzzers, target):
    proc = fuzzers[target]
    try:
        output, _ = proc.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.kill()
        output, _ = proc.communicate()
        pytest.fail(f"{target}: the fuzzer ran past {TIMEOUT} s\n{output[-4000:]}")
    assert proc.returncode == 0, f"{target}: an input raised an undocumented error\n{output[-8000:]}"
    assert "no input raised an undocumented error" in output
