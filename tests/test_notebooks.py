"""Every notebook's code cells run top to bottom (their own asserts included), each notebook in
a fresh Python process on one CPU device -- the kernel a user would start -- rather than in the
test process with its 8 fake devices."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from phase_runs import process_env

NOTEBOOKS = sorted((Path(__file__).parent.parent / "notebooks").glob("*.ipynb"))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_runs(path, tmp_path):
    cells = json.loads(path.read_text())["cells"]
    assert not any(cell.get("outputs") for cell in cells), f"{path.name} is stored with outputs; clear them"
    script = tmp_path / f"{path.stem}.py"
    script.write_text("\n\n".join("".join(cell["source"]) for cell in cells if cell["cell_type"] == "code"))
    env = process_env(fast_compile=False, MPLBACKEND="Agg")  # they train for long
    done = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, f"{path.name} failed:\n{done.stderr[-3000:]}"


def test_there_is_a_notebook_of_each_kind():
    assert {p.stem for p in NOTEBOOKS} >= {"losses_tour", "new_dpo_style_loss", "pipeline_api", "compare_runs",
                                          "overoptimisation"}
