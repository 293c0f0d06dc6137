"""The documentation site builds with warnings as errors (``mkdocs build --strict``): every
README section it includes is found, every docstring of the API reference renders."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_the_documentation_builds_without_warnings(tmp_path):
    pytest.importorskip("mkdocs", reason="the docs extra (pip install -e '.[docs]'); the README's test command has it")
    site = tmp_path / "site"
    done = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300, env=os.environ | {"NO_MKDOCS_2_WARNING": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    api = (site / "api" / "index.html").read_text()
    assert all(name in api for name in ("dpo_loss", "gae", "micro_batch_gradients", "run_pipeline"))
    guide = (site / "online" / "index.html").read_text()
    assert "GRPO family" in guide and "--8&lt;--" not in guide  # the README's section, its markers resolved
