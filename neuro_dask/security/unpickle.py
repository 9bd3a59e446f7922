"""The bounded restricted unpickler: what loads a pickle from a scheduler or operator.

Threat model. On a hardened network only peers whose certificate says `scheduler` or `operator`
may send a pickle at all (everyone else sends plain data, neuro_dask/security/plain_wire.py). This
loader must still hold against them: a leaked key must not become code execution, a crash, or a
load that runs as long or grows as large as one argument says. A pickle is a program: GLOBAL
imports a name, REDUCE calls it with arguments the sender chose, BUILD applies state to an
object, and cheap opcodes (TUPLE1, DUP, MEMOIZE, SETITEM) build structures whose later use can
cost far more than their bytes. What this loader refuses, and why:

1. Any global outside the allow-list (allowlist.py; its docstring says what it leaves out and
   why: numpy's rebuilders, range, deque, codecs, Dask's task specs). A dotted name
   (`Class.method`) is never allowed. Named-only types (bytes, str, int, ...) load only from a
   pickle that calls nothing, decided once per load. Python 2 names are not translated
   (fix_imports off): the allow-list is checked on the name the loader imports.
2. BUILD (state) except onto an instance of an Exception subclass or of BUILDABLE_CLASSES: never
   onto a class, function or module (that would rewrite it for the whole process, e.g. a class's
   `__module__`), never onto an object with a C layout that state could corrupt (numpy's dtype
   was the example: state describing a structured dtype whose object field its flags hide).
3. More than MAX_OPCODES opcodes or MAX_MEMO_ENTRIES memo entries: the work of one load is
   bounded by these, since every other check below makes each opcode's cost linear in its own
   bytes. A 2,000,000-opcode pickle stops at opcode 1,000,001.
4. A BYTEARRAY8 longer than what is left of the pickle: the pure-Python loader allocates (and
   zero-fills) the length the pickle claims before reading it, and trims it afterwards.
5. Tuples (and frozensets and slices) nested more than MAX_HASHABLE_DEPTH deep. hash() of a
   nested tuple recurses in C without Python's recursion guard: a million TUPLE1 opcodes (one
   byte each) make a tuple whose hash crashes the process, in this loader (as a dict key) or in
   whoever holds it later. These are immutable, so their depth is known when they are built.
   Lists and dicts may nest deeper: every C path that walks them (repr, ==, pickling) has the
   recursion guard and raises RecursionError, which this loader reports as UnpicklingError.
6. More than plain_wire.MAX_EQUAL_HASHES keys of one dict (members of one set) sharing one hash:
   ints, floats and tuples of them hash the same in every process, so distinct keys with one
   chosen hash are cheap to compute, and building a dict of N of them costs N**2 comparisons.
   Checked before every SETITEM(S), ADDITEMS, DICT and FROZENSET, and before a call of set,
   frozenset, dict, OrderedDict or defaultdict (directly, or through tblib's helpers, which call
   the class they are given).
7. Persistent ids (torch's storages use them; no peer needs them).

Errors: PickleRefusedError for everything above (its subclass PickleLimitError for 3, 5 and 6);
pickle.UnpicklingError for a malformed pickle (a truncated stream, a bad opcode, an allowed
constructor called with the wrong arguments): restricted_loads turns the pure-Python loader's
EOFError, IndexError, KeyError, ValueError, TypeError, AttributeError, struct.error,
OverflowError and RecursionError into it. Anything else escaping is a bug (the fuzz targets in
neuro_dask/testing/fuzz_targets.py treat it as a finding).

The pure-Python unpickler, because the C one's opcodes cannot be intercepted; what a hardened
network pickles is small (errors, a Status): an error as distributed pickles it (465 bytes) loads in
about 70 us, 50 us without the bounds (2-core VM); a refused 2,000,000-opcode pickle stops in 0.2 s.
Pure: no distributed here; neuro_dask/security/hardening.py puts this loader behind distributed's
own `loads` functions.
"""

from __future__ import annotations

import collections
import io
import pickle
import pickletools
import struct
import types
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import tblib.pickling_support

