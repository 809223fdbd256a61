"""moe_matmul on the CPU: every kind x format x dtype x layout x reduce x x-rank against the
float64 reference, edge sizes, transformations, lowering and argument errors."""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from jax_moe import InferenceOnlyError, MoeKind, QuantizedExperts, moe_matmul, quantize

from cases import check, make_case
from reference import FORMATS, gguf_decode, random_blocks

RANKS = (2, 3)
REDUCE = (True, False)


def run(case, **kw):
    kw.setdefault("out_dtype", case.out_dtype)
    return moe_matmul(case.x, case.ids, case.w, case.scores, **kw)


@pytest.mark.parametrize("dtype,layout,reduce,x_rank",
                         list(itertools.product(["float16", "bfloat16"], ["enk", "ekn"], REDUCE, RANKS)))
def test_wmma(rng, dtype, layout, reduce, x_rank):
    case = make_case(rng, kind=MoeKind.WMMA, dtype=dtype, layout=layout, reduce=reduce, x_rank=x_rank)
    out = run(case, reduce=reduce, weight_layout=layout)
    assert out.dtype == jnp.dtype(dtype)
    check(out, case)


@pytest.mark.parametrize("fmt,dtype,reduce,x_rank",
                         list(itertools.product(FORMATS, ["float16", "bfloat16"], REDUCE, RANKS)))
def test_wmma_gguf(rng, fmt, dtype, reduce, x_rank):
    case = make_case(rng, kind=MoeKind.WMMA_GGUF, fmt=fmt, dtype=dtype, reduce=reduce, x_rank=x_rank)
    out = run(case, reduce=reduce)
    assert out.dtype == jnp.dtype(dtype)
    check(out, case)


@pytest.mark.parametrize("fmt,reduce,x_rank", list(itertools.product(FORMATS, REDUCE, RANKS)))
def test_scalar_gguf(rng, fmt, reduce, x_rank):
    case = make_case(rng, kind=MoeKind.SCALAR_GGUF, fmt=fmt, reduce=reduce, x_rank=x_rank)
    out = run(case, reduce=reduce)
    assert out.dtype == jnp.float32
    check(out, case)


