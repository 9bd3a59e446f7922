"""Disputes: the scheduler settles a claim of a wrong answer itself, by recomputation.

A client that believes a worker answered wrongly does not get to say so: it brings *evidence*,
the worker's signed receipt (trust/receipts.py) with the call's request and response bytes, and
the scheduler has referees of its own choosing recompute the disputed expert on those rows. Only
a verdict moves reputation or stake; an unproven report costs its reporter.

    client --Evidence--> scheduler: ev.check(key of ev.receipt.worker)      (E1-E3)
                                    referee_order(candidates, accused, owner)  (R1-R3)
                                    answers = referees' expert(ev.rows("inputs"))
                                    judge(ev.rows("outputs"), answers, agree)  (rules 1-3)
                                    proven: forfeit (+ slash if slashable); refuted: strike reporter

Shape legend: n_e rows of the disputed expert, D hidden.

Evidence
--------
E1. Evidence is one expert call's receipt and signature, the disputed expert (one of the
    receipt's), and the whole call's request and response data bytes. The receipt signs the
    digests of exactly those bytes and how they read (dtype, hidden), so neither the client nor
    anyone else can substitute rows, re-read them in another dtype or shape, or pin an answer on a
    worker that did not sign it. `dtype` and `hidden` must equal the receipt's.
E2. Share answers (the private tier) can be disputed too: a worker's answer to one share is the
    expert's integer linear map applied in Z_2^64, bit-exact whoever computes it, so a referee
    given the same share (and the signed frac_bits) must return identical bytes. The share on its
    own is uniformly random and reveals nothing; the client names in `exclude` the workers that
    hold the other share of the same secret (the pair's other holder, a witness), and the
    scheduler never hands the share to them. The outputs' width is the step's (2I for gate_up,
    D for down): len(outputs) / (rows x 8). Answers agree only when identical.
E3. `Evidence.from_wire` checks every field and the call's size (receipt rows <= max_rows) before
    anything is hashed; the constructor checks the byte lengths against sum(counts) x hidden x
    itemsize, so `rows()` always cuts inside the buffers. `check(public_der)` then verifies, in
    order, the signature (with the accused worker's own key, from its certificate), the input
    digest, the output digest, and again lengths and expert, raising EvidenceError naming the
    first failure (`reason`: bad-signature, digest, length or expert).

Referees
--------
R1. Never the accused, nor any worker of the accused's owner (a worker's owner is itself when it
    declares none): an owner does not judge its own machines.
R2. Trusted (operator-anchored) referees first, then by reputation score descending, then by
    name: deterministic, so a dispute replayed gives the same referees.
R3. One referee per worker name (the first seen).

Verdict rules (judge)
---------------------
A referee's answer is None when it failed, and counts as failed when its shape differs from the
accused's. Two answers agree when they are identical (torch.equal) or `agree(a, b)`.
  1. If any trusted referee answered, the trusted answers decide alone: they must all agree
     with one another (else undecided); the accused disagreeing with every one of them is
     proven and slashable (an operator-anchored node recomputed it); agreeing with any is refuted.
  2. Otherwise the canonical answer needs at least two referees of distinct owners, and every
     untrusted referee that answered must agree with every other: a lone dissenter means the
     network cannot tell, so the dispute stays undecided and should go to a trusted node. Then
     the accused disagreeing with every one of them is proven, not slashable (no operator-trusted
     node recomputed it); agreeing with any is refuted.
  3. Anything else (no answers, all failed, one owner only, referees disagreeing among
     themselves) is undecided: nothing moves, and the reporter is not struck either.
A verdict is conservative for the accused: "proven" needs every deciding referee against it.

Strikes
-------
S1. A refuted report is a strike against its reporter (`StrikeBook.strike`). A reporter with
    `max_unproven` strikes within the last `window` seconds is refused further disputes
    (`allowed`) until the oldest of them leaves the window: a client cannot make the scheduler
    recompute without end, nor smear workers for free. Undecided verdicts are not strikes.
S2. Memory is bounded: at most `capacity` reporters (the one struck longest ago is forgotten
    first), each with at most `max_unproven` strike times.
"""

from __future__ import annotations

import math
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from neuro_dask.errors import ConfigError
from neuro_dask.protocol.wire import WIRE_DTYPES
from neuro_dask.security.signing import MAX_SIGNATURE
from neuro_dask.trust.receipts import EvidenceError, Receipt, digest, verify_receipt

Agree = Callable[[torch.Tensor, torch.Tensor], bool]
VERDICTS = ("proven", "refuted", "undecided")
_BYTES = (bytes, bytearray, memoryview)
_EVIDENCE_FIELDS = ("receipt", "expert", "dtype", "hidden", "inputs", "outputs")
_OPTIONAL_FIELDS = ("exclude",)
MAX_EXCLUDE = 8
_DTYPES = {**WIRE_DTYPES, "int64": torch.int64}


