import json
import os
import shlex

import nbformat
import pytest
from conftest import NO_GENERATION, REPO, run_script
from nbclient import NotebookClient

NOTEBOOK = REPO / "sampling.ipynb"


def test_notebook_is_committed_without_outputs():
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert code and all(not cell.outputs and cell.execution_count is None for cell in code)


@pytest.mark.long  # minutes on 2 cores: `make test-long`
@pytest.mark.slow
def test_notebook_runs_top_to_bottom_on_an_empty_results_folder(tmp_path, monkeypatch):
    """With no run in OML_RESULTS the notebook trains a small one, then samples from it; any cell error fails."""
    results = tmp_path / "results"
    monkeypatch.setenv("OML_RESULTS", str(results))
    monkeypatch.setenv("PYTHONPATH", f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    client = NotebookClient(notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(REPO)}})
    client.execute()  # raises CellExecutionError on the first failing cell

    (run,) = results.glob("*/final_model")
    trained = json.loads((run.parent / "fingerprints.json").read_text())
    text = "\n".join(
        output.get("text", "") + output.get("data", {}).get("text/plain", "")
        for cell in notebook.cells
        if cell.cell_type == "code"
        for output in cell.outputs
    )
    assert f"run {run.parent.name}" in text
    assert trained[0]["key"][:12] in text  # the side-by-side table shows the keys
    assert "fingerprinted match" in text
    # No evaluation yet: the notebook prints the command that evaluates the run, and that command finds it.
    (command,) = [line for line in text.splitlines() if line.startswith("python eval_for_multigpu.py ")]
    words = shlex.split(command)[2:]
    found = run_script(
        "eval_for_multigpu.py", *words, "--utility_benchmark", "none", *NO_GENERATION, "--skip_base_model"
    )
    assert found.returncode == 0, found.stderr[-2000:]
    assert (run.parent / "eval_results.json").is_file()
