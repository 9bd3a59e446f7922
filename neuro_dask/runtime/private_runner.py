"""The worker's side of the private tier: an expert's linear maps on secret shares.

A worker receives one additive share of each row (uniformly random int64 ring elements,
neuro_dask/privacy/sharing.py) and applies integer-encoded weights W_int = round(W * 2^f)
in Z_2^64 (int64 matmul, wrapping): step "gate_up" -> [gate | up] share, step "down" -> the
down projection's share. The non-linearity (silu(gate) * up) runs on the client, which alone
ever sees a reconstructed value. No Dask here: plugins/neuro_worker.py calls `serve_share`
from its `neuro_expert_share` handler, off the event loop.

Integer weights are built from the expert's verified file (the host's disk cache, so the same
weights whatever precision the standard tier runs at) and kept in a small LRU of their own:
2x the float32 bytes, not counted in the worker's memory budget (docs/privacy.md).

Shape legend: n rows, D hidden, I expert intermediate.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from neuro_dask.errors import NeuroDaskError
from neuro_dask.model.moe import ExpertWeights
from neuro_dask.privacy.fixed_point import encode, limb_exact, ring_matmul, ring_matmul_limbs
from neuro_dask.privacy.share_wire import ShareRequest, decode_share_request, encode_share_response
from neuro_dask.protocol.wire import WireFormatError, encode_error
from neuro_dask.runtime.expert_host import ExpertHost, ExpertNotHostedError
from neuro_dask.store.expert_files import (
    ExpertLayoutError,
    describe_refusal,
    is_swiglu,
    read_expert_tensors,
    swiglu_weights,
)
from neuro_dask.store.manifest import LAYOUT_TRANSFORMERS
from neuro_dask.store.shard_store import read_expert_file

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class IntegerExpert:
    """Integer-encoded SwiGLU weights, transposed for row-major shares. On a CUDA device the
    weights are kept there as float64 and products use exact 16-bit limb GEMMs
    (fixed_point.ring_matmul_limbs); on the CPU, torch's wrapping int64 matmul."""

    gate_up_t: torch.Tensor  # [D, 2I] int64 on the CPU, float64 on a CUDA device: gate then up
    down_t: torch.Tensor  # [I, D]
    frac_bits: int

    @classmethod
    def from_weights(cls, w: ExpertWeights, frac_bits: int, device: str | torch.device = "cpu") -> IntegerExpert:
        gate_up = torch.cat([encode(w.gate_proj, frac_bits), encode(w.up_proj, frac_bits)]).t().contiguous()  # [D, 2I]
        down = encode(w.down_proj, frac_bits).t().contiguous()
        device = torch.device(device)
        if device.type == "cuda" and limb_exact(gate_up) and limb_exact(down):
            return cls(gate_up.to(device, torch.float64), down.to(device, torch.float64), frac_bits)
        return cls(gate_up, down, frac_bits)

    @property
    def device(self) -> torch.device:
        return self.gate_up_t.device

    @property
    def hidden(self) -> int:
        return int(self.gate_up_t.shape[0])

    @property
    def intermediate(self) -> int:
        return int(self.down_t.shape[0])

    def nbytes(self) -> int:
        return 8 * (self.gate_up_t.numel() + self.down_t.numel())

    def apply(self, step: str, share: torch.Tensor) -> torch.Tensor:
        """share [n, D] -> [n, 2I] (gate_up), or [n, I] -> [n, D] (down); all in Z_2^64."""
        weights = self.gate_up_t if step == "gate_up" else self.down_t
        if share.shape[1] != weights.shape[0]:
            raise WireFormatError(
                f"step {step}: share rows of width {share.shape[1]}, the expert takes {weights.shape[0]}"
            )
        if weights.dtype == torch.float64:
            return ring_matmul_limbs(share.to(weights.device), weights).cpu()
        return ring_matmul(share, weights)


class PrivateExpertHost:
    """Integer experts for the experts an ExpertHost is assigned, built on demand."""

    def __init__(self, host: ExpertHost, max_experts: int = 64):
        self.host = host
        self.max_experts = max_experts
        self._experts: OrderedDict[tuple[str, int, int, int], IntegerExpert] = OrderedDict()
        self._lock = threading.Lock()
        self.calls_served = 0

    def expert(self, model_id: str, layer: int, expert: int, frac_bits: int) -> IntegerExpert:
        key = (model_id, layer, expert, frac_bits)
        with self._lock:
            if key in self._experts:
                self._experts.move_to_end(key)
                return self._experts[key]
        with self.host._lock:
            model = self.host.models.get(model_id)
            hosted = model is not None and (layer, expert) in model.assigned
        if not hosted:
            raise ExpertNotHostedError(model_id, layer, expert)
        path = self.host.cache.fetch(model.store_url, model.manifest.expert(layer, expert))  # verified, cached
        built = IntegerExpert.from_weights(_swiglu(path, model), frac_bits, self.host.device)
        with self._lock:
            self._experts[key] = built
            while len(self._experts) > self.max_experts:
                self._experts.popitem(last=False)
        return built

    def run(self, request: ShareRequest) -> dict[int, torch.Tensor]:
        outputs = {
            e: self.expert(request.model, request.layer, e, request.frac_bits).apply(request.step, rows)
            for e, rows in request.inputs.items()
        }
        with self._lock:
            self.calls_served += 1
        return outputs


def _swiglu(path, model) -> ExpertWeights:
    """Secret shares pass through linear maps and a SiLU-gated product only: plain SwiGLU experts
    (of either store layout). Others are refused with the reason (ExpertLayoutError)."""
    if model.manifest.layout == LAYOUT_TRANSFORMERS:
        spec = model.manifest.experts_spec or {}
        if not is_swiglu(spec):
            raise ExpertLayoutError(
                f"the private tier cannot run these experts: {describe_refusal(spec)}; "
                "secret shares need plain SwiGLU experts"
            )
        return swiglu_weights(read_expert_tensors(path, spec), spec)
    return read_expert_file(path, model.config)


def serve_share(
    private: PrivateExpertHost,
    msg: Any,
    max_rows: int,
    tamper: Callable[[int, dict[int, torch.Tensor]], dict[int, torch.Tensor]] | None = None,
) -> dict[str, Any]:
    """One share call -> its response. Never raises: no exception is ever pickled to a client.
    `tamper(layer, outputs)`: drills only (an adversarial worker's wrong answers)."""
    try:
        started = time.perf_counter()
        request = decode_share_request(msg, max_rows=max_rows)
        outputs = private.run(request)
        if tamper is not None:
            outputs = tamper(request.layer, outputs)
        return encode_share_response(outputs, time.perf_counter() - started)
    except (NeuroDaskError, WireFormatError) as exc:
        return encode_error(str(exc))
    except Exception as exc:
        log.exception("share call failed")
        return encode_error(f"{type(exc).__name__}: {exc}")
