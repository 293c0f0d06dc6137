"""Extensions from outside the package: ``RLHF_JAX_PLUGINS`` names modules (``pkg.module``)
or Python files (``path/to/file.py``), separated by commas, that the CLI imports before it
builds its commands. Each registers what it adds the way the built-ins do -- a model family
with :func:`rlhf_jax.models.register_family`, an offline phase (a new loss, its sub-command)
with :func:`rlhf_jax.phases.register_phase` -- so an extension is one file and one
registration, and a run names it like any other (``model.init.model_type``, the command)."""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from collections.abc import Mapping
from pathlib import Path

from rlhf_jax.config import ConfigError

VARIABLE = "RLHF_JAX_PLUGINS"


def load_plugins(environ: Mapping[str, str] = os.environ) -> list[str]:
    """Import every plugin ``environ[RLHF_JAX_PLUGINS]`` names, in order; their names. Raises
    ``ConfigError`` naming a plugin that is not found or fails to import, and why."""
    names = [name.strip() for name in environ.get(VARIABLE, "").split(",") if name.strip()]
    for name in names:
        try:
            if name.endswith(".py"):
                path = Path(name).resolve()
                if not path.is_file():
                    raise FileNotFoundError(f"no file {path}")
                spec = importlib.util.spec_from_file_location(f"rlhf_jax_plugin_{path.stem}", path)
                module = importlib.util.module_from_spec(spec)
                sys.modules[spec.name] = module
                spec.loader.exec_module(module)
            else:
                importlib.import_module(name)
        except Exception as error:  # a plugin's own failure, reported as the user's input it is
            raise ConfigError(f"{VARIABLE}: plugin {name!r} could not be loaded: {type(error).__name__}: {error}") \
                from None
    return names
