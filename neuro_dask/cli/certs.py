"""`neuro-dask certs ...`: the certificate authority and role certificates of mutual TLS.

Wiring it into neuro_dask/cli/main.py's parser (the handlers take `args` and return an exit code;
a refusal is a `CertificateError`, a NeuroDaskError, which `neuro-dask`'s main prints and exits 2 on):

    from neuro_dask.cli.certs import add_parser as add_certs_parser
    add_certs_parser(sub)  # sub = the parser's add_subparsers(...) object

Standalone: `python -m neuro_dask.cli.certs certs init DIR` (the same commands, same output).

Commands:

    neuro-dask certs init DIR [--name NAME] [--days N]
        create the CA: DIR/ca.pem (public, every peer needs it) and DIR/ca-key.pem (mode 0600,
        stays with the operator). Refuses when DIR already holds a CA.
    neuro-dask certs issue DIR --role ROLE --name NAME [--owner OWNER] [--days N] [--overwrite]
        sign a certificate with DIR's CA: DIR/<role>-<name>.pem and DIR/<role>-<name>.key (0600).
        ROLE is scheduler, worker, client or operator; a worker's NAME is its volunteer's ledger
        identity (1-64 of A-Z a-z 0-9 . _ -). A worker's OWNER is who owns the machine, as the CA
        vouches for it (default: the worker is its own owner); replicas and private-tier share
        holders are kept on different owners.
    neuro-dask certs show DIR
        list the certificates in DIR: role, name, expiry (UTC), sha256 fingerprint.
    neuro-dask certs quickstart DIR
        a CA plus scheduler-scheduler, client-client, operator-operator and worker-worker-1:
        everything to try TLS on one machine.

A peer's TLS folder (neuro.security.tls-dir) needs only ca.pem and its own certificate and key;
ca-key.pem belongs on no worker.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from neuro_dask.security.identity import ROLES  # pure and light: no cryptography for `--help`

# The certificates `quickstart` makes: (role, name).
QUICKSTART = (("scheduler", "scheduler"), ("client", "client"), ("operator", "operator"), ("worker", "worker-1"))


def _cmd_init(args: argparse.Namespace) -> int:
    from neuro_dask.security.certs import CA_KEY, create_ca, describe

    ca = create_ca(args.dir, name=args.name, days=args.days)
    info = describe(ca)
    print(f"created the CA {args.name!r} in {args.dir}, valid until {info['not_after']:%Y-%m-%d}")
    print(f"  {ca}  (public: every peer's TLS folder needs it)")
    print(f"  {Path(args.dir) / CA_KEY}  (secret, mode 0600: keep it here, give it to no peer)")
    print(f"next: neuro-dask certs issue {args.dir} --role scheduler --name scheduler  (and one per worker, client)")
    return 0


def _cmd_issue(args: argparse.Namespace) -> int:
    from neuro_dask.security.certs import describe, issue

    cert, key = issue(args.dir, args.role, args.name, days=args.days, overwrite=args.overwrite, owner=args.owner)
    info = describe(cert)
    owned = f" owned by {args.owner!r}" if args.owner else ""
    print(f"issued a {args.role} certificate for {args.name!r}{owned}, valid until {info['not_after']:%Y-%m-%d}")
    print(f"  {cert}")
    print(f"  {key}  (secret, mode 0600)")
    print(f"  sha256 {info['fingerprint']}")
    print(
        f"give the {args.role} a folder with ca.pem, {cert.name} and {key.name} and pass it as --tls DIR "
        "(or point neuro.security.tls-dir, DASK_NEURO__SECURITY__TLS_DIR, at it)"
    )
    print(_cli_hint(args.role, args.name))
    print(_dask_cli_hint(args.dir, args.role, cert, key))
    return 0


def _cmd_show(args: argparse.Namespace) -> int:
    from neuro_dask.errors import CertificateError
    from neuro_dask.security.certs import CA_KEY, certificates, describe

    paths = certificates(args.dir)
    if not paths:
        raise CertificateError(f"{args.dir}: no certificates here; `neuro-dask certs init {args.dir}` creates a CA")
    print(f"{'ROLE':<10} {'NAME':<24} {'OWNER':<16} {'EXPIRES (UTC)':<17} SHA-256 FINGERPRINT")
    for path in paths:
        info = describe(path)
        role = info["role"] or ("ca" if info["is_ca"] else "?")
        name = info["name"] or info["common_name"] or info["subject"]
        flag = "  EXPIRED" if info["expired"] else ""
        print(
            f"{role:<10} {name:<24} {info['owner'] or '-':<16} {info['not_after']:%Y-%m-%d %H:%M}  "
            f"{info['fingerprint']}{flag}"
        )
    if (Path(args.dir) / CA_KEY).exists():
        print(f"{CA_KEY} is here: this is the CA's folder; give peers only ca.pem and their own pair")
    return 0


def _cmd_quickstart(args: argparse.Namespace) -> int:
    from neuro_dask.security.certs import create_ca, issue

    folder = Path(args.dir)
    create_ca(folder)
    made = {role: issue(folder, role, name) for role, name in QUICKSTART}
    print(f"created a CA and {len(made)} certificates in {folder} (for trying TLS on one machine):")
    print(f"  {folder / 'ca.pem'}, {folder / 'ca-key.pem'}")
    for role, (cert, key) in made.items():
        print(f"  {role:<9} {cert.name}, {key.name}")
    for line in quickstart_next_steps(folder):
        print(line)
    return 0


def quickstart_next_steps(folder: str | Path) -> list[str]:
    """What to run next, as the README teaches it: each command picks its role's certificate from
    the one folder."""
    address = "tls://127.0.0.1:8786"
    return [
        "next, each in its own terminal:",
        f"  neuro-dask scheduler --tls {folder}",
        f"  neuro-dask worker {address} --tls {folder}",
        f"  neuro-dask publish neuro_dask/assets/adder --scheduler {address} --tls {folder}   (the operator)",
        f"  neuro-dask demo --scheduler {address} --tls {folder}   (a client)",
        f"in Python: Client({address!r}, security=security_for('client', {str(folder)!r})) with security_for "
        "from neuro_dask.security.tls; or set neuro.security.tls-dir "
        f"(DASK_NEURO__SECURITY__TLS_DIR={folder}) and leave --tls out",
    ]


def _cli_hint(role: str, name: str) -> str:
    if role == "scheduler":
        return "start it: neuro-dask scheduler --tls DIR"
    if role == "worker":
        return f"start it: neuro-dask worker tls://SCHEDULER:8786 --tls DIR --name {name}"
    if role == "operator":
        return "use it:   neuro-dask publish MODEL --scheduler tls://SCHEDULER:8786 --tls DIR"
    return "use it:   neuro-dask demo --scheduler tls://SCHEDULER:8786 --tls DIR (or generate/serve --tls DIR)"


def _dask_cli_hint(folder: str | Path, role: str, cert: Path, key: Path) -> str:
    """How Dask's own CLI takes this certificate (for the roles that have a Dask command)."""
    ca = Path(folder) / "ca.pem"
    flags = f"--tls-ca-file {ca} --tls-cert {cert} --tls-key {key}"
    if role == "scheduler":
        return f"(with Dask's own CLI: dask scheduler --preload neuro_scheduler {flags})"
    if role == "worker":
        return f"(with Dask's own CLI: dask worker tls://SCHEDULER:8786 --preload neuro_worker {flags})"
    return f"(in Python: Client('tls://SCHEDULER:8786', security=security_for({role!r}, DIR)))"


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add `certs` (init, issue, show, quickstart) to neuro-dask's subcommands; returns its parser."""
    certs = sub.add_parser(
        "certs",
        help="mutual TLS: a certificate authority and role certificates",
        description="The certificate authority and role certificates of mutual TLS.",
    )
    cs = certs.add_subparsers(dest="certs_command", required=True, metavar="COMMAND")

    p = cs.add_parser("init", help="create the CA (ca.pem, ca-key.pem) in DIR; refuses when one exists")
    p.add_argument("dir", metavar="DIR")
    p.add_argument("--name", default="neuro-dask-ca", help="the CA's common name (default neuro-dask-ca)")
    p.add_argument("--days", type=int, default=3650, help="days the CA is valid (default 3650)")
    p.set_defaults(func=_cmd_init)

    p = cs.add_parser("issue", help="sign a role certificate (<role>-<name>.pem and .key) with DIR's CA")
    p.add_argument("dir", metavar="DIR")
    p.add_argument("--role", required=True, choices=ROLES)
    p.add_argument(
        "--name", required=True, help="the peer's name; a worker's is its ledger identity (1-64 of A-Z a-z 0-9 . _ -)"
    )
    p.add_argument(
        "--owner",
        default="",
        help="workers: who owns the machine (1-64 of A-Z a-z 0-9 . _ -); on a "
        "TLS network this, not --neuro-owner, keeps replicas and private-tier "
        "shares on different owners (default: the worker is its own owner)",
    )
    p.add_argument("--days", type=int, default=825, help="days the certificate is valid (default 825)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing certificate and key")
    p.set_defaults(func=_cmd_issue)

    p = cs.add_parser("show", help="list DIR's certificates: role, name, expiry, fingerprint")
    p.add_argument("dir", metavar="DIR")
    p.set_defaults(func=_cmd_show)

    p = cs.add_parser("quickstart", help="a CA and one scheduler, client, operator and worker certificate in DIR")
    p.add_argument("dir", metavar="DIR")
    p.set_defaults(func=_cmd_quickstart)
    return certs


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m neuro_dask.cli.certs certs ...`: the same commands without the rest of neuro-dask."""
    from neuro_dask.errors import NeuroDaskError

    parser = argparse.ArgumentParser(prog="python -m neuro_dask.cli.certs")
    add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except NeuroDaskError as exc:
        print(f"neuro-dask: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
