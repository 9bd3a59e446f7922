"""Expert backends: ONNX Runtime against torch on every architecture, the ONNX cache, providers,
and the worker's ExpertHost at each backend and precision."""

from __future__ import annotations

import pytest
import torch
from tiny_models import ARCHITECTURES

from neuro_dask.errors import ConfigFieldError
from neuro_dask.model.moe import run_expert
from neuro_dask.protocol.wire import ExpertRequest
from neuro_dask.runtime.expert_host import ExpertHost
from neuro_dask.runtime.expert_memory import ExpertMemory
from neuro_dask.runtime.runners import PRECISIONS, choose_precision, expert_nbytes, prepare_expert
from neuro_dask.settings import WorkerSettings
from neuro_dask.store.remote import ExpertFileCache
from neuro_dask.store.shard_store import ShardStore

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")
from neuro_dask.runtime.onnx_backend import (  # noqa: E402
    EXPORTER_VERSION,
    OnnxExpertCache,
    onnx_expert,
    pick_providers,
)

# ONNX vs torch, float32: documented tolerance (different matmul kernels and a fused gate/up).
ONNX_ATOL, ONNX_RTOL = 1e-4, 1e-3


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_onnx_matches_torch_on_every_architecture(sharded, arch):
    store = ShardStore(sharded(arch))
    cfg = store.config
    g = torch.Generator().manual_seed(1)
    layer = cfg.moe_layers[0]
    for expert in range(cfg.num_experts):
        w = store.read_expert(layer, expert)
        for rows in (1, 7):
            x = torch.randn(rows, cfg.hidden_size, generator=g)
            torch.testing.assert_close(onnx_expert(w)(x), run_expert(x, w), atol=ONNX_ATOL, rtol=ONNX_RTOL)


def test_onnx_weights_as_inputs_gives_the_same_result(sharded):
    w = ShardStore(sharded("mixtral")).read_expert(0, 0)
    x = torch.randn(3, w.gate_proj.shape[1], generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(onnx_expert(w, weights_as_inputs=True)(x), onnx_expert(w)(x))


@pytest.mark.parametrize(
    "available, best",
    [
        (["AzureExecutionProvider", "CPUExecutionProvider"], "CPUExecutionProvider"),
        (["CPUExecutionProvider", "CUDAExecutionProvider"], "CUDAExecutionProvider"),
        (["CoreMLExecutionProvider", "CPUExecutionProvider"], "CoreMLExecutionProvider"),
        (["OpenVINOExecutionProvider", "DmlExecutionProvider", "CPUExecutionProvider"], "OpenVINOExecutionProvider"),
        (["DmlExecutionProvider"], "DmlExecutionProvider"),
    ],
)
def test_best_provider_first_and_cpu_last(available, best):
    providers = pick_providers(available)
    assert providers[0] == best and providers[-1] == "CPUExecutionProvider"


def test_onnx_cache_is_keyed_by_sha_and_exporter_version(sharded, tmp_path):
    store = ShardStore(sharded("qwen3_moe"))
    artifact = store.manifest.expert(0, 1)
    cache = OnnxExpertCache(tmp_path)
    path = cache.path_for(artifact.sha256)
    assert path.name == f"{artifact.sha256}-x{EXPORTER_VERSION}.onnx" and path.parent.parent == tmp_path / "onnx"
    w = store.read_expert(0, 1)
    first = cache.runner(artifact.sha256, w)
    stamp = path.stat().st_mtime_ns
    second = cache.runner(artifact.sha256, w)  # reused, not exported again
    assert path.stat().st_mtime_ns == stamp
    x = torch.randn(2, w.gate_proj.shape[1], generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(first(x), second(x))
    assert not list(path.parent.glob("*.part"))


def test_auto_precision_is_the_highest_that_fits():
    d, i, n = 1024, 3584, 10
    assert choose_precision(n * expert_nbytes(d, i, "float32"), n, d, i) == "float32"
    assert choose_precision(n * expert_nbytes(d, i, "float32") - 1, n, d, i) == "bfloat16"
    assert choose_precision(n * expert_nbytes(d, i, "int8"), n, d, i) == "int8"
    assert choose_precision(n * expert_nbytes(d, i, "int4"), n, d, i) == "int4"
    assert choose_precision(1, n, d, i) == "int4"  # nothing fits: the smallest, the LRU does the rest


@pytest.mark.parametrize("precision", PRECISIONS)
def test_expert_nbytes_is_what_a_runner_holds(precision):
    d, i = 128, 256
    g = torch.Generator().manual_seed(0)
    from neuro_dask.model.moe import ExpertWeights

    w = ExpertWeights(torch.randn(i, d, generator=g), torch.randn(i, d, generator=g), torch.randn(d, i, generator=g))
    assert prepare_expert(w, precision).nbytes() == expert_nbytes(d, i, precision)


@pytest.mark.parametrize(
    "settings, field",
    [
        (dict(backend="tensorrt"), "backend"),
        (dict(precision="fp8"), "precision"),
        (dict(backend="onnx", precision="int8"), "precision"),
    ],
)
def test_worker_settings_refuse_bad_backend_or_precision(settings, field):
    with pytest.raises(ConfigFieldError, match=field):
        WorkerSettings.load(**settings)


def test_worker_settings_accept_onnx_and_quantized():
    assert WorkerSettings.load(backend="onnx").backend == "onnx"
    assert WorkerSettings.load(precision="int8").precision == "int8"
    assert WorkerSettings.load().precision == "float32"  # mixed precisions need client-side tolerances


@pytest.mark.parametrize(
    "backend, precision, atol",
    [
        ("torch", "float32", 1e-6),
        ("onnx", "float32", 1e-4),
        ("torch", "int8", 0.25),
        ("torch", "bfloat16", 0.1),
    ],
)
def test_expert_host_serves_each_backend_and_counts_its_bytes(sharded, tmp_path, backend, precision, atol):
    root = sharded("mixtral")
    store = ShardStore(root)
    cfg = store.config
    host = ExpertHost(ExpertFileCache(tmp_path / "cache"), ExpertMemory(1 << 30), backend=backend, precision=precision)
    result = host.load("m", str(root), [(0, 0), (0, 1)])
    assert result.loaded == ((0, 0), (0, 1)) and not result.failed
    per_expert = expert_nbytes(cfg.hidden_size, cfg.moe_intermediate_size, precision)
    assert host.memory.bytes_used == 2 * per_expert
    x = torch.randn(3, cfg.hidden_size, generator=torch.Generator().manual_seed(0))
    out = host.run(ExpertRequest("m", 0, {0: x, 1: x[:1]}))
    torch.testing.assert_close(out[0], run_expert(x, store.read_expert(0, 0)), atol=atol, rtol=0.05)
    assert out[1].shape == (1, cfg.hidden_size) and out[0].dtype == torch.float32
    status = host.status()
    assert status["backend"] == backend and status["precision"] == {"m": precision}
    if backend == "onnx":
        assert list((tmp_path / "cache" / "onnx").rglob("*.onnx"))


def test_expert_host_auto_precision_follows_the_budget(sharded, tmp_path):
    root = sharded("mixtral")
    cfg = ShardStore(root).config
    experts = [(0, e) for e in range(4)]
    budget = 4 * expert_nbytes(cfg.hidden_size, cfg.moe_intermediate_size, "int8")
    host = ExpertHost(ExpertFileCache(tmp_path / "cache"), ExpertMemory(budget), precision="auto")
    assert host.load("m", str(root), experts).loaded == tuple(experts)
    assert host.status()["precision"] == {"m": "int8"} and host.memory.bytes_used == budget and len(host.memory) == 4
