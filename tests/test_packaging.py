"""jax_moe packaged as a library should be: typed, licensed, classified, bounded on jax (or free
of its internals), and clear about the extras an optional module needs."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "jax_moe"


def pyproject() -> dict:
    tomllib = pytest.importorskip("tomllib")
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_typed_licensed_and_classified():
    assert (PACKAGE / "py.typed").is_file()
    license_text = (ROOT / "LICENSE").read_text()
    assert "Apache License" in license_text and "Version 2.0, January 2004" in license_text
    project = pyproject()["project"]
    assert project["license"] == {"text": "Apache-2.0"}
    classifiers = set(project["classifiers"])
    assert {"License :: OSI Approved :: Apache Software License", "Typing :: Typed",
            "Programming Language :: Python :: 3"} <= classifiers


def test_jax_is_bounded_and_the_bound_admits_the_installed_jax():
    from packaging.requirements import Requirement

    reqs = [Requirement(r) for r in pyproject()["project"]["dependencies"]]
    jax_req = next(r for r in reqs if r.name == "jax")
    assert any(s.operator == "<" for s in jax_req.specifier), jax_req
    assert jax_req.specifier.contains(version("jax")), (jax_req, version("jax"))
    # the build's FFI headers (the oldest supported jax) are inside the range too
    build = [Requirement(r) for r in pyproject()["build-system"]["requires"]]
    pinned = next(r for r in build if r.name == "jax")
    assert jax_req.specifier.contains(next(iter(pinned.specifier)).version)


def test_no_imports_of_jax_internals():
    bad = []
    for path in sorted(PACKAGE.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            bad += [f"{path.name}: {n}" for n in names if n.startswith("jax._src")]
    assert not bad, bad


@pytest.mark.parametrize("module, missing, extra", [("jax_moe.nnx", "flax", "flax"),
                                                    ("jax_moe.linen", "flax", "flax"),
                                                    ("jax_moe.gguf", "gguf", "gguf")])
def test_a_missing_extra_says_which_to_install(module, missing, extra):
    code = f"import sys; sys.modules[{missing!r}] = None; import {module}"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                       env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert r.returncode != 0
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("ModuleNotFoundError: ") and f"{module} needs the optional dependency " \
        f"{missing!r}" in last and f"pip install 'jax_moe[{extra}]'" in last, r.stderr[-2000:]
