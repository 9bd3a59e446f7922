"""Fuzz the parsers of untrusted input at length: the manifest, the shard loader, the expert-call
frame decoder, the gateway's request parser, and hardened mode's decoders (decode_plain_frames for
workers and clients, the bounded restricted loader for schedulers and operators), 100,000 inputs
per test by default.

    .venv/bin/python benchmarks/fuzz_parsers.py [--examples 100000] [-k 'plain or pickle']

Runs tests/unit/test_fuzz_parsers.py (hypothesis) with NEURO_FUZZ_EXAMPLES set; any input that
raises anything but the parser's documented error fails it and is printed, shrunk.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--examples", type=int, default=100_000)
    parser.add_argument(
        "-k", dest="select", help="only the tests whose names match (pytest -k), e.g. 'plain or pickle'"
    )
    args = parser.parse_args()
    started = time.perf_counter()
    code = subprocess.call(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            str(ROOT / "tests/unit/test_fuzz_parsers.py"),
            *(["-k", args.select] if args.select else []),
        ],
        env={**os.environ, "NEURO_FUZZ_EXAMPLES": str(args.examples)},
        cwd=ROOT,
    )
    print(f"command: python {' '.join(sys.argv)}")
    print(
        f"{args.examples:,} inputs for each fuzz test of 6 parsers in {time.perf_counter() - started:.0f} s: "
        f"{'no input raised an undocumented error' if code == 0 else 'FAILED (see above)'}"
    )
    return code


if __name__ == "__main__":
    sys.exit(main())