from neuro_dask.security.allowlist import BUILDABLE_CLASSES
from neuro_dask.security.errors import PickleLimitError, PickleRefusedError
from neuro_dask.security.plain_wire import MAX_EQUAL_HASHES

Allowed = Callable[[str, str], bool]

# Opcodes one load may execute, and objects it may memoize. Honest pickles on a hardened
# network (an error with its cause, a Status) take a few hundred opcodes.
MAX_OPCODES = 1_000_000
MAX_MEMO_ENTRIES = 100_000
# Tuples, frozensets and slices nested in one another (hash() recurses through them in C).
MAX_HASHABLE_DEPTH = 100

# Opcodes that call or build with what the pickle names.
_CALLS = frozenset({"REDUCE", "NEWOBJ", "NEWOBJ_EX", "OBJ", "INST", "BUILD"})
# Types whose hash recurses into their items; their height is tracked as they are built.
_HASHABLE_CONTAINERS = (tuple, frozenset, slice)
# Callables that hash the items of their iterable argument (and so must see them spread out).
_HASHING_CALLS = frozenset({set, frozenset, dict, collections.OrderedDict, collections.defaultdict})
_DICT_LIKE = frozenset({dict, collections.OrderedDict, collections.defaultdict})
# Errors the pure-Python loader raises on a malformed pickle: restricted_loads reports them as
# UnpicklingError.
_MALFORMED = (
    EOFError,
    IndexError,
    KeyError,
    ValueError,
    TypeError,
    AttributeError,
    struct.error,
    OverflowError,
    RecursionError,
)


def calls_anything(data: bytes | bytearray | memoryview) -> bool:
    """Whether a pickle calls a global (REDUCE and friends) rather than merely naming it.
    Unreadable, or longer than MAX_OPCODES opcodes: treated as the dangerous kind."""
    try:
        for count, (op, _arg, _pos) in enumerate(pickletools.genops(bytes(data))):
            if op.name in _CALLS or count >= MAX_OPCODES:
                return True
        return False
    except Exception:  # unreadable: treat as the dangerous kind
        return True


# State may be applied only to instances. BUILD on an allow-listed *class* (or function) would
# set its attributes for the whole process: one message could break or subvert every later
# load (e.g. rewrite a class's __module__ to pass a check that names it).
_NOT_INSTANCES = (type, types.FunctionType, types.BuiltinFunctionType, types.MethodType, types.ModuleType)


def _counted(handler: Callable[[Any], None]) -> Callable[[Any], None]:
    def opcode(self: RestrictedUnpickler) -> None:
        self._opcodes += 1
        if self._opcodes > MAX_OPCODES:
            raise PickleLimitError("more opcodes than one load may run", MAX_OPCODES, self._peer)
        handler(self)

    opcode.__name__ = getattr(handler, "__name__", "opcode")
    return opcode


