"""Weight-only quantization of expert matrices: int8 per output channel, int4 per group.

Shape legend: n rows, O output features, K input features, G group size.

int8: symmetric, one scale per output row: w ~= q * scale, q in [-127, 127]. Run by torch's
`_weight_int8pack_mm` with bfloat16 activations (its float32 path is ~10-20x slower on x86 CPUs;
benchmarks/bench_backends.py), falling back to dequantize-then-matmul where the op is missing.
int4: asymmetric, one (scale, zero) per group of G input features of each output row, run by
`_weight_int4pack_mm_for_cpu` (bfloat16 activations) on a CPU, else dequantized on the fly.
Quantization happens on the worker at load time, from the sha256-verified float file.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from neuro_dask.errors import ConfigError

INT4_GROUP = 64
_INT4_KERNEL_GROUPS = (32, 64, 128, 256)


def int4_group(k: int, preferred: int = INT4_GROUP) -> int:
    """The preferred group size if it divides the input width k, else the largest of 32, 16, 8 that does."""
    for group in (preferred, 32, 16, 8):
        if k % group == 0:
            return group
    raise ConfigError(f"int4 needs an input width divisible by 8, got {k}; use int8 for this model")


def _has(op: str) -> bool:
    return hasattr(torch, op)


@dataclass(frozen=True)
class Int8Linear:
    """w [O, K] ~= qweight [O, K] (int8) * scales [O]."""

    qweight: torch.Tensor
    scales: torch.Tensor  # bfloat16 [O]: the packed kernel takes the activations' dtype

    @classmethod
    def quantize(cls, w: torch.Tensor) -> Int8Linear:
        w = w.float()
        # Codes from the bfloat16-rounded scale the kernel will use, rounded up so no code clips.
        scales = (w.abs().amax(dim=1) / 127.0).clamp(min=1e-12)
        scales = _bf16_ceil(scales)
        q = torch.clamp(torch.round(w / scales.float()[:, None]), -127, 127).to(torch.int8)
        return cls(q.contiguous(), scales)

    def nbytes(self) -> int:
        return _nbytes(self.qweight, self.scales)

    def dequantize(self) -> torch.Tensor:
        return self.qweight.float() * self.scales.float()[:, None]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """x [n, K] -> [n, O] in bfloat16 (the kernel's accumulation is float32)."""
        xb = x.to(self.qweight.device, torch.bfloat16)  # the weights' device (a CUDA worker's rows arrive on CPU)
        if self.qweight.device.type == "cpu" and _has("_weight_int8pack_mm"):
            return torch._weight_int8pack_mm(xb, self.qweight, self.scales)
        return F.linear(xb, self.qweight.to(torch.bfloat16)) * self.scales


@dataclass(frozen=True)
class Int4Linear:
    """w [O, K] ~= (q - 8) * scale + zero per group of `group` input features, q in [0, 15]."""

    packed: torch.Tensor  # the CPU kernel's layout (uint8 [O, K/2]); else one uint8 code per weight [O, K]
    scales_zeros: torch.Tensor  # bfloat16 [K/G, O, 2]
    group: int
    shape: tuple[int, int]
    kernel: bool  # packed for _weight_int4pack_mm_for_cpu

    @classmethod
    def quantize(cls, w: torch.Tensor, group: int = INT4_GROUP) -> Int4Linear:
        out, k = w.shape
        group = int4_group(k, group)
        wg = w.float().reshape(out, k // group, group)
        low, high = wg.amin(-1, keepdim=True), wg.amax(-1, keepdim=True)
        scale = ((high - low) / 15.0).clamp(min=1e-12)
        q = torch.clamp(torch.round((wg - low) / scale), 0, 15).to(torch.int32).reshape(out, k)
        zero = low + 8 * scale
        sz = torch.stack([scale.squeeze(-1), zero.squeeze(-1)], dim=-1).transpose(0, 1).contiguous()
        kernel = (
            w.device.type == "cpu"
            and group in _INT4_KERNEL_GROUPS
            and _has("_convert_weight_to_int4pack_for_cpu")
            and _has("_weight_int4pack_mm_for_cpu")
        )
        packed = torch._convert_weight_to_int4pack_for_cpu(q, 1) if kernel else q.to(torch.uint8)
        return cls(packed.contiguous(), sz.to(torch.bfloat16), group, (out, k), kernel)

    def nbytes(self) -> int:
        return _nbytes(self.packed, self.scales_zeros)

    def _packed_for_cpu(self) -> bool:
        return self.kernel

    def dequantize(self) -> torch.Tensor:
        if self._packed_for_cpu():
            eye = torch.eye(self.shape[1], dtype=torch.bfloat16)
            return torch._weight_int4pack_mm_for_cpu(eye, self.packed, self.group, self.scales_zeros).float().T
        out, k = self.shape
        sz = self.scales_zeros.float()  # [K/G, O, 2]
        scale, zero = sz[..., 0].T.unsqueeze(-1), sz[..., 1].T.unsqueeze(-1)  # [O, K/G, 1]
        q = self.packed.reshape(out, k // self.group, self.group).float()
        return ((q - 8) * scale + zero).reshape(out, k)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        xb = x.to(self.packed.device, torch.bfloat16)
        if self._packed_for_cpu():
            return torch._weight_int4pack_mm_for_cpu(xb, self.packed, self.group, self.scales_zeros)
        return F.linear(xb, self.dequantize().to(xb.device, torch.bfloat16))


QuantizedLinear = Int8Linear | Int4Linear


@dataclass(frozen=True)
class QuantizedExpert:
    """A SwiGLU expert whose three matrices are quantized; callable like run_expert."""

    gate_proj: QuantizedLinear
    up_proj: QuantizedLinear
    down_proj: QuantizedLinear
    precision: str

    def nbytes(self) -> int:
        return sum(m.nbytes() for m in (self.gate_proj, self.up_proj, self.down_proj))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """x [n, D] -> [n, D] in x's dtype."""
        h = F.silu(self.gate_proj(x)) * self.up_proj(x)
        return self.down_proj(h).to(x.dtype)


def quantize_expert(
    gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor, precision: str, group: int = INT4_GROUP
) -> QuantizedExpert:
    if precision == "int8":
        return QuantizedExpert(Int8Linear.quantize(gate), Int8Linear.quantize(up), Int8Linear.quantize(down), "int8")
    if precision == "int4":
        return QuantizedExpert(
            Int4Linear.quantize(gate, group), Int4Linear.quantize(up, group), Int4Linear.quantize(down, group), "int4"
        )
    raise ConfigError(f"precision {precision!r} is not a quantized precision; use int8 or int4")


def _bf16_ceil(x: torch.Tensor) -> torch.Tensor:
    """The smallest bfloat16 >= x (positive x)."""
    b = x.to(torch.bfloat16)
    low = b.float() < x
    return torch.where(low, torch.nextafter(b, torch.full_like(b, float("inf"))), b)


def _nbytes(*tensors: torch.Tensor) -> int:
    return sum(t.element_size() * t.numel() for t in tensors)
