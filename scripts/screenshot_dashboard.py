#!/usr/bin/env python
"""Screenshots of the operator dashboard's six pages, for the README.

    .venv/bin/python scripts/screenshot_dashboard.py [FOLDER]     (default: docs/images/)

Starts the scenario the browser test uses (tests/e2e/test_dashboard_browser.py): an in-process
cluster with trust on, three honest workers and one perturbing volunteer ("bad0"), a tiny
Mixtral checkpoint loaded and generating, then honest worker "1" killed; then opens /neuro/overview,
/neuro/network, /neuro/experts, /neuro/calls, /neuro/trust and /neuro/economy in headless Chromium
(Debian's chromium and chromium-driver; installed with apt-get when missing and run as root) and writes
FOLDER/neuro-{page}.png once each page has drawn (its key content shown, the screenshot not white).
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from browser_support import (  # noqa: E402  (from tests/, put on the path above)
    PAGES,
    browser_unavailable,
    chromium,
    dashboard_scenario,
    screenshot_pages,
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", nargs="?", default=str(ROOT / "docs" / "images"), help="where the PNGs go")
    parser.add_argument("--pages", nargs="+", default=list(PAGES), choices=[*PAGES, "status"])
    parser.add_argument("--timeout", type=float, default=60, help="seconds to wait for each page's content")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    reason = browser_unavailable()
    if reason:
        print(f"no browser: {reason}", file=sys.stderr)
        return 2

    from tiny_models import write_checkpoint

    from neuro_dask.cli.main import main as cli

    with tempfile.TemporaryDirectory(prefix="neuro-screenshots-") as tmp:
        tmp = Path(tmp)
        write_checkpoint("mixtral", tmp / "hf")
        if cli(["shard", str(tmp / "hf"), str(tmp / "sharded"), "--quiet"]) != 0:
            print("sharding the tiny checkpoint failed", file=sys.stderr)
            return 1
        with dashboard_scenario(tmp / "sharded", tmp / "cache") as scenario, chromium() as driver:
            errors = screenshot_pages(
                driver, scenario, args.folder, pages=args.pages, timeout=args.timeout, settle=True
            )
    for page in args.pages:
        print(
            f"{Path(args.folder) / f'neuro-{page}.png'}"
            + (f"  JavaScript errors: {errors[page]}" if errors[page] else "")
        )
    return 1 if any(errors.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
