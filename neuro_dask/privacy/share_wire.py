"""Share calls on the wire: one raw int64 frame plus a header of plain msgpack types (as protocol/wire.py).

A request carries one worker's shares for one layer and one step of the private expert:
  step "gate_up": rows [n_e, D] of input shares -> rows [n_e, 2I] (gate then up, scale 2^(2f))
  step "down":    rows [n_e, I] of hidden shares -> rows [n_e, D]  (scale 2^(2f))
Only ints, strings, lists and bytes cross the wire; nothing is unpickled, every field is
checked before a byte of it is trusted. No Dask here.

Shape legend: n_e rows of expert e, D hidden, I expert intermediate.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from neuro_dask.protocol.wire import MAX_HIDDEN, MAX_ROWS, WireFormatError

STEPS = ("gate_up", "down")


@dataclass(frozen=True)
class ShareRequest:
    model: str
    layer: int
    step: str
    frac_bits: int
    inputs: dict[int, torch.Tensor]  # expert -> int64 share rows [n_e, width]


def _pack(groups: Mapping[int, torch.Tensor]) -> dict[str, Any]:
    experts = list(groups)
    counts = [int(groups[e].shape[0]) for e in experts]
    rows = torch.cat([groups[e] for e in experts]) if len(experts) > 1 else groups[experts[0]]
    if rows.dtype != torch.int64:
        raise TypeError(f"shares must be int64, got {rows.dtype}")
    data = memoryview(rows.contiguous().reshape(-1).view(torch.uint8).numpy())
    return {"experts": experts, "counts": counts, "width": int(rows.shape[1]), "data": data}


def _unpack(msg: Mapping[str, Any], max_rows: int = MAX_ROWS) -> dict[int, torch.Tensor]:
    try:
        experts, counts = list(msg["experts"]), list(msg["counts"])
        width, data = int(msg["width"]), msg["data"]
    except (KeyError, TypeError, ValueError, OverflowError) as exc:
        raise WireFormatError(f"malformed share message: missing or bad field ({exc!r})") from None
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise WireFormatError(f"share message data must be bytes, got {type(data).__name__}")
    if len(experts) != len(counts) or any(isinstance(c, bool) or not isinstance(c, int) or c < 0 for c in counts):
        raise WireFormatError("share message has mismatched experts/counts")
    if any(isinstance(e, bool) or not isinstance(e, int) or e < 0 for e in experts) or len(set(experts)) != len(
        experts
    ):
        raise WireFormatError("share message must name distinct experts by integer id")
    total = sum(counts)
    if total > max_rows or not 0 < width <= 4 * MAX_HIDDEN:
        raise WireFormatError(f"share message of {total} rows x {width} is out of bounds")
    if len(data) != total * width * 8:
        raise WireFormatError(f"share message has {len(data)} bytes, header implies {total * width * 8}")
    rows = (
        torch.frombuffer(data, dtype=torch.int64).reshape(total, width)
        if total
        else torch.empty(0, width, dtype=torch.int64)
    )
    return dict(zip((int(e) for e in experts), torch.split(rows, counts), strict=True))


def encode_share_request(
    model: str, layer: int, step: str, frac_bits: int, groups: Mapping[int, torch.Tensor]
) -> dict[str, Any]:
    if step not in STEPS:
        raise ValueError(f"step must be one of {STEPS}, got {step!r}")
    return {"model": model, "layer": int(layer), "step": step, "frac_bits": int(frac_bits), **_pack(groups)}


def decode_share_request(msg: Any, max_rows: int = MAX_ROWS) -> ShareRequest:
    if not isinstance(msg, Mapping):
        raise WireFormatError(f"share request must be a mapping, got {type(msg).__name__}")
    model, layer, step, frac_bits = msg.get("model"), msg.get("layer"), msg.get("step"), msg.get("frac_bits")
    if not isinstance(model, str) or not isinstance(layer, int) or isinstance(layer, bool):
        raise WireFormatError("share request needs a string 'model' and an integer 'layer'")
    if step not in STEPS:
        raise WireFormatError(f"share request step must be one of {STEPS}, got {step!r:.50}")
    if not isinstance(frac_bits, int) or isinstance(frac_bits, bool) or not 0 <= frac_bits <= 30:
        raise WireFormatError("share request needs an integer 'frac_bits' in [0, 30]")
    return ShareRequest(model, layer, step, frac_bits, _unpack(msg, max_rows))


def encode_share_response(outputs: Mapping[int, torch.Tensor], compute_s: float = 0.0) -> dict[str, Any]:
    return {"status": "OK", "compute_s": float(compute_s), **_pack(outputs)}


def decode_share_response(msg: Any, sent: Mapping[int, torch.Tensor], width: int | None) -> dict[int, torch.Tensor]:
    """Outputs keyed by expert: exactly the experts sent, each with its rows and `width` columns
    (None: any width, the caller compares the two shares')."""
    if not isinstance(msg, Mapping):
        raise WireFormatError(f"share response must be a mapping, got {type(msg).__name__}")
    if msg.get("status") != "OK":
        raise WireFormatError(f"worker refused the share call: {msg.get('message', msg.get('status'))!s:.500}")
    outputs = _unpack(msg)
    if sorted(outputs) != sorted(sent):
        raise WireFormatError(f"share response covers experts {sorted(outputs)}, request sent {sorted(sent)}")
    for e, rows in outputs.items():
        expected = (sent[e].shape[0], rows.shape[1] if width is None else width)
        if tuple(rows.shape) != expected:
            raise WireFormatError(f"expert {e}: share response rows {tuple(rows.shape)}, expected {expected}")
    return outputs
