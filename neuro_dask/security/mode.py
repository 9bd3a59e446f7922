"""Whether this process runs hardened mode, for pure code that must act differently under it.

security/hardening.py (which patches distributed) flips it when it installs and uninstalls
itself; readers such as `model.map` (which then computes a collection's partitions here rather
than on the network) ask `hardened()` without importing distributed.
"""

from __future__ import annotations

_hardened = [False]


def hardened() -> bool:
    return _hardened[0]


def set_hardened(on: bool) -> None:
    _hardened[0] = bool(on)