@pytest.mark.parametrize("kind,fmt", [(MoeKind.WMMA, None), (MoeKind.WMMA_GGUF, "Q4_K"), (MoeKind.SCALAR_GGUF, "Q6_K")])
def test_explicit_kind_matches_default(rng, kind, fmt):
    case = make_case(rng, kind=kind, fmt=fmt)
    a, b = run(case), run(case, kind=kind)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("out_dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("kind,fmt", [(MoeKind.WMMA, None), (MoeKind.WMMA_GGUF, "Q5_K")])
def test_out_dtype(rng, kind, fmt, out_dtype):
    case = make_case(rng, kind=kind, fmt=fmt, dtype="bfloat16", out_dtype=out_dtype)
    out = run(case, out_dtype=out_dtype)
    assert out.dtype == jnp.dtype(out_dtype)
    check(out, case)


def test_scores_in_x_dtype_and_none(rng):
    case = make_case(rng, kind=MoeKind.WMMA, dtype="bfloat16", score_dtype="bfloat16")
    check(run(case), case)
    case = make_case(rng, kind=MoeKind.WMMA, dtype="float16", with_scores=False, reduce=False)
    out = run(case)  # reduce defaults to False without scores
    assert out.shape == case.ref.shape
    check(out, case)
    case = make_case(rng, kind=MoeKind.WMMA_GGUF, fmt="Q8_0", with_scores=False, reduce=True)
    check(run(case, reduce=True), case)


@pytest.mark.parametrize("T,N,K", [(1, 1, 16), (3, 17, 40), (13, 33, 8), (16, 16, 16), (5, 3, 1)])
def test_dense_tails(rng, T, N, K):
    case = make_case(rng, kind=MoeKind.WMMA, T=T, N=N, K=K, k=3, E=5)
    check(run(case), case)


@pytest.mark.parametrize("kind,fmt", [(MoeKind.WMMA_GGUF, "Q3_K"), (MoeKind.SCALAR_GGUF, "Q2_K"), (MoeKind.WMMA_GGUF, "Q8_0")])
def test_gguf_tails(rng, kind, fmt):
    case = make_case(rng, kind=kind, fmt=fmt, T=19, N=37, k=3, E=3)
    check(run(case), case)


@pytest.mark.parametrize("kind,fmt", [(MoeKind.WMMA, None), (MoeKind.WMMA_GGUF, "Q4_K"), (MoeKind.SCALAR_GGUF, "Q8_0")])
@pytest.mark.parametrize("reduce", REDUCE)
def test_zero_tokens(rng, kind, fmt, reduce):
    case = make_case(rng, kind=kind, fmt=fmt, T=0, reduce=reduce)
    out = run(case, reduce=reduce)
    assert out.shape == case.ref.shape and out.shape[0] == 0


@pytest.mark.parametrize("kind,fmt", [(MoeKind.WMMA, None), (MoeKind.WMMA_GGUF, "Q6_K"), (MoeKind.SCALAR_GGUF, "Q5_K")])
def test_k1_and_e1(rng, kind, fmt):
    case = make_case(rng, kind=kind, fmt=fmt, k=1, E=1, invalid_ids=False)
    check(run(case), case)
    case = make_case(rng, kind=kind, fmt=fmt, k=1, E=3)
    check(run(case), case)


@pytest.mark.parametrize("kind,fmt", [(MoeKind.WMMA, None), (MoeKind.WMMA_GGUF, "Q4_K"), (MoeKind.SCALAR_GGUF, "Q3_K")])
def test_out_of_range_ids_contribute_zero(rng, kind, fmt):
    case = make_case(rng, kind=kind, fmt=fmt, T=6, k=3, E=4, reduce=False)
    ids = case.ids.copy()
    ids[0] = [-1, 4, np.iinfo(np.int32).min]
    ids[1] = [np.iinfo(np.int32).max, 2, -7]
    out = np.asarray(moe_matmul(case.x, ids, case.w, case.scores, reduce=False).astype(jnp.float32))
    assert np.all(out[0] == 0.0)
    assert np.all(out[1, 0] == 0.0) and np.all(out[1, 2] == 0.0)
    assert np.any(out[1, 1] != 0.0)
    # An all-invalid token reduces to exactly zero.
    red = np.asarray(moe_matmul(case.x, ids, case.w, case.scores, reduce=True).astype(jnp.float32))
    assert np.all(red[0] == 0.0)


def test_reduce_equals_sum_of_pairs_and_is_deterministic(rng):
    case = make_case(rng, kind=MoeKind.WMMA_GGUF, fmt="Q4_K", dtype="float16", out_dtype="float32", T=9, k=4, E=6)
    red = np.asarray(run(case, reduce=True))
    pairs = np.asarray(run(case, reduce=False))
    np.testing.assert_allclose(red, pairs.sum(axis=1), rtol=1e-5, atol=1e-6)
    again = np.asarray(run(case, reduce=True))
    np.testing.assert_array_equal(red.view(np.uint32), again.view(np.uint32))


def test_jit_matches_eager(rng):
    case = make_case(rng, kind=MoeKind.WMMA_GGUF, fmt="Q4_K")
    f = jax.jit(lambda x, ids, w, s: moe_matmul(x, ids, w, s))
    np.testing.assert_array_equal(np.asarray(f(case.x, case.ids, case.w, case.scores)), np.asarray(run(case)))


def test_lowered_hlo_holds_the_custom_call(rng):
    case = make_case(rng, kind=MoeKind.WMMA)
    text = jax.jit(moe_matmul).lower(case.x, case.ids, case.w, case.scores).as_text()
    assert "jax_moe_matmul" in text and "custom_call" in text


def _vmap_refs(rng, B, kind, fmt):
    return [make_case(rng, kind=kind, fmt=fmt, T=5, k=2, E=3, N=24) for _ in range(B)]


@pytest.mark.parametrize("kind,fmt", [(MoeKind.WMMA, None), (MoeKind.WMMA_GGUF, "Q8_0")])
def test_vmap_over_x(rng, kind, fmt):
    cases = _vmap_refs(rng, 3, kind, fmt)
    c0 = cases[0]
    xs = jnp.stack([c.x for c in cases])
    out = jax.vmap(lambda x: moe_matmul(x, c0.ids, c0.w, c0.scores))(xs)
    for b, c in enumerate(cases):
        np.testing.assert_array_equal(np.asarray(out[b]), np.asarray(moe_matmul(c.x, c0.ids, c0.w, c0.scores)))


def test_vmap_over_ids_and_scores(rng):
    cases = _vmap_refs(rng, 4, MoeKind.WMMA, None)
    c0 = cases[0]
    ids = jnp.stack([c.ids for c in cases])
    sc = jnp.stack([c.scores for c in cases])
    out = jax.vmap(lambda i, s: moe_matmul(c0.x, i, c0.w, s), in_axes=(0, 0))(ids, sc)
    for b, c in enumerate(cases):
        np.testing.assert_array_equal(np.asarray(out[b]), np.asarray(moe_matmul(c0.x, c.ids, c0.w, c.scores)))
    # A batch axis that is not leading.
    out2 = jax.vmap(lambda i: moe_matmul(c0.x, i, c0.w, c0.scores), in_axes=1)(jnp.moveaxis(ids, 0, 1))
    for b, c in enumerate(cases):
        np.testing.assert_array_equal(np.asarray(out2[b]), np.asarray(moe_matmul(c0.x, c.ids, c0.w, c0.scores)))


@pytest.mark.parametrize("kind,fmt", [(MoeKind.WMMA, None), (MoeKind.WMMA_GGUF, "Q4_K"), (MoeKind.SCALAR_GGUF, "Q6_K")])
def test_vmap_over_weights(rng, kind, fmt):
    cases = _vmap_refs(rng, 3, kind, fmt)
    c0 = cases[0]
    if kind == MoeKind.WMMA:
        ws = jnp.stack([c.w for c in cases])
    else:
        stacked = np.stack([c.w.data for c in cases])  # a batched leaf, as vmap sees it
        ws = jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(c0.w), [stacked])
    out = jax.vmap(lambda w: moe_matmul(c0.x, c0.ids, w, c0.scores))(ws)
    for b, c in enumerate(cases):
        np.testing.assert_array_equal(np.asarray(out[b]), np.asarray(moe_matmul(c0.x, c0.ids, c.w, c0.scores)))


