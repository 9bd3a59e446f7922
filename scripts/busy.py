"""Run a command on a busy machine: N processes burn CPU beside it (tests must not lean on timing margins).

    python scripts/busy.py --burners 2 -- CMD ARGS...

Starts N processes that each spin a tight Python loop, runs CMD, stops the burners, and exits with
CMD's exit code. Ctrl-C stops the burners too.
"""

from __future__ import annotations

import argparse
import multiprocessing
import subprocess
import sys


def burn() -> None:
    """A tight loop that keeps one core busy until the process is terminated."""
    n = 0
    while True:
        n = (n * 1103515245 + 12345) & 0xFFFFFFFF


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--burners", type=int, default=2, help="how many CPU-burning processes (default 2)")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="the command to run, after --")
    args = parser.parse_args(argv)
    if args.command[:1] == ["--"]:
        args.command = args.command[1:]
    if not args.command:
        parser.error("no command given: busy.py --burners N -- CMD ARGS...")
    return args


def start_burners(n: int) -> list[multiprocessing.Process]:
    # spawn, not fork: a burner must not inherit anything of this process but the loop
    context = multiprocessing.get_context("spawn")
    burners = [context.Process(target=burn, daemon=True, name=f"burner-{i}") for i in range(n)]
    for burner in burners:
        burner.start()
    return burners


def stop_burners(burners: list[multiprocessing.Process]) -> None:
    for burner in burners:
        burner.terminate()
    for burner in burners:
        burner.join(10)
        if burner.is_alive():
            burner.kill()
            burner.join()


def main(argv: list[str] | None = None) -> int:
    args = parse(sys.argv[1:] if argv is None else argv)
    burners = start_burners(args.burners)
    try:
        return subprocess.run(args.command, check=False).returncode
    except KeyboardInterrupt:
        return 130
    finally:
        stop_burners(burners)


if __name__ == "__main__":
    sys.exit(main())
