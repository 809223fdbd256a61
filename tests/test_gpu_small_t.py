"""The small-T kernels at K a multiple of 256 (marker `gpu`): the tensor-core GEMV for GGUF
experts (csrc/cuda/mma_gemv.cuh) in every format, dtype, x rank and reduce mode, and the token
GEMV for dense experts, against the float64 reference, with partial row tiles (N % 16 != 0),
experts with more than 8 pairs (several passes), K split across warps, out-of-range ids, and the
plan choosing the GEMV for each case; and MXFP4's GEMV where K % 256 != 0 (gpt-oss's K = 2880:
rows on 2-byte boundaries and a partial last chunk)."""

from __future__ import annotations

import itertools

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from jax_moe import GGMLType, MoeKind, _ext

from cases import Case, check, make_case
from reference import FORMATS, gguf_decode
from test_gpu import gpu_run

pytestmark = pytest.mark.gpu


def _plan(kind: MoeKind, case, reduce: bool) -> str:
    T, k = case.ids.shape
    E, N, K = case.w.shape
    wtype = int(case.w.qtype) if hasattr(case.w, "qtype") else int(GGMLType.BF16)
    x_rows = T * k if case.x.ndim == 3 else T
    return _ext.cuda.plan_description(int(kind), wtype, 0, T, k, E, N, K, x_rows, reduce)


# (T, k, E, N, K, invalid ids): T=1, one pair per expert; T=6 over E=3, ~4 per expert (past
# T <= 4, passes of 8); T=4, k=6, E=1: 24 pairs of one expert (passes of 16 where the tile has
# them: 16 + 8, else three of 8); K=2048: K split across warps.
SHAPES = [(1, 2, 4, 70, 512, True), (6, 2, 3, 77, 512, True), (4, 6, 1, 40, 512, False), (3, 4, 8, 24, 2048, True)]


# Dense experts take the token GEMV at these sizes (T <= 4); K a multiple of 256 as above.
@pytest.mark.parametrize("T,k,E,N,K,invalid", [s for s in SHAPES if s[0] <= 4])
@pytest.mark.parametrize("dtype,reduce,x_rank", list(itertools.product(["bfloat16", "float16"], [True, False], [2, 3])))
def test_dense_small_t_gemv(rng, T, k, E, N, K, invalid, dtype, reduce, x_rank):
    case = make_case(rng, kind=MoeKind.WMMA, dtype=dtype, reduce=reduce, x_rank=x_rank, T=T, k=k, E=E, N=N, K=K,
                     invalid_ids=invalid)
    assert _plan(MoeKind.WMMA, case, reduce) == "token_gemv"
    check(gpu_run(case, reduce=reduce), case)


@pytest.mark.parametrize("T,k,E,N,K,invalid", SHAPES)
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dtype,reduce,x_rank", [("bfloat16", True, 3), ("bfloat16", False, 2), ("float16", False, 3),
                                                 ("float16", True, 2)])
def test_gguf_mma_gemv(rng, T, k, E, N, K, invalid, fmt, dtype, reduce, x_rank):
    case = make_case(rng, kind=MoeKind.WMMA_GGUF, fmt=fmt, dtype=dtype, reduce=reduce, x_rank=x_rank,
                     T=T, k=k, E=E, N=N, K=K, invalid_ids=invalid)
    assert _plan(MoeKind.WMMA_GGUF, case, reduce) == "mma_gemv"
    check(gpu_run(case, reduce=reduce), case)


# 11 pairs per expert on average: passes of 16 (two n8 blocks on each decoded weight) in the GEMV
# where the format's tile has them (plan.h mma_two_blocks), the GEMM for Q3_K, Q5_K and Q6_K
# (crossover 10). T=44 over E=8 with expert 0 the first choice of 20 tokens ("hot": over 16 pairs,
# a pass of 16 and a second one), the other experts with ~5 pairs (a pass whose empty second n8
# block runs it as a pass of 8) and out-of-range ids; T=11 over E=2 at K=2048: 11 per expert, a
# partly empty second block, with K split across warps.
TWO_BLOCK_SHAPES = [(44, 2, 8, 40, 512, True), (11, 2, 2, 40, 2048, False)]


