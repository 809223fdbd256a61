"""``python -m jax_moe`` (the main job) and the examples, run as a user runs them (on the CPU)."""

from __future__ import annotations

import os
import re
import runpy
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
KIND_ROW = re.compile(r"^(SCALAR_GGUF|WMMA|WMMA_GGUF)\s+(\S+)\s+(\S+)\s+(\S+)\s+(\S+)", re.M)


def _env() -> dict:
    env = dict(os.environ)
    env["JAX_PLATFORMS"] = "cpu"
    return env


def _rows(text: str) -> dict:
    return {m.group(1): m.groups()[1:] for m in KIND_ROW.finditer(text)}


def _check_table(text: str, fmt: str) -> None:
    from jax_moe.__main__ import MAX_ERROR

    rows = _rows(text)
    assert set(rows) == {"SCALAR_GGUF", "WMMA", "WMMA_GGUF"}, text
    assert rows["SCALAR_GGUF"][0] == fmt and rows["WMMA_GGUF"][0] == fmt and rows["WMMA"][0] == "bf16"
    for kind, (_, device, err, us) in rows.items():
        assert device.startswith("cpu"), text
        assert 0 < float(err) <= MAX_ERROR, (kind, text)
        assert float(us) > 0
    assert "FAILED" not in text


def test_import_does_not_pull_optional_dependencies():
    code = ("import sys, jax_moe, jax_moe.routing, jax_moe.ffn; "
            "bad = [m for m in ('flax', 'gguf', 'tqdm') if m in sys.modules]; "
            "assert not bad, bad; print('clean')")
    r = subprocess.run([sys.executable, "-c", code], env=_env(), capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0 and "clean" in r.stdout, r.stderr


def test_main_job_random_block_subprocess():
    r = subprocess.run([sys.executable, "-m", "jax_moe", "--tokens", "8", "--iters", "2"],
                       env=_env(), capture_output=True, text=True, timeout=300, cwd=str(ROOT.parent))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "Mixtral-style MoE block with random weights" in r.stdout
    _check_table(r.stdout, "Q4_K")


def _example(name: str) -> dict:
    return runpy.run_path(str(EXAMPLES / name))


def test_gguf_roundtrip_example_and_main_job_on_it(tmp_path, capsys, rng):
    pytest.importorskip("gguf")
    pytest.importorskip("flax")
    ex = _example("gguf_roundtrip.py")
    path = tmp_path / "tiny.gguf"
    assert ex["main"](["--out", str(path), "--blocks", "2", "--seed", str(rng.integers(2**31))]) == 0
    out, err = capsys.readouterr()
    assert out.strip().endswith("ok")
    assert len(re.findall(r"^block \d: Q4_K/Q6_K experts", out, re.M)) == 2
    assert "loading qwen3moe MoE blocks" in err and "2/2" in err

    from jax_moe.__main__ import main
    assert main(["--gguf", str(path), "--block", "1", "--tokens", "6", "--iters", "2"]) == 0
    out = capsys.readouterr().out
    assert "qwen3moe block 1 of" in out and "routing softmax renormalized" in out
    _check_table(out, "Q4_K/Q6_K")


def test_main_job_reports_failures_and_bad_arguments(tmp_path, capsys, monkeypatch):
    import jax_moe.__main__ as job

    real = job._reference
    monkeypatch.setattr(job, "_reference", lambda *a: real(*a) * 1.1)  # a 10% error
    assert job.main(["--tokens", "4", "--iters", "1"]) == 1
    assert capsys.readouterr().out.count("FAILED") == 3
    monkeypatch.undo()

    assert job.main(["--gguf", str(tmp_path / "missing.gguf")]) == 2
    assert "not found" in capsys.readouterr().err
    assert job.main(["--qtype", "Q4_0"]) == 2
    assert "qtype must be one of" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        job.main(["--block", "3"])


def test_flax_block_example(capsys, rng):
    pytest.importorskip("flax")
    ex = _example("flax_block.py")
    assert ex["main"](["--seed", str(rng.integers(2**31))]) == 0
    out = capsys.readouterr().out
    assert "(2, 16, 256) -> (2, 16, 256)" in out and out.strip().endswith("ok")


def test_scan_layers_example(capsys, rng):
    pytest.importorskip("flax")
    ex = _example("scan_layers.py")
    assert ex["main"](["--layers", "3", "--seed", str(rng.integers(2**31))]) == 0
    out = capsys.readouterr().out
    assert "3 stacked layers" in out and "data [3, 8, 512, 144]" in out
    assert "agree bit for bit: True" in out and out.strip().endswith("ok")


def test_examples_import_every_jax_moe_submodule_they_use():
    """`jax_moe.nnx.MoE` in an example needs its own `import jax_moe.nnx`: run in-process after
    other tests, a missing import is hidden by modules they imported (gguf_roundtrip.py had one)."""
    import ast

    for path in sorted(EXAMPLES.glob("*.py")):
        tree = ast.parse(path.read_text())
        imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        imported |= {f"{n.module}.{a.name}" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module
                     for a in n.names}
        used = {f"jax_moe.{n.attr}" for n in ast.walk(tree)
                if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name) and n.value.id == "jax_moe"}
        submodules = {u for u in used if (ROOT / "jax_moe" / f"{u.split('.')[1]}.py").exists()
                      or (ROOT / "jax_moe" / u.split(".")[1]).is_dir()}
        missing = submodules - imported
        assert not missing, f"{path.name} uses {sorted(missing)} without importing them"
