"""A network link with a delay, in user space: two TAP devices in two network namespaces, and
this process copying Ethernet frames between them, each held for half the link's round trip.

This kernel has no netem, and a TCP forwarder (benchmarks/bench_relay.py's DelayLink) only
delays connections made to it: hole punching and NAT need the real packets on a real link. A
TAP device is a real interface the kernel routes, bridges and NATs as any other; this process
is the cable between two of them.

    python tests/tap_link.py NETNS_A IFNAME_A NETNS_B IFNAME_B RTT_MS

It creates both devices (they vanish when it exits), prints "ready", and copies frames until
killed; the caller gives the devices their addresses and brings them up. Linux only, as root.
"""

from __future__ import annotations

import ctypes
import fcntl
import heapq
import os
import selectors
import struct
import sys
import time

TUNSETIFF = 0x400454CA
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
CLONE_NEWNET = 0x40000000


def _enter(netns: str) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(f"/run/netns/{netns}", os.O_RDONLY)
    try:
        if libc.setns(fd, CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), f"setns({netns})")
    finally:
        os.close(fd)


def open_tap(netns: str, name: str) -> int:
    """A TAP device `name` inside `netns`: the fd stays bound to that namespace's device."""
    _enter(netns)
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK)
    fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", name.encode(), IFF_TAP | IFF_NO_PI))
    return fd


def run(a: int, b: int, one_way: float) -> None:
    """Copy frames a <-> b, each delivered `one_way` seconds after it was read, in order."""
    sel = selectors.DefaultSelector()
    sel.register(a, selectors.EVENT_READ, b)
    sel.register(b, selectors.EVENT_READ, a)
    due: list[tuple[float, int, int, bytes]] = []  # (deliver at, sequence, to fd, frame)
    seq = 0
    while True:
        timeout = None if not due else max(0.0, due[0][0] - time.monotonic())
        for key, _ in sel.select(timeout):
            while True:
                try:
                    frame = os.read(key.fd, 65536)
                except BlockingIOError:
                    break
                seq += 1
                heapq.heappush(due, (time.monotonic() + one_way, seq, key.data, frame))
        now = time.monotonic()
        while due and due[0][0] <= now:
            _, _, to, frame = heapq.heappop(due)
            try:
                os.write(to, frame)
            except OSError:  # the device is down or its queue full: the link drops the frame
                pass


def main(argv: list[str]) -> int:
    ns_a, if_a, ns_b, if_b, rtt_ms = argv
    a = open_tap(ns_a, if_a)
    b = open_tap(ns_b, if_b)
    print("ready", flush=True)
    run(a, b, float(rtt_ms) / 2e3)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
