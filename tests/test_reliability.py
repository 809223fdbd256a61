"""Reliability of the host codecs, the pytree and the CPU custom call on inputs outside the happy path.

- ``quantize`` refuses what a GGUF block cannot hold (NaN, infinity, magnitudes whose fp16
  scales would overflow) with a ValueError naming the first such element, so that Q8_0 is
  bit-exact with gguf.quants for every input it accepts;
- ``QuantizedExperts`` and ``qtype`` arguments take what they say and nothing truncated;
- the custom call refuses an output that shares memory with an input (INVALID_ARGUMENT);
- its host scratch is bounded whatever k * N, and the chunked paths compute what the reference
  says;
- a seeded, time-bounded fuzz of direct custom calls: every outcome is INVALID_ARGUMENT or the
  float64 reference's result.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import textwrap
import time

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

gguf = pytest.importorskip("gguf")

import jax_moe  # noqa: E402
from jax_moe import MoeKind, QuantizedExperts, dequantize, moe_matmul, quantize  # noqa: E402
from jax_moe.kinds import as_qtype  # noqa: E402

from reference import BLOCKS, FORMATS, random_blocks  # noqa: E402
from test_properties import Problem, bits, check_against_reference  # noqa: E402

BF16 = jnp.bfloat16
GGML = {"Q8_0": 8, "Q2_K": 10, "Q3_K": 11, "Q4_K": 12, "Q5_K": 13, "Q6_K": 14, "MXFP4": 39}
Q8_0_LIMIT = np.float32(8321040.0)  # 65520 * 127: the first block maximum whose scale is fp16 inf


# -- quantize: what a block cannot hold -----------------------------------------------------

@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_quantize_refuses_non_finite_values_by_position(rng, fmt, value):
    x = rng.standard_normal((2, 3, 2 * BLOCKS[fmt][0])).astype(np.float32)
    where = (int(rng.integers(2)), int(rng.integers(3)), int(rng.integers(x.shape[2])))
    x[where] = value
    later = (1, 2, x.shape[2] - 1)
    if later > where:
        x[later] = np.nan  # only the first is named
    with pytest.raises(ValueError, match=rf"array\[{where[0]}, {where[1]}, {where[2]}\] is {value}: "
                                         r"quantize takes finite values only"):
        quantize(x, fmt)


@pytest.mark.parametrize("dtype", [np.float64, ml_dtypes.bfloat16])
def test_quantize_checks_the_values_it_was_given(rng, dtype):
    """A float64 1e39 becomes inf in float32: named with its own value, as too large."""
    x = rng.standard_normal((1, 2, 32)).astype(dtype)
    x[0, 1, 3] = 1e39 if dtype == np.float64 else np.inf
    match = r"array\[0, 1, 3\] = 1e\+39 is too large for Q8_0" if dtype == np.float64 else r"array\[0, 1, 3\] is inf"
    with pytest.raises(ValueError, match=match):
        quantize(x, "Q8_0")


def test_q8_0_is_bit_exact_with_gguf_up_to_its_limit_and_refuses_beyond(rng):
    """The largest block maximum whose scale max|x| / 127 is finite in fp16 quantizes bit for
    bit as gguf.quants does; one float32 step more makes gguf store an infinite scale (NaN on
    decode) and is refused, as are 1e7 and beyond."""
    x = rng.standard_normal((1, 4, 64)).astype(np.float32)
    top = np.nextafter(Q8_0_LIMIT, np.float32(0))
    x[0, 2, 33] = -top
    x[0, 0, 5] = top
    ours = np.asarray(quantize(x, "Q8_0").data)
    ref = gguf.quants.quantize(x.reshape(4, 64), gguf.GGMLQuantizationType.Q8_0)
    np.testing.assert_array_equal(ours.reshape(4, -1), ref)
    assert np.isfinite(dequantize(quantize(x, "Q8_0"))).all()
    for v in (Q8_0_LIMIT, np.float32(1e7), np.float32(3e38)):
        y = x.copy()
        y[0, 3, 40] = -v
        with pytest.raises(ValueError, match=r"array\[0, 3, 40\] = -\S+ is too large for Q8_0: its fp16 block "
                                             r"scales would overflow \(\|x\| must be below 65520 \* 127"):
            quantize(y, "Q8_0")
    with np.errstate(over="ignore"):
        bad = gguf.quants.quantize(np.full((1, 32), Q8_0_LIMIT, np.float32), gguf.GGMLQuantizationType.Q8_0)
    assert np.isinf(bad[:, :2].copy().view(np.float16)).all()  # what gguf would have stored


@pytest.mark.parametrize("fmt", ["Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"])
def test_k_quants_hold_the_float16_range_without_saturating(rng, fmt):
    """At |x| = 65504 (the bound) the fp16 scales do not saturate: the relative error of each
    pattern is what it is at scale 1; above the bound is a ValueError."""
    n = 256
    patterns = [rng.standard_normal((1, 8, n)), np.tile([1.0, -1.0], (1, 8, n // 2)),
                np.where(np.arange(n) == 7, 1.0, 1e-3 * rng.standard_normal((1, 8, n))),
                -np.ones((1, 8, n)), rng.uniform(0, 1, (1, 8, n)), 1 + 0.01 * rng.random((1, 8, n))]

    def rel(x):
        d = dequantize(quantize(x, fmt)).astype(np.float64)
        return np.linalg.norm(d - x) / np.linalg.norm(x)

    for p in patterns:
        p = (p / np.abs(p).max()).astype(np.float32)
        big = (p.astype(np.float64) * 65504.0).astype(np.float32)
        assert rel(big) <= 1.5 * rel(p) + 1e-3, (rel(big), rel(p))
    x = patterns[0].astype(np.float32)
    x[0, 5, 9] = np.nextafter(np.float32(65504), np.float32(np.inf))
    with pytest.raises(ValueError, match=rf"array\[0, 5, 9\] = 65504 is too large for {fmt}: .*at most 65504"):
        quantize(x, fmt)


def test_the_modules_quantize_through_the_same_check(rng):
    pytest.importorskip("flax")
    from flax import nnx

    import jax_moe.nnx as jnnx

    m = jnnx.MoE(64, 32, num_experts=2, router=jax_moe.RouterConfig(k=1), rngs=nnx.Rngs(0))
    m.gate_up[...] = m.gate_up[...].at[1, 3, 7].set(jnp.nan)
    with pytest.raises(ValueError, match=r"array\[1, \d+, \d+\] is nan: quantize takes finite values only"):
        m.quantize("Q8_0")


# -- strict types ----------------------------------------------------------------------------

def test_quantized_experts_takes_arrays_and_int_shapes(rng):
    data = random_blocks(rng, "Q4_K", (2, 3, 1))
    with pytest.raises(TypeError, match=r"data must be a uint8 array \(numpy or jax\).*got list"):
        QuantizedExperts(data.tolist(), "Q4_K", (2, 3, 256))
    with pytest.raises(TypeError, match=r"shape must be a tuple of ints \(E, N, K\); got \(2, 3\.9, 256\)"):
        QuantizedExperts(data, "Q4_K", (2, 3.9, 256))
    with pytest.raises(TypeError, match="shape must be a tuple of ints"):
        QuantizedExperts(data, "Q4_K", (2, True, 256))
    with pytest.raises(TypeError, match="shape must be a tuple of ints"):
        QuantizedExperts(data, "Q4_K", "2,3,256")
    q = QuantizedExperts(jnp.asarray(data), 12, (np.int64(2), np.int32(3), 256))
    assert q.shape == (2, 3, 256) and all(type(s) is int for s in q.shape)


@pytest.mark.parametrize("qtype", [12.7, 12.0, np.float32(8), True, None, [12]])
def test_qtype_must_be_a_format_id_or_name(rng, qtype):
    """12.7 used to be truncated to 12 (Q4_K)."""
    with pytest.raises(ValueError, match=r"qtype must be one of Q8_0, Q2_K.*; got"):
        as_qtype(qtype)
    with pytest.raises(ValueError, match="qtype must be one of"):
        quantize(np.ones((1, 1, 256), np.float32), qtype)
    with pytest.raises(ValueError, match="qtype must be one of"):
        QuantizedExperts(random_blocks(rng, "Q4_K", (1, 1, 1)), qtype, (1, 1, 256))
    assert as_qtype(np.int16(12)) == as_qtype("q4_k") == as_qtype(jax_moe.GGMLType.Q4_K)


# -- outputs that alias inputs ---------------------------------------------------------------

def aliased_call(x, ids, w, s, out_shape, out_dtype, alias: dict, *, kind, wtype, reduce):
    call = jax.ffi.ffi_call("jax_moe_matmul", jax.ShapeDtypeStruct(out_shape, out_dtype),
                            input_output_aliases=alias)
    return jax.jit(lambda *a: call(*a, kind=np.int32(kind), wtype=np.int32(wtype), layout=np.int32(0),
                                   reduce=bool(reduce)))(x, ids, w, s)


@pytest.mark.parametrize("which", ["w", "x", "scores"])
def test_an_output_aliasing_an_input_is_invalid_argument(rng, which):
    """With input_output_aliases a direct call can make out the same buffer as an input (the
    call then reads weights it has overwritten): refused by address ranges in the shared
    validation, for the CPU and CUDA handlers alike."""
    T, k = 64, 4
    ids = jnp.asarray(rng.integers(0, T, (T, k)), jnp.int32)
    if which == "w":       # dense w [E, N, K] = out [T, k, N] with E = T, N = k, K = k
        x, w = jnp.asarray(rng.standard_normal((T, k)), BF16), jnp.asarray(rng.standard_normal((T, k, k)), BF16)
        s, out, alias, reduce = jnp.ones((T, k), jnp.float32), (T, k, k), {2: 0}, False
    elif which == "x":     # per-pair x [T, k, K] = out [T, k, N] with N = K
        x, w = jnp.asarray(rng.standard_normal((T, k, 32)), BF16), jnp.asarray(rng.standard_normal((T, 32, 32)), BF16)
        s, out, alias, reduce = jnp.ones((T, k), jnp.float32), (T, k, 32), {0: 0}, False
    else:                  # scores [T, k] f32 = out [T, N] f32 with N = k
        x, w = jnp.asarray(rng.standard_normal((T, 32)), BF16), jnp.asarray(rng.standard_normal((T, k, 32)), BF16)
        s, out, alias, reduce = jnp.ones((T, k), jnp.float32), (T, k), {3: 0}, True
    dtype = jnp.float32 if which == "scores" else BF16
    with pytest.raises(jax.errors.JaxRuntimeError,
                       match=rf"INVALID_ARGUMENT: jax_moe\.moe_matmul: out shares memory with the input {which}"):
        jax.block_until_ready(aliased_call(x, ids, w, s, out, dtype, alias, kind=1, wtype=30, reduce=reduce))
    # the same call without the alias is fine
    call = jax.ffi.ffi_call("jax_moe_matmul", jax.ShapeDtypeStruct(out, dtype))
    got = call(x, ids, w, s, kind=np.int32(1), wtype=np.int32(30), layout=np.int32(0), reduce=bool(reduce))
    ref = moe_matmul(x, ids, w, s, reduce=reduce, out_dtype=dtype)
    np.testing.assert_array_equal(bits(got), bits(ref))


# -- host scratch: a fixed budget whatever k * N ----------------------------------------------

_PEAK = textwrap.dedent("""
    import json, resource, sys
    import jax, jax.numpy as jnp, numpy as np
    from jax_moe import moe_matmul
    T, k, N, K, E = 1, 2**14, 2**14, 32, 4
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((T, K)), jnp.bfloat16)
    w = jnp.asarray(rng.standard_normal((E, N, K)), jnp.bfloat16)
    ids = np.full((T, k), -1, np.int32); ids[0, [0, 1, 7777, k - 1]] = [0, 3, 1, 2]
    s = jnp.asarray(rng.uniform(-1, 1, (T, k)), jnp.float32)
    f = jax.jit(lambda *a: moe_matmul(*a)).lower(x, jnp.asarray(ids), w, s).compile()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = __import__("time").perf_counter()
    jax.block_until_ready(f(x, jnp.asarray(ids), w, s))
    took = __import__("time").perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"delta_mb": (peak - before) / 1024, "seconds": took}))
