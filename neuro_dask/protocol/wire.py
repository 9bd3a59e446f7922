"""Expert calls on the wire: one raw array frame plus a small header of plain msgpack types.

A request carries every row one worker must process for one layer: the experts, how many rows
each, and one contiguous [N, D] buffer. A response carries the outputs in the same order. Only
ints, strings, lists and bytes cross the wire, so nothing a peer sends is ever unpickled, and
every field is checked before a byte of it is trusted.

Shape legend: N rows in the call, D hidden size.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from neuro_dask.errors import NeuroDaskError

# torch warns that a tensor over received (immutable) bytes is not writable: ours never write.
warnings.filterwarnings("ignore", message="The given buffer is not writable", category=UserWarning)

WIRE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_DTYPE_NAMES = {v: k for k, v in WIRE_DTYPES.items()}
MAX_ROWS = 1 << 20
MAX_HIDDEN = 1 << 18  # far above any model's hidden size; torch.empty(0, 2**63) would not raise our error


class WireFormatError(NeuroDaskError):
    """A peer sent a malformed expert request or response; the call is treated as failed."""


@dataclass(frozen=True)
class ExpertRequest:
    model: str
    layer: int
    inputs: dict[int, torch.Tensor]  # expert -> rows [n_e, D], ascending expert id


def _pack_rows(groups: Mapping[int, torch.Tensor]) -> tuple[list[int], list[int], str, int, memoryview]:
    experts = list(groups)
    counts = [int(groups[e].shape[0]) for e in experts]
    first = groups[experts[0]]
    rows = torch.cat([groups[e] for e in experts]) if len(experts) > 1 else first
    # A view of the rows' own memory (it keeps them alive): msgpack copies it once into the
    # message, and no copy is made before that.
    data = memoryview(rows.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy())
    return experts, counts, _DTYPE_NAMES[first.dtype], int(first.shape[1]), data


def _unpack_rows(
    msg: Mapping[str, Any], hidden: int | None = None, max_rows: int = MAX_ROWS
) -> dict[int, torch.Tensor]:
    try:
        experts, counts = list(msg["experts"]), list(msg["counts"])
        dtype = WIRE_DTYPES[msg["dtype"]]
        width, data = int(msg["hidden"]), msg["data"]
    except (KeyError, TypeError, ValueError, OverflowError) as exc:  # OverflowError: hidden = inf
        raise WireFormatError(f"malformed expert message: missing or bad field ({exc!r})") from None
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise WireFormatError(f"expert message data must be bytes, got {type(data).__name__}")
    if hidden is not None and width != hidden:
        raise WireFormatError(f"hidden size {width} differs from the expected {hidden}")
    if len(experts) != len(counts) or any(isinstance(c, bool) or not isinstance(c, int) or c < 0 for c in counts):
        raise WireFormatError("expert message has mismatched experts/counts")
    if any(isinstance(e, bool) or not isinstance(e, int) or e < 0 for e in experts) or len(set(experts)) != len(
        experts
    ):
        raise WireFormatError("expert message must name distinct experts by integer id")
    total = sum(counts)
    if total > max_rows or not 0 < width <= MAX_HIDDEN:
        raise WireFormatError(f"expert message of {total} rows x {width} is out of bounds")
    itemsize = torch.empty((), dtype=dtype).element_size()
    if len(data) != total * width * itemsize:
        raise WireFormatError(f"expert message has {len(data)} bytes, header implies {total * width * itemsize}")
    # Over the received bytes themselves, no copy: every reader of these rows (the expert, the
    # router's combine, the validator) only reads them.
    rows = torch.frombuffer(data, dtype=dtype).reshape(total, width) if total else torch.empty(0, width, dtype=dtype)
    return dict(zip((int(e) for e in experts), torch.split(rows, counts), strict=True))


def encode_request(
    model: str, layer: int, groups: Mapping[int, torch.Tensor], call: str | None = None
) -> dict[str, Any]:
    """`call` names the request so that a worker can be told to drop it (a lost hedge race)."""
    experts, counts, dtype, hidden, data = _pack_rows(groups)
    msg = {
        "model": model,
        "layer": int(layer),
        "experts": experts,
        "counts": counts,
        "dtype": dtype,
        "hidden": hidden,
        "data": data,
    }
    if call is not None:
        msg["call"] = str(call)
    return msg


def decode_request(msg: Mapping[str, Any], max_rows: int = MAX_ROWS) -> ExpertRequest:
    """`max_rows` is the worker's neuro.security.max-rows: a bigger call is refused before any compute."""
    if not isinstance(msg, Mapping):
        raise WireFormatError(f"expert request must be a mapping, got {type(msg).__name__}")
    model, layer = msg.get("model"), msg.get("layer")
    if not isinstance(model, str) or not isinstance(layer, int):
        raise WireFormatError("expert request needs a string 'model' and an integer 'layer'")
    return ExpertRequest(model, layer, _unpack_rows(msg, max_rows=max_rows))


def encode_response(outputs: Mapping[int, torch.Tensor]) -> dict[str, Any]:
    experts, counts, dtype, hidden, data = _pack_rows(outputs)
    return {"status": "OK", "experts": experts, "counts": counts, "dtype": dtype, "hidden": hidden, "data": data}


def encode_error(message: str) -> dict[str, Any]:
    return {"status": "error", "message": str(message)[:2000]}


def decode_response(msg: Any, sent: Mapping[int, torch.Tensor]) -> dict[int, torch.Tensor]:
    """Outputs keyed by expert; exactly the experts sent, each with its input's shape and dtype,
    and every value finite: a worker's answer is data, checked before the router combines it."""
    if not isinstance(msg, Mapping):
        raise WireFormatError(f"expert response must be a mapping, got {type(msg).__name__}")
    if msg.get("status") != "OK":
        raise WireFormatError(f"worker refused the call: {msg.get('message', msg.get('status'))!s:.500}")
    first = next(iter(sent.values()))
    outputs = _unpack_rows(msg, hidden=int(first.shape[1]))
    if sorted(outputs) != sorted(sent):
        raise WireFormatError(f"response covers experts {sorted(outputs)}, request sent {sorted(sent)}")
    for e, rows in outputs.items():
        if rows.shape != sent[e].shape:
            raise WireFormatError(f"expert {e}: response rows {tuple(rows.shape)} for request {tuple(sent[e].shape)}")
        if rows.numel() and not bool(torch.isfinite(rows).all()):
            raise WireFormatError(f"expert {e}: the response holds NaN or infinite values")
    return {e: rows.to(first.dtype) for e, rows in outputs.items()}
