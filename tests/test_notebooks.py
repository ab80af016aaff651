"""The notebooks run top to bottom against the public API (outputs are never committed)."""

import json
import pathlib

import pytest

NOTEBOOKS = sorted((pathlib.Path(__file__).parent.parent / "notebooks").glob("*.ipynb"))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_runs_and_has_no_outputs(path, smollm2_gguf, capsys):
    nb = json.loads(path.read_text())
    code_cells = [c for c in nb["cells"] if c["cell_type"] == "code"]
    assert code_cells and all(not c.get("outputs") for c in code_cells)
    namespace: dict = {}
    for i, cell in enumerate(code_cells):
        exec(compile("".join(cell["source"]), f"{path.name}[{i}]", "exec"), namespace)
    assert "ADMIT" in capsys.readouterr().out
