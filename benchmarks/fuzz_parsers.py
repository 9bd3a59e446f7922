"""Fuzz the parsers of untrusted input at length: the manifest, the shard loader, the expert-call
frame decoder and the gateway's request parser, 100,000 inputs each by default.

    .venv/bin/python benchmarks/fuzz_parsers.py [--examples 100000]

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
    args = parser.parse_args()
    started = time.perf_counter()
    code = subprocess.call([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                            str(ROOT / "tests/unit/test_fuzz_parsers.py")],
                           env={**os.environ, "NEURO_FUZZ_EXAMPLES": str(args.examples)}, cwd=ROOT)
    print(f"command: python {' '.join(sys.argv)}")
    print(f"{args.examples:,} inputs for each of 4 parsers in {time.perf_counter() - started:.0f} s: "
          f"{'no input raised an undocumented error' if code == 0 else 'FAILED (see above)'}")
    return code


if __name__ == "__main__":
    sys.exit(main())
