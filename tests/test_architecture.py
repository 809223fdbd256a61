"""A house a newcomer can change safely (issue 15): one rule, one name, one place per concept.
Each check reads the source, so it fails when a second copy comes back."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "jax_moe"


def source(name: str) -> str:
    return (PKG / name).read_text()


def functions(name: str) -> set[str]:
    return {n.name for n in ast.walk(ast.parse(source(name))) if isinstance(n, ast.FunctionDef)}


def imported_modules(name: str) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(source(name))):
        if isinstance(node, ast.ImportFrom):
            out.add(node.module or "")
            out.update(f"{node.module or ''}.{a.name}".lstrip(".") for a in node.names)
    return out


def test_one_vmap_rule_in_one_file():
    import jax_moe.batching as batching
    import jax_moe.binding as binding

    folds = {p.name for p in PKG.glob("*.py") if {"_fold", "fold_batch", "_fold_batch"} & functions(p.name)}
    assert folds == {"batching.py"}, folds
    assert binding.fold_batch is batching.fold_batch  # the custom_vmap rule's fold
    assert "fold_batch(moe_matmul_p.bind" in source("batching.py")  # the primitive's rule's


def test_single_device_calls_do_not_go_through_partitioning():
    assert not any("partitioning" in m for m in imported_modules("ops.py"))
    assert "bind" not in functions("partitioning.py")
    assert "_binding.bind(" in source("ops.py")


def test_one_set_of_dense_dtypes():
    pair = re.compile(r"\(\s*(jnp\.dtype\(jnp\.float16\)|\"float16\"|np\.dtype\(np\.float16\))\s*,\s*"
                      r"(jnp\.dtype\(jnp\.bfloat16\)|\"bfloat16\"|np\.dtype\(ml_dtypes\.bfloat16\))")
    places = {p.name: len(pair.findall(p.read_text())) for p in PKG.glob("*.py")}
    assert {n: c for n, c in places.items() if c} == {"kinds.py": 1}, places


def test_the_modules_share_their_router_config_and_kernel_initializer():
    for name in ("nnx.py", "linen.py"):
        assert "_router_config" not in functions(name)
        assert "variance_scaling" not in source(name)
    assert {"router_config", "default_kernel_init"} <= functions("modules.py")


def test_one_shared_expert_ffn():
    assert "_shared_expert" not in functions("parallel.py")
    assert "shared_ffn(" in source("parallel.py") and "shared_ffn" in functions("ffn.py")


def test_one_float64_ffn_reference_in_the_tests():
    ffn_tests = (ROOT / "tests" / "test_ffn.py").read_text()
    defined = {n.name for n in ast.walk(ast.parse(ffn_tests)) if isinstance(n, ast.FunctionDef)}
    assert not {"ref_ffn", "q8_1", "dequant", "rnd", "weight_as_seen"} & defined, defined
    assert "from reference import" in ffn_tests


def test_no_unused_imports_in_ops():
    tree = ast.parse(source("ops.py"))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            for a in node.names:
                names.add((a.asname or a.name).split(".")[0])
    used = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)}
    used |= {n.value.id for n in ast.walk(tree) if isinstance(n, ast.Attribute)
             and isinstance(n.value, ast.Name)}
    registering = {"_batching", "_lowering"}  # imported for their registrations (noqa: F401)
    assert names - used - {"annotations"} - registering == set()


def package_imports() -> dict[str, set[str]]:
    """{module: the package modules it imports}, function-level imports included."""
    mods = {p.stem for p in PKG.glob("*.py")}
    graph: dict[str, set[str]] = {}
    for p in PKG.glob("*.py"):
        deps: set[str] = set()
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level >= 1:
                deps.update([node.module.split(".")[0]] if node.module else [a.name for a in node.names])
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("jax_moe."):
                deps.add(node.module.split(".")[1])
            elif isinstance(node, ast.Import):
                deps.update(a.name.split(".")[1] for a in node.names if a.name.startswith("jax_moe."))
        graph[p.stem] = {d for d in deps if d in mods and d != p.stem}
    return graph


def test_no_import_cycles_in_the_package():
    """The GGUF loader returns MoEWeights and the Flax modules own from_gguf: no module imports
    one that imports it back (gguf.py and nnx.py used to), nor any longer cycle."""
    graph = package_imports()
    state: dict[str, int] = {}

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for d in sorted(graph[m]):
            assert state.get(d) != 1, " -> ".join(path + [m, d])
            if d not in state:
                visit(d, path + [m])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [])
    assert not graph["gguf"] & {"nnx", "linen"}, graph["gguf"]


def test_gguf_is_split_by_idea():
    """The file reader (untrusted bytes: header, metadata, tensor placement, byte order) is
    gguf_file.py; gguf.py maps a checkpoint's metadata and tensors to MoE blocks."""
    reader, loader = functions("gguf_file.py"), functions("gguf.py")
    assert {"_reader", "_field", "_check_placement"} <= reader
    assert {"read_moe_config", "load_block_weights", "load_blocks"} <= loader
    assert not reader & loader, reader & loader
    assert "class _File" in source("gguf_file.py") and "class _File" not in source("gguf.py")
    assert "gguf" not in {m.split(".")[0] for m in package_imports()["gguf_file"]}