def _itemsize(dtype: str) -> int:
    return torch.empty((), dtype=_DTYPES[dtype]).element_size()


@dataclass(frozen=True)
class Evidence:
    """One disputed expert answer and the bytes its receipt signs (E1-E3)."""

    receipt: Receipt
    sig: bytes
    expert: int  # the disputed expert, one of receipt.experts
    dtype: str  # the receipt's dtype
    hidden: int  # the receipt's hidden
    inputs: bytes  # the whole call's request data, [N, D] in `dtype`
    outputs: bytes  # the whole call's response data, [N, D] in `dtype` ([N, W] for a share call)
    exclude: tuple[str, ...] = ()  # share calls: workers that must not see the share (the other holders)

    def __post_init__(self) -> None:
        r = self.receipt
        if not isinstance(r, Receipt):
            raise EvidenceError(f"evidence needs a Receipt, got {type(r).__name__}", "receipt")
        if (
            not isinstance(self.exclude, (list, tuple))
            or len(self.exclude) > MAX_EXCLUDE
            or not all(isinstance(w, str) and 0 < len(w) <= 128 for w in self.exclude)
        ):
            raise EvidenceError(f"evidence field 'exclude' must list at most {MAX_EXCLUDE} worker names", "exclude")
        object.__setattr__(self, "exclude", tuple(self.exclude))
        if not isinstance(self.sig, _BYTES) or not 0 < len(self.sig) <= MAX_SIGNATURE:
            raise EvidenceError(f"evidence signature must be 1 to {MAX_SIGNATURE} bytes", "sig")
        if isinstance(self.expert, bool) or not isinstance(self.expert, int) or self.expert not in r.experts:
            raise EvidenceError(
                f"the disputed expert must be one of the receipt's experts {list(r.experts)[:16]}", "expert", "expert"
            )
        if self.dtype != r.dtype or self.hidden != r.hidden:
            raise EvidenceError(
                f"the evidence reads its rows as {_short(self.dtype)} x {_short(self.hidden)} but "
                f"the receipt signs {r.dtype} x {r.hidden}",
                "dtype",
            )
        for name in ("inputs", "outputs"):
            data = getattr(self, name)
            if not isinstance(data, _BYTES):
                raise EvidenceError(f"evidence field {name!r} must be bytes, got {type(data).__name__}", name)
            if isinstance(data, memoryview) and (not data.c_contiguous or data.itemsize != 1):
                raise EvidenceError(f"evidence field {name!r} must be a contiguous byte buffer", name)
        self._check_lengths()

    @property
    def out_width(self) -> int:
        """Columns of the response's rows: the request's for expert calls, the step's for shares."""
        r = self.receipt
        if r.kind == "expert" or not r.rows:
            return r.hidden
        return len(self.outputs) // (r.rows * _itemsize(r.dtype))

    def _check_lengths(self) -> None:
        r = self.receipt
        itemsize = _itemsize(r.dtype)
        need = r.rows * r.hidden * itemsize
        if len(self.inputs) != need:
            raise EvidenceError(
                f"evidence inputs hold {len(self.inputs)} bytes but the receipt's {r.rows} rows x "
                f"{r.hidden} x {r.dtype} need {need}",
                "inputs",
                "length",
            )
        out = r.rows * self.out_width * itemsize
        if len(self.outputs) != out or (r.kind == "share" and r.rows and not 0 < self.out_width <= 4 * r.hidden * 4):
            raise EvidenceError(
                f"evidence outputs hold {len(self.outputs)} bytes, which are not the receipt's "
                f"{r.rows} rows of one width",
                "outputs",
                "length",
            )

    @classmethod
    def from_wire(cls, obj: object, max_rows: int) -> Evidence:
        """Evidence from {"receipt": Receipt.to_wire(sig), "expert", "dtype", "hidden", "inputs",
        "outputs"}, every field checked and the call no larger than `max_rows` (E3)."""
        if isinstance(max_rows, bool) or not isinstance(max_rows, int) or max_rows < 0:
            raise ValueError(f"max_rows must be an integer >= 0, got {max_rows!r}")
        if not isinstance(obj, Mapping):
            raise EvidenceError(f"evidence must be a mapping, got {type(obj).__name__}")
        missing = [n for n in _EVIDENCE_FIELDS if n not in obj]
        if missing:
            raise EvidenceError(f"evidence field {missing[0]!r} is missing", missing[0])
        extra = set(obj) - set(_EVIDENCE_FIELDS) - set(_OPTIONAL_FIELDS)
        if extra:
            raise EvidenceError(
                f"evidence has unknown fields: expected only {', '.join(_EVIDENCE_FIELDS)} "
                f"(and {', '.join(_OPTIONAL_FIELDS)})"
            )
        receipt, sig = Receipt.from_wire(obj["receipt"])
        if receipt.rows > max_rows:
            raise EvidenceError(
                f"the disputed call has {receipt.rows} rows, above this scheduler's {max_rows}", "receipt", "length"
            )
        dtype, hidden = obj["dtype"], obj["hidden"]
        if not isinstance(dtype, str) or dtype not in _DTYPES:
            raise EvidenceError(f"evidence field 'dtype' must be one of {list(_DTYPES)}", "dtype")
        if isinstance(hidden, bool) or not isinstance(hidden, int):
            raise EvidenceError("evidence field 'hidden' must be an integer", "hidden")
        exclude = obj.get("exclude", ())
        return cls(
            receipt,
            sig,
            obj["expert"],
            dtype,
            hidden,
            obj["inputs"],
            obj["outputs"],
            tuple(exclude) if isinstance(exclude, (list, tuple)) else exclude,
        )

    def to_wire(self) -> dict[str, Any]:
        wire = {
            "receipt": self.receipt.to_wire(self.sig),
            "expert": self.expert,
            "dtype": self.dtype,
            "hidden": self.hidden,
            "inputs": self.inputs,
            "outputs": self.outputs,
        }
        if self.exclude:
            wire["exclude"] = list(self.exclude)
        return wire

    def check(self, public_der: bytes) -> None:
        """E3: None when the accused signed exactly these bytes; EvidenceError naming the first failure."""
        r = self.receipt
        if not verify_receipt(public_der, r, bytes(self.sig)):
            raise EvidenceError(
                f"the receipt does not verify with worker {r.worker!r}'s key: it is not that worker's signed answer",
                "sig",
                "bad-signature",
            )
        if digest(self.inputs) != r.in_digest:
            raise EvidenceError("the evidence inputs are not the request bytes the worker signed", "inputs", "digest")
        if digest(self.outputs) != r.out_digest:
            raise EvidenceError(
                "the evidence outputs are not the response bytes the worker signed", "outputs", "digest"
            )
        self._check_lengths()
        if self.expert not in r.experts:
            raise EvidenceError(f"expert {self.expert} is not in the receipt", "expert", "expert")

    def rows(self, which: str) -> torch.Tensor:
        """The disputed expert's rows [n_e, D] (outputs of a share call: [n_e, W]) of "inputs" or
        "outputs", over the buffer (no copy)."""
        if which not in ("inputs", "outputs"):
            raise ValueError(f"rows() takes 'inputs' or 'outputs', got {which!r}")
        r = self.receipt
        width = self.hidden if which == "inputs" else self.out_width
        index = r.experts.index(self.expert)
        start, n = sum(r.counts[:index]), r.counts[index]
        dtype = _DTYPES[self.dtype]
        if n == 0:
            return torch.empty(0, width, dtype=dtype)
        itemsize = _itemsize(self.dtype)
        return torch.frombuffer(
            getattr(self, which), dtype=dtype, count=n * width, offset=start * width * itemsize
        ).reshape(n, width)


