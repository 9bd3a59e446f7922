"""Settings for workers, the scheduler and clients: frozen dataclasses from Dask's `neuro.*` config.

Defaults live in neuro_dask/neuro.yaml, registered into Dask's config on import, so that
~/.config/dask files, DASK_NEURO__... environment variables and `dask.config.set` all apply.
Unknown keys are rejected with an error that names them.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import dask.config
import yaml

from neuro_dask.errors import ConfigFieldError

_DEFAULTS = Path(__file__).with_name("neuro.yaml")
dask.config.update_defaults(yaml.safe_load(_DEFAULTS.read_text()))

_SIZE = re.compile(r"^\s*([0-9.]+)\s*([kmgt]?i?b?)\s*$", re.IGNORECASE)
_UNITS = {
    "": 1,
    "b": 1,
    "k": 1e3,
    "kb": 1e3,
    "m": 1e6,
    "mb": 1e6,
    "g": 1e9,
    "gb": 1e9,
    "t": 1e12,
    "tb": 1e12,
    "ki": 2**10,
    "kib": 2**10,
    "mi": 2**20,
    "mib": 2**20,
    "gi": 2**30,
    "gib": 2**30,
    "ti": 2**40,
    "tib": 2**40,
}


def parse_bytes(value: Any, field: str) -> int:
    if isinstance(value, int) and value > 0:
        return value
    match = _SIZE.match(str(value))
    if not match or match.group(2).lower() not in _UNITS:
        raise ConfigFieldError("neuro config", field, f"must be a size such as 4GiB or 2000000000, got {value!r}")
    return int(float(match.group(1)) * _UNITS[match.group(2).lower()])


def _build(cls, section: str, overrides: Mapping[str, Any] | None):
    # Dask treats - and _ alike (DASK_NEURO__WORKER__CACHE_DIR arrives as cache_dir): so do we.
    raw = {k.replace("_", "-"): v for k, v in (dask.config.get(f"neuro.{section}", default={}) or {}).items()}
    raw.update({k.replace("_", "-"): v for k, v in (overrides or {}).items() if v is not None})
    known = {f.name.replace("_", "-"): f.name for f in fields(cls)}
    unknown = sorted(set(raw) - set(known))
    if unknown:
        raise ConfigFieldError(f"neuro.{section}", unknown[0], f"is not a setting; known: {', '.join(sorted(known))}")
    return cls(**{known[k]: v for k, v in raw.items()})


@dataclass(frozen=True)
class WorkerSettings:
    store: str | None = None
    cache_dir: str | None = None
    memory_budget: Any = "auto"
    device: str = "auto"
    backend: str = "torch"
    precision: str = "float32"
    owner: str = ""
    benchmark: bool = True
    adversary: Any = None
    # Idle-only volunteering (docs/distributed.md, neuro_dask/volunteer/idle_policy.py).
    idle_only: bool = False
    idle_interval: float = 2.0
    idle_busy_cpu: float = 50.0
    idle_resume_cpu: float = 25.0
    idle_busy_gpu: float = 30.0
    idle_resume_gpu: float = 10.0
    idle_busy_input: float = 60.0
    idle_resume_input: float = 120.0
    idle_busy_samples: int = 3
    idle_resume_samples: int = 5
    idle_min_pause: float = 30.0
    nice: int = 10
    max_threads: Any = "auto"
    vram_fraction: Any = "auto"
    relay: str | None = None  # HOST:PORT of a relay to listen through, behind a NAT (RelayedWorker)
    relay_punch: bool = True  # behind a relay: let callers the relay introduces dial in by hole punching

    BACKENDS = ("torch", "onnx")
    PRECISIONS = ("auto", "float32", "bfloat16", "int8", "int4")

    def __post_init__(self) -> None:
        if self.backend not in self.BACKENDS:
            raise ConfigFieldError("neuro.worker", "backend", f"must be torch or onnx, got {self.backend!r}")
        if self.precision not in self.PRECISIONS:
            raise ConfigFieldError(
                "neuro.worker", "precision", f"must be one of {', '.join(self.PRECISIONS)}, got {self.precision!r}"
            )
        if self.backend == "onnx" and self.precision not in ("auto", "float32"):
            raise ConfigFieldError(
                "neuro.worker",
                "precision",
                f"is {self.precision!r} but the onnx backend runs "
                "float32 experts; use backend torch for bfloat16, int8 or int4",
            )
        if self.device not in ("auto", "cpu", "cuda", "mps"):
            raise ConfigFieldError("neuro.worker", "device", f"must be auto, cpu, cuda or mps, got {self.device!r}")
        if not self.idle_interval > 0:
            raise ConfigFieldError("neuro.worker", "idle-interval", "must be a positive number of seconds")
        self.idle_policy()  # checks the thresholds
        if isinstance(self.nice, bool) or not isinstance(self.nice, int) or not 0 <= self.nice <= 19:
            raise ConfigFieldError("neuro.worker", "nice", f"must be an integer from 0 to 19, got {self.nice!r}")
        if self.max_threads not in (None, "auto") and (
            isinstance(self.max_threads, bool) or not isinstance(self.max_threads, int) or self.max_threads < 1
        ):
            raise ConfigFieldError(
                "neuro.worker", "max-threads", f"must be auto, null or a positive integer, got {self.max_threads!r}"
            )
        if self.vram_fraction not in (None, "auto") and (
            isinstance(self.vram_fraction, bool)
            or not isinstance(self.vram_fraction, (int, float))
            or not 0 < self.vram_fraction <= 1
        ):
            raise ConfigFieldError(
                "neuro.worker",
                "vram-fraction",
                f"must be auto, null or a fraction in (0, 1], got {self.vram_fraction!r}",
            )

        if self.relay is not None:
            relay_listen_address(self.relay, "neuro.worker")

    @classmethod
    def load(cls, **overrides) -> WorkerSettings:
        return _build(cls, "worker", overrides)

    def idle_policy(self):
        from neuro_dask.volunteer.idle_policy import IdlePolicy

        return IdlePolicy(
            self.idle_busy_cpu,
            self.idle_resume_cpu,
            self.idle_busy_gpu,
            self.idle_resume_gpu,
            self.idle_busy_input,
            self.idle_resume_input,
            self.idle_busy_samples,
            self.idle_resume_samples,
            self.idle_min_pause,
        )

    def threads(self, cores: int) -> int | None:
        """CPU threads for expert math: None = torch's default. auto = all but one core when idle-only."""
        if self.max_threads == "auto":
            return max(1, cores - 1) if self.idle_only else None
        return self.max_threads

    def vram_cap(self) -> float | None:
        """Fraction of each GPU's memory this worker may allocate: None = no cap. auto = 0.8 when idle-only."""
        if self.vram_fraction == "auto":
            return 0.8 if self.idle_only else None
        return None if self.vram_fraction is None else float(self.vram_fraction)

    def resolved_cache_dir(self) -> Path:
        return Path(os.path.expanduser(self.cache_dir or "~/.cache/neuro_dask"))

    def budget_bytes(self, available: int) -> int:
        return (
            available // 2 if self.memory_budget in (None, "auto") else parse_bytes(self.memory_budget, "memory-budget")
        )


