"""What a pickle from a scheduler or operator may name, and which task functions a hardened worker runs.

Who may send a pickle at all: on a hardened network, only peers whose certificate says
`scheduler` or `operator`. Workers, clients and peers without a certificate send plain data
(neuro_dask/security/plain_wire.py), refused before anything is parsed if it is not. This list is
the second wall, for the trusted roles' pickles (errors, a Status), and it must hold even against
them: a leaked operator key must not become code execution, a crash or an unbounded load.

Every entry must be safe to *call with arguments an attacker chose*, because that is what a
pickle's REDUCE does, and its cost must be linear in the pickle's own length, not in the VALUE of
an argument (`range(10**12)` is 5 bytes; `deque(range(N), 1)` loops N times, `list(range(N))`
allocates 8N bytes). Never add:

- anything that imports, runs or opens by name: getattr, eval/exec, __import__, open,
  functools.partial of anything, operator functions, a module's `apply`, `_codecs.encode` (its
  encoding names a codec module to import), `copyreg._reconstructor` (`base.__new__(cls)` of any
  allowed pair, skipping `__init__`);
- anything that builds a C-level object from raw bytes or from state it does not validate:
  numpy's `dtype` (BUILD state can describe a structured dtype whose object field numpy's flags
  do not show), `scalar` (then copies attacker bytes into that "object" slot: reading it
  dereferences an attacker-chosen pointer), `_reconstruct`, `ndarray`, `_frombuffer`; the
  `datetime` class itself (its bytes state is checked for the month only: year 0 makes
  `ctime()` read out of bounds), which is replaced by a validating stand-in (SUBSTITUTES);
  UnicodeDecodeError and UnicodeEncodeError (on Python 3.11 their `__str__` indexes `object` with
  an unchecked `start`: a negative one reads out of bounds, gh-123378);
- anything that allocates or loops in proportion to an argument's value: `range`, `deque`,
  `bytes`/`bytearray` (named only, below), `int`/`str` (the same);
- Dask's task specs and expressions (`dask._task_spec.*`, `dask._expr.*`), distributed's
  `Serialize`/`ToPickle` wrappers and `WrappedKey`: a hardened network runs no Dask task graph
  and carries no serialized objects, so nothing needs them, and each is a class whose methods
  later run on what the pickle put in it.

The loader (unpickle.py) adds what a list cannot say: a bound on opcodes, memo entries, tuple
nesting and hash collisions, and BUILD only onto exceptions and the plain classes of
BUILDABLE_CLASSES.
"""

from __future__ import annotations

import datetime as _datetime

# The only functions a hardened worker executes as tasks (guards.py checks task specs against
# it). Not pickle-loadable: a pickle that calls serve_expert_call would run expert compute
# inside the loader, and hardened networks send no task graphs.
TASK_FUNCTIONS: frozenset[tuple[str, str]] = frozenset(
    {
        ("neuro_dask.client.dispatch.tasks", "serve_expert_call"),
    }
)

# Plain containers, each costing time and memory linear in what the pickle itself holds:
# set, frozenset, list, tuple, dict copy or extend from an iterable the pickle built (the loader
# checks keys and members for hash flooding first); slice holds three references; complex parses
# a number or a string the pickle carries. No bytes/bytearray (bytes(10**12) is a memory bomb;
# protocol 3+ writes bytes values without a call), no range (a lazy sequence of any length).
_BUILTIN_DATA = ("set", "frozenset", "slice", "complex", "list", "tuple", "dict")

# Exception classes a scheduler may describe an error with. Loading builds the object; nothing
# raises it during the load. Exception subclasses only: a task error is re-raised in the client,
# and a SystemExit or KeyboardInterrupt from a peer would end it. Each one's __init__ stores its
# arguments and its __str__ formats them (OSError and KeyError with repr, which Python bounds by
# its recursion guard). Not UnicodeDecodeError/UnicodeEncodeError (module docstring); the plain
# UnicodeError base stays.
_BUILTIN_EXCEPTIONS = (
    "Exception",
    "ArithmeticError",
    "AssertionError",
    "AttributeError",
    "BufferError",
    "EOFError",
    "FloatingPointError",
    "ImportError",
    "IndexError",
    "KeyError",
    "LookupError",
    "MemoryError",
    "ModuleNotFoundError",
    "NotImplementedError",
    "OSError",
    "OverflowError",
    "RecursionError",
    "ReferenceError",
    "RuntimeError",
    "StopIteration",
    "TimeoutError",
    "TypeError",
    "UnicodeError",
    "ValueError",
    "ZeroDivisionError",
    "ConnectionError",
    "ConnectionRefusedError",
    "ConnectionResetError",
    "BrokenPipeError",
    "FileNotFoundError",
    "PermissionError",
)