def _short(value: object) -> str:
    return repr(value)[:40] if isinstance(value, (str, int)) else type(value).__name__


# ---- referees ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Referee:
    """A worker the scheduler may ask to recompute. An empty owner means the worker owns itself."""

    worker: str
    owner: str
    trusted: bool
    score: float

    def __post_init__(self) -> None:
        if not isinstance(self.worker, str) or not self.worker:
            raise ConfigError(f"Referee.worker={self.worker!r} must be a non-empty string")
        if not isinstance(self.score, (int, float)) or isinstance(self.score, bool) or not math.isfinite(self.score):
            raise ConfigError(f"referee {self.worker}: score={self.score!r} must be a finite number")

    @property
    def owner_id(self) -> str:
        return self.owner or self.worker


def referee_order(candidates: Iterable[Referee], accused: str, accused_owner: str) -> list[Referee]:
    """R1-R3: who may judge `accused`, best first."""
    banned = accused_owner or accused
    seen: set[str] = set()
    eligible = []
    for ref in candidates:
        if ref.worker in seen or ref.worker == accused or ref.owner_id == banned:
            continue
        seen.add(ref.worker)
        eligible.append(ref)
    return sorted(eligible, key=lambda r: (not r.trusted, -r.score, r.worker))


# ---- verdicts ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Verdict:
    kind: str  # "proven" | "refuted" | "undecided"
    slashable: bool  # proven by a trusted referee (rule 1)
    referees: tuple[str, ...]  # those whose answers decided; for undecided, those that answered
    why: str

    def __post_init__(self) -> None:
        if self.kind not in VERDICTS:
            raise ValueError(f"verdict kind must be one of {VERDICTS}, got {self.kind!r}")
        if self.slashable and self.kind != "proven":
            raise ValueError("only a proven verdict can be slashable")


