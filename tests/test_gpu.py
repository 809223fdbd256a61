"""The moe_matmul contract on the CUDA handlers (marker `gpu`; skips without a CUDA device):
every kind x format x dtype x layout x reduce x x-rank against the float64 reference,
agreement with the CPU implementation, determinism, large pair counts and CUDA graphs."""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_moe import GGMLType, MoeKind, moe_matmul

from cases import check, make_case
from reference import FORMATS, rel_err

pytestmark = pytest.mark.gpu

REDUCE = (True, False)
RANKS = (2, 3)


def poison_device_memory(nbytes: int = 1 << 28) -> None:
    """Fill and free a large NaN buffer so that the allocator hands that memory to the next
    output: an element a kernel forgets to write then shows up as NaN."""
    a = jnp.full((nbytes // 4,), jnp.nan, jnp.float32)
    a.block_until_ready()
    a.delete()


def gpu_run(case, **kw):
    poison_device_memory()
    kw.setdefault("out_dtype", case.out_dtype)
    dev = jax.devices("cuda")[0]
    args = jax.device_put((case.x, case.ids, case.w, case.scores), dev)
    out = moe_matmul(*args, **kw)
    assert out.devices() == {dev}
    return out


def cpu_run(case, **kw):
    kw.setdefault("out_dtype", case.out_dtype)
    cpu = jax.devices("cpu")[0]
    with jax.default_device(cpu):
        args = jax.device_put((case.x, case.ids, case.w, case.scores), cpu)
        return moe_matmul(*args, **kw)


# T=3 takes the small-T (token GEMV) path, the larger T the grouped tensor-core GEMM.
@pytest.mark.parametrize("T", [3, 37])
@pytest.mark.parametrize("dtype,layout,reduce,x_rank",
                         list(itertools.product(["float16", "bfloat16"], ["enk", "ekn"], REDUCE, RANKS)))
def test_wmma_gpu(rng, dtype, layout, reduce, x_rank, T):
    case = make_case(rng, kind=MoeKind.WMMA, dtype=dtype, layout=layout, reduce=reduce, x_rank=x_rank,
                     T=T, k=3, E=5, N=72, K=80)
    check(gpu_run(case, reduce=reduce, weight_layout=layout), case)


# T=3: the GEMV; T=37 over E=4 (18.5 pairs per expert, past the GEMV's 11): the GEMM at small T.
@pytest.mark.parametrize("T", [3, 37])
@pytest.mark.parametrize("fmt,dtype,reduce,x_rank",
                         list(itertools.product(FORMATS, ["float16", "bfloat16"], REDUCE, RANKS)))
def test_wmma_gguf_gpu(rng, fmt, dtype, reduce, x_rank, T):
    case = make_case(rng, kind=MoeKind.WMMA_GGUF, fmt=fmt, dtype=dtype, reduce=reduce, x_rank=x_rank,
                     T=T, k=2, E=4, N=70)
    check(gpu_run(case, reduce=reduce), case)


# Pairs per expert pick the GEMM's tile (plan.h; WMMA: < 64 the skinny 32x256 tile, >= 64 the
# 128x128 one; wgmma on Hopper: < 128 a 64-row tile, >= 128 the 128x256 one, 128x128 for GGUF,
# whose blocks are decoded inside the GEMM). E=2, k=2: T=70 -> 70 pairs per expert, T=260 -> 260.
@pytest.mark.parametrize("T", [70, 260])
@pytest.mark.parametrize("kind,fmt,layout", [(MoeKind.WMMA, None, "enk"), (MoeKind.WMMA, None, "ekn"),
                                             *[(MoeKind.WMMA_GGUF, f, "enk") for f in FORMATS]])
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("reduce", REDUCE)
def test_large_tiles_gpu(rng, T, kind, fmt, layout, dtype, reduce):
    case = make_case(rng, kind=kind, fmt=fmt, dtype=dtype, layout=layout, reduce=reduce,
                     T=T, k=2, E=2, N=136, K=256, x_rank=3 if reduce else 2)
    check(gpu_run(case, reduce=reduce, weight_layout=layout), case)


# Many K steps (more than the GEMM's pipeline depth, with a partial last step), several N tiles
# with a partial last one, and experts with several M tiles. On Hopper these take the wgmma
# GEMM's three tiles: 64x128 (few blocks: T=40, E=16), 128x256 (T=300, E=2: 300 pairs per
# expert, 3 M tiles; the warp-specialized kernel of wgmma_ws.cu, whose TMA boxes run past the last
# expert's rows and past K) and 64x256 (T=300, E=64: 9 pairs per expert, hundreds of blocks).
WGMMA_TILES = {(40, 16): "64x128", (300, 2): "128x256", (300, 64): "64x256"}


@pytest.mark.parametrize("T,E,N,K", [(40, 16, 600, 1096), (300, 2, 600, 1096), (300, 64, 1040, 264)])
@pytest.mark.parametrize("dtype,out_dtype", [("bfloat16", "bfloat16"), ("float16", "float16"),
                                             ("bfloat16", "float32")])
@pytest.mark.parametrize("reduce", REDUCE)
def test_many_k_steps_and_n_tiles_gpu(rng, T, E, N, K, dtype, out_dtype, reduce):
    case = make_case(rng, kind=MoeKind.WMMA, dtype=dtype, reduce=reduce, T=T, k=2, E=E, N=N, K=K,
                     out_dtype=out_dtype)
    if jax.devices("cuda")[0].compute_capability == "9.0":
        assert current_plan(MoeKind.WMMA, case, reduce) == f"grouped_wgmma {WGMMA_TILES[T, E]}"
    check(gpu_run(case, reduce=reduce), case)


# GGUF experts decoded inside the GEMM with many blocks (on Hopper the fused wgmma 64x128 tile):
# 1400 pairs, past the tensor-core GEMV's 1024.
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_gguf_many_blocks_gpu(rng, fmt, dtype):
    case = make_case(rng, kind=MoeKind.WMMA_GGUF, fmt=fmt, dtype=dtype, reduce=False, T=700, k=2, E=64,
                     N=1040, K=512)
    assert current_plan(MoeKind.WMMA_GGUF, case, False).startswith("grouped_w")
    check(gpu_run(case, reduce=False), case)


def current_plan(kind: MoeKind, case, reduce: bool) -> str:
    """The kernel and tile the CUDA plan (plan.h) picks for this case on this GPU."""
    from jax_moe import _ext
    T, k = case.ids.shape
    E, N, K = case.w.shape
    x_rows = T * k if case.x.ndim == 3 else T
    wtype = case.w.qtype if hasattr(case.w, "qtype") else GGMLType.F16 if case.w.dtype == jnp.float16 else GGMLType.BF16
    return _ext.cuda.plan_description(int(kind), int(wtype), 0, T, k, E, N, K, x_rows, reduce)


# The fused GGUF GEMM's edges: each of its tiles (T=80 over E=8 -> 20 pairs per expert, 64x128;
# T=300 and 700 over E=2 -> 300 and 700 pairs per expert, 256x128 with 2 and 3 M tiles, the last
# partial, Q6_K and Q8_0 with 3 x stages: plan.h gguf_tall_x_stages),
# K = 544 (two raw stages of 256 plus 32: a partial raw stage and a last K step of 32 for the
# 32-element formats), N = 200 (a partial N tile), rows whose bytes start off 16-byte boundaries
# (Q8_0 578 and MXFP4 289 bytes per row).
@pytest.mark.parametrize("T,E", [(80, 8), (300, 2), (700, 2)])
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dtype,reduce,x_rank", [("bfloat16", True, 2), ("float16", False, 3), ("bfloat16", False, 2)])
def test_gguf_fused_gemm_edges_gpu(rng, T, E, fmt, dtype, reduce, x_rank):
    K = 544 if fmt in ("Q8_0", "MXFP4") else 512
    case = make_case(rng, kind=MoeKind.WMMA_GGUF, fmt=fmt, dtype=dtype, reduce=reduce, x_rank=x_rank,
                     T=T, k=2, E=E, N=200, K=K)
    plan = current_plan(MoeKind.WMMA_GGUF, case, reduce)
    if jax.devices("cuda")[0].compute_capability == "9.0":
        tile = "64x128" if T == 80 else "256x128"
        assert plan == f"grouped_wgmma_gguf {tile}", plan
    else:
        assert plan.startswith("grouped_wmma"), plan
    check(gpu_run(case, reduce=reduce), case)


@pytest.mark.parametrize("fmt,reduce,x_rank", list(itertools.product(FORMATS, REDUCE, RANKS)))
def test_scalar_gguf_gpu(rng, fmt, reduce, x_rank):
    case = make_case(rng, kind=MoeKind.SCALAR_GGUF, fmt=fmt, reduce=reduce, x_rank=x_rank, T=13, k=2, E=4, N=40)
    check(gpu_run(case, reduce=reduce), case)


@pytest.mark.parametrize("T", [2, 50])
@pytest.mark.parametrize("kind,fmt,dtype,tol", [
    (MoeKind.WMMA, None, "bfloat16", 5e-3), (MoeKind.WMMA, None, "float16", 1e-3),
    *[(MoeKind.WMMA_GGUF, f, "bfloat16", 5e-3) for f in FORMATS],
    *[(MoeKind.WMMA_GGUF, f, "float16", 1e-3) for f in FORMATS],
    *[(MoeKind.SCALAR_GGUF, f, "float32", 1e-4) for f in FORMATS],
])
@pytest.mark.parametrize("reduce", REDUCE)
def test_gpu_agrees_with_cpu(rng, kind, fmt, dtype, tol, reduce, T):
    case = make_case(rng, kind=kind, fmt=fmt, dtype=dtype if dtype != "float32" else "bfloat16",
                     T=T, k=4, E=6, N=96, K=512, reduce=reduce)
    g = np.asarray(gpu_run(case, reduce=reduce).astype(jnp.float32), np.float64)
    c = np.asarray(cpu_run(case, reduce=reduce).astype(jnp.float32), np.float64)
    assert np.isfinite(g).all()
    assert rel_err(g, c) <= tol


@pytest.mark.parametrize("T", [2, 300])
@pytest.mark.parametrize("kind,fmt", [(MoeKind.WMMA, None), (MoeKind.WMMA_GGUF, "Q4_K"), (MoeKind.SCALAR_GGUF, "Q6_K")])
def test_gpu_bitwise_reproducible(rng, kind, fmt, T):
    case = make_case(rng, kind=kind, fmt=fmt, T=T, k=4, E=8, N=130, K=512)
    a = np.asarray(gpu_run(case).astype(jnp.float32))
    for _ in range(3):
        b = np.asarray(gpu_run(case).astype(jnp.float32))
        np.testing.assert_array_equal(a.view(np.uint32), b.view(np.uint32))


@pytest.mark.parametrize("kind,fmt", [(MoeKind.WMMA, None), (MoeKind.WMMA_GGUF, "Q8_0"), (MoeKind.SCALAR_GGUF, "Q8_0")])
@pytest.mark.parametrize("reduce", REDUCE)
def test_gpu_edge_sizes(rng, kind, fmt, reduce):
    for T, k, E, N in [(0, 2, 3, 16), (1, 1, 1, 1), (3, 5, 2, 17), (65, 1, 1, 63)]:
        case = make_case(rng, kind=kind, fmt=fmt, T=T, k=k, E=E, N=N, reduce=reduce, invalid_ids=E > 1)
        out = gpu_run(case, reduce=reduce)
        if T == 0:
            assert out.shape == case.ref.shape
        else:
            check(out, case)
    if kind == MoeKind.WMMA:  # K % 8 != 0: no 16-byte vector loads, on both paths
        for T in (2, 40):
            case = make_case(rng, kind=kind, T=T, k=2, E=3, N=33, K=20, reduce=reduce)
            check(gpu_run(case, reduce=reduce), case)


@pytest.mark.parametrize("kind,fmt", [(MoeKind.WMMA, None), (MoeKind.WMMA_GGUF, "Q8_0"), (MoeKind.SCALAR_GGUF, "Q8_0")])
def test_gpu_four_million_pairs(rng, kind, fmt):
    """T * k = 2^22 pairs: no grid dimension limits the problem size."""
    T, k, E, N, K = 1 << 21, 2, 4, 16, 32
    x_dtype = "float32" if kind == MoeKind.SCALAR_GGUF else "bfloat16"
    x = jnp.asarray(rng.standard_normal((T, K)).astype(np.float32), x_dtype)
    ids = rng.integers(-1, E + 1, size=(T, k)).astype(np.int32)
    scores = rng.uniform(0.1, 1.0, size=(T, k)).astype(np.float32)
    small = make_case(rng, kind=kind, fmt=fmt, T=1, k=1, E=E, N=N, K=K)
    out = gpu_run(type(small)(x, ids, small.w, scores, None, "float32" if kind == MoeKind.SCALAR_GGUF else x_dtype))
    out = np.asarray(out.astype(jnp.float32))
    assert out.shape == (T, N) and np.isfinite(out).all()
    # Compare a sample of tokens spread over the whole range with the CPU implementation.
    sample = np.concatenate([rng.choice(T, 2000, replace=False), [0, T - 1]])
    ref = np.asarray(cpu_run(type(small)(x[sample], ids[sample], small.w, scores[sample], None,
                                         "float32" if kind == MoeKind.SCALAR_GGUF else x_dtype)).astype(jnp.float32))
    tol = 1e-4 if kind == MoeKind.SCALAR_GGUF else 5e-3
    assert rel_err(out[sample], ref) <= tol


_GRAPH_SCRIPT = textwrap.dedent("""
    import sys, numpy as np, jax, jax.numpy as jnp
    import jax_moe
    rng = np.random.default_rng(int(sys.argv[1]))
    T, k, E, N, K = 24, 2, 4, 64, 256
    x = jnp.asarray(rng.standard_normal((T, K)), jnp.bfloat16)
    ids = jnp.asarray(rng.integers(0, E, (T, k)), jnp.int32)
    s = jnp.asarray(rng.uniform(size=(T, k)), jnp.float32)
    wd = jnp.asarray(rng.standard_normal((E, N, K)) / 16, jnp.bfloat16)
    wq = jax.device_put(jax_moe.quantize(rng.standard_normal((E, N, K)).astype(np.float32) / 16, "Q4_K"))
    wdown = jnp.asarray(rng.standard_normal((E, K, N)) / 8, jnp.bfloat16)
    def f(x, ids, s, wd, wq, wdown):
        a = jax_moe.moe_matmul(x, ids, wd, reduce=False)
        b = jax_moe.moe_matmul(x, ids, wq, reduce=False)
        h = (jax.nn.silu(a.astype(jnp.float32)) * b.astype(jnp.float32)).astype(jnp.bfloat16)
        return jax_moe.moe_matmul(h, ids, wdown, s)
    fj = jax.jit(f)
    out = fj(x, ids, s, wd, wq, wdown)
    for _ in range(3):
        out = fj(x, ids, s, wd, wq, wdown)
    np.save(sys.argv[2], np.asarray(out.astype(jnp.float32)))
""")


def test_cuda_graphs_match_plain_launches(tmp_path, rng):
    """With command buffers on, the three moe_matmul calls of one jitted function run inside
    XLA's command buffer (a CUDA graph), as XLA's thunk dump and log show; the result equals
    the run with command buffers off, bit for bit."""
    script = tmp_path / "graph.py"
    script.write_text(_GRAPH_SCRIPT)
    seed = str(int(rng.integers(1 << 30)))
    runs = {}
    for name, flags in {
        "on": "--xla_gpu_enable_command_buffer=FUSION,CUSTOM_CALL --xla_gpu_graph_min_graph_size=1",
        "off": "--xla_gpu_enable_command_buffer=",
    }.items():
        dump = tmp_path / f"dump_{name}"
        env = dict(os.environ, XLA_FLAGS=f"{flags} --xla_dump_to={dump}", XLA_PYTHON_CLIENT_PREALLOCATE="false",
                   TF_CPP_MIN_LOG_LEVEL="0",
                   TF_CPP_VMODULE="command_buffer_conversion_pass=2,command_buffer_thunk=2")
        res = subprocess.run([sys.executable, str(script), seed, str(tmp_path / f"{name}.npy")],
                             env=env, capture_output=True, text=True, timeout=300)
        assert res.returncode == 0, res.stderr[-3000:]
        # The thunk sequence XLA runs (after its command-buffer pass, where that pass ran).
        seqs = sorted(dump.glob("*jit_f.thunk_sequence_after_thunk_passes.txt")) or sorted(
            dump.glob("*jit_f.thunk_sequence.txt"))
        assert seqs, sorted(p.name for p in dump.iterdir() if "jit_f" in p.name)
        runs[name] = (seqs[-1].read_text(), res.stderr, np.load(tmp_path / f"{name}.npy"))
    seq_on, log_on, out_on = runs["on"]
    seq_off, _, out_off = runs["off"]
    # On: one command buffer thunk holding the three custom calls, captured and executed.
    assert seq_on.lstrip().split(":", 1)[1].split()[0] == "kCommandBuffer"
    inside = [ln for ln in seq_on.splitlines()[1:] if ln.startswith("    ") and ": kCustomCall" in ln]
    assert len(inside) == 3, seq_on
    created = [ln for ln in log_on.splitlines() if "Creating command buffer thunk with the following thunks" in ln]
    assert any(ln.count("jax_moe_matmul") == 3 for ln in created), created
    assert "Executing warm up iteration of command buffer thunk" in log_on
    # Off: plain launches.
    assert "kCommandBuffer" not in seq_off
    np.testing.assert_array_equal(out_on, out_off)
    assert np.isfinite(out_on).all()