@dataclass(frozen=True)
class SchedulerSettings:
    replicas: int = 2
    hot_extra_replicas: int = 1
    hot_threshold: float = 2.0
    trusted: tuple = ()
    reputation_file: str | None = None
    state_file: str | None = None  # published models and model channels, kept across restarts
    min_reputation: float = 0.5
    establish_after: int = 20
    version_adoption: str = "operator"  # operator | vote: who makes a channel's candidate current
    version_drain_seconds: float = 30.0
    version_lease_seconds: float = 600.0
    # Evidence, not claims (docs/security.md): tickets, holds, disputes and probes.
    free_tier: bool = False  # with a ledger: workers serve calls without a paid ticket too
    hold_seconds: float = 600.0  # a request's hold and ticket expire after this
    open_requests_per_client: int = 64  # requests one client may have open at once
    max_unproven_reports: int = 5  # refuted disputes within the window before a reporter is refused
    unproven_window: float = 3600.0
    probe_interval: float = 5.0  # a reported worker is probed at most this often
    probe_timeout: float = 10.0
    # A relay for volunteers behind a NAT (neuro_dask/relay/), in the scheduler's process.
    relay: str | None = None  # HOST:PORT to listen on; null: none (`neuro-dask relay` runs one alone)
    # A scheduler that shuts down tells each volunteer when to come back (volunteer/comeback.py):
    # this many a second, over at most comeback_spread seconds.
    comeback_rate: float = 20.0
    comeback_spread: float = 30.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "trusted", tuple(str(w) for w in self.trusted or ()))
        for name in ("hold_seconds", "unproven_window", "probe_interval", "probe_timeout", "comeback_rate"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ConfigFieldError(
                    "neuro.scheduler", name.replace("_", "-"), f"must be a positive number of seconds, got {value!r}"
                )
        if self.relay is not None:
            relay_listen_address(self.relay)
        spread = self.comeback_spread
        if isinstance(spread, bool) or not isinstance(spread, (int, float)) or not 0 <= spread <= 3600:
            raise ConfigFieldError("neuro.scheduler", "comeback-spread", f"must be 0 to 3600 seconds, got {spread!r}")
        for name in ("open_requests_per_client", "max_unproven_reports"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigFieldError(
                    "neuro.scheduler", name.replace("_", "-"), f"must be a positive integer, got {value!r}"
                )

    @classmethod
    def load(cls, **overrides) -> SchedulerSettings:
        return _build(cls, "scheduler", overrides)


def relay_listen_address(text: object, section: str = "neuro.scheduler") -> tuple[str, int]:
    """neuro.scheduler.relay (or `--neuro-relay`, `neuro-dask relay --listen`) and
    neuro.worker.relay: HOST:PORT, or :PORT for every interface."""
    host, sep, port = str(text).rpartition(":")
    if not isinstance(text, str) or not sep or not port.isdigit() or not 0 <= int(port) < 65536:
        raise ConfigFieldError(section, "relay", f"must be HOST:PORT or :PORT, got {text!r}")
    return (host.strip("[]") or "0.0.0.0"), int(port)


# Answers that travel as bfloat16 or float16 are rounded after the expert ran: two honest
# replicas may land a rounding step apart, so the validator allows two units in the last place.
WIRE_RTOL = {"bfloat16": 2.0**-6, "float16": 2.0**-9}


@dataclass(frozen=True)
class ClientSettings:
    transport: str = "direct"
    deadline: float = 10.0
    connect_timeout: float = 3.0
    suspect_cooldown: float = 30.0
    routes_refresh: float = 2.0
    trust: bool = False
    seed: int | None = None
    spot_check: float = 0.05
    min_quorum: int = 2
    max_total_replicas: int = 5
    max_error_replicas: int = 3
    atol: float = 1e-4
    rtol: float = 1e-3
    exact: bool = False
    hedge_quantile: float = 0.9
    hedge_cap: float = 0.1
    hedge_peer_factor: float = 2.0
    account: str | None = None
    missing_expert_wait: float = 20.0
    load_timeout: float = 120.0
    micro_batches: int = 1
    wire_dtype: str | None = None
    latency_aware: bool = True
    simulated_latency: Any = None
    speculative: str | None = None
    draft_max: int = 8
    relay_punch: bool = True  # reach a relayed volunteer directly by TCP hole punching where the NATs allow

    def trust_policy(self):
        """The trust cores' policies from these settings (each validates its own fields)."""
        from neuro_dask.trust.hedging import HedgePolicy
        from neuro_dask.trust.policy import TrustPolicy
        from neuro_dask.trust.quorum import QuorumPolicy
        from neuro_dask.trust.replication import ReplicationPolicy
        from neuro_dask.trust.validation import ValidationPolicy

        return TrustPolicy(
            QuorumPolicy(self.min_quorum, max(self.min_quorum, 2), self.max_total_replicas, self.max_error_replicas),
            ReplicationPolicy(spot_check=self.spot_check, min_quorum=self.min_quorum),
            ValidationPolicy(self.atol, max(self.rtol, WIRE_RTOL.get(self.wire_dtype, 0.0)), self.exact),
            HedgePolicy(
                hedge_quantile=self.hedge_quantile,
                hedge_cap=self.hedge_cap,
                peer_factor=self.hedge_peer_factor,
                min_deadline=min(0.5, self.deadline),
                max_deadline=self.deadline,
            ),
        )

    def __post_init__(self) -> None:
        if self.transport not in ("direct", "futures"):
            raise ConfigFieldError(
                "neuro.client", "transport", f"must be 'direct' or 'futures', got {self.transport!r}"
            )
        for name in (
            "deadline",
            "connect_timeout",
            "suspect_cooldown",
            "routes_refresh",
            "missing_expert_wait",
            "load_timeout",
        ):
            if not getattr(self, name) > 0:
                raise ConfigFieldError("neuro.client", name.replace("_", "-"), "must be a positive number of seconds")
        if isinstance(self.micro_batches, bool) or not isinstance(self.micro_batches, int) or self.micro_batches < 1:
            raise ConfigFieldError(
                "neuro.client", "micro-batches", f"must be a positive integer, got {self.micro_batches!r}"
            )
        if self.speculative not in (None, "off", "prompt-lookup", "self", "mtp"):
            raise ConfigFieldError(
                "neuro.client",
                "speculative",
                f"must be null, off, prompt-lookup, self or mtp, got {self.speculative!r}",
            )
        if isinstance(self.draft_max, bool) or not isinstance(self.draft_max, int) or not 1 <= self.draft_max <= 64:
            raise ConfigFieldError(
                "neuro.client", "draft-max", f"must be an integer in [1, 64], got {self.draft_max!r}"
            )
        if self.wire_dtype not in (None, "float32", "bfloat16", "float16"):
            raise ConfigFieldError(
                "neuro.client", "wire-dtype", f"must be null, float32, bfloat16 or float16, got {self.wire_dtype!r}"
            )

    @classmethod
    def load(cls, **overrides) -> ClientSettings:
        return _build(cls, "client", overrides)


@dataclass(frozen=True)
class SecuritySettings:
    """Hardened mode, TLS and the limits on what one peer may ask (docs/security.md)."""

    hardened: bool = False
    tls_dir: str | None = None
    max_message_bytes: Any = 268435456
    max_rows: int = 8192
    max_prompt_tokens: int = 8192
    max_new_tokens: int = 4096
    max_batch: int = 1024
    requests_per_minute: int = 600
    dashboard_token: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "max_message_bytes", parse_bytes(self.max_message_bytes, "max-message-bytes"))
        for name in ("max_rows", "max_prompt_tokens", "max_new_tokens", "max_batch"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigFieldError(
                    "neuro.security", name.replace("_", "-"), f"must be a positive integer, got {value!r}"
                )
        if not isinstance(self.requests_per_minute, int) or self.requests_per_minute < 0:
            raise ConfigFieldError(
                "neuro.security",
                "requests-per-minute",
                f"must be 0 (unlimited) or a positive integer, got {self.requests_per_minute!r}",
            )

    def __repr__(self) -> str:  # the token is a secret: never in a log line or a traceback
        token = "***" if self.dashboard_token else None
        return (
            f"SecuritySettings(hardened={self.hardened}, tls_dir={self.tls_dir!r}, "
            f"max_message_bytes={self.max_message_bytes}, max_rows={self.max_rows}, "
            f"max_prompt_tokens={self.max_prompt_tokens}, max_new_tokens={self.max_new_tokens}, "
            f"max_batch={self.max_batch}, requests_per_minute={self.requests_per_minute}, dashboard_token={token})"
        )

    @classmethod
    def load(cls, **overrides) -> SecuritySettings:
        return _build(cls, "security", overrides)
