"""The C++ entry points called directly, bypassing the Python wrapper (docs/contract.md §5).

- The CPU FFI handler ``jax_moe_matmul`` through ``jax.ffi.ffi_call``: every wrong shape, dtype,
  rank or attribute is an INVALID_ARGUMENT error whose message names the argument, never a crash
  or a read outside a buffer; a fuzz test perturbs valid calls and checks that whatever the
  handler accepts is exactly what the public wrapper computes.
- The host codecs ``_jax_moe_cpu.quantize`` / ``dequantize`` / ``block_elems`` / ``block_bytes``:
  wrong sizes, ranks, dtypes and formats are ValueError / TypeError.
- The public wrapper and the primitive bound directly: hostile shapes and parameters are
  ValueError / TypeError at trace time.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st

import jax_moe
from jax_moe import moe_matmul, moe_matmul_p

from reference import BLOCKS, FORMATS, gguf_decode, random_blocks
from test_properties import SETTINGS, bits, examples

cpu = jax_moe._ext.cpu
BF16 = jnp.bfloat16
GGML = {"Q8_0": 8, "Q2_K": 10, "Q3_K": 11, "Q4_K": 12, "Q5_K": 13, "Q6_K": 14, "MXFP4": 39}


def ffi(x, ids, w, s, out_shape, out_dtype, *, kind, wtype, layout=0, reduce=True):
    """The CPU handler, called as a custom call that nothing validated before it."""
    call = jax.ffi.ffi_call("jax_moe_matmul", jax.ShapeDtypeStruct(out_shape, out_dtype))
    return call(x, ids, w, s, kind=np.int32(kind), wtype=np.int32(wtype), layout=np.int32(layout),
                reduce=bool(reduce))


def invalid(match: str):
    return pytest.raises(jax.errors.JaxRuntimeError, match=r"INVALID_ARGUMENT: jax_moe\.moe_matmul: .*" + match)


T, k, E, N, K = 4, 2, 3, 8, 32
X = jnp.ones((T, K), BF16)
X32 = jnp.ones((T, K), jnp.float32)
IDS = jnp.asarray([[0, 1], [2, -1], [3, 2**31 - 1], [-(2**31), 0]], jnp.int32)
W = jnp.ones((E, N, K), BF16)
WQ = jnp.zeros((E, N, 34), jnp.uint8)  # Q8_0, K = 32
S = jnp.ones((T, k), jnp.float32)


def test_valid_direct_calls_match_the_wrapper():
    ref = moe_matmul(X, IDS, W, S)
    np.testing.assert_array_equal(bits(ffi(X, IDS, W, S, (T, N), BF16, kind=1, wtype=30)), bits(ref))
    ref = moe_matmul(X32, IDS, jax_moe.QuantizedExperts(WQ, "Q8_0", (E, N, K)), S)
    np.testing.assert_array_equal(bits(ffi(X32, IDS, WQ, S, (T, N), jnp.float32, kind=0, wtype=8)), bits(ref))


@pytest.mark.parametrize("case,match", [
    # the output buffer
    (lambda: ffi(X, IDS, W, S, (T, N - 1), BF16, kind=1, wtype=30), r"out must be \[T, N\] with T=4 k=2 N=8, got \[4, 7\]"),
    (lambda: ffi(X, IDS, W, S, (T, N + 1), BF16, kind=1, wtype=30), r"out must be \[T, N\].*got \[4, 9\]"),
    (lambda: ffi(X, IDS, W, S, (T * N,), BF16, kind=1, wtype=30), r"out must be \[T, N\].*got \[32\]"),
    (lambda: ffi(X, IDS, W, S, (T, N), BF16, kind=1, wtype=30, reduce=False), r"out must be \[T, k, N\]"),
    (lambda: ffi(X, IDS, W, S, (T, k + 1, N), BF16, kind=1, wtype=30, reduce=False), r"out must be \[T, k, N\]"),
    (lambda: ffi(X, IDS, W, S, (T, N), jnp.int32, kind=1, wtype=30), "out must be float32, float16 or bfloat16"),
    (lambda: ffi(X32, IDS, WQ, S, (T, N), BF16, kind=0, wtype=8), "SCALAR_GGUF writes float32 out"),
    # expert ids
    (lambda: ffi(X, IDS.astype(jnp.float32), W, S, (T, N), BF16, kind=1, wtype=30), r"expert_ids must be int32 \[T, k\], got float32"),
    (lambda: ffi(X, IDS.astype(jnp.int16), W, S, (T, N), BF16, kind=1, wtype=30), r"expert_ids must be int32"),
    (lambda: ffi(X, IDS.astype(jnp.uint32), W, S, (T, N), BF16, kind=1, wtype=30), r"expert_ids must be int32"),
    (lambda: ffi(X, IDS[:, :, None], W, S, (T, N), BF16, kind=1, wtype=30), r"expert_ids must be int32 \[T, k\]"),
    (lambda: ffi(X, IDS[:, 0], W, S, (T, N), BF16, kind=1, wtype=30), r"expert_ids must be int32 \[T, k\]"),
    (lambda: ffi(X, IDS[:, :0], W, S[:, :0], (T, N), BF16, kind=1, wtype=30), "k >= 1"),
    # x
    (lambda: ffi(X[:3], IDS, W, S, (T, N), BF16, kind=1, wtype=30), r"x must be \[T, K\] or \[T, k, K\]"),
    (lambda: ffi(X[0], IDS, W, S, (T, N), BF16, kind=1, wtype=30), r"x must be \[T, K\] or \[T, k, K\]"),
    (lambda: ffi(jnp.ones((T, k + 1, K), BF16), IDS, W, S, (T, N), BF16, kind=1, wtype=30), r"got \[4, 3, 32\]"),
    (lambda: ffi(jnp.ones((T, k, 1, K), BF16), IDS, W, S, (T, N), BF16, kind=1, wtype=30), r"x must be"),
    (lambda: ffi(X.astype(jnp.int32), IDS, W, S, (T, N), BF16, kind=1, wtype=30), "x must be float32, float16 or bfloat16"),
    (lambda: ffi(X.astype(jnp.float16), IDS, W, S, (T, N), BF16, kind=0, wtype=8), "SCALAR_GGUF takes float32 x"),
    (lambda: ffi(X32, IDS, W.astype(jnp.float32), S, (T, N), jnp.float32, kind=1, wtype=0), "take float16 or bfloat16 x"),
    (lambda: ffi(X32, IDS, WQ, S, (T, N), jnp.float32, kind=2, wtype=8), "take float16 or bfloat16 x"),
    # dense w
    (lambda: ffi(X, IDS, W[:, :, :16], S, (T, N), BF16, kind=1, wtype=30), r"w \[3, 8, 16\] does not match K = 32 \(\[E, N, K\] expected\)"),
    (lambda: ffi(X, IDS, W[:, :, :K + 0][:, :, 1:], S, (T, N), BF16, kind=1, wtype=30), "does not match K = 32"),
    (lambda: ffi(X, IDS, W, S, (T, K), BF16, kind=1, wtype=30, layout=1), r"does not match K = 32 \(\[E, K, N\] expected\)"),
    (lambda: ffi(X, IDS, W.astype(jnp.float16), S, (T, N), BF16, kind=1, wtype=30), "dense w must have x's dtype bfloat16, got float16"),
    (lambda: ffi(X, IDS, W[0], S, (T, N), BF16, kind=1, wtype=30), r"w must be rank 3, got \[8, 32\]"),
    (lambda: ffi(X, IDS, W[None], S, (T, N), BF16, kind=1, wtype=30), r"w must be rank 3"),
    # quantized w
    (lambda: ffi(X32, IDS, WQ[:, :, :33], S, (T, N), jnp.float32, kind=0, wtype=8), r"quantized w must be \[E, N, 34\] for K = 32 in Q8_0, got \[3, 8, 33\]"),
    (lambda: ffi(X32, IDS, jnp.zeros((E, N, 35), jnp.uint8), S, (T, N), jnp.float32, kind=0, wtype=8), r"got \[3, 8, 35\]"),
    (lambda: ffi(X32, IDS, WQ, S, (T, N), jnp.float32, kind=0, wtype=12), r"K = 32 must be a multiple of 256 for Q4_K"),
    (lambda: ffi(jnp.ones((T, 48), jnp.float32), IDS, WQ, S, (T, N), jnp.float32, kind=0, wtype=8), "K = 48 must be a multiple of 32"),
    (lambda: ffi(jnp.ones((T, 256), jnp.float32), IDS, jnp.zeros((E, N, 143), jnp.uint8), S, (T, N), jnp.float32, kind=0, wtype=12), r"\[E, N, 144\]"),
    (lambda: ffi(X32, IDS, WQ.astype(jnp.int8), S, (T, N), jnp.float32, kind=0, wtype=8), "quantized w must be uint8 blocks"),
    (lambda: ffi(X32, IDS, WQ, S, (T, N), jnp.float32, kind=0, wtype=0), "qtype 0 is not a supported GGUF format"),
    (lambda: ffi(X32, IDS, WQ, S, (T, N), jnp.float32, kind=0, wtype=30), "qtype 30 is not a supported GGUF format"),
    (lambda: ffi(X32, IDS, WQ, S, (T, N), jnp.float32, kind=0, wtype=-8), "qtype -8 is not a supported GGUF format"),
    (lambda: ffi(X, IDS, WQ, S, (T, N), BF16, kind=2, wtype=8, layout=1), "quantized w must use the ENK layout"),
    # scores
    (lambda: ffi(X, IDS, W, S[:, :1], (T, N), BF16, kind=1, wtype=30), r"scores must be \[T, k\] = \[4, 2\], got \[4, 1\]"),
    (lambda: ffi(X, IDS, W, S[:3], (T, N), BF16, kind=1, wtype=30), r"scores must be \[T, k\]"),
    (lambda: ffi(X, IDS, W, S.reshape(-1), (T, N), BF16, kind=1, wtype=30), r"scores must be \[T, k\]"),
    (lambda: ffi(X, IDS, W, S.astype(jnp.int32), (T, N), BF16, kind=1, wtype=30), "scores must be float32 or x's dtype, got int32"),
    (lambda: ffi(X, IDS, W, S.astype(jnp.float16), (T, N), BF16, kind=1, wtype=30), "scores must be float32 or x's dtype, got float16"),
    # attributes
    (lambda: ffi(X, IDS, W, S, (T, N), BF16, kind=3, wtype=30), "kind must be 0, 1 or 2, got 3"),
    (lambda: ffi(X, IDS, W, S, (T, N), BF16, kind=-1, wtype=30), "kind must be 0, 1 or 2, got -1"),
    (lambda: ffi(X, IDS, W, S, (T, N), BF16, kind=2**31 - 1, wtype=30), "kind must be 0, 1 or 2"),
    (lambda: ffi(X, IDS, W, S, (T, N), BF16, kind=1, wtype=30, layout=2), r"layout must be 0 \(ENK\) or 1 \(EKN\), got 2"),
    (lambda: ffi(X, IDS, W, S, (T, N), BF16, kind=1, wtype=30, layout=-(2**31)), "layout must be 0"),
])
def test_wrong_sizes_are_invalid_argument(case, match):
    with invalid(match):
        jax.block_until_ready(case())


def test_wrong_arity_and_attribute_types_are_errors_not_crashes():
    # Each call under a jit of its own: eager calls are cached by attribute value, and
    # np.int64(1) == np.int32(1), so an eager call here would be reused by later valid calls.
    x, ids, w, s = jnp.ones((5, 64), BF16), jnp.zeros((5, 1), jnp.int32), jnp.ones((2, 3, 64), BF16), jnp.ones((5, 1))
    call = jax.ffi.ffi_call("jax_moe_matmul", jax.ShapeDtypeStruct((5, 3), BF16))
    for attrs in (dict(kind=np.int64(1), wtype=np.int32(30), layout=np.int32(0), reduce=True),
                  dict(kind=np.int32(1), wtype=np.int32(30), layout=np.int32(0)),
                  dict(kind=np.float32(1), wtype=np.int32(30), layout=np.int32(0), reduce=True)):
        with pytest.raises(jax.errors.JaxRuntimeError, match="(?s)INVALID_ARGUMENT.*([Aa]ttribute|scalar data type)"):
            jax.block_until_ready(jax.jit(lambda *a, attrs=attrs: call(*a, **attrs))(x, ids, w, s))
    good = dict(kind=np.int32(1), wtype=np.int32(30), layout=np.int32(0), reduce=True)
    for args in ((x, ids, w), (x, ids, w, s, s), (x,)):
        with pytest.raises(jax.errors.JaxRuntimeError, match="INVALID_ARGUMENT.*Wrong number of arguments"):
            jax.block_until_ready(call(*args, **good))
    two = jax.ffi.ffi_call("jax_moe_matmul", (jax.ShapeDtypeStruct((5, 3), BF16),) * 2)
    with pytest.raises(jax.errors.JaxRuntimeError, match="INVALID_ARGUMENT.*Wrong number of results"):
        jax.block_until_ready(two(x, ids, w, s, **good))


# -- fuzzing the handler --------------------------------------------------------------------

DTYPES = [jnp.float32, jnp.float16, BF16, jnp.int32, jnp.uint8, jnp.int8, jnp.uint32]


@st.composite
def direct_calls(draw):
    """A valid call, then 0-3 perturbations of shapes, dtypes and attributes."""
    kind = draw(st.sampled_from([0, 1, 2]))
    fmt = draw(st.sampled_from(FORMATS))
    qk, bb, _ = BLOCKS[fmt]
    small = lambda lo, hi: draw(st.one_of(st.integers(lo, hi), st.just(0)) if draw(st.integers(0, 9)) == 0  # noqa: E731
                                else st.integers(lo, hi))
    t, kk, e, n = small(1, 5), draw(st.integers(1, 3)), draw(st.integers(1, 4)), small(1, 9)
    layout, reduce, rank3 = 0, draw(st.booleans()), draw(st.booleans())
    xd = jnp.float32 if kind == 0 else draw(st.sampled_from([jnp.float16, BF16]))
    if kind == 1:
        K_ = draw(st.integers(0, 40))
        layout = draw(st.sampled_from([0, 1]))
        wshape, wd, wtype = ([e, n, K_] if layout == 0 else [e, K_, n]), xd, 1 if xd == jnp.float16 else 30
    else:
        K_ = qk * draw(st.integers(0, 2))
        wshape, wd, wtype = [e, n, K_ // qk * bb], jnp.uint8, GGML[fmt]
    spec = dict(x=[t, kk, K_] if rank3 else [t, K_], xd=xd, ids=[t, kk], idd=jnp.int32, w=wshape, wd=wd,
                s=[t, kk], sd=jnp.float32 if draw(st.booleans()) else xd, out=[t, n] if reduce else [t, kk, n],
                od=jnp.float32 if kind == 0 else draw(st.sampled_from([jnp.float32, jnp.float16, BF16])),
                kind=kind, wtype=wtype, layout=layout, reduce=reduce)
    for _ in range(draw(st.integers(0, 3))):
        what = draw(st.sampled_from(["shape", "shape", "rank", "dtype", "attr"]))
        if what in ("shape", "rank"):
            key = draw(st.sampled_from(["x", "ids", "w", "s", "out"]))
            dims = list(spec[key])
            if what == "rank":
                dims = dims[:-1] if dims and draw(st.booleans()) else dims + [draw(st.integers(0, 2))]
            elif dims:
                i = draw(st.integers(0, len(dims) - 1))
                dims[i] = max(0, dims[i] + draw(st.sampled_from([-1, 1, 2, -dims[i], 7])))
            spec[key] = dims
        elif what == "dtype":
            key = draw(st.sampled_from(["xd", "idd", "wd", "sd", "od"]))
            spec[key] = draw(st.sampled_from(DTYPES))
        else:
            key = draw(st.sampled_from(["kind", "wtype", "layout", "reduce"]))
            spec[key] = {"kind": draw(st.sampled_from([-1, 0, 1, 2, 3])),
                         "wtype": draw(st.sampled_from([0, 1, 8, 9, 10, 11, 12, 13, 14, 15, 30, 38, 39, 40, -1])),
                         "layout": draw(st.sampled_from([-1, 0, 1, 2])), "reduce": not spec["reduce"]}[key]
    return spec, draw(st.integers(0, 2**32))


def _array(rng, shape, dtype, E_: int = 4):
    if np.prod(shape, dtype=np.int64) > 10**6:
        return None
    if dtype == jnp.int32:
        return jnp.asarray(rng.integers(-2, E_ + 2, size=shape), jnp.int32)
    if jnp.issubdtype(dtype, jnp.integer):
        return jnp.asarray(rng.integers(0, 100, size=shape), dtype)
    return jnp.asarray(rng.standard_normal(shape), dtype)


@settings(max_examples=examples(200), **SETTINGS)
@given(call=direct_calls())
def test_fuzz_the_handler(call):
    """Whatever the handler accepts, the wrapper accepts too and computes the same bits;
    everything else is INVALID_ARGUMENT."""
    spec, seed = call
    rng = np.random.default_rng(seed)
    x, ids = _array(rng, spec["x"], spec["xd"]), _array(rng, spec["ids"], spec["idd"], spec["w"][0] if spec["w"] else 4)
    w, s = _array(rng, spec["w"], spec["wd"]), _array(rng, spec["s"], spec["sd"])
    if spec["wd"] == jnp.uint8 and w is not None and len(spec["w"]) == 3 and spec["wtype"] in GGML.values():
        fmt = next(f for f, v in GGML.items() if v == spec["wtype"])
        bb = BLOCKS[fmt][1]
        if spec["w"][2] % bb == 0:  # finite fp16 scales
            w = jnp.asarray(random_blocks(rng, fmt, tuple(spec["w"][:2]) + (spec["w"][2] // bb,)))
    try:
        out = jax.block_until_ready(ffi(x, ids, w, s, tuple(spec["out"]), spec["od"], kind=spec["kind"],
                                        wtype=spec["wtype"], layout=spec["layout"], reduce=spec["reduce"]))
    except jax.errors.JaxRuntimeError as e:
        assert "INVALID_ARGUMENT: jax_moe.moe_matmul: " in str(e), str(e)
        event("rejected")
        return
    if out.size == 0:
        # XLA drops a custom call whose result is empty: the handler never ran, no byte was touched.
        event("empty result: not run")
        return
    event("accepted")
    # Accepted: the public primitive takes the same call and gives the same bits.
    ref = moe_matmul_p.bind(x, ids, w, s, kind=spec["kind"], wtype=spec["wtype"], layout=spec["layout"],
                            reduce=spec["reduce"], out_dtype=np.dtype(spec["od"]))
    assert ref.shape == out.shape and ref.dtype == out.dtype
    np.testing.assert_array_equal(bits(out), bits(ref))


# -- the codecs -----------------------------------------------------------------------------

@pytest.mark.parametrize("fmt", FORMATS)
def test_codecs_reject_wrong_sizes(fmt):
    qt, (qk, bb, _) = GGML[fmt], BLOCKS[fmt]
    with pytest.raises(ValueError, match=f"last dimension of x \\({qk + 1}\\) must be a multiple of {qk}"):
        cpu.quantize(np.zeros((2, qk + 1), np.float32), qt)
    with pytest.raises(ValueError, match=f"last dimension of data \\({bb - 1} bytes\\) must be a multiple of {bb}"):
        cpu.dequantize(np.zeros((2, bb - 1), np.uint8), qt)
    with pytest.raises(ValueError, match="at least one dimension"):
        cpu.quantize(np.zeros((), np.float32), qt)
    with pytest.raises(ValueError, match="at least one dimension"):
        cpu.dequantize(np.zeros((), np.uint8), qt)
    # x is converted to float32 C order (values kept), as jax_moe.quantize does.
    x64 = np.random.default_rng(1).standard_normal((2, qk))
    np.testing.assert_array_equal(cpu.quantize(x64, qt), cpu.quantize(x64.astype(np.float32), qt))
    # Block bytes are never converted: uint16 / float / int8 arrays would be cast value by value
    # to uint8 and decoded as blocks they are not (regression: they were, silently).
    for dt in (np.int8, np.uint16, np.float32, np.int64):
        with pytest.raises(TypeError):
            cpu.dequantize(np.full((2, bb), 100, dt), qt)
    with pytest.raises(TypeError):
        cpu.dequantize(np.zeros((2, 2 * bb), np.uint8)[:, ::2], qt)  # non-contiguous view
    with pytest.raises(TypeError):
        cpu.quantize([1.0] * qk, qt)
    # Zero-sized arrays of any rank, including a huge leading dimension of nothing.
    assert cpu.quantize(np.zeros((2**40, 0), np.float32), qt).shape == (2**40, 0)
    assert cpu.quantize(np.zeros((0, 2**20 * qk), np.float32), qt).shape == (0, 2**20 * bb)
    assert cpu.dequantize(np.zeros((3, 0, bb), np.uint8), qt).shape == (3, 0, qk)


@pytest.mark.parametrize("qtype", [-1, 0, 1, 2, 7, 9, 15, 16, 30, 2**31 - 1, -(2**31)])
def test_codecs_reject_unsupported_formats(qtype):
    with pytest.raises(ValueError, match=f"qtype must be one of .*; got {qtype}"):
        cpu.quantize(np.zeros((1, 256), np.float32), qtype)
    with pytest.raises(ValueError, match="qtype must be one of"):
        cpu.dequantize(np.zeros((1, 210), np.uint8), qtype)
    with pytest.raises(ValueError, match="qtype must be one of"):
        cpu.block_elems(qtype)
    with pytest.raises(ValueError, match="qtype must be one of"):
        cpu.block_bytes(qtype)


def test_codecs_non_contiguous_inputs_are_copied_or_refused():
    a = np.random.default_rng(0).standard_normal((4, 512)).astype(np.float32)
    view = a[:, ::2]  # non-contiguous [4, 256]
    try:
        q = cpu.quantize(view, 12)
    except TypeError:
        return
    np.testing.assert_array_equal(q, cpu.quantize(np.ascontiguousarray(view), 12))


@settings(max_examples=examples(150), **SETTINGS)
@given(fmt=st.sampled_from(FORMATS), lead=st.lists(st.integers(0, 3), min_size=0, max_size=3),
       last=st.integers(0, 4), off=st.sampled_from([0, 0, 1, -1, 7]), seed=st.integers(0, 2**32))
def test_fuzz_codec_sizes(fmt, lead, last, off, seed):
    """Any shape: the output shape follows the block arithmetic or the call is a ValueError;
    decoding matches gguf.quants bit for bit."""
    qt, (qk, bb, _) = GGML[fmt], BLOCKS[fmt]
    rng = np.random.default_rng(seed)
    n = max(0, last * qk + off)
    x = rng.standard_normal(tuple(lead) + (n,)).astype(np.float32)
    if n % qk:
        with pytest.raises(ValueError, match="must be a multiple"):
            cpu.quantize(x, qt)
    else:
        q = cpu.quantize(x, qt)
        assert q.shape == tuple(lead) + (n // qk * bb,) and q.dtype == np.uint8
    m = max(0, last * bb + off)
    data = rng.integers(0, 256, tuple(lead) + (m,), dtype=np.uint8)
    if m % bb:
        with pytest.raises(ValueError, match="must be a multiple"):
            cpu.dequantize(data, qt)
        return
    if m:
        data = random_blocks(rng, fmt, tuple(lead) + (m // bb,))
    dec = cpu.dequantize(data, qt)
    assert dec.shape == tuple(lead) + (m // bb * qk,) and dec.dtype == np.float32
    if dec.size:
        np.testing.assert_array_equal(dec.view(np.uint32), gguf_decode(data, fmt, m // bb * qk).view(np.uint32))


# -- the public wrapper and the primitive ----------------------------------------------------

@st.composite
def hostile_public_calls(draw):
    shape = lambda: draw(st.lists(st.integers(0, 5), min_size=0, max_size=4))  # noqa: E731
    dt = lambda: draw(st.sampled_from(DTYPES))  # noqa: E731
    quantized = draw(st.booleans())
    fmt = draw(st.sampled_from(FORMATS))
    return dict(x=(shape(), dt()), ids=(shape(), draw(st.sampled_from([jnp.int32, jnp.int32, jnp.int16, jnp.float32]))),
                w=(shape(), dt()), s=None if draw(st.booleans()) else (shape(), dt()), quantized=quantized, fmt=fmt,
                qshape=draw(st.lists(st.integers(0, 4), min_size=3, max_size=3)),
                kind=draw(st.sampled_from([None, 0, 1, 2, "WMMA", 3])), reduce=draw(st.sampled_from([None, True, False])),
                out_dtype=draw(st.sampled_from([None, jnp.float32, BF16, jnp.int32])),
                layout=draw(st.sampled_from(["enk", "ekn", "nke"])))


@settings(max_examples=examples(200), **SETTINGS)
@given(c=hostile_public_calls(), seed=st.integers(0, 2**32))
def test_fuzz_public_api_hostile_shapes(c, seed):
    """Random ranks, sizes and dtypes: moe_matmul returns the contract's shape or raises
    ValueError / TypeError naming the problem; nothing else escapes and nothing crashes."""
    rng = np.random.default_rng(seed)
    x = _array(rng, *c["x"])
    ids = _array(rng, *c["ids"])
    s = None if c["s"] is None else _array(rng, *c["s"])
    if c["quantized"]:
        qk, bb, _ = BLOCKS[c["fmt"]]
        Eq, Nq, nb = c["qshape"]
        try:
            w = jax_moe.QuantizedExperts(jnp.zeros((Eq, Nq, nb * bb), jnp.uint8), c["fmt"], (Eq, Nq, nb * qk))
        except ValueError:
            return
    else:
        w = _array(rng, *c["w"])
    try:
        out = moe_matmul(x, ids, w, s, kind=c["kind"], reduce=c["reduce"], out_dtype=c["out_dtype"],
                         weight_layout=c["layout"])
    except (ValueError, TypeError) as e:
        assert str(e)
        event(f"rejected: {type(e).__name__}")
        return
    event("accepted")
    Tn, kn = ids.shape
    reduce = c["reduce"] if c["reduce"] is not None else s is not None
    assert out.shape[0] == Tn and out.ndim == (2 if reduce else 3)


@pytest.mark.parametrize("params,error,match", [
    (dict(kind=5, wtype=30, layout=0), ValueError, "5 is not a valid MoeKind"),
    (dict(kind=1, wtype=30, layout=9), ValueError, "9 is not a valid WeightLayout"),
    (dict(kind=2, wtype=0, layout=0), (TypeError, ValueError), "0 is not a valid GGMLType|qtype|F32"),
    (dict(kind=2, wtype=99, layout=0), (TypeError, ValueError), "99 is not a valid GGMLType|qtype"),
])
def test_primitive_bound_with_bad_parameters(params, error, match):
    x = X if params["kind"] == 1 else jnp.ones((T, 256), BF16)
    w = W if params["kind"] == 1 else jnp.zeros((E, N, 144), jnp.uint8)
    with pytest.raises(error, match=match):
        moe_matmul_p.bind(x, IDS, w, S, reduce=True, out_dtype=np.dtype(BF16), **params)


# -- degenerate sizes cost nothing -----------------------------------------------------------

def _time_call(E_: int) -> float:
    """Seconds per call (compiled once) with E experts of zero bytes each (K = 0)."""
    x = jnp.zeros((2, 0), BF16)
    ids = jnp.asarray([[0, 3], [5, -1]], jnp.int32)
    w = jax.device_put(np.zeros((E_, 4, 0), ml_dtypes.bfloat16))  # no jnp.zeros: XLA is O(E) there
    s = jnp.asarray([[1.0, np.nan], [2.0, 1.0]], jnp.float32)
    f = jax.jit(moe_matmul).lower(x, ids, w, s).compile()
    out = np.asarray(jax.block_until_ready(f(x, ids, w, s)), np.float32)
    expect = np.zeros((2, 4), np.float32)
    if E_ > 3:
        expect[0] = np.nan  # the NaN score of pair (0, 1) times an empty dot product, as in float64
    np.testing.assert_array_equal(out, expect)
    t0 = time.perf_counter()
    for _ in range(3):
        jax.block_until_ready(f(x, ids, w, s))
    return (time.perf_counter() - t0) / 3


def test_empty_experts_cost_nothing_however_many():
    """K = 0: the expert buffer is empty whatever E is, so a call has nothing to compute.

    BUG (csrc/cpu/moe_cpu.cc, owner's): the CPU kernel groups pairs with a counting sort over
    all E experts (E + 1 int64 counts plus a copy, cleared and scanned per token chunk), so its
    time and memory grow with E even when the buffers hold nothing: ~0.1 s and 128 MB at
    E = 2**23, ~32 GB at E = 2**31 - 1 (all an int32 id can address; enough to get the process
    killed). Fix: group a chunk's valid pairs by sorting them (O(T*k log(T*k)), no per-expert
    arrays), or count only the experts that occur. (XLA itself also compiles a custom call with
    such an operand in O(E) time and memory, ~3 s here; that part is not jax_moe's.)"""
    small, big = _time_call(4), _time_call(2**23)
    assert big < 0.02 + 10 * small, f"E = 2**23 empty experts: {big:.4f} s per call (E = 4: {small:.4f} s)"
