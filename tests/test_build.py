"""build_info and the README's quickstart example."""

from __future__ import annotations

import os
import subprocess
import sys

import jax_moe

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_build_info_describes_the_build():
    info = jax_moe.build_info()
    assert set(info) >= {"cuda", "cuda_architectures", "ffi_api_version", "kinds"}
    assert info["kinds"]["cpu"] == ["SCALAR_GGUF", "WMMA", "WMMA_GGUF"]
    major, minor = info["ffi_api_version"]
    assert isinstance(major, int) and isinstance(minor, int) and (major, minor) >= (0, 1)
    assert info["cuda"] == (jax_moe._ext.cuda is not None)
    if info["cuda"]:
        assert info["cuda_architectures"] and all(a >= 70 for a in info["cuda_architectures"])
        assert info["kinds"]["cuda"] == ["SCALAR_GGUF", "WMMA", "WMMA_GGUF"]
        assert info["cuda_runtime_version"] >= 11000
        assert isinstance(info["cuda_sm90a"], bool)
        assert not info["cuda_sm90a"] or 90 in info["cuda_architectures"]
    else:
        assert info["cuda_sm90a"] is False
        assert "cuda" not in info["kinds"]


def test_readme_quickstart_runs_and_is_accurate():
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    res = subprocess.run([sys.executable, os.path.join(ROOT, "examples", "quickstart.py")],
                         capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    errs = {line.split()[0] + (" bf16" if "bf16" in line else ""): float(line.rsplit(":", 1)[1])
            for line in res.stdout.splitlines() if "relative error" in line}
    assert set(errs) == {"dense bf16", "Q4_K"}, res.stdout
    assert errs["dense bf16"] < 1e-2  # bf16 rounding of x, w and the output
    assert errs["Q4_K"] < 0.1  # Q4_K's own error (~0.07 relative RMS) dominates
