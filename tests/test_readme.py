"""Every ``python`` block of the README is a file that runs: the blocks are verbatim regions
(``# --- README: NAME`` ... ``# --- end``) of the files under docs/snippets/ or examples/, and
each of those files runs here on the CPU (examples/quickstart.py runs in test_build.py)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SNIPPETS = ROOT / "docs" / "snippets"
REGION = re.compile(r"^# --- README: (\w+)\n(.*?)^# --- end$", re.M | re.S)
RUN_ELSEWHERE = {"examples/quickstart.py"}  # tests/test_build.py runs it and checks its numbers


def readme_blocks() -> list[str]:
    text = (ROOT / "README.md").read_text()
    return [b.strip("\n") for b in re.findall(r"^```python\n(.*?)^```$", text, re.M | re.S)]


def regions() -> dict[str, tuple[str, str]]:
    """{region text: (file, region name)} of every marked region."""
    out = {}
    for path in sorted(SNIPPETS.glob("*.py")) + sorted((ROOT / "examples").glob("*.py")):
        for name, body in REGION.findall(path.read_text()):
            out[body.strip("\n")] = (str(path.relative_to(ROOT)), name)
    return out


def test_every_readme_block_is_a_region_of_a_file():
    blocks, found = readme_blocks(), regions()
    assert len(blocks) >= 5, "the README lost its snippets"
    missing = [b for b in blocks if b not in found]
    assert not missing, ("README blocks that no file under docs/snippets or examples holds "
                         "verbatim between '# --- README: NAME' and '# --- end':\n\n"
                         + "\n\n".join(missing))
    # and every marked region is still in the README (no stale copies)
    stale = [where for body, where in found.items() if body not in blocks]
    assert not stale, stale


@pytest.mark.parametrize("name", sorted(p.name for p in SNIPPETS.glob("*.py")))
def test_snippet_runs(name):
    pytest.importorskip("flax")
    pytest.importorskip("gguf")
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    r = subprocess.run([sys.executable, str(SNIPPETS / name)], env=env, capture_output=True,
                       text=True, timeout=600, cwd=str(ROOT))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert r.stdout.strip(), "a snippet prints what it checked"


def test_files_holding_readme_blocks_are_run():
    files = {where[0] for where in regions().values()}
    run_here = {f"docs/snippets/{p.name}" for p in SNIPPETS.glob("*.py")}
    assert files <= run_here | RUN_ELSEWHERE, files - run_here - RUN_ELSEWHERE


def test_the_contract_the_code_cites_is_in_the_repository():
    """Python comments cite docs/contract.md (not the design file outside the repository), and
    every section they cite exists."""
    contract = (ROOT / "docs" / "contract.md").read_text()
    sections = set(re.findall(r"^## (\w+)\. ", contract, re.M))
    assert {"1", "2", "3", "4", "5", "5b", "6", "7", "8"} <= sections, sections
    cited, stale = set(), []
    for path in sorted(ROOT.glob("*/*.py")):
        if path.parts[-2] not in ("jax_moe", "tests", "benchmarks", "examples", "tools"):
            continue
        text = path.read_text()
        if "DESIGN" + ".md" in text:
            stale.append(str(path.relative_to(ROOT)))
        cited |= set(re.findall(r"docs/contract\.md §(\w+)", text))
    assert not stale, f"files citing a design file that is not in the repository: {stale}"
    assert cited and cited <= sections, cited - sections
    assert "docs/contract.md" in (ROOT / "README.md").read_text()
