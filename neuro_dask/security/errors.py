"""Errors of hardened mode. Each says what was refused and what to do about it."""

from __future__ import annotations

import pickle

from neuro_dask.errors import NeuroDaskError


class SecurityError(NeuroDaskError):
    """Something a peer sent or asked for was refused by hardened mode."""


class PickleRefusedError(SecurityError, pickle.UnpicklingError, TypeError):
    """A pickle named a global outside the allow-list.

    Also a TypeError and an UnpicklingError: distributed's own error paths (clean_exception,
    the comm's read loop) already treat those as "this payload cannot be loaded", so a refusal
    degrades into the failure distributed expects instead of a crash somewhere unexpected.
    """

    def __init__(self, module: str, name: str, peer: str | None = None):
        self.module = module
        self.name = name
        self.peer = peer
        origin = f" from {peer}" if peer else ""
        super().__init__(
            f"refused to unpickle {module}.{name}{origin}: hardened mode loads pickles only from the scheduler "
            "and the operator, and then only plain containers and exceptions (neuro_dask/security/allowlist.py)"
        )


class RequestRefusedError(SecurityError):
    """A peer asked for an operation its role may not perform, or one hardened mode never allows."""

    def __init__(self, op: str, role: str | None, peer: str | None, why: str):
        self.op = op
        self.role = role
        self.peer = peer
        self.why = why
        who = f"{peer} ({role or 'no certificate'})"
        super().__init__(f"refused {op!r} from {who}: {why}")


class UnverifiedDistributedError(SecurityError):
    """Hardened mode patches distributed's pickle-loading paths; other versions may have new ones."""

    def __init__(self, found: str, verified: tuple[str, ...]):
        self.found = found
        self.verified = verified
        super().__init__(
            f"hardened mode is verified against distributed {', '.join(verified)}, but {found} is installed: "
            f"install a verified version (pip install 'distributed=={verified[-1]}') or turn hardened mode "
            "off (neuro.security.hardened: false) on a network where every peer is trusted"
        )


class TaskRefusedError(SecurityError):
    """A hardened worker runs only neuro_dask's own task functions."""

    def __init__(self, key: str, function: str):
        self.key = key
        self.function = function
        super().__init__(f"task {key!r}: this hardened worker runs only neuro_dask's expert tasks, not {function}")


class PickleLimitError(PickleRefusedError):
    """A pickle from a scheduler or operator went past a bound of the restricted loader: too many
    opcodes or memo entries, tuples nested too deep, or too many keys sharing one hash.

    A PickleRefusedError (so a TypeError and an UnpicklingError too) whose `module` is "<pickle>"
    and whose `name` says which bound; `limit` is the bound (neuro_dask/security/unpickle.py).
    """

    def __init__(self, what: str, limit: int, peer: str | None = None):
        self.module = "<pickle>"
        self.name = what
        self.what = what
        self.limit = limit
        self.peer = peer
        origin = f" from {peer}" if peer else ""
        SecurityError.__init__(
            self,
            f"refused a pickle{origin}: {what} (limit {limit:,}); hardened mode bounds the work of one load "
            "(neuro_dask/security/unpickle.py), and no message a scheduler or operator sends comes near it",
        )


class PlainDataRefusedError(SecurityError, ValueError):
    """A message from a worker, a client or a peer without a certificate was not plain data.

    On a hardened network those peers send msgpack without pickles, serialized sub-frames or
    extension types (neuro_dask/security/plain_wire.py). Also a ValueError, as msgpack's own
    errors for a malformed frame are. `reason` says what was refused.
    """

    def __init__(self, reason: str, peer: str | None = None):
        self.reason = reason
        self.peer = peer
        origin = f" from {peer}" if peer else ""
        super().__init__(
            f"refused a message{origin}: {reason}. Hardened networks accept plain data only from workers and "
            "clients (msgpack in one frame: no pickles, no serialized sub-frames, no extension types); "
            "send arrays as bytes with a dtype and shape, and errors as text"
        )