class RestrictedUnpickler(pickle._Unpickler):
    """An unpickler whose find_class consults `allowed(module, name)` before importing, which
    applies state (BUILD) to exceptions and BUILDABLE_CLASSES only, and which bounds its own work
    (module docstring: rules 1-7)."""

    dispatch = dict(pickle._Unpickler.dispatch)

    def __init__(
        self,
        data,
        *,
        allowed: Allowed,
        buffers: Iterable[Any] | None = None,
        peer: str | None = None,
        named_only: Allowed | None = None,
        substitutes: Mapping[tuple[str, str], Any] | None = None,
    ):
        self._stream = io.BytesIO(data)
        super().__init__(self._stream, buffers=buffers, fix_imports=False)
        self._data = data
        self._size = len(self._stream.getbuffer())
        self._substitutes = substitutes or {}
        self._allowed = allowed
        self._named_only = named_only
        self._peer = peer
        self._opcodes = 0
        self._calls: bool | None = None  # calls_anything(data), computed when first needed
        # id -> (height, object) of every tuple, frozenset and slice built; the object is kept so
        # that its id stays its own until the load ends.
        self._heights: dict[int, tuple[int, Any]] = {}
        # id -> (container, Counter of key hashes) for dicts and sets filled opcode by opcode.
        self._spread: dict[int, tuple[Any, Counter]] = {}

    # ---- rule 1: globals ----------------------------------------------------------------------

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self._substitutes:
            return self._substitutes[module, name]
        if "." in name:
            raise PickleRefusedError(module, name, self._peer)
        if self._allowed(module, name):
            return super().find_class(module, name)
        # Some types may be *named* (distributed pickles `type(x)` alone, e.g. bytes) but never
        # called: bytes(10**11) would be a memory bomb.
        if self._named_only is not None and self._named_only(module, name):
            if self._calls is None:
                self._calls = calls_anything(self._data)
            if not self._calls:
                return super().find_class(module, name)
        raise PickleRefusedError(module, name, self._peer)

    # ---- rule 2: state ------------------------------------------------------------------------

    def load_build(self) -> None:
        target = self.stack[-2] if len(self.stack) > 1 else None  # [..., target, state]
        if isinstance(target, _NOT_INSTANCES):
            raise PickleRefusedError(
                getattr(target, "__module__", None) or "?",
                f"{getattr(target, '__qualname__', type(target).__name__)} (state applied to it)",
                self._peer,
            )
        if not (isinstance(target, Exception) or type(target) in BUILDABLE_CLASSES):
            kind = type(target)
            raise PickleRefusedError(kind.__module__, f"{kind.__qualname__} (state applied to an instance)", self._peer)
        super().load_build()

    dispatch[pickle.BUILD[0]] = load_build

    # ---- rule 3: memo entries ------------------------------------------------------------------

    def _memo_bounded(handler: Callable[[Any], None]) -> Callable[[Any], None]:  # noqa: N805 - a decorator
        def put(self: RestrictedUnpickler) -> None:
            handler(self)
            if len(self.memo) > MAX_MEMO_ENTRIES:
                raise PickleLimitError("more memo entries than one load may keep", MAX_MEMO_ENTRIES, self._peer)

        return put

    for _code in (pickle.PUT, pickle.BINPUT, pickle.LONG_BINPUT, pickle.MEMOIZE):
        dispatch[_code[0]] = _memo_bounded(pickle._Unpickler.dispatch[_code[0]])

    # ---- rule 4: BYTEARRAY8 ----------------------------------------------------------------------

    def load_bytearray8(self) -> None:
        (length,) = struct.unpack("<Q", self.read(8))
        if length > self._unread():
            raise pickle.UnpicklingError(f"BYTEARRAY8 of {length} bytes, more than the pickle holds")
        buffer = bytearray(length)
        self.readinto(buffer)
        self.append(buffer)

    dispatch[pickle.BYTEARRAY8[0]] = load_bytearray8

    def _unread(self) -> int:
        frame = self._unframer.current_frame
        in_frame = len(frame.getbuffer()) - frame.tell() if frame else 0
        return in_frame + self._size - self._stream.tell()

    # ---- rule 5: nesting of hashable containers ---------------------------------------------------

    def _built(handler: Callable[[Any], None]) -> Callable[[Any], None]:  # noqa: N805 - a decorator
        def build(self: RestrictedUnpickler) -> None:
            handler(self)
            top = self.stack[-1] if self.stack else None
            if isinstance(top, _HASHABLE_CONTAINERS):
                self._height(top)

        return build

    def _height(self, obj: Any) -> int:
        entry = self._heights.get(id(obj))
        if entry is not None and entry[1] is obj:
            return entry[0]
        children = (obj.start, obj.stop, obj.step) if type(obj) is slice else obj
        nested = [child for child in children if isinstance(child, _HASHABLE_CONTAINERS)]
        height = 1 + max(map(self._height_known, nested), default=0)
        if height > MAX_HASHABLE_DEPTH:
            raise PickleLimitError("tuples nested deeper than one load may build", MAX_HASHABLE_DEPTH, self._peer)
        self._heights[id(obj)] = (height, obj)
        return height

    def _height_known(self, obj: Any) -> int:
        """The height of a child: recorded when it was built; measured (breadth first, each object
        once, at most to the limit) for one this loader did not build, such as the items of an
        allowed constructor's result."""
        entry = self._heights.get(id(obj))
        if entry is not None and entry[1] is obj:
            return entry[0]
        height, depth, level, seen = 0, 0, [obj], {id(obj)}
        while level:
            depth += 1
            nested = []
            for item in level:
                entry = self._heights.get(id(item))
                if entry is not None and entry[1] is item:
                    height = max(height, depth - 1 + entry[0])
                    continue
                height = max(height, depth)
                children = (item.start, item.stop, item.step) if type(item) is slice else item
                for child in children:
                    if isinstance(child, _HASHABLE_CONTAINERS) and id(child) not in seen:
                        seen.add(id(child))
                        nested.append(child)
            if height > MAX_HASHABLE_DEPTH:
                raise PickleLimitError("tuples nested deeper than one load may build", MAX_HASHABLE_DEPTH, self._peer)
            level = nested
        self._heights[id(obj)] = (height, obj)
        return height

    # ---- rule 6: hash spread --------------------------------------------------------------------

    def _check_spread(self, keys: Iterable[Any], into: Any = None) -> None:
        """Refuse when more than MAX_EQUAL_HASHES of `keys` (added to `into`, a dict or set being
        filled, when given) share one hash. Unhashable keys are left to the insertion to refuse."""
        try:
            hashes = list(map(hash, keys))
        except TypeError:
            return
        if into is not None:
            entry = self._spread.get(id(into))
            if entry is None or entry[0] is not into:
                # what the container already holds (a dict(...) or set(...) the pickle called) counts too
                held = into.keys() if isinstance(into, dict) else into if isinstance(into, (set, frozenset)) else ()
                entry = self._spread[id(into)] = (into, Counter(map(hash, held)))
            counts = entry[1]
            counts.update(hashes)
            if hashes and max(counts[h] for h in set(hashes)) > MAX_EQUAL_HASHES:
                raise PickleLimitError("keys of one dict or set sharing one hash", MAX_EQUAL_HASHES, self._peer)
        elif len(hashes) > MAX_EQUAL_HASHES and len(set(hashes)) < len(hashes):
            if Counter(hashes).most_common(1)[0][1] > MAX_EQUAL_HASHES:
                raise PickleLimitError("keys of one dict or set sharing one hash", MAX_EQUAL_HASHES, self._peer)

    def _check_call(self, func: Any, args: Any) -> None:
        """Before calling an allowed callable: the items its call would hash."""
        if not isinstance(args, tuple):
            return
        if func is tblib.pickling_support.unpickle_exception and len(args) >= 2:
            self._check_call(args[0], args[1])  # calls args[0](*args[1])
        elif func is tblib.pickling_support.unpickle_exception_with_attrs and len(args) >= 8:
            self._check_call(args[0], args[7])  # calls args[0].__new__(args[0], *args[7])
        elif isinstance(func, type) and func in _HASHING_CALLS:
            position = 1 if func is collections.defaultdict else 0
            iterable = args[position] if len(args) > position else None
            if type(iterable) in (list, tuple):
                if func in _DICT_LIKE:
                    iterable = [pair[0] for pair in iterable if type(pair) in (list, tuple) and len(pair) == 2]
                self._check_spread(iterable)

    def load_setitem(self) -> None:
        stack = self.stack
        if len(stack) >= 3:
            self._check_spread((stack[-2],), into=stack[-3])
        super().load_setitem()

    def load_setitems(self) -> None:
        if self.metastack and self.metastack[-1]:
            self._check_spread(self.stack[0::2], into=self.metastack[-1][-1])
        super().load_setitems()

    def load_additems(self) -> None:
        if self.metastack and self.metastack[-1]:
            self._check_spread(self.stack, into=self.metastack[-1][-1])
        super().load_additems()

    def load_dict(self) -> None:
        self._check_spread(self.stack[0::2])
        super().load_dict()

    def load_frozenset(self) -> None:
        self._check_spread(self.stack)
        super().load_frozenset()

    def load_reduce(self) -> None:
        if len(self.stack) >= 2:
            self._check_call(self.stack[-2], self.stack[-1])
        super().load_reduce()

    def load_newobj(self) -> None:
        if len(self.stack) >= 2:
            self._check_call(self.stack[-2], self.stack[-1])
        super().load_newobj()

    def load_newobj_ex(self) -> None:
        if len(self.stack) >= 3:
            self._check_call(self.stack[-3], self.stack[-2])
        super().load_newobj_ex()

    def load_obj(self) -> None:
        if self.stack:
            self._check_call(self.stack[0], tuple(self.stack[1:]))
        super().load_obj()

    def load_inst(self) -> None:
        module = self.readline()[:-1].decode("ascii")
        name = self.readline()[:-1].decode("ascii")
        klass = self.find_class(module, name)
        self._check_call(klass, tuple(self.stack))
        self._instantiate(klass, self.pop_mark())

    for _code, _handler in (
        (pickle.SETITEM, load_setitem),
        (pickle.SETITEMS, load_setitems),
        (pickle.ADDITEMS, load_additems),
        (pickle.DICT, load_dict),
    ):
        dispatch[_code[0]] = _handler
    # Opcodes that may leave a new tuple, frozenset or slice on the stack: its height is recorded.
    for _code, _handler in (
        (pickle.FROZENSET, load_frozenset),
        (pickle.REDUCE, load_reduce),
        (pickle.NEWOBJ, load_newobj),
        (pickle.NEWOBJ_EX, load_newobj_ex),
        (pickle.OBJ, load_obj),
        (pickle.INST, load_inst),
        *(
            (code, pickle._Unpickler.dispatch[code[0]])
            for code in (pickle.TUPLE, pickle.TUPLE1, pickle.TUPLE2, pickle.TUPLE3, pickle.EMPTY_TUPLE)
        ),
    ):
        dispatch[_code[0]] = _built(_handler)

    # ---- rule 7: persistent ids ------------------------------------------------------------------

    def persistent_load(self, pid: Any) -> Any:
        # Persistent ids reach into the loader's own world (torch uses them for storages):
        # nothing a peer sends has a reason to use them.
        shown = repr(pid[:80]) if isinstance(pid, (str, bytes)) else type(pid).__name__
        raise PickleRefusedError("<persistent id>", shown, self._peer)

    # ---- rule 3: opcodes (every handler above included) ----------------------------------------

    dispatch = {_code: _counted(_handler) for _code, _handler in dispatch.items()}
    del _code, _handler, _memo_bounded, _built


