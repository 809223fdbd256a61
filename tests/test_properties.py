"""Property tests (hypothesis) of moe_matmul on the CPU (docs/contract.md §4).

Random problems over every kind, format, dtype, layout, x rank, reduce and out dtype, with
shapes from empty to thousands of tokens, k from 1 to E, E from 1 to 256, K at and around block
multiples, ids anywhere in int32 (negative, >= E, INT32_MIN/MAX) and NaN/Inf in x, scores and
the fp16 scales of GGUF blocks. Properties:

- the result equals the float64 reference wherever the reference is finite (elementwise, with a
  bound derived from f32 accumulation and one rounding to the output dtype);
- it is non-finite wherever the reference is, and NaN exactly where the reference is NaN when
  the inputs hold NaN but no Inf: NaN propagates instead of being masked;
- pairs with ids outside [0, E) contribute exactly zero and are never read: poisoning their
  scores (and x rows) with NaN and moving their ids elsewhere outside [0, E) changes no bit;
- two calls give the same bits; no input crashes the process.

The helpers here are shared with the GPU versions in test_gpu_properties.py.
"""

from __future__ import annotations

import dataclasses
import os

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from jax_moe import MoeKind, QuantizedExperts, moe_matmul, quantize

from reference import BLOCKS, E8M0, FORMATS, gguf_decode, random_blocks, stage_q8_1

I32 = np.iinfo(np.int32)
NP_DTYPES = {"float16": np.dtype(np.float16), "bfloat16": np.dtype(ml_dtypes.bfloat16),
             "float32": np.dtype(np.float32)}
# Relative error of one rounding to the output dtype (with margin).
OUT_RTOL = {"float32": 0.0, "float16": 2.0**-10, "bfloat16": 2.0**-7}
# Smallest magnitude an output dtype resolves (subnormal spacing).
OUT_ATOL = {"float32": 2.0**-149, "float16": 2.0**-24, "bfloat16": 2.0**-133}
U32 = 2.0**-24  # unit roundoff of f32

DENSE_K = (0, 1, 2, 7, 8, 9, 15, 16, 17, 31, 32, 33, 63, 64, 65, 127, 128, 129, 255, 256, 257)
HOSTILE_IDS = ("-1", "E", "E+1", "-E", "min", "max", "any")
# JAX_MOE_HYPOTHESIS_SCALE=10 runs ten times the examples (a longer bug hunt than CI's).
SCALE = float(os.environ.get("JAX_MOE_HYPOTHESIS_SCALE", "1"))


def examples(n: int) -> int:
    return max(1, int(n * SCALE))


