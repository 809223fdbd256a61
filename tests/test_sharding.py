"""Sharding: the partitioning plan (here, in-process) and everything on 8 CPU devices (in a
subprocess: ``jax_num_cpu_devices`` must be set before JAX starts its CPU backend, and the rest
of the suite shares this process with one device).

The 8-device cases live in ``tests/sharding_cases.py`` and run once per session; each test
below checks one group of them (meshes (8,), (2, 4), (4, 2); shard_map; jax_moe.parallel).
"""

from __future__ import annotations

import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from jax_moe.kinds import GGMLType, MoeKind, WeightLayout
from jax_moe.partitioning import Params, plan_partition, sharding_rule

HERE = Path(__file__).resolve().parent

BF16 = np.dtype(ml_dtypes.bfloat16)

def dense(reduce: bool = True, layout: WeightLayout = WeightLayout.ENK) -> Params:
    return Params(int(MoeKind.WMMA), int(GGMLType.BF16), int(layout), reduce, BF16)


def gguf(reduce: bool = True) -> Params:
    return Params(int(MoeKind.WMMA_GGUF), int(GGMLType.Q8_0), 0, reduce, BF16)


MESH = {"a": 2, "b": 4}
T, k, E, N, K = 24, 2, 8, 48, 64


def plan(params: Params, x: P, ids: P, w: P, s: P, out: P | None = None, *, x_rank: int = 2,
         w_shape=(E, N, K)):
    xs = (T, K) if x_rank == 2 else (T, k, K)
    return plan_partition(params, MESH, [xs, (T, k), w_shape, (T, k)], [x, ids, w, s], out)


# -- the plan (pure Python: no devices needed) ---------------------------------------------------
def test_rule_strings():
    rule, special = sharding_rule(dense(), 2)
    assert rule == "t c, t j, e n c, t j -> t n"
    assert special == dict(reduction_factors=("c", "j", "e"), need_replication_factors=())
    rule, special = sharding_rule(dense(False, WeightLayout.EKN), 3)
    assert rule == "t j c, t j, e c n, t j -> t j n"
    assert special["reduction_factors"] == ("c", "e")  # j passes through without reduce
    rule, special = sharding_rule(gguf(), 2)
    assert rule == "t c, t j, e n q, t j -> t n"
    assert special == dict(reduction_factors=("j", "e"), need_replication_factors=("c", "q"))


def test_plan_tokens_only_is_local():
    p = plan(dense(), P("a"), P("a"), P(), P("a"))
    assert p.t == ("a",) and not (p.e or p.n or p.c or p.psum or p.scatter_t)
    assert p.compute_dtype == BF16  # nothing to combine: the kernel rounds once, as on one device


def test_plan_experts_psum_in_float32():
    p = plan(dense(), P(), P(), P("b"), P())
    assert p.e == ("b",) and p.psum == ("b",) and p.compute_dtype == np.float32
    assert p.specs(dense(), 2) == ((P(None, None), P(None, None), P("b", None, None), P(None, None)),
                                   P(None, None))
    # reduce=False: one nonzero term per element, combined in the output dtype (exact)
    p = plan(dense(False), P(), P(), P("b"), P(), x_rank=3)
    assert p.psum == ("b",) and p.compute_dtype == BF16


def test_plan_weights_win_an_axis_and_tokens_are_reduce_scattered():
    p = plan(dense(), P("b"), P("b"), P("b"), P("b"))
    assert p.e == ("b",) and p.t == () and p.scatter_t == ("b",) and p.psum == ()
    (x, ids, w, s), out = p.specs(dense(), 2)
    assert x == P(None, None) and w == P("b", None, None) and out == P("b", None)


def test_plan_never_moves_weights_for_the_output():
    # The output is wanted N-sharded over "a", but w is K-sharded over "a": K stays.
    p = plan(dense(), P(), P(), P(None, None, "a"), P(), out=P(None, "a"))
    assert p.c == ("a",) and p.n == () and p.scatter_n == ("a",) and p.psum == ()
    # Without a weight sharding of N, the output's wish shards N (a free local slice of w).
    p = plan(dense(), P(), P(), P(), P(), out=P(None, "b"))
    assert p.n == ("b",) and p.specs(dense(), 2)[0][2] == P(None, "b", None)