CSRC = ROOT / "csrc"


def test_the_abi_enums_have_one_home():
    """MoeKind, WeightLayout and DType are defined once, in csrc/common/moe_types.h (they were
    in gguf_blocks.h and fp16.h)."""
    enum = re.compile(r"enum\s+class\s+(MoeKind|WeightLayout|DType)\b")
    homes = {str(p.relative_to(CSRC)): enum.findall(p.read_text())
             for p in CSRC.rglob("*") if p.suffix in (".h", ".cuh", ".cc", ".cu")}
    assert {k: sorted(v) for k, v in homes.items() if v} == {
        "common/moe_types.h": ["DType", "MoeKind", "WeightLayout"]}


def test_the_staged_activation_block_is_not_named_like_ggmls():
    """ggml's block_q8_1 is 36 bytes (f16 scale, f16 sum); ours is 40 and is called q8_1_staged."""
    code = {p.name: re.sub(r"//[^\n]*", "", p.read_text()) for p in CSRC.rglob("*") if p.is_file()}
    assert not [name for name, text in code.items() if re.search(r"\bblock_q8_1\b", text)]
    assert "static_assert(sizeof(q8_1_staged) == 40" in (CSRC / "common" / "q8_1.h").read_text()


def test_cuda_errors_cross_the_launch_boundary_as_a_type():
    """The CUDA handler maps a CudaStatus code to the FFI error, instead of sorting error strings
    by their prefix."""
    handler = (CSRC / "ffi" / "cuda_handler.cu").read_text()
    assert "rfind(" not in handler and "CudaStatus::Code::kInvalidArgument" in handler
    assert "CudaStatus moe_forward_cuda(" in (CSRC / "cuda" / "kernels.h").read_text()


def test_gguf_names_come_from_gguf():
    """Metadata keys and tensor names are gguf.Keys / gguf.TENSOR_NAMES, not strings written by
    hand (the legacy per-expert tensors, which gguf does not name, are the exception)."""
    code = re.sub(r'"""[\s\S]*?"""|#[^\n]*', "", source("gguf.py"))
    for key in ("expert_count", "expert_used_count", "expert_gating_func", "expert_weights_norm",
                "expert_weights_scale", "expert_group_count", "swiglu_clamp_exp", "general.architecture"):
        assert not re.search(rf'["\'][^"\']*{re.escape(key)}["\']', code), key
    for name in ("ffn_gate_inp", "exp_probs_b", "_exps.weight", "_shexp.weight"):
        assert not re.search(rf'["\'][^"\']*{re.escape(name)}[^"\']*["\']', code), name
    assert "_gguf.TENSOR_NAMES" in code and "_gguf.Keys" in code
