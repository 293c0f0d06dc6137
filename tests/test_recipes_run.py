"""Every ``rlhf-jax`` command of the recipe pages (``RECIPE_PAGES``: the README, the index, the
recipes, the real models, the models) runs, as printed, at a smoke size: in page order, each written file read by
the commands after it, with the caps of ``recipe_runner.SMOKE_CAPS`` appended (a few steps,
iterations, prompts and tokens) and the real checkpoints the recipes name replaced by tiny
ones of the same architecture, tokenizer and chat template (``smoke_checkpoints``). A command
printed on several pages runs once. The other pages print the tiny configs' commands, which
``tests/test_docs_commands.py`` checks and the phase tests run.

Not run here: ``plan --topology`` (libtpu's compiler and an 8B model for minutes;
``tests/test_plan.py`` compiles a small config for a slice), a multi-host launch printed with a
placeholder address (``tests/test_multihost.py`` runs multi-host phases), the built-in
pipeline, which ``tests/test_online.py`` runs in full, and its over-optimisation run, which
the ``overoptimisation`` notebook runs in full (``tests/test_notebooks.py``)."""

import json
import subprocess
import sys

import pytest

from documented import PAGES, ROOT, documented_commands
from phase_runs import process_env
from smoke_checkpoints import MINILM, SMOLLM2, installed, write_packages

RECIPE_PAGES = ("README.md", "index.md", "recipes.md", "real-models.md", "models.md")


def runs_here(argv: list[str]) -> bool:
    """Not one of the commands the module docstring leaves to other tests."""
    return ("--topology" not in argv and "HOST:PORT" not in argv and argv != ["pipeline"]
            and not (argv[0] == "pipeline" and "--overoptimisation" in argv))


def commands(pages) -> list[list[str]]:
    """The distinct commands of ``pages`` in order, those of :func:`runs_here` only."""
    ordered = []
    for page in pages:
        for argv in documented_commands(page):
            if argv not in ordered and runs_here(argv):
                ordered.append(argv)
    return ordered


@pytest.fixture(scope="module")
def smoke_packages(tmp_path_factory):
    if installed(SMOLLM2) is None or installed(MINILM) is None:
        pytest.skip("the real checkpoints' packages are not installed (the README's test command installs them)")
    pytest.importorskip("gguf")
    return write_packages(tmp_path_factory.mktemp("packages"))


def test_the_recipe_pages_are_pages_and_their_commands_are_found():
    pages = [page for page in PAGES if page.name in RECIPE_PAGES]
    assert len(pages) == len(RECIPE_PAGES)
    run = commands(pages)
    assert ["grpo", "configs/grpo_smollm2_sums.yaml"] in run and ["pipeline", "configs/pipeline_arithmetic.yaml"] in run
    assert not any("--topology" in argv or "--overoptimisation" in argv for argv in run) and ["pipeline"] not in run


@pytest.mark.slow
def test_every_recipe_command_runs_at_a_smoke_size(smoke_packages, tmp_path):
    pages = [page for page in PAGES if page.name in RECIPE_PAGES]
    if not (ROOT.parent / "shared" / "data").is_dir():
        pytest.skip("the shared data (../shared/data) is not beside this checkout")
    work = tmp_path / "checkout"  # the checkout as the commands see it, with a runs/ of its own
    work.mkdir()
    for entry in ROOT.iterdir():
        if entry.name != "runs":
            (work / entry.name).symlink_to(entry)
    (tmp_path / "shared").symlink_to(ROOT.parent / "shared")
    (tmp_path / "commands.json").write_text(json.dumps(commands(pages)))
    env = process_env(PYTHONPATH=f"{smoke_packages}:{ROOT / 'tests'}", HF_HUB_OFFLINE="1")  # compiles fast
    run = subprocess.run([sys.executable, str(ROOT / "tests" / "recipe_runner.py"), str(tmp_path / "commands.json")],
                         cwd=work, env=env, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    ran = [line for line in run.stdout.splitlines() if line.startswith("+ rlhf-jax ")]
    exits = [line for line in run.stdout.splitlines() if line.startswith("  exit ")]
    assert len(ran) == len(commands(pages)) == len(exits) and all(line.startswith("  exit 0") for line in exits)
