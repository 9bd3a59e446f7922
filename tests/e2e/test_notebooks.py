"""notebooks/*.ipynb run top to bottom in a real kernel, as a data scientist runs them.

The kernel is this interpreter (a kernelspec written for the test, so a `python3` kernelspec
elsewhere on the machine cannot swap in another Python), started in a temporary directory.
Any cell that raises fails the test with nbclient's CellExecutionError, which shows the cell
and its traceback. The notebooks must also be exactly what notebooks/build_notebooks.py writes,
without outputs.
"""

from __future__ import annotations

import importlib.util
import json
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
    (kernels / KERNEL / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "neuro_dask tests", "language": "python",
    }))

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


@pytest.mark.parametrize("name", NAMES)
def test_notebook_runs_top_to_bottom(name, tmp_path, kernel_manager_factory, runtimes):
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    nb.cells.insert(0, nbformat.v4.new_code_cell(PROBE))
    client = nbclient.NotebookClient(nb, km=kernel_manager_factory(), timeout=CELL_TIMEOUT,
                                     resources={"metadata": {"path": str(tmp_path)}})
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


def test_notebooks_use_only_the_public_api():
    """No private names (`nd._x`, `from neuro_dask.x import _y`) and no CLI internals."""
    for name in NAMES:
        nb = nbformat.read(NOTEBOOKS / name, as_version=4)
        source = "\n".join(c.source for c in nb.cells if c.cell_type == "code")
        assert "neuro_dask.cli" not in source and "import _" not in source and "nd._" not in source, name
