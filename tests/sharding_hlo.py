"""Reading compiled HLO text: which collectives move data that comes from given parameters.

Used by the sharding tests to prove that expert weights are never gathered (nor all-to-all'd,
permuted or reduced): a value is *derived* from a parameter when it is the parameter or any
instruction of the entry computation with a derived operand, except the jax_moe custom call
(its output is activations). A collective with a derived operand moves weight data.
"""

from __future__ import annotations

import re

COLLECTIVES = ("all-gather", "all-to-all", "collective-permute", "all-reduce", "reduce-scatter",
               "all-gather-start", "all-reduce-start", "collective-permute-start", "ragged-all-to-all")

_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*)$")
_OPCODE = re.compile(r"(?:^|[\s}\])])([a-z][\w\-]*)\(")
_PARAM = re.compile(r"\bparameter\((\d+)\)")
_NAME = re.compile(r"%([\w.\-]+)")


def _entry(text: str) -> list[str]:
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if line.startswith("ENTRY"):
            out = []
            for body in lines[i + 1:]:
                if body.startswith("}"):
                    break
                out.append(body)
            return out
    raise ValueError("no ENTRY computation in the HLO text")


def collectives_from_params(hlo_text: str, params: set[int]) -> list[str]:
    """The collective instructions of the entry computation whose operands derive from the
    entry parameters numbered ``params``."""
    derived: set[str] = set()
    hits = []
    for line in _entry(hlo_text):
        m = _INSTR.match(line)
        if not m:
            continue
        name, rest = m.groups()
        p = _PARAM.search(rest)
        if p and rest.split("parameter(")[0].strip() and int(p.group(1)) in params:
            derived.add(name)
            continue
        op = _OPCODE.search(rest)
        opcode = op.group(1) if op else ""
        if opcode == "custom-call" and "jax_moe_matmul" in rest:
            continue
        if any(n in derived for n in _NAME.findall(rest)):
            derived.add(name)
            if opcode in COLLECTIVES:
                hits.append(line.strip())
    return hits
