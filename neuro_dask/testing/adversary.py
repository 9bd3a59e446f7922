"""Adversarial workers for tests and operator drills: wrap a worker's honest expert outputs.

One `Adversary` per worker sits between `ExpertHost.run` and the response. Modes:

- honest:   outputs unchanged.
- perturb:  with `probability`, every output gets Gaussian noise N(0, sigma) where
            sigma = max(scale * rms(output), MIN_NOISE); the noise comes from a torch.Generator
            seeded from (seed, call index, layer, expert), so a run is repeatable.
- collude:  every call, a wrong result that all colluders of one `group` share: the noise is
            seeded from a blake2b hash of (group, layer, expert, input bytes) only, never from the
            worker's own seed or call count, so colluders fed the same input agree bit for bit.
- straggle: with `probability`, the answer comes `delay` seconds late; outputs unchanged. By
            default only that answer is late (`respond` returns the delay for the caller to
            wait out off the compute thread: each call straggles independently, like a slow
            network path); `blocking: true` sleeps in the compute thread instead, so the calls
            queued behind it are late too (a slow or overloaded machine).
- crash:    honest for `after` calls, then every later call invokes exit().
- defect:   honest for `after` calls, then perturbed on every later call (`probability` ignored).

Coins (perturb, straggle) come from random.Random(seed). A worker passes its name as `salt`,
which is mixed into the coins and the perturb noise: one config shared by many workers (the usual
`neuro.worker.adversary`) must not make them straggle on the same calls or perturb alike, which
would be collusion by accident. Input and output tensors are never modified; a changed output is
a new tensor with the original's shape, dtype and device.
"""

from __future__ import annotations

import hashlib
import math
import random
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields

import torch

from neuro_dask.errors import ConfigError

MODES = ("honest", "perturb", "collude", "straggle", "crash", "defect")

# Floor on the noise's standard deviation: 10x the validator's default atol (1e-4), so an output
# that is (near) zero is still perturbed detectably instead of by scale * 0.
MIN_NOISE = 1e-3

_SEED_MASK = (1 << 63) - 1  # torch.Generator.manual_seed wants a non-negative 64-bit int


class AdversaryCrash(Exception):
    """Raised by the default `exit`: the worker plugin turns it into os._exit in real drills.

    Deliberately not a NeuroDaskError, so handlers that turn library errors into an error
    response cannot swallow a crash.
    """