SETTINGS = dict(deadline=None, derandomize=False, print_blob=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@dataclasses.dataclass
class Problem:
    """One moe_matmul call and what the float64 reference needs."""

    kind: MoeKind
    fmt: str | None
    dtype: str  # x dtype
    layout: str
    x: np.ndarray  # as passed (x dtype)
    ids: np.ndarray
    w: object  # np dense array (as passed, in its layout) or QuantizedExperts
    scores: np.ndarray | None
    reduce: bool
    out_dtype: str | None
    has_inf: bool  # some input holds +-Inf (not only NaN)

    @property
    def E(self) -> int:
        return self.w.E if isinstance(self.w, QuantizedExperts) else self.w.shape[0]

    @property
    def out_dtype_name(self) -> str:
        if self.out_dtype is not None:
            return self.out_dtype
        return "float32" if self.kind == MoeKind.SCALAR_GGUF else self.dtype

    def invalid(self) -> np.ndarray:
        return (self.ids < 0) | (self.ids >= self.E)

    def call(self, x=None, ids=None, scores=None):
        kw = {} if self.out_dtype is None else {"out_dtype": self.out_dtype}
        return moe_matmul(self.x if x is None else x, self.ids if ids is None else ids, self.w,
                          self.scores if scores is None else scores, kind=self.kind,
                          reduce=self.reduce, weight_layout=self.layout, **kw)

    def _repr_pretty_(self, printer, cycle) -> None:  # hypothesis prints this, not the arrays
        printer.text(repr(self))

    def __repr__(self) -> str:  # what a failing example prints
        s = "None" if self.scores is None else f"{self.scores.dtype}{list(self.scores.shape)}"
        return (f"Problem(kind={self.kind.name}, fmt={self.fmt}, dtype={self.dtype}, layout={self.layout}, "
                f"x={list(self.x.shape)}, ids={list(self.ids.shape)} E={self.E}, w={self.w if self.fmt else list(self.w.shape)}, "
                f"scores={s}, reduce={self.reduce}, out_dtype={self.out_dtype}, has_inf={self.has_inf}, "
                f"invalid_pairs={int(self.invalid().sum())}, nan_x={int(np.isnan(np.asarray(self.x, np.float32)).sum())})")


def _inject(rng, a: np.ndarray, values, count: int) -> None:
    """Write `count` values drawn from `values` at random positions of `a` (in place)."""
    if a.size == 0 or count == 0:
        return
    flat = a.reshape(-1)
    pos = rng.integers(0, flat.size, size=count)
    flat[pos] = rng.choice(np.asarray(values, np.float64), size=count).astype(a.dtype)


def _hostile_ids(rng, shape, E: int, p_invalid: float) -> np.ndarray:
    ids = rng.integers(0, E, size=shape, dtype=np.int64)
    bad = rng.random(shape) < p_invalid
    pick = {"-1": -1, "E": E, "E+1": E + 1, "-E": -E, "min": I32.min, "max": I32.max}
    choice = rng.integers(0, len(HOSTILE_IDS), size=shape)
    for i, name in enumerate(HOSTILE_IDS):
        sel = bad & (choice == i)
        if name == "any":  # anywhere in int32 outside [0, E)
            v = rng.integers(I32.min, I32.max, size=shape, dtype=np.int64, endpoint=True)
            v = np.where((v >= 0) & (v < E), v - E - 1, v)
            ids[sel] = v[sel]
        else:
            ids[sel] = pick[name]
    return ids.astype(np.int32)


@st.composite
def problems(draw, *, kinds=tuple(MoeKind), max_T: int = 4097, max_E: int = 256, work: int = 3_000_000,
             weight_elems: int = 1_500_000, specials: bool = True) -> Problem:
    """A random moe_matmul problem; `work` bounds pairs * N * K and `weight_elems` E * N * K."""
    kind = draw(st.sampled_from(kinds))
    if kind == MoeKind.WMMA:
        fmt, dtype, layout = None, draw(st.sampled_from(["float16", "bfloat16"])), draw(st.sampled_from(["enk", "ekn"]))
        K = draw(st.sampled_from(DENSE_K))
    else:
        fmt, layout = draw(st.sampled_from(FORMATS)), "enk"
        dtype = "float32" if kind == MoeKind.SCALAR_GGUF else draw(st.sampled_from(["float16", "bfloat16"]))
        qk = BLOCKS[fmt][0]
        K = qk * draw(st.integers(0, 4 if qk == 32 else 2))
    E = draw(st.one_of(st.integers(1, 8), st.sampled_from([e for e in (16, 64, 128, 255, 256) if e <= max_E])))
    E = min(E, max_E)
    T = draw(st.one_of(st.integers(0, 12), st.sampled_from([t for t in (0, 31, 32, 33, 255, 256, 1000, 2048, 4097) if t <= max_T])))
    N = draw(st.one_of(st.integers(1, 40), st.sampled_from([0, 64, 127, 128, 129])))
    Kc = max(K, 1)
    N = min(N, max(1, weight_elems // (E * Kc)), max(1, work // (max(T, 1) * Kc)))
    k_max = max(1, min(E, work // max(1, T * max(N, 1) * Kc), 4 * E if T > 256 else E))
    k = draw(st.one_of(st.integers(1, min(k_max, 4)), st.integers(1, k_max)))
    x_rank = draw(st.sampled_from([2, 3]))
    reduce = draw(st.booleans())
    score_mode = draw(st.sampled_from(["none", "float32", "xdtype"]))
    out_dtype = None
    if kind != MoeKind.SCALAR_GGUF and draw(st.booleans()):
        out_dtype = draw(st.sampled_from(["float32", "float16", "bfloat16"]))
    p_invalid = draw(st.sampled_from([0.0, 0.1, 0.5, 1.0]))
    x_scale = draw(st.sampled_from([0.0, 1e-3, 1.0, 30.0]))
    nan_x = specials and draw(st.booleans())
    inf_x = specials and draw(st.booleans())
    nan_scores = specials and score_mode != "none" and draw(st.booleans())
    inf_scores = specials and score_mode != "none" and draw(st.booleans())
    bad_scales = specials and fmt is not None and draw(st.sampled_from(["none", "nan", "inf", "huge", "mixed"]))
    n_special = draw(st.integers(1, 3))
    seed = draw(st.integers(0, 2**63 - 1))

    rng = np.random.default_rng(seed)
    xs = (T, k, K) if x_rank == 3 else (T, K)
    x = (rng.standard_normal(xs) * x_scale).astype(np.float32)
    if nan_x:
        _inject(rng, x, [np.nan], n_special)
    if inf_x:
        _inject(rng, x, [np.inf, -np.inf], n_special)
    x = x.astype(NP_DTYPES[dtype])
    ids = _hostile_ids(rng, (T, k), E, p_invalid)
    scores = None
    if score_mode != "none":
        s = rng.uniform(-1.0, 1.0, size=(T, k)).astype(np.float32)
        if nan_scores:
            _inject(rng, s, [np.nan], n_special)
        if inf_scores:
            _inject(rng, s, [np.inf, -np.inf], n_special)
        scores = s.astype(NP_DTYPES["float32" if score_mode == "float32" else dtype])
    if kind == MoeKind.WMMA:
        w = (rng.standard_normal((E, N, K)) / np.sqrt(Kc)).astype(NP_DTYPES[dtype])
        if layout == "ekn":
            w = np.ascontiguousarray(np.swapaxes(w, 1, 2))
    else:
        qk, bb, offsets = BLOCKS[fmt]
        data = random_blocks(rng, fmt, (E, N, K // qk), scale=0.01)
        if bad_scales and bad_scales != "none" and data.size:
            blocks = data.reshape(-1, bb)
            values = {"nan": [0x7E00, 0xFE00, 0x7C01], "inf": [0x7C00, 0xFC00], "huge": [0x7BFF, 0xFBFF],
                      "mixed": [0x7E00, 0x7C00, 0xFC00, 0x7BFF, 0x0001]}[bad_scales]
            for _ in range(n_special):
                b = int(rng.integers(0, blocks.shape[0]))
                if fmt in E8M0:  # E8M0 has no NaN or Inf: the largest scales overflow f32 (x 12)
                    blocks[b, E8M0[fmt][0]] = rng.choice([253, 254, 255])
                    continue
                off = offsets[int(rng.integers(0, len(offsets)))]
                blocks[b, off:off + 2] = np.array([rng.choice(values)], np.uint16).view(np.uint8)
        w = QuantizedExperts(data, fmt, (E, N, K))
    has_inf = inf_x or inf_scores or bad_scales in ("inf", "huge", "mixed")
    return Problem(kind, fmt, dtype, layout, x, ids, w, scores, reduce, out_dtype, has_inf)


def _pairs_einsum(xrows: np.ndarray, w: np.ndarray) -> np.ndarray:
    """xrows [M, K] @ w[N, K]^T in float64 without BLAS (no zero-skipping: NaN/Inf propagate)."""
    if xrows.shape[0] == 0 or w.shape[0] == 0:
        return np.zeros((xrows.shape[0], w.shape[0]))
    return np.einsum("mk,nk->mn", xrows, w, optimize=False)


def reference(p: Problem) -> tuple[np.ndarray, np.ndarray]:
    """float64 reference output and an elementwise bound on the f32 accumulation error."""
    T, k = p.ids.shape
    x = np.asarray(p.x, np.float32)
    K = x.shape[-1]
    with np.errstate(all="ignore"):
        if p.kind == MoeKind.WMMA:
            w = np.asarray(p.w, np.float64)
            if p.layout == "ekn":
                w = np.swapaxes(w, 1, 2)
            xr = x.astype(np.float64)
        else:
            w = (gguf_decode(np.asarray(p.w.data), p.fmt, K).astype(np.float64) if np.asarray(p.w.data).size
                 else np.zeros(p.w.shape))
            if p.kind == MoeKind.WMMA_GGUF:
                w = w.astype(np.float32).astype(NP_DTYPES[p.dtype]).astype(np.float64)
                xr = x.astype(np.float64)
            else:
                xr = stage_q8_1(x) if K else x.astype(np.float64)
        E, N, _ = w.shape
        s = np.ones((T, k)) if p.scores is None else np.asarray(p.scores, np.float32).astype(np.float64)
        rows = xr if xr.ndim == 3 else np.broadcast_to(xr[:, None, :], (T, k, K))
        # Accumulation-error scale: sum |s| |w| |x| (dense), or |s| max|w_row| sum|x| * 3 for the
        # integer dot products of SCALAR_GGUF (a * sum(q_w q_x) - m * sum(q_x) may cancel).
        absw = np.abs(w)
        if p.kind == MoeKind.SCALAR_GGUF:
            absw = np.broadcast_to(3 * np.nan_to_num(absw, posinf=0).max(axis=2, keepdims=True, initial=0), w.shape)
        out = np.zeros((T, k, N))
        bound = np.zeros((T, k, N))
        valid = (p.ids >= 0) & (p.ids < E)
        for e in np.unique(p.ids[valid]):
            m = p.ids == e
            out[m] = s[m][:, None] * _pairs_einsum(rows[m], w[e])
            fin = lambda a: np.nan_to_num(np.abs(a), nan=0.0, posinf=0.0)  # noqa: E731
            bound[m] = fin(s[m])[:, None] * _pairs_einsum(fin(rows[m]), fin(absw[e]))
        if p.reduce:
            out, bound = out.sum(axis=1), bound.sum(axis=1)
    acc = (K + k + 24) * U32 * bound
    return out, acc


def round_ref(ref: np.ndarray, out_dtype: str) -> np.ndarray:
    with np.errstate(all="ignore"):
        return ref.astype(np.float32).astype(NP_DTYPES[out_dtype]).astype(np.float64)


def to_f64(out) -> np.ndarray:
    return np.asarray(jnp.asarray(out).astype(jnp.float32), np.float64)


def bits(out) -> np.ndarray:
    a = np.asarray(out)
    return a.view({2: np.uint16, 4: np.uint32}[a.dtype.itemsize])


def check_against_reference(p: Problem, out) -> None:
    with np.errstate(all="ignore"):
        _check_against_reference(p, out)


def _check_against_reference(p: Problem, out) -> None:
    ref, acc = reference(p)
    od = p.out_dtype_name
    assert jnp.asarray(out).dtype == jnp.dtype(od), (out.dtype, od)
    T, k = p.ids.shape
    expect_shape = (T, p.w.shape[1]) if p.reduce else (T, k, p.w.shape[1])
    if p.kind == MoeKind.WMMA and p.layout == "ekn":
        expect_shape = expect_shape[:-1] + (p.w.shape[2],)
    assert tuple(out.shape) == expect_shape, (out.shape, expect_shape)
    got = to_f64(out)
    ref_r = round_ref(ref, od)
    finite = np.isfinite(ref_r)
    # Where the reference is finite: close to it, elementwise.
    err = np.abs(got - ref)
    tol = acc * (1 + OUT_RTOL[od]) + OUT_RTOL[od] * np.abs(ref) + OUT_ATOL[od]
    # The f32 result may round across the output dtype's overflow threshold: allow exactly that.
    overflow = ~np.isfinite(got) & finite & (np.abs(ref) + acc >= float(ml_dtypes.finfo(NP_DTYPES[od]).max) * (1 - 2.0**-12))
    bad = finite & ~overflow & ~(err <= tol)
    if bad.any():
        i = tuple(np.argwhere(bad)[0])
        raise AssertionError(f"{int(bad.sum())} elements differ from the reference; first at {i}: "
                             f"got {got[i]!r}, ref {ref[i]!r}, tol {tol[i]!r}\n{p!r}")
    # Where it is not: NaN/Inf propagate (never masked to a finite value).
    masked = ~finite & np.isfinite(got)
    if masked.any():
        i = tuple(np.argwhere(masked)[0])
        raise AssertionError(f"{int(masked.sum())} non-finite reference values came out finite; first at {i}: "
                             f"got {got[i]!r}, ref {ref_r[i]!r}\n{p!r}")
    if not p.has_inf:
        # Only NaN among the inputs: NaN exactly where the reference has NaN.
        assert np.array_equal(np.isnan(got), np.isnan(ref_r)), f"NaN pattern differs\n{p!r}"
    if not p.reduce:
        inv = p.invalid()
        assert np.all(got[inv] == 0.0), f"a pair with an out-of-range id is not zero\n{p!r}"


def poisoned(p: Problem, rng: np.random.Generator):
    """(x, ids, scores) with every pair whose id is outside [0, E) given a different out-of-range
    id and NaN in its score and, where no valid pair reads it, its x row."""
    inv = p.invalid()
    E = p.E
    alt = rng.choice(np.array([-1, E, I32.min, I32.max, -E - 7], np.int64), size=p.ids.shape)
    ids = np.where(inv, alt, p.ids).astype(np.int32)
    x = np.array(p.x, copy=True)
    if x.ndim == 3:
        x[inv] = np.nan
    else:
        x[inv.all(axis=1)] = np.nan
    scores = p.scores
    if scores is not None:
        scores = np.where(inv, np.array(np.nan, scores.dtype), scores).astype(scores.dtype)
    return x, ids, scores


def check_problem(p: Problem, *, poison: bool = True, again: bool = True) -> None:
    out = p.call()
    check_against_reference(p, out)
    if again:
        np.testing.assert_array_equal(bits(p.call()), bits(out), err_msg=f"not reproducible\n{p!r}")
    if poison and p.invalid().any():
        x, ids, scores = poisoned(p, np.random.default_rng(p.ids.size))
        np.testing.assert_array_equal(bits(p.call(x=x, ids=ids, scores=scores)), bits(out),
                                      err_msg=f"out-of-range pairs changed the result\n{p!r}")


# -- the properties --------------------------------------------------------------------------

@settings(max_examples=examples(150), **SETTINGS)
@given(p=problems())
def test_matches_reference_any_input(p):
    check_problem(p)


@settings(max_examples=examples(60), **SETTINGS)
@given(p=problems(max_T=256, specials=False))
def test_matches_reference_finite_inputs(p):
    """Finite inputs only: the result is finite and close everywhere (no spurious NaN)."""
    out = p.call()
    check_against_reference(p, out)
    ref = round_ref(reference(p)[0], p.out_dtype_name)
    assert np.isfinite(ref).all() == np.isfinite(to_f64(out)).all()


@settings(max_examples=examples(60), **SETTINGS)
@given(kind=st.sampled_from(list(MoeKind)), fmt=st.sampled_from(FORMATS), T=st.integers(1, 9),
       k=st.integers(1, 4), E=st.integers(1, 6), x_rank=st.sampled_from([2, 3]), reduce=st.booleans(),
       seed=st.integers(0, 2**32))
def test_nan_in_x_reaches_exactly_its_rows(kind, fmt, T, k, E, x_rank, reduce, seed):
    """One NaN in one x row: every output that a valid pair reading that row feeds is NaN, every
    other output is finite, and pairs with out-of-range ids stay exactly zero."""
    check_nan_row(kind, fmt, T, k, E, x_rank, reduce, seed)


def check_nan_row(kind, fmt, T, k, E, x_rank, reduce, seed) -> None:
    rng = np.random.default_rng(seed)
    dtype = "float32" if kind == MoeKind.SCALAR_GGUF else "bfloat16"
    qk = BLOCKS[fmt][0]
    K, N = 2 * qk if kind != MoeKind.WMMA else 48, 24
    x = rng.standard_normal((T, k, K) if x_rank == 3 else (T, K)).astype(np.float32)
    ids = _hostile_ids(rng, (T, k), E, 0.3)
    if kind == MoeKind.WMMA:
        w = (rng.standard_normal((E, N, K)) / 8).astype(NP_DTYPES[dtype])
    else:
        w = quantize(rng.standard_normal((E, N, K)).astype(np.float32) / 8, fmt)
    row = tuple(rng.integers(0, s) for s in x.shape[:-1])
    x[row + (int(rng.integers(0, K)),)] = np.nan
    out = to_f64(moe_matmul(x.astype(NP_DTYPES[dtype]), ids, w, np.ones((T, k), np.float32), kind=kind, reduce=reduce))
    valid = (ids >= 0) & (ids < E)
    reads = np.zeros((T, k), bool)
    if x_rank == 3:
        reads[row] = True
    else:
        reads[row[0], :] = True
    nan_pairs = reads & valid
    if reduce:
        expect_nan = nan_pairs.any(axis=1)
        assert np.isnan(out[expect_nan]).all()
        assert np.isfinite(out[~expect_nan]).all()
    else:
        assert np.isnan(out[nan_pairs]).all()
        assert np.isfinite(out[~nan_pairs]).all()
        assert np.all(out[~valid] == 0.0)


@settings(max_examples=examples(100), **SETTINGS)
@given(fmt=st.sampled_from(FORMATS), E=st.integers(1, 4), N=st.integers(1, 5),
       K=st.integers(1, 1100), dense_first=st.booleans())
def test_gguf_k_not_a_block_multiple_is_rejected(fmt, E, N, K, dense_first):
    """K that is not a block multiple is a ValueError at construction, at quantize, and at the
    call (x of another K than w's): no call reaches a kernel with a partial block."""
    qk, bb, _ = BLOCKS[fmt]
    if K % qk == 0:
        K += 1
    with pytest.raises(ValueError, match="multiple"):
        quantize(np.zeros((E, N, K), np.float32), fmt)
    with pytest.raises(ValueError, match="multiple"):
        QuantizedExperts(np.zeros((E, N, -(-K // qk) * bb), np.uint8), fmt, (E, N, K))
    w = QuantizedExperts(np.zeros((E, N, bb), np.uint8), fmt, (E, N, qk))
    x = np.zeros((3, K), np.float32 if dense_first else np.float16)
    with pytest.raises(ValueError, match="K"):
        moe_matmul(x, np.zeros((3, 1), np.int32), w)