def restricted_loads(
    data: bytes | bytearray | memoryview,
    *,
    allowed: Allowed,
    buffers: Iterable[Any] | None = None,
    peer: str | None = None,
    named_only: Allowed | None = None,
    substitutes: Mapping[tuple[str, str], Any] | None = None,
) -> Any:
    """pickle.loads with an allow-list and bounds (module docstring).

    Raises PickleRefusedError naming the first refused global (PickleLimitError for a bound), or
    pickle.UnpicklingError for a malformed pickle. `named_only` globals load only from a pickle
    that calls nothing (a bare type reference)."""
    return _load(
        RestrictedUnpickler(
            data, allowed=allowed, buffers=buffers or (), peer=peer, named_only=named_only, substitutes=substitutes
        )
    )


def _load(unpickler: RestrictedUnpickler) -> Any:
    try:
        return unpickler.load()
    except (PickleRefusedError, pickle.UnpicklingError):
        raise
    except _MALFORMED as exc:
        raise pickle.UnpicklingError(f"malformed pickle ({type(exc).__name__}: {str(exc)[:200]})") from exc


class _RecordingUnpickler(RestrictedUnpickler):
    """For globals_named: applies state to anything (it audits, and never sees untrusted bytes)."""

    dispatch = dict(RestrictedUnpickler.dispatch)

    def _load_build_anything(self) -> None:
        pickle._Unpickler.load_build(self)

    dispatch[pickle.BUILD[0]] = _counted(_load_build_anything)


def globals_named(data: bytes | bytearray | memoryview, buffers: Iterable[Any] | None = None) -> list[tuple[str, str]]:
    """Every global a pickle imports, in order, found by loading it with a recording loader.

    For audits and tests only: it *does* load the pickle, calling every global it names and
    applying every state, so never call it on untrusted bytes.
    """
    seen: list[tuple[str, str]] = []

    def record(module: str, name: str) -> bool:
        seen.append((module, name))
        return True

    _load(_RecordingUnpickler(data, allowed=record, buffers=buffers or ()))
    return seen
