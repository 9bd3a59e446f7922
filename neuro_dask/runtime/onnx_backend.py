"""ONNX Runtime expert backend: one small graph per expert, weights as initializers.

Graph (opset 17), D hidden, I intermediate, n rows:
    gu = MatMul(x [n, D], W_gu [D, 2I]);  g, u = Split(gu)
    y  = MatMul(g * Sigmoid(g) * u, W_down [I, D])
Gate and up are one fused matmul. Weights are initializers, not inputs, so that ONNX Runtime
prepacks them once per session (weights as inputs of one shared graph per shape ran ~1.5-3x
slower on CPU: benchmarks/bench_backends.py measures both).

Exported graphs are cached next to the worker's expert files, content-addressed by the expert
file's sha256 and EXPORTER_VERSION: cache_dir/onnx/<sha[:2]>/<sha>-x<version>.onnx. The graph
is built from the sha256-verified float file, so a cached graph is as trusted as the file.
Execution provider: the first of PREFERRED_PROVIDERS that onnxruntime lists, CPU otherwise.
"""

from __future__ import annotations

import logging
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from neuro_dask.errors import NeuroDaskError
from neuro_dask.model.moe import ExpertWeights

log = logging.getLogger(__name__)

EXPORTER_VERSION = 1
OPSET = 17
PREFERRED_PROVIDERS = (
    "CUDAExecutionProvider",
    "CoreMLExecutionProvider",
    "OpenVINOExecutionProvider",
    "DmlExecutionProvider",
    "CPUExecutionProvider",
)


class OnnxUnavailableError(NeuroDaskError):
    def __init__(self, missing: str):
        self.missing = missing
        super().__init__(
            f"the onnx backend needs the {missing!r} package: `pip install onnx onnxruntime` "
            "(or onnxruntime-gpu / onnxruntime-openvino / onnxruntime-directml), "
            "or set neuro.worker.backend to torch"
        )

    def __reduce__(self):
        return type(self), (self.missing,)


def pick_providers(available: list[str] | tuple[str, ...] | None = None) -> list[str]:
    """The best available execution provider first, CPU always last as the fallback."""
    if available is None:
        available = _ort().get_available_providers()
    chosen = [p for p in PREFERRED_PROVIDERS if p in available and p != "CPUExecutionProvider"]
    return chosen[:1] + ["CPUExecutionProvider"]


def _ort():
    try:
        import onnxruntime
    except ImportError as exc:
        raise OnnxUnavailableError("onnxruntime") from exc
    return onnxruntime


def _onnx():
    try:
        import onnx
    except ImportError as exc:
        raise OnnxUnavailableError("onnx") from exc
    return onnx


def expert_graph(weights: ExpertWeights, weights_as_inputs: bool = False) -> bytes:
    """Serialized ONNX model of one SwiGLU expert (float32)."""
    onnx = _onnx()
    from onnx import TensorProto, helper, numpy_helper

    inter, hidden = weights.gate_proj.shape
    w_gu = torch.cat([weights.gate_proj, weights.up_proj], dim=0).T.float().contiguous().numpy()  # [D, 2I]
    w_down = weights.down_proj.T.float().contiguous().numpy()  # [I, D]
    split = numpy_helper.from_array(np.array([inter, inter], dtype=np.int64), "split")
    nodes = [
        helper.make_node("MatMul", ["x", "w_gu"], ["gu"]),
        helper.make_node("Split", ["gu", "split"], ["g", "u"], axis=1),
        helper.make_node("Sigmoid", ["g"], ["sg"]),
        helper.make_node("Mul", ["g", "sg"], ["act"]),
        helper.make_node("Mul", ["act", "u"], ["h"]),
        helper.make_node("MatMul", ["h", "w_down"], ["y"]),
    ]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", hidden])]
    initializers = [split]
    if weights_as_inputs:
        inputs += [
            helper.make_tensor_value_info("w_gu", TensorProto.FLOAT, [hidden, 2 * inter]),
            helper.make_tensor_value_info("w_down", TensorProto.FLOAT, [inter, hidden]),
        ]
    else:
        initializers += [numpy_helper.from_array(w_gu, "w_gu"), numpy_helper.from_array(w_down, "w_down")]
    graph = helper.make_graph(
        nodes,
        "neuro_expert",
        inputs,
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", hidden])],
        initializers,
    )
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", OPSET)],
        producer_name="neuro_dask",
        producer_version=str(EXPORTER_VERSION),
    )
    model.ir_version = min(model.ir_version, 9)  # readable by onnxruntime >= 1.16
    onnx.checker.check_model(model)
    return model.SerializeToString()


def session(model: bytes | str | Path, providers: list[str] | None = None, threads: int | None = None) -> Any:
    ort = _ort()
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = threads or torch.get_num_threads()
    options.log_severity_level = 3
    source = str(model) if isinstance(model, Path) else model
    return ort.InferenceSession(source, options, providers=providers or pick_providers())


@dataclass
class OnnxExpert:
    """One expert's ONNX Runtime session; callable x [n, D] -> [n, D] (float32 inside)."""

    sess: Any
    weight_bytes: int
    precision: str = "float32"
    extra_inputs: dict[str, np.ndarray] = field(default_factory=dict)

    def nbytes(self) -> int:
        return self.weight_bytes

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        feed = {"x": np.ascontiguousarray(x.detach().to("cpu", torch.float32).numpy()), **self.extra_inputs}
        (y,) = self.sess.run(["y"], feed)
        return torch.from_numpy(y).to(x.dtype)


def weights_bytes(weights: ExpertWeights) -> int:
    return sum(4 * t.numel() for t in weights.as_dict().values())


class OnnxExpertCache:
    """Exported expert graphs under root/onnx/, keyed by the expert file's sha256 and exporter version."""

    def __init__(self, root: str | Path, providers: list[str] | None = None, threads: int | None = None):
        self.root = Path(root) / "onnx"
        self.providers = providers
        self.threads = threads

    def path_for(self, sha256: str) -> Path:
        return self.root / sha256[:2] / f"{sha256}-x{EXPORTER_VERSION}.onnx"

    def runner(self, sha256: str, weights: ExpertWeights) -> OnnxExpert:
        """Export on first use (atomic write), then open a session on the cached graph."""
        path = self.path_for(sha256)
        if not path.is_file():
            self._write(path, expert_graph(weights))
            log.debug("exported expert %s to %s", sha256[:12], path)
        return OnnxExpert(session(path, self.providers, self.threads), weights_bytes(weights))

    @staticmethod
    def _write(path: Path, data: bytes) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".part")
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


def onnx_expert(
    weights: ExpertWeights,
    providers: list[str] | None = None,
    threads: int | None = None,
    weights_as_inputs: bool = False,
) -> OnnxExpert:
    """An uncached runner (tests, benchmarks, the local executor)."""
    sess = session(expert_graph(weights, weights_as_inputs), providers, threads)
    extra = {}
    if weights_as_inputs:
        extra = {
            "w_gu": torch.cat([weights.gate_proj, weights.up_proj]).T.float().contiguous().numpy(),
            "w_down": weights.down_proj.T.float().contiguous().numpy(),
        }
    return OnnxExpert(sess, weights_bytes(weights), extra_inputs=extra)
