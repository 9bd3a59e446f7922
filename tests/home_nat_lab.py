"""Real separate hosts and home routers on this machine: network namespaces, veth pairs, and
iptables NAT (MASQUERADE) on each router, as a home router does it.

    public   10.99.0.1   the scheduler and its relay (the Internet's side; a bridge joins the routers)
    far      10.99.0.2   (with far_rtt_ms) a host across the Internet: a relay off the homes' way
    r1..r3   10.99.0.1i  home routers: NAT out of 192.168.i.0/24, nothing in (only replies pass)
    h1..h3   192.168.i.2 behind them: h1 and h2 volunteers, h3 a data scientist
    h1b      192.168.1.3 a second machine on home 1's LAN (one bridge in r1 joins h1, h1b, r1)

With `rtt_ms`, each router's Internet link is a real delayed link (tests/tap_link.py: two TAP
devices and a process between them, as this kernel has no netem), so every packet through a
home router, hole punches included, pays the delay.

Only addresses inside namespaces the lab creates are used, and everything is deleted at the end.
`unavailable()` says why a machine cannot build it (not root, no `ip`, no `iptables`, no netns).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

PUBLIC = "10.99.0.1"
FAR = "10.99.0.2"
HOMES = (1, 2, 3)
TAP_LINK = Path(__file__).with_name("tap_link.py")


def _sh(*argv: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(list(argv), check=check, capture_output=True, text=True, timeout=30)


def unavailable() -> str:
    """Why this machine cannot build the lab ('' if it can)."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    for tool in ("ip", "iptables"):
        if shutil.which(tool) is None:
            return f"`{tool}` is not installed (Debian: apt-get install iproute2 iptables)"
    if not os.path.exists("/dev/net/tun"):
        return "no /dev/net/tun for the delayed links"
    probe = f"ndprobe{os.getpid() % 100000}"
    try:
        _sh("ip", "netns", "add", probe)
        _sh("ip", "netns", "exec", probe, "iptables", "-t", "nat", "-L", "-n")
    except (subprocess.CalledProcessError, OSError) as exc:
        return f"cannot create a network namespace with NAT here: {getattr(exc, 'stderr', '') or exc}"
    finally:
        _sh("ip", "netns", "del", probe, check=False)
    return ""


