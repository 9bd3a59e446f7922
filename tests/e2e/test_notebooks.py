"""notebooks/*.ipynb run top to bottom in a real kernel, as a data scientist runs them.

The kernel is this interpreter (a kernelspec written for the test, so a `python3` kernelspec
elsewhere on the machine cannot swap in another Python), started in a temporary directory.
Any cell that raises fails the test with nbclient's CellExecutionError, which shows the cell
and its traceback; so does a Python warning printed in any cell's output (TqdmWarning: "IProgress
not found" meant the notebook progress bar was plain text). The notebooks must also be exactly
what notebooks/build_notebooks.py writes, without outputs, and use only the public API: their
code cells are scanned for private names, scheduler handlers called by name, executor internals
and imports of modules outside PUBLIC_MODULES.
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import json
import re
import sys
import time
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")
pytest.importorskip("pandas")

NOTEBOOKS = Path(__file__).resolve().parents[2] / "notebooks"
NAMES = ["quickstart.ipynb", "batch_inference.ipynb", "operator.ipynb", "privacy.ipynb"]
CELL_TIMEOUT = 120
KERNEL = "neuro-dask-test"
PROBE = "import sys; print(sys.executable)"
# Appended to privacy.ipynb: the federated rounds' figures, for the test to check.
ROUNDS_PROBE = "import json; print(json.dumps(coordinator.table()))"
# A Python warning as `warnings` prints it to a cell's stderr: "file.py:12: TqdmWarning: IProgress not found".
WARNING_LINE = re.compile(r"\b\w*Warning: |IProgress not found")
WIDGET = "application/vnd.jupyter.widget-view+json"

# What a notebook may import from neuro_dask: the package itself (its __all__) and these modules.
PUBLIC_MODULES = frozenset(
    {
        "neuro_dask",
        "neuro_dask.client.cluster",  # local_cluster
        "neuro_dask.demo.addition",  # the bundled model's data
        "neuro_dask.cli.drill",  # run_drill
        "neuro_dask.federated",  # its __all__
        "neuro_dask.ledger",  # its __all__
    }
)
# Attributes that reach into a model's or a client's machinery rather than its API.
INTERNAL_ATTRIBUTES = {
    "executor": "the model's expert executor (use model.stats(), model.model_id)",
    "scheduler": "a scheduler handler called by name (use nd.network_status, nd.channels, ...)",
    "rpc": "a worker handler called by name",
    "sync": "client.sync of an internal coroutine",
}


def private_access(source: str) -> list[str]:
    """What in `source` (a notebook's code) is not public API: names starting with `_` (bar `_`
    itself and dunders), `client.sync(client.scheduler.…)` and the like, `.executor`, imports of
    neuro_dask modules outside PUBLIC_MODULES or of names outside a module's `__all__`, and `nd.X`
    for an X that `neuro_dask.__all__` does not export."""
    found: list[str] = []

    def private(name: str) -> bool:
        return name.startswith("_") and name != "_" and not (name.startswith("__") and name.endswith("__"))

    def exported(module: str, name: str) -> bool:
        exports = getattr(importlib.import_module(module), "__all__", None)
        return exports is None or name in exports

    aliases = {"nd": "neuro_dask"}
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Attribute):
            if private(node.attr):
                found.append(f"private attribute .{node.attr} (line {node.lineno})")
            if node.attr in INTERNAL_ATTRIBUTES:
                found.append(f".{node.attr}: {INTERNAL_ATTRIBUTES[node.attr]} (line {node.lineno})")
            if (
                isinstance(node.value, ast.Name)
                and aliases.get(node.value.id) == "neuro_dask"
                and not exported("neuro_dask", node.attr)
            ):
                found.append(f"{node.value.id}.{node.attr} is not in neuro_dask.__all__ (line {node.lineno})")
        elif isinstance(node, ast.Name) and private(node.id):
            found.append(f"private name {node.id} (line {node.lineno})")
        elif isinstance(node, (ast.FunctionDef, ast.ClassDef)) and private(node.name):
            found.append(f"private name {node.name} (line {node.lineno})")
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "neuro_dask" and alias.name not in PUBLIC_MODULES:
                    found.append(f"import of non-public module {alias.name} (line {node.lineno})")
                elif any(private(part) for part in alias.name.split(".")):
                    found.append(f"import of private module {alias.name} (line {node.lineno})")
                elif alias.name in PUBLIC_MODULES and alias.asname:
                    aliases[alias.asname] = alias.name
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if any(private(part) for part in module.split(".")):
                found.append(f"import from private module {module} (line {node.lineno})")
            for alias in node.names:
                if private(alias.name):
                    found.append(f"import of private name {module}.{alias.name} (line {node.lineno})")
            if module.split(".")[0] != "neuro_dask":
                continue
            if module not in PUBLIC_MODULES:
                found.append(f"import from non-public module {module} (line {node.lineno})")
                continue
            for alias in node.names:
                if not private(alias.name) and not exported(module, alias.name):
                    found.append(f"{module}.{alias.name} is not in {module}.__all__ (line {node.lineno})")
    return found


def _builder():
    spec = importlib.util.spec_from_file_location("build_notebooks", NOTEBOOKS / "build_notebooks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def kernel_manager_factory(tmp_path_factory):
    """KernelManagers whose only kernelspec runs `sys.executable -m ipykernel_launcher`."""
    from jupyter_client.kernelspec import KernelSpecManager
    from jupyter_client.manager import KernelManager

    kernels = tmp_path_factory.mktemp("kernels")
    (kernels / KERNEL).mkdir()
    (kernels / KERNEL / "kernel.json").write_text(
        json.dumps(
            {
                "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
                "display_name": "neuro_dask tests",
                "language": "python",
            }
        )
    )

    def make() -> KernelManager:
        specs = KernelSpecManager(kernel_dirs=[str(kernels)], ensure_native_kernel=False)
        return KernelManager(kernel_name=KERNEL, kernel_spec_manager=specs)

    return make


@pytest.fixture(scope="module")
def runtimes(request):
    """Seconds per notebook, written to the terminal once the module is done."""
    times: dict[str, float] = {}
    yield times
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    if reporter is None or capture is None or not times:
        return
    with capture.global_and_fixture_disabled():  # teardown output is captured otherwise
        reporter.write_line("")
        for name, seconds in times.items():
            reporter.write_line(f"notebook {name}: {seconds:.1f} s")
        reporter.write_line(f"notebooks total: {sum(times.values()):.1f} s")


def _stream_text(cell) -> str:
    return "".join(o.get("text", "") for o in cell.get("outputs", ()) if o.get("output_type") == "stream")


@pytest.mark.parametrize("name", NAMES)
def test_notebook_runs_top_to_bottom(name, tmp_path, kernel_manager_factory, runtimes):
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    nb.cells.insert(0, nbformat.v4.new_code_cell(PROBE))
    if name == "privacy.ipynb":
        nb.cells.append(nbformat.v4.new_code_cell(ROUNDS_PROBE))
    client = nbclient.NotebookClient(
        nb, km=kernel_manager_factory(), timeout=CELL_TIMEOUT, resources={"metadata": {"path": str(tmp_path)}}
    )
    start = time.perf_counter()
    try:
        client.execute()  # raises CellExecutionError on the first failing cell
    finally:
        nbformat.write(nb, tmp_path / name)  # the executed notebook, outputs and all, to look at
    runtimes[name] = time.perf_counter() - start
    probe = "".join(o.get("text", "") for o in nb.cells[0].outputs).strip()
    assert probe == sys.executable, f"the kernel ran {probe!r}, not this interpreter"
    errors = [o for cell in nb.cells for o in cell.get("outputs", ()) if o.get("output_type") == "error"]
    assert not errors
    warnings = [
        (i, line)
        for i, cell in enumerate(nb.cells)
        for line in _stream_text(cell).splitlines()
        if WARNING_LINE.search(line)
    ]
    assert not warnings, f"warnings in cell outputs (cell index, line): {warnings}"
    if name == "batch_inference.ipynb":  # model.map's progress bar is tqdm's widget, not text
        widgets = [o for cell in nb.cells for o in cell.get("outputs", ()) if WIDGET in o.get("data", {})]
        assert widgets, "no progress bar widget: is ipywidgets installed (pip install -e '.[notebook]')?"
    if name == "privacy.ipynb":  # the federated model improves round by round
        table = json.loads(_stream_text(nb.cells[-1]))
        assert [row["rounds"] for row in table] == list(range(len(table))) and len(table) >= 3, table
        losses = [row["loss"] for row in table]
        assert losses[-1] < losses[1] < losses[0], f"held-out loss per round: {losses}"
        assert table[-1]["accuracy"] > table[0]["accuracy"], table


def test_notebooks_are_built_by_the_script_and_have_no_outputs():
    builder = _builder()
    assert sorted(builder.NOTEBOOKS) == sorted(NAMES)
    for name in NAMES:
        text = (NOTEBOOKS / name).read_text()
        assert text == builder.render(name), f"{name} is stale: run python notebooks/build_notebooks.py"
        nb = nbformat.reads(text, as_version=4)
        for cell in nb.cells:
            if cell.cell_type == "code":
                assert cell.outputs == [] and cell.execution_count is None, name


@pytest.mark.parametrize("name", NAMES)
def test_notebooks_use_only_the_public_api(name):
    """No private names, no handlers called by name, no internals, only public modules."""
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    for i, cell in enumerate(nb.cells):
        if cell.cell_type == "code":
            assert private_access(cell.source) == [], f"{name}, cell {i}:\n{cell.source}"


@pytest.mark.parametrize(
    "line, warns",
    [
        ("/x/tqdm/auto.py:21: TqdmWarning: IProgress not found. Please update jupyter and ipywidgets.", True),
        ("/x/y.py:3: UserWarning: Port 8787 is already in use.", True),
        ("IProgress not found", True),
        ("06:55:53 loading 4 experts of mixtral-9306cbc2b62c ...", False),
        ("2026-12-07 06:53:32 - distributed.core - WARNING - No handler", False),
    ],
)
def test_the_warning_pattern(line, warns):
    assert bool(WARNING_LINE.search(line)) is warns


@pytest.mark.parametrize(
    "source",
    [
        "status = client.sync(client.scheduler.neuro_status)",
        "stats = dict(private.executor.stats)",
        "print(model.executor.model_id)",
        "from neuro_dask.federated.dask_rounds import run_federated",
        "from neuro_dask.federated.training import get_flat",
        "import neuro_dask.federated.training as training",
        "from neuro_dask.cli.main import main",
        "from neuro_dask import _settings",
        "from neuro_dask.federated import _LAZY",
        "nd._settings",
        "x = model._forward_logits(batch)",
        "def _helper(): pass",
        "from neuro_dask.federated import evaluate_model, no_such_name",
        "nd.no_such_export",
        "client.run_on_scheduler(f); client.rpc(addr).neuro_status()",
    ],
)
def test_the_scan_finds_private_access(source):
    assert private_access(source), source


@pytest.mark.parametrize(
    "source",
    [
        "import neuro_dask as nd\nstatus = nd.network_status(client)\nfor _, layer in status.placement(): pass",
        "from neuro_dask.federated import run_federated, get_flat, LocalSteps",
        "from neuro_dask.ledger import Ledger, UNIT",
        "stats = model.stats(); print(model.model_id, stats.__class__)",
    ],
)
def test_the_scan_passes_public_code(source):
    assert private_access(source) == [], source