@pytest.mark.parametrize("T,k,E,N,K,invalid", TWO_BLOCK_SHAPES)
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dtype,reduce,x_rank", [("bfloat16", True, 3), ("float16", False, 2)])
def test_gguf_mma_gemv_passes_of_16(rng, T, k, E, N, K, invalid, fmt, dtype, reduce, x_rank):
    case = make_case(rng, kind=MoeKind.WMMA_GGUF, fmt=fmt, dtype=dtype, reduce=reduce, x_rank=x_rank,
                     T=T, k=k, E=E, N=N, K=K, invalid_ids=invalid, hot_tokens=20 if E == 8 else 0)
    if E == 8:
        assert np.count_nonzero(np.asarray(case.ids) == 0) >= 17  # over 16: a second pass
    plan = _plan(MoeKind.WMMA_GGUF, case, reduce)
    if fmt in ("Q3_K", "Q5_K", "Q6_K"):
        assert plan.startswith("grouped_"), plan
    else:
        assert plan == "mma_gemv", plan
    check(gpu_run(case, reduce=reduce), case)


def test_gguf_mma_gemv_rounds_each_weight_once(rng):
    """x a unit vector e_i picks column i of the decoded experts out: the output (f32, no scores)
    is exactly the gguf-py decode rounded once to bf16, for every format and row."""
    K = 256
    for fmt in FORMATS:
        case = make_case(rng, kind=MoeKind.WMMA_GGUF, fmt=fmt, dtype="bfloat16", reduce=False, T=1, k=1, E=1,
                         N=16, K=K, invalid_ids=False, with_scores=False)
        for i in rng.choice(K, 4, replace=False):
            x = np.zeros((1, K), np.float32)
            x[0, i] = 1.0
            unit = Case(jnp.asarray(x, jnp.bfloat16), case.ids, case.w, None, case.ref, "float32")
            assert _plan(MoeKind.WMMA_GGUF, unit, False) == "mma_gemv"
            out = np.asarray(gpu_run(unit, reduce=False)).reshape(-1)
            dec = gguf_decode(np.asarray(case.w.data), fmt, K)[0, :, i]
            want = np.asarray(jnp.asarray(dec, jnp.bfloat16).astype(jnp.float32))
            # Equal values (a decoded -0 comes out +0: the f32 sum starts at +0).
            np.testing.assert_array_equal(out, want, err_msg=f"{fmt} column {i}")


# MXFP4 at K % 256 == 64, 128, 192 (a partial last chunk: lanes past K read nothing), with rows off
# 8-byte boundaries (K / 32 x 17 bytes), several row tiles, more than 8 pairs per expert and K splits.
MXFP4_ODD_K = [(1, 4, 6, 96, 2880, False), (3, 4, 8, 40, 320, True), (4, 6, 1, 33, 448, False),
               (6, 2, 3, 77, 2880 - 128, True)]


@pytest.mark.parametrize("T,k,E,N,K,invalid", MXFP4_ODD_K)
@pytest.mark.parametrize("dtype,reduce,x_rank", [("bfloat16", True, 3), ("bfloat16", False, 2), ("float16", False, 3)])
def test_mxfp4_mma_gemv_k_not_a_multiple_of_256(rng, T, k, E, N, K, invalid, dtype, reduce, x_rank):
    case = make_case(rng, kind=MoeKind.WMMA_GGUF, fmt="MXFP4", dtype=dtype, reduce=reduce, x_rank=x_rank,
                     T=T, k=k, E=E, N=N, K=K, invalid_ids=invalid)
    assert _plan(MoeKind.WMMA_GGUF, case, reduce) == "mma_gemv"
    check(gpu_run(case, reduce=reduce), case)


def test_mxfp4_mma_gemv_partial_chunk_columns(rng):
    """x a unit vector e_i with i in the last, partial chunk (and one before it): the output is
    exactly the gguf-py decode of column i rounded once to bf16, in rows off 8-byte boundaries."""
    for K in (320, 2880):
        case = make_case(rng, kind=MoeKind.WMMA_GGUF, fmt="MXFP4", dtype="bfloat16", reduce=False, T=1, k=1, E=1,
                         N=19, K=K, invalid_ids=False, with_scores=False)
        tail0 = K // 256 * 256
        for i in [0, tail0 - 1, tail0, K - 33, K - 1]:
            x = np.zeros((1, K), np.float32)
            x[0, i] = 1.0
            unit = Case(jnp.asarray(x, jnp.bfloat16), case.ids, case.w, None, case.ref, "float32")
            assert _plan(MoeKind.WMMA_GGUF, unit, False) == "mma_gemv"
            out = np.asarray(gpu_run(unit, reduce=False)).reshape(-1)
            dec = gguf_decode(np.asarray(case.w.data), "MXFP4", K)[0, :, i]
            want = np.asarray(jnp.asarray(dec, jnp.bfloat16).astype(jnp.float32))
            np.testing.assert_array_equal(out, want, err_msg=f"K {K} column {i}")


