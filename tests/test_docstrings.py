"""Every public function and class of the library's core modules (and their public methods)
says what it does: shapes, units, errors, the paper."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "rlhf_jax"
CORE = ["losses", "advantages.py", "kl.py", "masked.py", "logprobs.py", "trust_region.py", "models", "rollout", "train",
        "phases/protocol.py", "phases/algorithms.py", "phases/loop.py", "data/batches.py"]


def public_definitions(path: Path):
    tree = ast.parse(path.read_text())
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)) and not node.name.startswith("_"):
            yield node.name, node
            if isinstance(node, ast.ClassDef):
                for method in node.body:
                    if isinstance(method, ast.FunctionDef) and not method.name.startswith("_"):
                        yield f"{node.name}.{method.name}", method


@pytest.mark.parametrize("module", CORE)
def test_public_definitions_have_docstrings(module):
    root = PACKAGE / module
    files = [root] if root.suffix == ".py" else sorted(root.glob("*.py"))
    missing = [f"{f.relative_to(PACKAGE)}:{node.lineno} {name}" for f in files
               for name, node in public_definitions(f) if not ast.get_docstring(node)]
    assert not missing, "no docstring: " + ", ".join(missing)