def test_vmap_over_everything_in_jit(rng):
    cases = _vmap_refs(rng, 2, MoeKind.WMMA, None)
    st = lambda f: jnp.stack([f(c) for c in cases])  # noqa: E731
    f = jax.jit(jax.vmap(lambda x, i, w, s: moe_matmul(x, i, w, s, reduce=False)))
    out = f(st(lambda c: c.x), st(lambda c: c.ids), st(lambda c: c.w), st(lambda c: c.scores))
    for b, c in enumerate(cases):
        np.testing.assert_array_equal(np.asarray(out[b]), np.asarray(moe_matmul(c.x, c.ids, c.w, c.scores, reduce=False)))


def test_grad_raises_inference_only(rng):
    case = make_case(rng, kind=MoeKind.WMMA, dtype="float16")
    loss = lambda x: moe_matmul(x, case.ids, case.w, case.scores).astype(jnp.float32).sum()  # noqa: E731
    with pytest.raises(InferenceOnlyError, match="inference-only.*stop_gradient"):
        jax.grad(loss)(case.x)
    with pytest.raises(InferenceOnlyError):
        jax.jvp(loss, (case.x,), (jnp.ones_like(case.x),))
    # The remedy works: nothing is differentiated through the op.
    g = jax.grad(lambda x: loss(jax.lax.stop_gradient(x)) + x.astype(jnp.float32).sum())(case.x)
    np.testing.assert_array_equal(np.asarray(g, np.float32), 1.0)


