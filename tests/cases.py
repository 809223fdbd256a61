"""Building random moe_matmul cases and their float64 references, shared by the CPU and GPU
suites (the GPU suite runs the same cases on the CUDA handlers)."""

from __future__ import annotations

from dataclasses import dataclass

import jax.numpy as jnp
import numpy as np

from jax_moe import MoeKind, QuantizedExperts

from reference import BLOCKS, gguf_decode, moe_reference, random_blocks, rel_err, round_to, stage_q8_1

# Relative Frobenius tolerance by output dtype: one rounding of the f32 result dominates.
TOL = {"float32": 2e-5, "float16": 1.5e-3, "bfloat16": 8e-3}


@dataclass
class Case:
    x: jnp.ndarray
    ids: np.ndarray
    w: object  # dense jnp array or QuantizedExperts
    scores: np.ndarray | None
    ref: np.ndarray  # float64 reference output
    out_dtype: str


def make_case(rng, *, kind: MoeKind, fmt: str | None = None, dtype: str = "bfloat16", layout: str = "enk",
              reduce: bool = True, x_rank: int = 2, T: int = 7, k: int = 2, E: int = 4, N: int = 40,
              K: int | None = None, with_scores: bool = True, out_dtype: str | None = None,
              invalid_ids: bool = True, score_dtype: str = "float32", hot_tokens: int = 0) -> Case:
    """A random case: ids include out-of-range values when invalid_ids; weights finite; the first
    hot_tokens tokens (after the bad ids) choose expert 0 first, the rest of their choices other
    experts (a skewed routing: one expert with many pairs)."""
    if K is None:
        K = 2 * BLOCKS[fmt][0] if fmt else 48
    x_dtype = "float32" if kind == MoeKind.SCALAR_GGUF else dtype
    xs = (T, k, K) if x_rank == 3 else (T, K)
    x32 = rng.standard_normal(xs).astype(np.float32)
    x = jnp.asarray(x32, x_dtype)
    lo, hi = (-2, E + 2) if invalid_ids else (0, E)
    ids = rng.integers(lo, hi, size=(T, k)).astype(np.int32)
    if invalid_ids and T * k >= 3:
        ids.flat[0], ids.flat[1] = -1, E  # make sure both kinds of bad id occur
    if hot_tokens:
        assert 0 < hot_tokens < T and E >= 2, (hot_tokens, T, E)
        ids[1:hot_tokens + 1, 0] = 0
        ids[1:hot_tokens + 1, 1:] = rng.integers(1, E, size=(hot_tokens, k - 1))
    scores = rng.uniform(0.1, 1.0, size=(T, k)).astype(score_dtype) if with_scores else None
    sc64 = np.ones((T, k)) if scores is None else np.asarray(scores, np.float64)
    if score_dtype != "float32" and scores is not None:
        scores = jnp.asarray(scores, score_dtype)
        sc64 = np.asarray(scores.astype(jnp.float32), np.float64)
    xr = np.asarray(x.astype(jnp.float32), np.float64)
    if kind == MoeKind.WMMA:
        w32 = (rng.standard_normal((E, N, K)) / np.sqrt(K)).astype(np.float32)
        wj = jnp.asarray(w32, dtype)
        wr = np.asarray(wj.astype(jnp.float32), np.float64)
        w = wj if layout == "enk" else jnp.asarray(np.swapaxes(np.asarray(wj), 1, 2))
    else:
        qk = BLOCKS[fmt][0]
        data = random_blocks(rng, fmt, (E, N, K // qk), scale=0.01)
        w = QuantizedExperts(data, fmt, (E, N, K))
        wdec = gguf_decode(data, fmt, K)
        if kind == MoeKind.WMMA_GGUF:
            wr = round_to(wdec, dtype)
        else:
            wr = wdec.astype(np.float64)
            xr = stage_q8_1(np.asarray(x32))
    reduce_eff = reduce
    ref = moe_reference(xr, ids, wr, sc64, reduce_eff)
    if out_dtype is None:
        out_dtype = "float32" if kind == MoeKind.SCALAR_GGUF else dtype
    return Case(x, ids, w, scores, ref, out_dtype)


def check(out, case: Case, tol: float | None = None) -> None:
    out = np.asarray(jnp.asarray(out).astype(jnp.float32), np.float64)
    assert out.shape == case.ref.shape, (out.shape, case.ref.shape)
    assert np.isfinite(out).all(), "non-finite output"
    err = rel_err(out, case.ref)
    limit = TOL[case.out_dtype] if tol is None else tol
    assert err <= limit, f"relative error {err:.3g} > {limit}"
    # Pairs with out-of-range ids contribute exactly zero.
    if out.ndim == 3:
        bad = (case.ids < 0) | (case.ids >= _num_experts(case.w))
        assert np.all(out[bad] == 0.0)


def _num_experts(w) -> int:
    return w.E if isinstance(w, QuantizedExperts) else w.shape[0]
