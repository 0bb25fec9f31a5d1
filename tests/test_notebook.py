"""The notebooks (quickstart: a Linen model; nnx: an NNX model): committed clean, and each runs
top to bottom at a tiny size."""

import base64
import io
import json
import pathlib
import re
import sys

import nbformat
import pytest
from PIL import Image

nbclient = pytest.importorskip("nbclient")
from jupyter_client.kernelspec import KernelSpecManager  # noqa: E402
from jupyter_client.manager import KernelManager  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parent.parent
NOTEBOOK = REPO / "notebooks" / "quickstart.ipynb"
NNX_NOTEBOOK = REPO / "notebooks" / "nnx.ipynb"


def _kernel_manager(tmp_path) -> KernelManager:
    """A kernel of this interpreter: installed kernelspecs may name another Python."""
    spec_dir = tmp_path / "kernels" / "byol-jax-test"
    spec_dir.mkdir(parents=True)
    spec = {
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "byol_jax test",
        "language": "python",
    }
    (spec_dir / "kernel.json").write_text(json.dumps(spec))
    specs = KernelSpecManager(kernel_dirs=[str(tmp_path / "kernels")])
    return KernelManager(kernel_name="byol-jax-test", kernel_spec_manager=specs)


@pytest.mark.parametrize("path", [NOTEBOOK, NNX_NOTEBOOK], ids=["quickstart", "nnx"])
def test_notebook_is_committed_without_outputs(path):
    notebook = nbformat.read(path, as_version=4)
    nbformat.validate(notebook)
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert code and all(not c.outputs and c.execution_count is None for c in code)
    assert "parameters" in code[0].metadata.get("tags", [])
    assert 'hidden_layer="pool"' in "".join(c.source for c in code)


def _execute(path, tmp_path, monkeypatch) -> tuple[str, list]:
    """Runs the notebook at 3 steps of 16 images: (its printed text, its outputs)."""
    monkeypatch.setenv("BYOL_NOTEBOOK_STEPS", "3")
    monkeypatch.setenv("BYOL_NOTEBOOK_BATCH_SIZE", "16")
    monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", str(REPO / ".cache" / "jax"))
    monkeypatch.setenv("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
    notebook = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(
        notebook,
        km=_kernel_manager(tmp_path),
        timeout=240,
        resources={"metadata": {"path": str(path.parent)}},
    )
    client.execute()
    outputs = [out for cell in notebook.cells if cell.cell_type == "code" for out in cell.outputs]
    assert not [out for out in outputs if out.output_type == "error"]
    text = "".join(out.get("text", "") for out in outputs if out.output_type == "stream")
    return text, outputs


@pytest.mark.slow
def test_the_nnx_notebook_trains_an_nnx_model_top_to_bottom(tmp_path, monkeypatch):
    text, _ = _execute(NNX_NOTEBOOK, tmp_path, monkeypatch)
    found = re.search(
        r"kNN top-1 after 3 steps: ([\d.]+) % \(at initialisation: ([\d.]+) %\)", text
    )
    assert found, text[-2000:]
    before = re.search(r"kNN top-1 at initialisation: ([\d.]+) %", text)
    assert before and before.group(1) == found.group(2)
    assert re.search(r"3 steps in \d+ s; loss [\d.]+ -> [\d.]+", text)
    assert "the trained NNX model runs on its own: (1, 10)" in text


@pytest.mark.slow
def test_notebook_runs_top_to_bottom_at_a_tiny_size(tmp_path, monkeypatch):
    monkeypatch.setenv("BYOL_NOTEBOOK_MAP", "pca")  # t-SNE takes seconds more
    monkeypatch.setenv("TMPDIR", str(tmp_path))  # the notebook's pictures land here
    text, outputs = _execute(NOTEBOOK, tmp_path, monkeypatch)
    found = re.search(
        r"kNN top-1 after 3 steps: ([\d.]+) % \(random initialisation: ([\d.]+) %\)", text
    )
    assert found, text[-2000:]
    before = re.search(r"kNN top-1 at random initialisation: ([\d.]+) %", text)
    assert before and before.group(1) == found.group(2)
    # 360 test digits, 10 classes: a kNN that works is far above chance even untrained.
    assert 20.0 < float(found.group(1)) <= 100.0 and 20.0 < float(found.group(2)) <= 100.0
    assert re.search(r"3 steps in \d+ s .*loss [\d.]+ -> [\d.]+", text)
    images = [out for out in outputs if "image/png" in out.get("data", {})]
    assert len(images) == 3  # curves, retrieval grid, embedding map
    for out in images:
        with Image.open(io.BytesIO(base64.b64decode(out["data"]["image/png"]))) as image:
            assert image.format == "PNG" and min(image.size) >= 300
    assert len(list(tmp_path.glob("byol_quickstart_*/*.png"))) == 3