# (tokens per call, the plan): the GEMV, and the fused GEMM's three tiles (64, 128 and 256 rows).
EVERY_SCALE_PLANS = [(1, "mma_gemv"), (32, "grouped_wgmma_gguf 64x128"), (128, "grouped_wgmma_gguf 128x128"),
                     (256, "grouped_wgmma_gguf 256x128")]


@pytest.mark.parametrize("T,path", EVERY_SCALE_PLANS)
def test_mxfp4_every_scale_byte(rng, T, path):
    """Every E8M0 scale byte through the bf16 MXFP4 decode of the tensor-core GEMV and of the fused
    GEMM (E2M1 bits placed in bf16's, then one bf16 product by 2^(e - 1), or a second by
    2^(e - 128) where e > 128: mma_gemv.cuh's rare chunks, wgmma_gguf.cu's per-block select). Each
    token is a unit vector e_i (one per call for the GEMV; T per call, the 32 columns in turn, for
    the GEMM), so the f32 output is exactly the gguf-py decode of column i rounded once to bf16.
    Chunk 0 of every row holds e = 0..127 (the common path, with the subnormal scales e < 2), chunk
    1 e = 128..252 (the rare path; from 253 on 12 x 2^(e - 128) overflows, and the zeros of x times
    it would be NaN)."""
    N, K = 16, 512
    case = make_case(rng, kind=MoeKind.WMMA_GGUF, fmt="MXFP4", dtype="bfloat16", reduce=False, T=1, k=1, E=1,
                     N=N, K=K, invalid_ids=False, with_scores=False)
    data = np.array(case.w.data).reshape(1, N, K // 32, 17)
    row, blk = np.meshgrid(np.arange(N), np.arange(K // 32), indexing="ij")
    data[..., 0] = np.where(blk < 8, row * 8 + blk, 128 + (row * 8 + blk - 8) % 125).astype(np.uint8)
    assert sorted(set(data[..., 0].ravel())) == list(range(253))
    data = data.reshape(1, N, -1)
    w = type(case.w)(jnp.asarray(data), "MXFP4", (1, N, K))
    dec = gguf_decode(data, "MXFP4", K)[0]
    cols = [32 * b + 16 * h + int(rng.integers(0, 16)) for b in range(K // 32) for h in range(2)]
    calls = [[i] for i in cols] if T == 1 else [[cols[t % len(cols)] for t in range(T)]]
    for group in calls:
        x = np.zeros((len(group), K), np.float32)
        x[np.arange(len(group)), group] = 1.0
        ids = jnp.zeros((len(group), 1), jnp.int32)
        unit = Case(jnp.asarray(x, jnp.bfloat16), ids, w, None, case.ref, "float32")
        assert _plan(MoeKind.WMMA_GGUF, unit, False) == path
        out = np.asarray(gpu_run(unit, reduce=False)).reshape(len(group), N)
        want = dec[:, group].T.astype(ml_dtypes.bfloat16).astype(np.float32)
        # Equal values (a decoded -0 comes out +0: the f32 sum starts at +0).
        np.testing.assert_array_equal(out, want, err_msg=f"{path}, columns {group}")


# Up to 1024 pairs (Qwen3 up to T = 128): past 768 the partial dots take over the default 48 KiB of
# dynamic shared memory; many experts with a few pairs each, some with more than 8 (at T=100 and
# 128, over 6 per expert: passes of 16 where the tile has them; at T=70 passes of 8, two for some).
@pytest.mark.parametrize("fmt", ["Q4_K", "MXFP4", "Q6_K"])
@pytest.mark.parametrize("T,reduce,x_rank", [(100, False, 2), (128, True, 3), (70, True, 2)])
def test_gguf_mma_gemv_many_pairs(rng, fmt, T, reduce, x_rank):
    case = make_case(rng, kind=MoeKind.WMMA_GGUF, fmt=fmt, dtype="bfloat16", reduce=reduce, x_rank=x_rank,
                     T=T, k=8, E=128, N=40, K=512, invalid_ids=True)
    assert _plan(MoeKind.WMMA_GGUF, case, reduce) == "mma_gemv"
    check(gpu_run(case, reduce=reduce), case)