@dataclass(frozen=True)
class AdversarySpec:
    """How one worker misbehaves (see the module docstring for each mode).

    Rules: mode one of MODES; scale finite and > 0; probability in [0, 1]; delay finite and >= 0;
    after an int >= 0; group a non-empty string; seed an int. Anything else raises ConfigError.
    """

    mode: str = "honest"
    scale: float = 0.05  # perturb/collude/defect: noise std relative to the output's RMS
    probability: float = 1.0  # straggle: chance of a delay; perturb: chance of noise
    delay: float = 0.5  # straggle: extra seconds
    after: int = 0  # crash: calls before exiting; defect: honest calls before perturbing
    group: str = "cabal"  # collude: colluders of one group return the same wrong result
    seed: int = 0
    blocking: bool = False  # straggle: hold the compute thread (later calls queue behind it)

    def __post_init__(self) -> None:
        if not isinstance(self.mode, str) or self.mode not in MODES:
            raise ConfigError(f"adversary mode {self.mode!r} is unknown; choose one of {', '.join(MODES)}")
        for name in ("scale", "probability", "delay"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ConfigError(f"adversary {name}={value!r} must be a finite number")
            object.__setattr__(self, name, float(value))  # an int from YAML is fine; store a float
        for name in ("after", "seed"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ConfigError(f"adversary {name}={value!r} must be an integer")
        if self.scale <= 0:
            raise ConfigError(f"adversary scale={self.scale} must be > 0 (0 would perturb nothing)")
        if not 0.0 <= self.probability <= 1.0:
            raise ConfigError(f"adversary probability={self.probability} must be within [0, 1]")
        if self.delay < 0:
            raise ConfigError(f"adversary delay={self.delay} must be >= 0 seconds")
        if self.after < 0:
            raise ConfigError(f"adversary after={self.after} must be >= 0 calls")
        if not isinstance(self.blocking, bool):
            raise ConfigError(f"adversary blocking={self.blocking!r} must be true or false")
        if not isinstance(self.group, str) or not self.group:
            raise ConfigError(f"adversary group={self.group!r} must be a non-empty string")

    @classmethod
    def from_config(cls, raw: Mapping | None) -> AdversarySpec:
        """A spec from a config mapping such as {"mode": "perturb", "scale": 0.05}.

        None means honest. A non-mapping, unknown keys (all named) or bad values raise ConfigError.
        """
        if raw is None:
            return cls()
        if not isinstance(raw, Mapping):
            raise ConfigError(f"adversary config must be a mapping, got {type(raw).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(str(k) for k in raw if k not in known)
        if unknown:
            raise ConfigError(
                f"adversary config has unknown keys {', '.join(unknown)}; known keys are {', '.join(sorted(known))}"
            )
        return cls(**raw)


def _default_exit() -> None:
    raise AdversaryCrash("adversary: crash mode reached its call limit")


def _seed(*parts: object, data: bytes = b"") -> int:
    """A stable 63-bit seed from parts (their repr) and raw bytes; never Python's salted hash()."""
    h = hashlib.blake2b(repr(parts).encode("utf-8"), digest_size=8)
    h.update(data)
    return int.from_bytes(h.digest(), "little") & _SEED_MASK


def _tensor_bytes(t: torch.Tensor) -> bytes:
    # View as uint8 first: numpy has no bfloat16.
    return t.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy().tobytes()


def _noisy(output: torch.Tensor, scale: float, seed: int) -> torch.Tensor:
    """A new tensor: output + N(0, max(scale * rms(output), MIN_NOISE)), in output's dtype/device."""
    if output.numel() == 0:
        return output.clone()
    x = output.detach().to("cpu", torch.float32)
    rms = x.pow(2).mean().sqrt().item()
    sigma = max(scale * rms if math.isfinite(rms) else 0.0, MIN_NOISE)
    gen = torch.Generator().manual_seed(seed)
    noise = torch.randn(x.shape, generator=gen, dtype=torch.float32) * sigma
    return (x + noise).to(output.device, output.dtype)


def _noisy_share(output: torch.Tensor, scale: float, seed: int, frac_bits: int = 32) -> torch.Tensor:
    """A wrong answer on the private tier: int64 ring elements + round(N(0, scale) * 2^frac_bits),
    never + 0 (every element changes, wrapping mod 2^64 as the ring does)."""
    gen = torch.Generator().manual_seed(seed)
    delta = (torch.randn(output.shape, generator=gen, dtype=torch.float64) * scale * 2.0**frac_bits).to(torch.int64)
    delta[delta == 0] = 1
    return output + delta


class Adversary:
    """Wraps honest expert outputs; one instance per worker. Thread-safe.

    `calls` counts every `apply` so far (the crashing call included). `sleep` and `exit` are
    injected so tests neither wait nor die; if an injected `exit` returns, `apply` raises
    AdversaryCrash anyway, because a crashed worker must never hand back a result.
    """

    def __init__(
        self,
        spec: AdversarySpec,
        sleep: Callable[[float], None] = time.sleep,
        exit: Callable[[], None] = _default_exit,
        salt: str = "",
    ):
        self.spec = spec
        self.calls = 0
        self._sleep = sleep
        self._exit = exit
        self._salt = salt
        self._rng = random.Random(_seed("coins", spec.seed, salt) if salt else spec.seed)
        self._lock = threading.Lock()

    @property
    def is_honest(self) -> bool:
        """True only for mode "honest" (a straggler's outputs are honest but it still misbehaves)."""
        return self.spec.mode == "honest"

    def apply(
        self, layer: int, inputs: Mapping[int, torch.Tensor], outputs: dict[int, torch.Tensor]
    ) -> dict[int, torch.Tensor]:
        """The outputs this worker returns for one request, after any straggle delay (slept here).

        Always a new dict; unchanged outputs are the very tensors passed in, changed ones are new.
        """
        outputs, delay = self.respond(layer, inputs, outputs)
        if delay:
            self._sleep(delay)
        return outputs

    def respond(
        self, layer: int, inputs: Mapping[int, torch.Tensor], outputs: dict[int, torch.Tensor]
    ) -> tuple[dict[int, torch.Tensor], float]:
        """(outputs, seconds the caller must hold the answer back without blocking its compute).

        A blocking straggle sleeps here instead and returns 0.
        """
        spec = self.spec
        with self._lock:  # the plugin may serve calls from several threads
            index = self.calls
            self.calls += 1
            coin = self._rng.random() if spec.mode in ("perturb", "straggle") else 0.0
        mode = spec.mode
        if (mode == "perturb" and coin < spec.probability) or (mode == "defect" and index >= spec.after):
            return self._perturbed(layer, index, outputs), 0.0
        if mode == "collude":
            return self._colluded(layer, inputs, outputs), 0.0
        if mode == "straggle" and coin < spec.probability:
            if not spec.blocking:
                return dict(outputs), spec.delay
            self._sleep(spec.delay)
        if mode == "crash" and index >= spec.after:
            self._exit()
            raise AdversaryCrash(f"adversary: crashed on call {index + 1} (after={spec.after})")
        return dict(outputs), 0.0

    def tamper_shares(self, layer: int, outputs: dict[int, torch.Tensor]) -> dict[int, torch.Tensor]:
        """The private tier's answers (int64 shares at scale 2^32): perturb and defect change them
        as `respond` changes float outputs; the other modes leave them (straggle and crash act
        through `respond`'s callers only on the standard tier)."""
        spec = self.spec
        with self._lock:
            index = self.calls
            self.calls += 1
            coin = self._rng.random() if spec.mode == "perturb" else 0.0
        if (spec.mode == "perturb" and coin < spec.probability) or (spec.mode == "defect" and index >= spec.after):
            return {
                e: _noisy_share(out, spec.scale, _seed("share", spec.seed, self._salt, index, layer, int(e)))
                for e, out in outputs.items()
            }
        return dict(outputs)

    def _perturbed(self, layer: int, index: int, outputs: Mapping[int, torch.Tensor]) -> dict[int, torch.Tensor]:
        # Seeded per expert so the noise does not depend on the dict's order.
        return {
            e: _noisy(out, self.spec.scale, _seed("perturb", self.spec.seed, self._salt, index, layer, int(e)))
            for e, out in outputs.items()
        }

    def _colluded(
        self, layer: int, inputs: Mapping[int, torch.Tensor], outputs: Mapping[int, torch.Tensor]
    ) -> dict[int, torch.Tensor]:
        result = {}
        for e, out in outputs.items():
            if e not in inputs:
                raise ValueError(f"collude: no input rows for expert {e}; the wrong result is keyed on them")
            x = inputs[e]
            # Only group, layer, expert and the input: never this worker's seed or call count.
            seed = _seed(
                "collude", self.spec.group, int(layer), int(e), str(x.dtype), tuple(x.shape), data=_tensor_bytes(x)
            )
            result[e] = _noisy(out, self.spec.scale, seed)
        return result


def make_adversary(raw_config: Mapping | None, salt: str = "", **injected: Callable) -> Adversary:
    """An Adversary from a config mapping (see AdversarySpec.from_config); `salt` is the worker's
    name, `injected` is sleep/exit."""
    return Adversary(AdversarySpec.from_config(raw_config), salt=salt, **injected)
