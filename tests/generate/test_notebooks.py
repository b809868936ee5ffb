"""The notebooks run top to bottom (executed with nbclient on the embedded default) and are committed without outputs."""

from __future__ import annotations

from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

from blendexp.evaluate import evaluate
from tests.conftest import REPO
from tests.generate.conftest import compose_config

NOTEBOOKS = REPO / "notebooks"


def execute(name: str, **parameters: object) -> nbformat.NotebookNode:
    """Run a notebook with its ``parameters`` cell overridden (papermill's convention: a cell inserted after it)."""
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    index = next(i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", []))
    lines = ["from pathlib import Path"] + [f"{k} = Path({str(v)!r})" if isinstance(v, Path) else f"{k} = {v!r}"
                                           for k, v in parameters.items()]
    nb.cells.insert(index + 1, nbformat.v4.new_code_cell("\n".join(lines)))
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(NOTEBOOKS)}}).execute()
    return nb


def outputs(nb: nbformat.NotebookNode, kind: str) -> list[object]:
    """Every output of one MIME kind (``image/png``, ``text/plain``)."""
    return [o["data"][kind] for c in nb.cells if c.cell_type == "code" for o in c.outputs if kind in o.get("data", {})]


@pytest.mark.parametrize("name", ["quickstart.ipynb", "evaluation_analysis.ipynb"])
def test_committed_without_outputs(name: str) -> None:
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code and all(not c.outputs and c.execution_count is None for c in code)


@pytest.mark.slow
def test_quickstart_generates_grids(tiny_base, tiny_annotators: Path) -> None:
    nb = execute("quickstart.ipynb", TINY_BASE=tiny_base[0].parent, TINY_ANNOTATORS=tiny_annotators,
                 STEPS=2, THREADS=1)
    assert len(outputs(nb, "image/png")) == 4  # identity, preset grid, edits, transition


@pytest.mark.slow
def test_evaluation_analysis_plots_an_evaluation_run(tmp_path: Path, tiny_base, tiny_annotators: Path) -> None:
    run = tmp_path / "evaluation"
    evaluate(compose_config("evaluate", run, f"paths.tiny_base={tiny_base[0].parent}",
                            f"eval.annotators.tiny_root={tiny_annotators}", "eval.annotators.facenet=null", "threads=1",
                            "eval.generation.steps=2", "eval.generation.samples=1", "eval.sources.limit=2",
                            "eval.targets.limit=2", "~eval.methods.expr_ref", "eval.fid.bootstrap=3",
                            "eval.fid.kid_subsets=5"))
    nb = execute("evaluation_analysis.ipynb", RUN=run)
    assert len(outputs(nb, "image/png")) == 3  # methods, identity vs expression, per component
    printed = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    assert "largest error per method: {'arc2face': 'exp." in printed
