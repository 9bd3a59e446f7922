"""What hardened mode lets a pickle name, and which task functions a hardened worker runs.

Every entry must be safe to *call with arguments an attacker chose*, because that is what a
pickle's REDUCE does: constructors of plain data, numpy's array rebuilders, exception classes
(built, never raised by loading), Dask's task-spec classes, and neuro_dask's own task function.
Never add getattr, eval/exec, __import__, open, functools.partial of anything, operator
functions, a module's `apply`, or anything that imports, runs or opens by name.

The list was found by auditing every pickle a neuro_dask network sends on distributed
2026.8.0 (tests/integration/test_hardened_cluster.py runs the paths in hardened mode);
hardening.py refuses to start on a distributed it was not verified against.
"""

from __future__ import annotations

# The only functions a hardened worker executes as tasks.
TASK_FUNCTIONS: frozenset[tuple[str, str]] = frozenset({
    ("neuro_dask.dispatch.tasks", "serve_expert_call"),
})

# No bytes/bytearray: bytes(10**12) is a memory bomb, and protocol 5 needs neither.
_BUILTIN_DATA = ("set", "frozenset", "slice", "range", "complex", "list", "tuple", "dict")

# Exception classes a worker or scheduler may describe an error with. Loading builds the
# object; nothing raises it during the load. Exception subclasses only: a task error is
# re-raised in the client, and a SystemExit or KeyboardInterrupt from a peer would end it.
_BUILTIN_EXCEPTIONS = (
    "Exception", "ArithmeticError", "AssertionError", "AttributeError", "BufferError",
    "EOFError", "FloatingPointError", "ImportError", "IndexError", "KeyError", "LookupError", "MemoryError",
    "ModuleNotFoundError", "NotImplementedError", "OSError", "OverflowError", "RecursionError",
    "ReferenceError", "RuntimeError", "StopIteration", "TimeoutError", "TypeError", "UnicodeDecodeError",
    "UnicodeEncodeError", "UnicodeError", "ValueError", "ZeroDivisionError", "ConnectionError",
    "ConnectionRefusedError", "ConnectionResetError", "BrokenPipeError", "FileNotFoundError",
    "PermissionError",
)

ALLOWED_GLOBALS: frozenset[tuple[str, str]] = frozenset(
    {("builtins", name) for name in _BUILTIN_DATA + _BUILTIN_EXCEPTIONS}
    | {
        ("copyreg", "_reconstructor"),
        ("_codecs", "encode"),
        ("collections", "OrderedDict"),
        ("collections", "defaultdict"),
        ("collections", "deque"),
        ("datetime", "datetime"),
        ("datetime", "timedelta"),
        ("datetime", "timezone"),
        ("asyncio.exceptions", "TimeoutError"),
        ("concurrent.futures._base", "CancelledError"),
        # numpy arrays and scalars (numpy 1.x and 2.x module paths)
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy.core.numeric", "_frombuffer"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "scalar"),
        ("numpy._core.numeric", "_frombuffer"),
        # exceptions as distributed pickles them (tblib keeps their attributes; tracebacks are refused)
        ("tblib.pickling_support", "unpickle_exception"),
        ("tblib.pickling_support", "unpickle_exception_with_attrs"),
        # client.submit sends its graph as a low-level-graph expression; _reconstruct builds the
        # class it is given (itself checked here) from operands and sets cached attributes.
        ("dask._expr", "Expr._reconstruct"),
        ("dask._expr", "LLGExpr"),
        # Dask's task specs (the graph a client submits and the scheduler forwards)
        ("dask._task_spec", "Task"),
        ("dask._task_spec", "DataNode"),
        ("dask._task_spec", "Alias"),
        ("dask._task_spec", "TaskRef"),
        ("dask._task_spec", "List"),
        ("dask._task_spec", "Tuple"),
        ("dask._task_spec", "Dict"),
        ("dask._task_spec", "Set"),
        # distributed's own message types and errors
        ("distributed.core", "Status"),
        ("distributed.utils_comm", "WrappedKey"),
        ("distributed.protocol.serialize", "Serialize"),
        ("distributed.protocol.serialize", "ToPickle"),
        ("distributed.client", "FutureCancelledError"),
        ("distributed.core", "CommClosedError"),
        ("distributed.comm.core", "CommClosedError"),
        ("distributed.scheduler", "KilledWorker"),
        ("distributed.worker_state_machine", "TaskErredMsg"),
        ("neuro_dask.security.errors", "TaskRefusedError"),
        ("neuro_dask.security.errors", "RequestRefusedError"),
    }
    | TASK_FUNCTIONS
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


# Globals replaced by a harmless stand-in instead of refused: every remote error from an
# honest peer carries a pickled traceback, and refusing it would lose the exception too.
SUBSTITUTES = {("tblib.pickling_support", "unpickle_traceback"): drop_traceback,
               **{("tblib", part): DroppedTracebackPart for part in ("Frame", "Code", "Traceback")}}


def is_named_only(module: str, name: str) -> bool:
    return (module, name) in NAMED_ONLY_GLOBALS


# neuro_dask's own errors travel as exceptions of tasks and handlers: every exception class in
# these modules, and errors._rebuild (cls.__new__ + Exception.__init__ + attributes).
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