""")


def test_host_scratch_does_not_grow_with_k_times_n():
    """One token with k = N = 2^14 (a 32 KiB output): the per-token scratch used to be k * N
    floats (+1 GB); now it is cut to the fixed 64 MB budget."""
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    res = subprocess.run([sys.executable, "-c", _PEAK], capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    stats = json.loads(res.stdout.strip().splitlines()[-1])
    assert stats["delta_mb"] < 400, stats


def _sparse_problem(rng, kind, T, k, N, K, E, reduce, x_per_pair=False):
    """Mostly out-of-range ids (cheap to compute at any k) with a few valid pairs at the same
    places in every token, around chunk boundaries included. Returns the problem and the
    places of its valid pairs."""
    ids = np.full((T, k), -1, np.int32)
    cols = np.array(sorted({0, 1, k // 2 - 1, k // 2, k // 2 + 1, k - 2, k - 1, *rng.integers(0, k, 6).tolist()}))
    ids[:, cols] = rng.integers(0, E, (T, len(cols)))
    xs = (T, k, K) if x_per_pair else (T, K)
    s = rng.uniform(-1, 1, (T, k)).astype(np.float32)
    if kind == MoeKind.WMMA:
        x = rng.standard_normal(xs).astype(ml_dtypes.bfloat16)
        w = (rng.standard_normal((E, N, K)) / np.sqrt(K)).astype(ml_dtypes.bfloat16)
        return Problem(kind, None, "bfloat16", "enk", x, ids, w, s, reduce, None, False), cols
    x = rng.standard_normal(xs).astype(np.float32 if kind == MoeKind.SCALAR_GGUF else ml_dtypes.bfloat16)
    w = QuantizedExperts(random_blocks(rng, "Q8_0", (E, N, K // 32)), "Q8_0", (E, N, K))
    dtype = "float32" if kind == MoeKind.SCALAR_GGUF else "bfloat16"
    return Problem(kind, "Q8_0", dtype, "enk", x, ids, w, s, reduce, None, False), cols


def check_chunked(p: Problem, cols: np.ndarray) -> None:
    """Against the float64 reference, and bit for bit against the same call with only the
    valid pairs (a call small enough for one chunk): out-of-range pairs add exactly nothing
    and the sum over k keeps its order across chunks and column passes."""
    out = p.call()
    check_against_reference(p, out)
    x = p.x[:, cols] if p.x.ndim == 3 else p.x
    compact = dataclasses.replace(p, x=x, ids=p.ids[:, cols], scores=p.scores[:, cols]).call()
    if p.reduce:
        np.testing.assert_array_equal(bits(out), bits(compact))
    else:
        got = bits(out)
        np.testing.assert_array_equal(got[:, cols], bits(compact))
        rest = np.ones(p.ids.shape[1], bool)
        rest[cols] = False
        assert (got[:, rest] == 0).all()


@pytest.mark.parametrize("kind", list(MoeKind))
@pytest.mark.parametrize("shape", [
    (2, 2**14, 2**11, 32),   # k * N = 2^25: output columns in passes of 2^10
    (1, 2**21, 16, 32),      # k = 2^21: one token's pairs span two chunks (partial sums carried)
])
@pytest.mark.parametrize("reduce", [True, False])
def test_chunked_calls_equal_the_reference(rng, kind, shape, reduce):
    T, k, N, K = shape
    if not reduce and T * k * N > 2**25:
        T = 1
    check_chunked(*_sparse_problem(rng, kind, T, k, N, K, 3, reduce))


@pytest.mark.parametrize("reduce", [True, False])
def test_chunked_per_pair_x(rng, reduce):
    """x [T, k, K] with a token cut across chunks: each pair reads its own row."""
    check_chunked(*_sparse_problem(rng, MoeKind.WMMA, 1, 2**21, 8, 8, 2, reduce, x_per_pair=True))


# -- fuzzing direct custom calls -------------------------------------------------------------

FUZZ_SEED = int(os.environ.get("JAX_MOE_FUZZ_SEED", "16"))
FUZZ_SECONDS = float(os.environ.get("JAX_MOE_FUZZ_SECONDS", "30"))
DTYPES = [jnp.float32, jnp.float16, BF16, jnp.int32, jnp.uint8, jnp.int8]
NAMES = {jnp.dtype(jnp.float32): "float32", jnp.dtype(jnp.float16): "float16", jnp.dtype(BF16): "bfloat16"}


def random_call(rng) -> dict:
    """A valid call of a random kind, format and size, then 0-3 perturbations of shapes,
    ranks, dtypes and attributes."""
    kind = int(rng.integers(3))
    fmt = FORMATS[int(rng.integers(len(FORMATS)))]
    qk, bb, _ = BLOCKS[fmt]
    t, kk, e, n = int(rng.integers(0, 6)), int(rng.integers(1, 5)), int(rng.integers(1, 6)), int(rng.integers(0, 10))
    xd = jnp.float32 if kind == 0 else [jnp.float16, BF16][int(rng.integers(2))]
    layout, reduce, rank3 = 0, bool(rng.integers(2)), bool(rng.integers(2))
    if kind == 1:
        K = int(rng.integers(0, 41))
        layout = int(rng.integers(2))
        w, wd, wtype = ([e, n, K] if layout == 0 else [e, K, n]), xd, 1 if xd == jnp.float16 else 30
    else:
        K = qk * int(rng.integers(0, 3))
        w, wd, wtype = [e, n, K // qk * bb], jnp.uint8, GGML[fmt]
    c = dict(x=[t, kk, K] if rank3 else [t, K], xd=xd, ids=[t, kk], idd=jnp.int32, w=w, wd=wd, s=[t, kk],
             sd=[jnp.float32, xd][int(rng.integers(2))], out=[t, n] if reduce else [t, kk, n],
             od=jnp.float32 if kind == 0 else [jnp.float32, jnp.float16, BF16][int(rng.integers(3))],
             kind=kind, wtype=wtype, layout=layout, reduce=reduce, fmt=fmt)
    for _ in range(int(rng.integers(0, 4))):
        what = ["shape", "shape", "rank", "dtype", "attr"][int(rng.integers(5))]
        if what in ("shape", "rank"):
            key = ["x", "ids", "w", "s", "out"][int(rng.integers(5))]
            dims = list(c[key])
            if what == "rank":
                dims = dims[:-1] if dims and rng.integers(2) else dims + [int(rng.integers(0, 3))]
            elif dims:
                i = int(rng.integers(len(dims)))
                dims[i] = max(0, dims[i] + [-1, 1, 2, -dims[i], 7][int(rng.integers(5))])
            c[key] = dims
        elif what == "dtype":
            c[["xd", "idd", "wd", "sd", "od"][int(rng.integers(5))]] = DTYPES[int(rng.integers(len(DTYPES)))]
        else:
            key = ["kind", "wtype", "layout", "reduce"][int(rng.integers(4))]
            c[key] = {"kind": [-1, 0, 1, 2, 3, 2**31 - 1][int(rng.integers(6))],
                      "wtype": [0, 1, 8, 9, 10, 11, 12, 13, 14, 15, 30, 38, 39, 40, -1][int(rng.integers(15))],
                      "layout": [-1, 0, 1, 2][int(rng.integers(4))], "reduce": not c["reduce"]}[key]
    return c


def _array(rng, shape, dtype, n_experts: int) -> np.ndarray:
    if dtype == jnp.int32:
        return rng.integers(-2, n_experts + 2, size=shape).astype(np.int32)
    if jnp.issubdtype(dtype, jnp.integer):
        return rng.integers(0, 100, size=shape).astype(np.dtype(dtype))
    return rng.standard_normal(shape).astype(np.dtype(dtype))


def _as_problem(c, x, ids, w, s) -> Problem | None:
    """The accepted call as the reference sees it (None if the handler could not have accepted it)."""
    kind = MoeKind(c["kind"])
    if kind == MoeKind.WMMA:
        return Problem(kind, None, NAMES[jnp.dtype(c["xd"])], "enk" if c["layout"] == 0 else "ekn", x, ids, w,
                       s, c["reduce"], NAMES[jnp.dtype(c["od"])], False)
    fmt = next(f for f, v in GGML.items() if v == c["wtype"])
    K = x.shape[-1]
    q = QuantizedExperts(w, fmt, (w.shape[0], w.shape[1], K))
    return Problem(kind, fmt, NAMES[jnp.dtype(c["xd"])], "enk", x, ids, q, s, c["reduce"],
                   NAMES[jnp.dtype(c["od"])], False)


def test_fuzz_direct_calls_are_refused_or_equal_the_reference():
    """Seeded (JAX_MOE_FUZZ_SEED) and bounded in time (JAX_MOE_FUZZ_SECONDS): random direct
    custom calls, valid and perturbed. Every outcome is an INVALID_ARGUMENT naming
    jax_moe.moe_matmul, or a result equal to the float64 reference (never a crash, never an
    error of another kind, never a wrong value)."""
    outcomes = {"rejected": 0, "accepted": 0, "empty": 0}
    t0 = time.perf_counter()
    case = 0
    while time.perf_counter() - t0 < FUZZ_SECONDS:
        rng = np.random.default_rng([FUZZ_SEED, case])
        c = random_call(rng)
        n_experts = c["w"][0] if c["w"] else 4
        x, ids = _array(rng, c["x"], c["xd"], 4), _array(rng, c["ids"], c["idd"], n_experts)
        w, s = _array(rng, c["w"], c["wd"], 4), _array(rng, c["s"], c["sd"], 4)
        if c["wd"] == jnp.uint8 and len(c["w"]) == 3 and c["wtype"] in GGML.values():
            bb = BLOCKS[next(f for f, v in GGML.items() if v == c["wtype"])][1]
            if c["w"][2] % bb == 0:  # blocks with finite fp16 scales
                fmt = next(f for f, v in GGML.items() if v == c["wtype"])
                w = random_blocks(rng, fmt, tuple(c["w"][:2]) + (c["w"][2] // bb,))
        call = jax.ffi.ffi_call("jax_moe_matmul", jax.ShapeDtypeStruct(tuple(c["out"]), c["od"]))
        where = f"case {case} (seed {FUZZ_SEED}): {c}"
        try:
            out = jax.block_until_ready(call(x, ids, w, s, kind=np.int32(c["kind"]), wtype=np.int32(c["wtype"]),
                                             layout=np.int32(c["layout"]), reduce=bool(c["reduce"])))
        except jax.errors.JaxRuntimeError as e:
            assert "INVALID_ARGUMENT: jax_moe.moe_matmul: " in str(e), f"{where}: {e}"
            outcomes["rejected"] += 1
        else:
            if out.size == 0:  # XLA drops a custom call whose result is empty
                outcomes["empty"] += 1
            else:
                p = _as_problem(c, x, ids, w, s)
                try:
                    check_against_reference(p, out)
                except AssertionError as e:
                    raise AssertionError(f"{where}: {e}") from None
                outcomes["accepted"] += 1
        case += 1
    print(f"{case} cases: {outcomes}")
    assert outcomes["accepted"] >= 20 and outcomes["rejected"] >= 20, outcomes
