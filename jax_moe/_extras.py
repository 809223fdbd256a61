"""Imports of optional dependencies, with the extra that installs them in the error."""

from __future__ import annotations

import importlib
from types import ModuleType


def require(module: str, extra: str, user: str) -> ModuleType:
    """Import ``module`` for the jax_moe module ``user``, or raise ModuleNotFoundError saying
    which extra of jax_moe installs it (``pip install 'jax_moe[extra]'``)."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as e:
        missing = e.name or module
        if not module.startswith(missing):
            raise  # something else is missing inside the dependency: its own error says what
        missing = missing.split(".")[0]
        raise ModuleNotFoundError(
            f"{user} needs the optional dependency {missing!r}, which is not installed: "
            f"pip install 'jax_moe[{extra}]' (or pip install {missing})", name=missing) from e