def _agrees(a: torch.Tensor, b: torch.Tensor, agree: Agree) -> bool:
    return torch.equal(a, b) or bool(agree(a, b))


def _all_agree(answers: list[tuple[Referee, torch.Tensor]], agree: Agree) -> bool:
    return all(
        _agrees(answers[i][1], answers[j][1], agree) for i in range(len(answers)) for j in range(i + 1, len(answers))
    )


def _decide(
    accused: torch.Tensor, group: list[tuple[Referee, torch.Tensor]], agree: Agree, slashable: bool, who: str
) -> Verdict:
    names = tuple(r.worker for r, _ in group)
    with_accused = [r.worker for r, answer in group if _agrees(accused, answer, agree)]
    if with_accused:
        return Verdict("refuted", False, names, f"the accused's answer agrees with {who} {with_accused[0]}")
    return Verdict("proven", slashable, names, f"the accused's answer disagrees with every {who} ({', '.join(names)})")


def judge(accused: torch.Tensor, answers: Sequence[tuple[Referee, torch.Tensor | None]], agree: Agree) -> Verdict:
    """The verdict on `accused` (the disputed rows the worker signed) by the referees' recomputed
    answers (None: the referee failed), under rules 1-3 of the module docstring."""
    valid = [
        (ref, answer) for ref, answer in answers if answer is not None and tuple(answer.shape) == tuple(accused.shape)
    ]
    answered = tuple(ref.worker for ref, _ in valid)
    trusted = [(ref, answer) for ref, answer in valid if ref.trusted]
    if trusted:  # rule 1
        if not _all_agree(trusted, agree):
            return Verdict(
                "undecided",
                False,
                tuple(r.worker for r, _ in trusted),
                "trusted referees disagree among themselves: check their hardware and precision",
            )
        return _decide(accused, trusted, agree, True, "trusted referee")
    owners = {ref.owner_id for ref, _ in valid}
    if len(valid) >= 2 and len(owners) >= 2:  # rule 2
        if not _all_agree(valid, agree):
            return Verdict(
                "undecided", False, answered, "referees disagree among themselves: recompute on a trusted node"
            )
        return _decide(accused, valid, agree, False, "referee")
    if not valid:  # rule 3
        why = "no referee answered" if not answers else "every referee failed to answer"
    else:
        why = f"the answers come from one owner only ({', '.join(sorted(owners))}): two distinct owners must agree"
    return Verdict("undecided", False, answered, why)


# ---- strikes ----------------------------------------------------------------------------------------


class StrikeBook:
    """S1-S2: reporters whose disputes were refuted too often are refused for a while."""

    def __init__(self, max_unproven: int, window: float, clock: Callable[[], float], capacity: int = 10_000):
        if isinstance(max_unproven, bool) or not isinstance(max_unproven, int) or max_unproven < 1:
            raise ConfigError(f"StrikeBook max_unproven={max_unproven!r} must be an integer >= 1")
        if not (isinstance(window, (int, float)) and math.isfinite(window) and window > 0):
            raise ConfigError(f"StrikeBook window={window!r} must be a finite number of seconds > 0")
        if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 1:
            raise ConfigError(f"StrikeBook capacity={capacity!r} must be an integer >= 1")
        self.max_unproven = max_unproven
        self.window = float(window)
        self.capacity = capacity
        self._clock = clock
        self._strikes: OrderedDict[str, deque[float]] = OrderedDict()  # least recently struck first

    def __len__(self) -> int:
        return len(self._strikes)

    def _recent(self, reporter: str, now: float) -> deque[float] | None:
        times = self._strikes.get(reporter)
        if times is None:
            return None
        while times and times[0] <= now - self.window:
            times.popleft()
        if not times:
            del self._strikes[reporter]
            return None
        return times

    def allowed(self, reporter: str) -> tuple[bool, str]:
        """(True, "") while the reporter has fewer than max_unproven strikes in the window;
        (False, why and until when) otherwise."""
        now = self._clock()
        times = self._recent(reporter, now)
        if times is None or len(times) < self.max_unproven:
            return True, ""
        wait = times[-self.max_unproven] + self.window - now
        return False, (
            f"{reporter} made {len(times)} disputes that recomputation refuted in the last "
            f"{self.window:.0f} s; disputes from it are refused for another {max(wait, 0):.0f} s"
        )

    def strike(self, reporter: str) -> None:
        """One refuted report by `reporter`."""
        now = self._clock()
        times = self._recent(reporter, now)
        if times is None:
            times = self._strikes[reporter] = deque(maxlen=self.max_unproven)
        times.append(now)
        self._strikes.move_to_end(reporter)
        while len(self._strikes) > self.capacity:
            self._strikes.popitem(last=False)