def test_bad_inputs_raise_clear_errors(rng):
    case = make_case(rng, kind=MoeKind.WMMA, T=4, k=2, E=3, N=8, K=32)
    x, ids, w, s = case.x, case.ids, case.w, case.scores
    with pytest.raises(ValueError, match=r"expert_ids must be \[T, k\]"):
        moe_matmul(x, ids[:, 0], w, s)
    with pytest.raises(TypeError, match="expert_ids must be int32"):
        moe_matmul(x, ids.astype(np.int16), w, s)
    with pytest.raises(ValueError, match=r"x must be \[T, K\] or \[T, k, K\]"):
        moe_matmul(x[:3], ids, w, s)
    with pytest.raises(ValueError, match=r"w must be \[E, N, K\] with K = 32"):
        moe_matmul(x, ids, w[:, :, :16], s)
    with pytest.raises(ValueError, match=r"w must be \[E, K, N\] with K = 32"):
        moe_matmul(x, ids, w, s, weight_layout="ekn")
    with pytest.raises(ValueError, match="weight_layout must be"):
        moe_matmul(x, ids, w, s, weight_layout="nke")
    with pytest.raises(ValueError, match=r"scores must be \[T, k\]"):
        moe_matmul(x, ids, w, s[:, :1])
    with pytest.raises(TypeError, match="scores must be float32 or x's dtype"):
        moe_matmul(x, ids, w, np.asarray(s, np.float64).astype(np.float16))
    with pytest.raises(TypeError, match="x and w of the same dtype"):
        moe_matmul(x.astype(jnp.float16), ids, w, s)
    with pytest.raises(TypeError, match="dense experts run in float16 or bfloat16"):
        moe_matmul(x.astype(jnp.float32), ids, w.astype(jnp.float32), s)
    with pytest.raises(TypeError, match="out_dtype must be"):
        moe_matmul(x, ids, w, s, out_dtype=jnp.int32)
    with pytest.raises(ValueError, match="kind must be a MoeKind"):
        moe_matmul(x, ids, w, s, kind=7)


def test_kind_dtype_mismatches_raise_type_error(rng):
    case = make_case(rng, kind=MoeKind.WMMA_GGUF, fmt="Q8_0", T=3, K=64)
    dense = make_case(rng, kind=MoeKind.WMMA, T=3, K=64)
    with pytest.raises(TypeError, match="kind=WMMA runs dense.*QuantizedExperts"):
        moe_matmul(case.x, case.ids, case.w, case.scores, kind=MoeKind.WMMA)
    with pytest.raises(TypeError, match="kind=WMMA_GGUF runs GGUF-quantized experts"):
        moe_matmul(dense.x, dense.ids, dense.w, dense.scores, kind="WMMA_GGUF")
    with pytest.raises(TypeError, match="kind=SCALAR_GGUF takes float32 x"):
        moe_matmul(case.x, case.ids, case.w, case.scores, kind=MoeKind.SCALAR_GGUF)
    with pytest.raises(TypeError, match="kind=WMMA_GGUF takes float16 or bfloat16 x"):
        moe_matmul(case.x.astype(jnp.float32), case.ids, case.w, case.scores, kind=MoeKind.WMMA_GGUF)
    with pytest.raises(TypeError, match="SCALAR_GGUF writes float32"):
        moe_matmul(case.x.astype(jnp.float32), case.ids, case.w, case.scores, out_dtype=jnp.bfloat16)
    with pytest.raises(ValueError, match=r"x must be \[..., K\] with K = 64"):
        moe_matmul(case.x[:, :32], case.ids, case.w, case.scores)
    with pytest.raises(ValueError, match='weight_layout must be "enk"'):
        moe_matmul(case.x, case.ids, case.w, case.scores, weight_layout="ekn")


def test_gguf_k_not_multiple_of_block_is_value_error(rng):
    with pytest.raises(ValueError, match="multiple of the Q4_K block size 256"):
        quantize(rng.standard_normal((2, 4, 300)).astype(np.float32), "Q4_K")


def test_primitive_checks_shapes_when_bound_directly(rng):
    """The abstract eval validates even when the wrapper is bypassed."""
    from jax_moe import moe_matmul_p

    case = make_case(rng, kind=MoeKind.WMMA_GGUF, fmt="Q4_K", T=3)
    with pytest.raises(ValueError, match="w holds rows of K"):
        moe_matmul_p.bind(case.x[:, :256], jnp.asarray(case.ids), jnp.asarray(case.w.data),
                          jnp.ones((3, 2), jnp.float32), kind=2, wtype=12, layout=0, reduce=True,
                          out_dtype=np.dtype("bfloat16"))