class HomeLab:
    def __init__(self, folder: Path, rtt_ms: float = 0.0, far_rtt_ms: float | None = None):
        """`rtt_ms`: each home router's Internet link's round trip; `far_rtt_ms`: build the far
        host, on a link with this round trip."""
        tag = f"nd{os.getpid() % 10000}"
        self.tag = tag
        self.rtt_ms, self.far_rtt_ms = rtt_ms, far_rtt_ms
        self.ns = {
            "public": f"{tag}pub",
            **({"far": f"{tag}far"} if far_rtt_ms is not None else {}),
            **{f"r{i}": f"{tag}r{i}" for i in HOMES},
            **{f"h{i}": f"{tag}h{i}" for i in HOMES},
            "h1b": f"{tag}h1b",
        }
        self.folder = Path(folder)
        self.procs: list[tuple[subprocess.Popen, Path]] = []
        self.links: list[subprocess.Popen] = []

    # ---- building and tearing down ----------------------------------------------------------------

    def __enter__(self) -> HomeLab:
        try:
            self._build()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def ip(self, where: str, *argv: str, check: bool = True) -> subprocess.CompletedProcess:
        return _sh("ip", "netns", "exec", self.ns[where], *argv, check=check)

    def _build(self) -> None:
        for name in self.ns.values():
            _sh("ip", "netns", "add", name)
            _sh("ip", "netns", "exec", name, "ip", "link", "set", "lo", "up")
        pub = self.ns["public"]
        _sh("ip", "netns", "exec", pub, "ip", "link", "add", "br0", "type", "bridge")
        _sh("ip", "netns", "exec", pub, "ip", "addr", "add", f"{PUBLIC}/24", "dev", "br0")
        _sh("ip", "netns", "exec", pub, "ip", "link", "set", "br0", "up")
        if self.far_rtt_ms is not None:
            self._link("far", "eth0", f"{FAR}/24", "far", self.far_rtt_ms)
        for i in HOMES:
            router = self.ns[f"r{i}"]
            self._link(f"r{i}", "wan", f"10.99.0.1{i}/24", f"r{i}", self.rtt_ms)
            # the home LAN: a bridge in the router, each machine on it
            _sh("ip", "netns", "exec", router, "ip", "link", "add", "lan", "type", "bridge")
            _sh("ip", "netns", "exec", router, "ip", "addr", "add", f"192.168.{i}.1/24", "dev", "lan")
            _sh("ip", "netns", "exec", router, "ip", "link", "set", "lan", "up")
            for host, address in ((f"h{i}", f"192.168.{i}.2"), *((("h1b", "192.168.1.3"),) if i == 1 else ())):
                home = self.ns[host]
                _sh("ip", "link", "add", "eth0", "netns", home, "type", "veth", "peer", "name", host, "netns", router)
                _sh("ip", "netns", "exec", router, "ip", "link", "set", host, "master", "lan", "up")
                _sh("ip", "netns", "exec", home, "ip", "addr", "add", f"{address}/24", "dev", "eth0")
                _sh("ip", "netns", "exec", home, "ip", "link", "set", "eth0", "up")
                _sh("ip", "netns", "exec", home, "ip", "route", "add", "default", "via", f"192.168.{i}.1")
            # a home router: forward out with NAT; in, only replies to what the home opened
            _sh("ip", "netns", "exec", router, "sysctl", "-qw", "net.ipv4.ip_forward=1")
            nat = ("ip", "netns", "exec", router, "iptables")
            _sh(*nat, "-t", "nat", "-A", "POSTROUTING", "-o", "wan", "-j", "MASQUERADE")
            _sh(*nat, "-P", "FORWARD", "DROP")
            _sh(*nat, "-A", "FORWARD", "-i", "lan", "-o", "wan", "-j", "ACCEPT")
            _sh(*nat, "-A", "FORWARD", "-i", "lan", "-o", "lan", "-j", "ACCEPT")  # the LAN's own (br_netfilter)
            _sh(
                *nat,
                "-A",
                "FORWARD",
                "-i",
                "wan",
                "-m",
                "conntrack",
                "--ctstate",
                "ESTABLISHED,RELATED",
                "-j",
                "ACCEPT",
            )
            # counted, then dropped: any connection the Internet tries to open into the home
            _sh(*nat, "-A", "FORWARD", "-i", "wan", "-m", "conntrack", "--ctstate", "NEW", "-j", "DROP")
            _sh(*nat, "-A", "INPUT", "-i", "wan", "-m", "conntrack", "--ctstate", "NEW", "-j", "DROP")

    def _link(self, where: str, ifname: str, address: str, bridge_port: str, rtt_ms: float) -> None:
        """`where`'s interface `ifname` (with `address`) joined to the public bridge as
        `bridge_port`: a veth pair, or with a round trip, a delayed TAP link."""
        ns, pub = self.ns[where], self.ns["public"]
        if rtt_ms > 0:
            link = subprocess.Popen(
                [sys.executable, str(TAP_LINK), ns, ifname, pub, bridge_port, str(rtt_ms)],
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                start_new_session=True,
            )
            self.links.append(link)
            ready = link.stdout.readline().strip()
            if ready != "ready":
                raise RuntimeError(f"the delayed link {where} did not start: {ready}{link.stdout.read()}")
        else:
            _sh("ip", "link", "add", ifname, "netns", ns, "type", "veth", "peer", "name", bridge_port, "netns", pub)
        _sh("ip", "netns", "exec", pub, "ip", "link", "set", bridge_port, "master", "br0", "up")
        _sh("ip", "netns", "exec", ns, "ip", "addr", "add", address, "dev", ifname)
        _sh("ip", "netns", "exec", ns, "ip", "link", "set", ifname, "up")

    def close(self) -> None:
        for proc, _ in self.procs:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, 15)
        for proc, _ in self.procs:
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, 9)
                proc.wait(20)
        for link in self.links:
            link.kill()
            link.wait(20)
        for name in self.ns.values():
            _sh("ip", "netns", "del", name, check=False)

    # ---- processes ------------------------------------------------------------------------------------

    def start(self, where: str, *argv: str, env: dict[str, str] | None = None) -> subprocess.Popen:
        """A long-running process inside a namespace, in its own session, with its own log."""
        n = len(self.procs)
        path = self.folder / f"{where}-{n}.log"
        env = dict(os.environ if env is None else env, DASK_NEURO__WORKER__CACHE_DIR=str(self.folder / f"cache{n}"))
        with open(path, "w") as log:
            proc = subprocess.Popen(
                ["ip", "netns", "exec", self.ns[where], *argv],
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                env=env,
            )
        self.procs.append((proc, path))
        return proc

    def log(self, proc: subprocess.Popen) -> str:
        return next(path for p, path in self.procs if p is proc).read_text(errors="replace")

    def run(
        self, where: str, *argv: str, timeout: float = 300, env: dict[str, str] | None = None
    ) -> subprocess.CompletedProcess:
        return subprocess.run(
            ["ip", "netns", "exec", self.ns[where], *argv],
            capture_output=True,
            text=True,
            timeout=timeout,
            env=dict(os.environ, **(env or {})),
        )

    # ---- what the routers saw -------------------------------------------------------------------------

    def inbound_attempts(self, router: str) -> int:
        """Packets of connections the Internet tried to open into this home (the counted DROP rules)."""
        total = 0
        for chain in ("FORWARD", "INPUT"):
            out = self.ip(router, "iptables", "-L", chain, "-v", "-n", "-x").stdout
            for line in out.splitlines():
                if "ctstate NEW" in line and "DROP" in line:
                    total += int(line.split()[0])
        return total

    def connection_origins(self, router: str) -> set[str]:
        """Where each TCP connection the router tracks was opened from (its first packet's
        source): a home's own addresses only, if nothing ever dialled in. A hole-punched
        connection counts as the home's: the router saw the home's own packet first (the
        other side's arriving earlier was dropped, see inbound_attempts)."""
        text = self.ip(router, "cat", "/proc/net/nf_conntrack").stdout
        origins = set()
        for line in text.splitlines():
            fields = line.split()
            if "tcp" in fields:
                origins.add(next(f[len("src=") :] for f in fields if f.startswith("src=")))
        return origins

    def nat_translations(self, router: str) -> int:
        """Packets the router's MASQUERADE rule translated: traffic the home sent out."""
        out = self.ip(router, "iptables", "-t", "nat", "-L", "POSTROUTING", "-v", "-n", "-x").stdout
        return sum(int(line.split()[0]) for line in out.splitlines() if "MASQUERADE" in line)

    def listening(self, where: str) -> set[str]:
        """Local addresses anything in this namespace listens on (TCP)."""
        out = self.ip(where, "ss", "-ltnH").stdout
        return {line.split()[3].rsplit(":", 1)[0] for line in out.splitlines() if line.strip()}

    def drop_all_connections(self, router: str) -> None:
        """The router resets every TCP connection through it (as a reboot or a new WAN address does)."""
        self.ip(router, "iptables", "-I", "FORWARD", "1", "-p", "tcp", "-j", "REJECT", "--reject-with", "tcp-reset")

    def restore(self, router: str) -> None:
        self.ip(router, "iptables", "-D", "FORWARD", "-p", "tcp", "-j", "REJECT", "--reject-with", "tcp-reset")