ALLOWED_GLOBALS: frozenset[tuple[str, str]] = frozenset(
    {("builtins", name) for name in _BUILTIN_DATA + _BUILTIN_EXCEPTIONS}
    | {
        # dict subclasses: OrderedDict(iterable) and defaultdict(factory, iterable) copy what the
        # pickle holds; a defaultdict's factory is itself an allowed global, called later with no
        # arguments (every entry here is cheap to call without arguments, or refuses).
        ("collections", "OrderedDict"),
        ("collections", "defaultdict"),
        # timedelta and timezone validate their arguments' ranges in their constructors (the
        # pickled forms call them); datetime is a validating SUBSTITUTE, below.
        ("datetime", "timedelta"),
        ("datetime", "timezone"),
        # what asyncio and concurrent.futures raise for a timeout or a cancellation
        ("asyncio.exceptions", "TimeoutError"),
        ("concurrent.futures._base", "CancelledError"),
        # exceptions as distributed pickles them (tblib): unpickle_exception calls its first
        # argument, itself a global the pickle had to name (so checked here), with arguments from
        # the pickle; unpickle_exception_with_attrs calls cls.__new__(cls) of such a class and
        # sets attributes. Tracebacks are dropped (SUBSTITUTES).
        ("tblib.pickling_support", "unpickle_exception"),
        ("tblib.pickling_support", "unpickle_exception_with_attrs"),
        # a worker's or the scheduler's status travels as Status(name): an Enum lookup by value
        ("distributed.core", "Status"),
        # distributed's own errors: Exception subclasses with a plain __init__
        ("distributed.client", "FutureCancelledError"),
        ("distributed.core", "CommClosedError"),
        ("distributed.comm.core", "CommClosedError"),
        ("distributed.scheduler", "KilledWorker"),
        ("neuro_dask.security.errors", "TaskRefusedError"),
        ("neuro_dask.security.errors", "RequestRefusedError"),
    }
)


# Types distributed names on their own (the `dask` serialization family pickles `type(x)`),
# which must never be called: a pickle may name them only if it calls nothing at all.
NAMED_ONLY_GLOBALS: frozenset[tuple[str, str]] = frozenset(
    {("builtins", name) for name in ("bytes", "bytearray", "str", "int", "float", "bool", "memoryview")}
)


def drop_traceback(*_args, **_kwargs) -> None:
    """Stands in for tblib's unpickle_traceback, which rebuilds code objects from a peer's data:
    a remote exception arrives whole, without its remote traceback."""
    return None


class DroppedTracebackPart:
    """Stands in for tblib's Frame, Code and Traceback records inside a dropped traceback."""

    def __init__(self, *_args, **_kwargs) -> None:
        pass

    def __setstate__(self, _state) -> None:
        pass


def checked_datetime(*args) -> _datetime.datetime:
    """Stands in for datetime.datetime in a pickle: builds it as pickle would (from the bytes state
    Python writes), then again through the validating constructor, so that a year 0, a day 0 or an
    hour 25 that the bytes form lets through is a ValueError instead of a datetime whose ctime()
    reads out of bounds."""
    value = _datetime.datetime(*args)
    return _datetime.datetime(
        value.year,
        value.month,
        value.day,
        value.hour,
        value.minute,
        value.second,
        value.microsecond,
        value.tzinfo,
        fold=value.fold,
    )


# Globals replaced by a harmless stand-in instead of refused: every remote error from an
# honest peer carries a pickled traceback, and refusing it would lose the exception too.
SUBSTITUTES = {
    ("tblib.pickling_support", "unpickle_traceback"): drop_traceback,
    **{("tblib", part): DroppedTracebackPart for part in ("Frame", "Code", "Traceback")},
    ("datetime", "datetime"): checked_datetime,
}

# Classes whose instances a pickle may apply state to (BUILD), besides Exception subclasses:
# plain Python classes with no C layout that state could corrupt.
BUILDABLE_CLASSES: tuple[type, ...] = (DroppedTracebackPart,)


def is_named_only(module: str, name: str) -> bool:
    return (module, name) in NAMED_ONLY_GLOBALS


# neuro_dask's own errors travel as exceptions of handlers: every exception class in these
# modules, and errors._rebuild (cls.__new__ + Exception.__init__ + attributes; its cls is a
# global the pickle had to name, so checked here too).
_ERROR_MODULES = ("neuro_dask.errors", "neuro_dask.security.errors", "neuro_dask.ledger.errors")


def _is_neuro_error(module: str, name: str) -> bool:
    if module not in _ERROR_MODULES:
        return False
    import importlib

    value = getattr(importlib.import_module(module), name, None) if "." not in name else None
    if module == "neuro_dask.errors" and name == "_rebuild":
        return True
    return isinstance(value, type) and issubclass(value, Exception)


def is_allowed(module: str, name: str) -> bool:
    return (module, name) in ALLOWED_GLOBALS or _is_neuro_error(module, name)


def is_task_function(module: str, name: str) -> bool:
    return (module, name) in TASK_FUNCTIONS