def test_more_pairs_than_int32_is_a_clear_error():
    """T * k above 2^31 - 1 is refused at trace time (checked without allocating anything)."""
    T = 2**30 + 1
    x = jax.ShapeDtypeStruct((T, 16), jnp.bfloat16)
    ids = jax.ShapeDtypeStruct((T, 2), jnp.int32)
    w = jax.ShapeDtypeStruct((2, 8, 16), jnp.bfloat16)
    with pytest.raises(ValueError, match=r"more than the 2147483647 \(2\^31 - 1\)"):
        jax.eval_shape(lambda x, i, w: moe_matmul(x, i, w), x, ids, w)
    # At the limit the shapes are fine.
    ok = jax.eval_shape(lambda x, i, w: moe_matmul(x, i, w), jax.ShapeDtypeStruct((2**30 - 1, 16), jnp.bfloat16),
                        jax.ShapeDtypeStruct((2**30 - 1, 2), jnp.int32), w)
    assert ok.shape == (2**30 - 1, 2, 8)


@pytest.mark.parametrize("x_scale", [0.0, 1.0])
def test_scalar_gguf_keeps_mxfp4_overflow_non_finite(rng, x_scale):
    """MXFP4's E8M0 scale reaches 2^127, so a decoded weight can be infinite (gguf-py decodes it
    so). SCALAR_GGUF's integer dot must not hide it: x = 0 gives NaN (inf * 0), x > 0 a
    non-finite value, as decode(w) . x does. (The integer sum was 0, or finite, before.)"""
    K = 64
    blocks = np.zeros((1, 1, K // 32, 17), np.uint8)
    blocks[..., 0] = 254                                      # scale 2^126
    blocks[..., 1:] = rng.integers(0, 256, size=(1, 1, K // 32, 16), dtype=np.uint8) | 0x77  # codes >= 7
    w = QuantizedExperts(blocks.reshape(1, 1, -1), "MXFP4", (1, 1, K))
    dec = gguf_decode(blocks.reshape(1, 1, -1), "MXFP4", K)
    assert np.isinf(dec).any()
    x = np.full((1, K), x_scale, np.float32)
    with np.errstate(invalid="ignore", over="ignore"):
        ref = (dec[0] @ x[0].astype(np.float64))[0]
    out = np.asarray(moe_matmul(jnp.asarray(x), jnp.zeros((1, 1), jnp.int32), w, reduce=False))
    assert out.shape == (1, 1, 1) and not np.isfinite(out).any(), out
    assert np.isnan(out).all() == np.isnan(ref), (out, ref)


def test_subnormal_values_are_kept(rng):
    """The CPU kernels keep IEEE f32 although XLA's CPU threads flush subnormals (FTZ/DAZ): MXFP4
    blocks with the scale bytes e = 0..7 (scales 2^-128 .. 2^-121: subnormal scales and products)
    and a dense bf16 expert of subnormal values, read through unit-vector tokens, come out exactly
    as gguf-py's decode (rounded once to bf16) and as the weights, as on the GPU."""
    N, K = 16, 256
    data = random_blocks(rng, "MXFP4", (1, N, K // 32)).reshape(1, N, K // 32, 17)
    row, blk = np.meshgrid(np.arange(N), np.arange(K // 32), indexing="ij")
    data[..., 0] = ((row + blk) % 8).astype(np.uint8)
    data = data.reshape(1, N, -1)
    dec = gguf_decode(data, "MXFP4", K)[0]
    assert np.any((dec != 0) & (np.abs(dec) < np.finfo(np.float32).tiny))  # subnormal values present
    bits = rng.integers(1, 128, (1, N, K), dtype=np.uint16) | (rng.integers(0, 2, (1, N, K), dtype=np.uint16) << 15)
    dense = bits.view(ml_dtypes.bfloat16)  # every value a bf16 subnormal
    cols = rng.permutation(K)[:64]
    x = np.zeros((64, K), np.float32)
    x[np.arange(64), cols] = 1.0
    ids = jnp.zeros((64, 1), jnp.int32)
    xb = jnp.asarray(x, jnp.bfloat16)
    got = moe_matmul(xb, ids, QuantizedExperts(jnp.asarray(data), "MXFP4", (1, N, K)), kind=MoeKind.WMMA_GGUF,
                     reduce=False, out_dtype=jnp.float32)
    want = dec[:, cols].T.astype(ml_dtypes.bfloat16).astype(np.float32)
    np.testing.assert_array_equal(np.asarray(got).reshape(64, N), want)
    got = moe_matmul(xb, ids, jnp.asarray(dense), kind=MoeKind.WMMA, reduce=False, out_dtype=jnp.float32)
    np.testing.assert_array_equal(np.asarray(got).reshape(64, N), dense[0][:, cols].T.astype(np.float32))
