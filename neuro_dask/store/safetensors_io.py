"""Streaming safetensors reading and writing with bounded memory, plus sha256 of what is written.

`safetensors.torch.save_file` needs every tensor of a file in memory at once; a trunk of a large
model would then cost its full size in RAM. StreamingWriter writes the header from shapes alone
and then one tensor at a time, hashing as it goes, so peak memory is one tensor.
"""

from __future__ import annotations

import hashlib
import json
import math
import struct
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch

from neuro_dask.errors import IntegrityError, TruncatedFileError

DTYPE_NAMES = {
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.float64: "F64",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
    torch.float8_e4m3fn: "F8_E4M3",
    torch.float8_e5m2: "F8_E5M2",
}
_TORCH_DTYPES = {v: k for k, v in DTYPE_NAMES.items()}
_HASH_CHUNK = 1 << 22


class StreamingWriter:
    """Write a safetensors file whose tensor names, dtypes and shapes are known up front."""

    def __init__(
        self,
        path: Path,
        specs: Iterable[tuple[str, torch.dtype, tuple[int, ...]]],
        metadata: dict[str, str] | None = None,
    ):
        self.path = Path(path)
        self.specs = list(specs)
        header: dict[str, object] = {}
        offset = 0
        for name, dtype, shape in self.specs:
            nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
            header[name] = {
                "dtype": DTYPE_NAMES[dtype],
                "shape": list(shape),
                "data_offsets": [offset, offset + nbytes],
            }
            offset += nbytes
        if metadata:
            header["__metadata__"] = metadata
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # the format aligns tensor data to 8 bytes
        self._prefix = struct.pack("<Q", len(raw)) + raw
        self._next = 0
        self.bytes = len(self._prefix) + offset
        self.sha256 = ""

    def write(self, tensors: Iterator[torch.Tensor]) -> None:
        """Consume tensors in spec order; write to a temp file, rename when complete."""
        digest = hashlib.sha256(self._prefix)
        tmp = self.path.with_name(self.path.name + ".partial")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as fh:
            fh.write(self._prefix)
            for (name, dtype, shape), tensor in zip(self.specs, tensors, strict=True):
                if tensor.dtype != dtype or tuple(tensor.shape) != tuple(shape):
                    raise ValueError(f"{name}: got {tensor.dtype} {tuple(tensor.shape)}, declared {dtype} {shape}")
                data = tensor.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy()
                digest.update(data)
                fh.write(memoryview(data))
                del data, tensor
        tmp.replace(self.path)
        self.sha256 = digest.hexdigest()


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def verify_sha256(path: Path, expected: str) -> None:
    actual = sha256_file(path)
    if actual != expected:
        raise IntegrityError(str(path), expected, actual)


# torch refuses sizes past int64 and strides that overflow; an empty tensor ([0, 2**62]) has 0
# bytes, so the byte count alone does not catch them. No real tensor comes near these.
_MAX_DIM = 1 << 40
_MAX_DIMS = 8


def _entry_problem(entry: object) -> str | None:
    """Why one header entry cannot describe a tensor (files may come from untrusted mirrors)."""
    if not isinstance(entry, dict):
        return "not an object"
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in _TORCH_DTYPES:
        return f"unknown dtype {dtype!r}"
    if (
        not isinstance(shape, list)
        or len(shape) > _MAX_DIMS
        or any(isinstance(d, bool) or not isinstance(d, int) or not 0 <= d <= _MAX_DIM for d in shape)
    ):
        return f"shape {shape!r} is not a list of at most {_MAX_DIMS} sizes below 2**40"
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or any(isinstance(o, bool) or not isinstance(o, int) for o in offsets)
        or not 0 <= offsets[0] <= offsets[1]
    ):
        return f"data_offsets {offsets!r} are not [begin, end]"
    numel = 1
    for d in shape:
        numel *= d
    if offsets[1] - offsets[0] != numel * torch.empty((), dtype=_TORCH_DTYPES[dtype]).element_size():
        return f"{offsets[1] - offsets[0]} bytes for a {dtype} tensor of shape {shape}"
    return None


class SafetensorsFile:
    """A safetensors file read with plain positioned reads (no mmap).

    Reading through mmap leaves every touched page resident for as long as the file stays open,
    so sharding a 100 GB checkpoint would show 100 GB of RSS. Here each read copies exactly one
    tensor (or one expert's slice of a stacked tensor, which is contiguous) into fresh memory.
    """

    def __init__(self, path: Path):
        self.path = Path(path)
        try:
            size = self.path.stat().st_size
            with open(self.path, "rb") as fh:
                (n,) = struct.unpack("<Q", fh.read(8))
                if n > size - 8:
                    raise ValueError(f"header of {n} bytes in a {size}-byte file")
                header = json.loads(fh.read(n))
        except FileNotFoundError:
            raise TruncatedFileError(str(path), "file does not exist") from None
        except (struct.error, ValueError, UnicodeDecodeError) as exc:
            raise TruncatedFileError(str(path), f"bad header: {exc}") from exc
        except RecursionError:  # "[[[[..." from an untrusted mirror: no real header nests
            raise TruncatedFileError(str(path), "bad header: nested too deeply") from None
        if not isinstance(header, dict):
            raise TruncatedFileError(str(path), f"bad header: a JSON object is needed, not {type(header).__name__}")
        metadata = header.pop("__metadata__", None) or {}
        if not isinstance(metadata, dict):
            raise TruncatedFileError(str(path), "bad header: __metadata__ must be an object")
        self.metadata = metadata
        self._data_start = 8 + n
        self._entries = header
        for name, entry in header.items():
            problem = _entry_problem(entry)
            if problem:
                raise TruncatedFileError(str(path), f"bad header entry for {name!r}: {problem}")
            if self._data_start + entry["data_offsets"][1] > size:
                raise TruncatedFileError(
                    str(path),
                    f"tensor {name!r} ends at byte {self._data_start + entry['data_offsets'][1]}, file has {size}",
                )

    def keys(self) -> list[str]:
        return list(self._entries)

    def spec(self, name: str) -> tuple[torch.dtype, tuple[int, ...]]:
        entry = self._entries[name]
        return _TORCH_DTYPES[entry["dtype"]], tuple(entry["shape"])

    def read(self, name: str, index: int | None = None, half: int | None = None) -> torch.Tensor:
        """The tensor, or its [index] slice along dim 0, optionally one half of that slice's rows."""
        dtype, shape = self.spec(name)
        begin, end = self._entries[name]["data_offsets"]
        if index is not None:
            if not 0 <= index < shape[0]:
                raise IndexError(f"{name}: index {index} outside dim 0 of size {shape[0]}")
            step = (end - begin) // shape[0]
            begin, shape = begin + index * step, shape[1:]
            end = begin + step
        if half is not None:
            step = (end - begin) // 2
            begin, shape = begin + half * step, (shape[0] // 2, *shape[1:])
            end = begin + step
        buf = bytearray(end - begin)
        with open(self.path, "rb") as fh:
            fh.seek(self._data_start + begin)
            if fh.readinto(buf) != len(buf):
                raise TruncatedFileError(str(self.path), f"short read of tensor {name!r}")
        if not buf:
            return torch.empty(shape, dtype=dtype)
        return torch.frombuffer(buf, dtype=dtype).reshape(shape)


def read_tensors(path: Path, names: Iterable[str] | None = None) -> dict[str, torch.Tensor]:
    f = SafetensorsFile(path)
    return {k: f.read(k) for k in (f.keys() if names is None else names)}