def test_plan_ekn_layout_and_k_from_x():
    p = plan(dense(layout=WeightLayout.EKN), P(None, "a"), P(), P(None, None, "b"), P(),
             w_shape=(E, K, N))
    assert p.n == ("b",) and p.c == ("a",) and p.psum == ("a",)
    assert p.specs(dense(layout=WeightLayout.EKN), 2)[0][2] == P(None, "a", "b")


def test_plan_gguf_never_splits_blocks():
    rb = K // 32 * 34
    p = plan(gguf(), P(None, "a"), P(), P("b", None, "a"), P(), w_shape=(E, N, rb))
    assert p.c == () and p.e == ("b",)
    (x, _, w, _), _ = p.specs(gguf(), 2)
    assert x == P(None, None) and w == P("b", None, None)


def test_plan_pairs_and_multi_axis_experts():
    p = plan(dense(False), P(None, "a"), P(None, "a"), P(("a", "b")), P(None, "a"), x_rank=3)
    assert p.e == ("a", "b") and p.j == ()  # both axes taken by the experts
    p = plan(dense(True), P(None, "a"), P(None, "a"), P(), P(None, "a"), x_rank=3)
    assert p.j == ("a",) and p.psum == ("a",)  # reduce over a split k: partial sums + psum


def test_plan_drops_axes_that_do_not_divide():
    p = plan(dense(), P("b"), P("b"), P("b"), P("b"), w_shape=(6, N, K))
    assert p.e == () and p.t == ("b",) and p.psum == ()


# -- 8 CPU devices, in a subprocess -----------------------------------------------------------------
GROUPS = {
    "jit-mesh-8": lambda n: n.startswith("test_jit_rule[8-"),
    "jit-mesh-2x4": lambda n: n.startswith("test_jit_rule[2x4-"),
    "jit-mesh-4x2": lambda n: n.startswith("test_jit_rule[4x2-"),
    "jit-other": lambda n: n.split("[")[0] in (
        "test_hlo_check_catches_weight_gathers", "test_explicit_axes_and_out_shardings",
        "test_eager_call_on_sharded_arrays", "test_vmap_inside_sharded_jit",
        "test_vmap_over_a_sharded_batch_with_explicit_axes",
        "test_gspmd_propagation_path", "test_version_and_device_count"),
    "shard_map": lambda n: n.startswith("test_shard_map"),
    "ffn-and-parallel": lambda n: n.split("[")[0] in (
        "test_moe_ffn_under_jit_with_sharded_experts", "test_parallel_ffn",
        "test_parallel_block_with_shared_expert", "test_parallel_functional_form_and_errors",
        "test_flax_module_with_sharded_experts",
        "test_quantize_keeps_the_sharding_and_metadata_of_each_expert_weight"),
}


@pytest.fixture(scope="module")
def eight_devices(tmp_path_factory):
    """Run tests/sharding_cases.py once with 8 CPU devices; its per-test results and output."""
    junit = tmp_path_factory.mktemp("sharding") / "junit.xml"
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env.pop("JAX_NUM_CPU_DEVICES", None)
    cmd = [sys.executable, "-m", "pytest", str(HERE / "sharding_cases.py"), "-q", "-rfE",
           "-p", "no:cacheprovider", f"--junitxml={junit}"]
    proc = subprocess.run(cmd, cwd=HERE.parent, env=env, capture_output=True, text=True, timeout=900)
    results: dict[str, str] = {}
    if junit.exists():
        for case in ET.parse(junit).getroot().iter("testcase"):
            status = "passed"
            for tag in ("failure", "error", "skipped"):
                if case.find(tag) is not None:
                    status = tag
            results[case.get("name")] = status
    return results, proc.returncode, proc.stdout[-20000:] + proc.stderr[-5000:]


@pytest.mark.parametrize("group", list(GROUPS))
def test_on_8_cpu_devices(eight_devices, group):
    results, rc, output = eight_devices
    mine = {n: s for n, s in results.items() if GROUPS[group](n)}
    assert mine, f"no 8-device results for {group} (child exit status {rc}):\n{output}"
    bad = {n: s for n, s in mine.items() if s not in ("passed", "skipped")}
    assert not bad, f"{len(bad)} of {len(mine)} failed: {sorted(bad)}\n{output}"


def test_every_8_device_case_belongs_to_a_group(eight_devices):
    results, rc, output = eight_devices
    assert results, f"the 8-device run produced no results (exit status {rc}):\n{output}"
    orphans = [n for n in results if not any(g(n) for g in GROUPS.values())]
    assert not orphans, orphans
    assert rc == 0, output
