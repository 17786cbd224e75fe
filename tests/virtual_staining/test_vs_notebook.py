"""virtual_staining/virtual_staining.ipynb runs top to bottom in its offline mode (tiny stand-ins, demo slide)."""

from __future__ import annotations

import os

import nbformat
import numpy as np
import pytest
from nbclient import NotebookClient
from PIL import Image

from tests.helpers.paths import REPO

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: one thread for tiny models


NOTEBOOK = REPO / "virtual_staining" / "virtual_staining.ipynb"


def test_notebook_executes_offline(tmp_path, monkeypatch, real_slide):
    nb = nbformat.read(NOTEBOOK, as_version=4)
    assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code")  # committed without outputs
    work = tmp_path / "work"
    # The kernel inherits this environment: the repository importable, the offline mode, outputs in tmp.
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    monkeypatch.setenv("PIXCELL_VS_WORK", str(work))
    monkeypatch.delenv("PIXCELL_VS_MODE", raising=False)
    monkeypatch.delenv("PIXCELL_VS_INPUT", raising=False)
    monkeypatch.setenv("PIXCELL_VS_NUM_IMAGES", "1")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # tiny models: see conftest's one_thread
    monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    # kernel "python3" starts the current interpreter (jupyter_client swaps `python` for sys.executable)
    NotebookClient(
        nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    ).execute()

    text = "\n".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    assert "mode offline" in text and "matches the step-by-step result: True" in text
    assert "tissue fraction" in text  # H&E came from the real demo slide
    assert any("image/png" in o.get("data", {}) for c in nb.cells for o in c.get("outputs", []))  # the figure
    outputs = sorted((work / "ihc_HER2").glob("*.png"))
    assert len(outputs) == 1
    assert np.asarray(Image.open(outputs[0])).shape == (128, 128, 3)  # tiny model: 128 px per 1024 px unit
