"""The property, hostile-input and long-run tests on the CUDA handlers (marker `gpu`; they skip
themselves without a CUDA device). The CPU versions are test_properties.py, test_long_runs.py
and test_entry_points.py; the properties and their reference are shared with them.

Example counts are bounded (JAX_MOE_HYPOTHESIS_SCALE multiplies them) and inputs are moderate,
so that the file also runs under compute-sanitizer:

    compute-sanitizer --tool memcheck  python -m pytest -q -m gpu tests/test_gpu_properties.py
    compute-sanitizer --tool racecheck python -m pytest -q -m gpu tests/test_gpu_properties.py -k "not ten_thousand"
    compute-sanitizer --tool synccheck python -m pytest -q -m gpu tests/test_gpu_properties.py -k "not ten_thousand"
"""

from __future__ import annotations

import gc
import os

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jax_moe import MoeKind, moe_matmul

from reference import FORMATS
from test_long_runs import CALLS, THREADS, _hammer, rss_mib, small_cases
from test_properties import SETTINGS, bits, check_nan_row, check_problem, examples, problems

pytestmark = pytest.mark.gpu

BF16 = jnp.bfloat16


def cuda():
    return jax.devices("cuda")[0]


def poison(nbytes: int = 1 << 26) -> None:
    """Fill and free a NaN buffer so that an output element a kernel forgets to write shows up
    as NaN (the allocator hands the freed memory to the next output)."""
    a = jnp.full((nbytes // 4,), jnp.nan, jnp.float32, device=cuda())
    a.block_until_ready()
    a.delete()


def in_use() -> int:
    return int(cuda().memory_stats()["bytes_in_use"])


@settings(max_examples=examples(60), **SETTINGS)
@given(p=problems(max_T=2048, work=2_000_000, weight_elems=1_000_000))
def test_gpu_matches_reference_any_input(p):
    """Random shapes, every kind/format/dtype/layout, hostile ids, NaN/Inf in x, scores and fp16
    scales: close to the reference where it is finite, NaN/Inf propagate, out-of-range pairs are
    exactly zero and never read, and results are bitwise reproducible."""
    poison()
    check_problem(p)


@settings(max_examples=examples(40), **SETTINGS)
@given(kind=st.sampled_from(list(MoeKind)), fmt=st.sampled_from(FORMATS), T=st.integers(1, 9),
       k=st.integers(1, 4), E=st.integers(1, 6), x_rank=st.sampled_from([2, 3]), reduce=st.booleans(),
       seed=st.integers(0, 2**32))
def test_gpu_nan_in_x_reaches_exactly_its_rows(kind, fmt, T, k, E, x_rank, reduce, seed):
    poison()
    check_nan_row(kind, fmt, T, k, E, x_rank, reduce, seed)


@pytest.mark.parametrize("reduce", [True, False])
@pytest.mark.parametrize("kind,fmt", [(MoeKind.WMMA, None), (MoeKind.WMMA_GGUF, "Q4_K"), (MoeKind.SCALAR_GGUF, "Q8_0")])
def test_gpu_every_id_out_of_range(kind, fmt, reduce, rng):
    """All ids outside [0, E) (INT32_MIN/MAX, -1, E) with NaN x and scores: exactly zero."""
    from cases import make_case
    c = make_case(rng, kind=kind, fmt=fmt, T=300, k=4, E=5, N=40)
    ids = rng.choice(np.array([-1, 5, 6, -(2**31), 2**31 - 1], np.int32), size=(300, 4))
    x = jnp.full(c.x.shape, jnp.nan, c.x.dtype)
    s = np.full((300, 4), np.nan, np.float32)
    poison()
    out = np.asarray(moe_matmul(x, ids, c.w, s, reduce=reduce).astype(jnp.float32))
    assert np.all(out == 0.0)


def test_gpu_empty_experts_however_many():
    """K = 0 with E = 2**20 experts of zero bytes: zeros (NaN where a score is NaN), quickly."""
    x = jnp.zeros((3, 0), BF16)
    ids = jnp.asarray([[0, 2**20 - 1], [5, -1], [2**31 - 1, 7]], jnp.int32)
    w = jax.device_put(np.zeros((2**20, 4, 0), ml_dtypes.bfloat16), cuda())
    s = jnp.asarray([[1.0, np.nan], [2.0, 1.0], [np.nan, 1.0]], jnp.float32)
    out = np.asarray(moe_matmul(x, ids, w, s), np.float32)
    expect = np.zeros((3, 4), np.float32)
    expect[0] = np.nan
    np.testing.assert_array_equal(out, expect)


def test_gpu_ten_thousand_calls_hold_memory_steady(rng):
    """10,000 calls: device bytes in use and peak stay where the warm-up left them, host memory
    too, no live arrays leak and results keep their bits."""
    with jax.default_device(cuda()):
        cases = small_cases(rng)
    expected = [np.array(bits(fn(*args))) for _, fn, args, _ in cases]
    for i in range(300):
        _, fn, args, _ = cases[i % len(cases)]
        fn(*args).block_until_ready()
    gc.collect()
    live0, rss0, dev0 = len(jax.live_arrays()), rss_mib(), in_use()
    peak0 = int(cuda().memory_stats().get("peak_bytes_in_use", 0))
    for i in range(CALLS):
        name, fn, args, reduce = cases[i % len(cases)]
        out = moe_matmul(*args, reduce=reduce) if i % 50 == 0 else fn(*args)
        if i % 1000 == 999:
            np.testing.assert_array_equal(bits(out), expected[i % len(cases)], err_msg=f"call {i} ({name})")
    out.block_until_ready()
    del out
    gc.collect()
    stats = cuda().memory_stats()
    assert len(jax.live_arrays()) <= live0
    assert int(stats["bytes_in_use"]) <= dev0 + (1 << 20), (dev0, stats["bytes_in_use"])
    if peak0:
        assert int(stats.get("peak_bytes_in_use", 0)) <= peak0 + (8 << 20), (peak0, stats.get("peak_bytes_in_use"))
    assert rss_mib() - rss0 < 64, f"host memory grew from {rss0:.0f} to {rss_mib():.0f} MiB"


def test_gpu_eight_threads_match_serial_calls(rng):
    with jax.default_device(cuda()):
        cases = small_cases(rng)
    serial = [np.array(bits(fn(*args))) for _, fn, args, _ in cases]

    def run(t, r):
        with jax.default_device(cuda()):
            for j in np.random.default_rng(1000 * t + r).permutation(len(cases)):
                name, fn, args, reduce = cases[j]
                out = fn(*args) if (t + r + j) % 3 else moe_matmul(*args, reduce=reduce)
                np.testing.assert_array_equal(bits(out), serial[j], err_msg=f"thread {t} round {r}: {name}")
    _hammer(run, THREADS, rounds=4)


@pytest.mark.skipif(os.environ.get("JAX_MOE_GPU_HEAVY") != "1",
                    reason="needs ~25 GB of device memory; set JAX_MOE_GPU_HEAVY=1")
@pytest.mark.slow
@pytest.mark.parametrize("kind", [MoeKind.WMMA, MoeKind.WMMA_GGUF])
def test_gpu_more_pairs_than_int32(kind):
    """T * k > 2**31 pairs (validate.h allows up to 2**40): the grouping's int32 counts, cursors
    and permutation (csrc/cuda/grouping.cu) would wrap and write out of bounds. The call must be
    rejected with INVALID_ARGUMENT or be correct (here: K = 0, so every output is 0), and the
    device must stay healthy for the next call. ~25 GB: ids 8.6 GB, scores 4.3 GB, out 4.3 GB,
    scratch (perm) 8.6 GB."""
    T, k = (2**31 + 2**20) // 256, 256
    ids = jnp.zeros((T, k), jnp.int32, device=cuda())  # every pair on expert 0
    x = jnp.zeros((T, 0), BF16, device=cuda())
    s = jnp.ones((T, k), BF16, device=cuda())
    if kind == MoeKind.WMMA:
        w = jnp.zeros((2, 1, 0), BF16, device=cuda())
    else:
        from jax_moe import QuantizedExperts
        w = QuantizedExperts(jnp.zeros((2, 1, 0), jnp.uint8, device=cuda()), "Q8_0", (2, 1, 0))
    try:
        out = moe_matmul(x, ids, w, s, kind=kind, reduce=False)
        assert not bool(jnp.any(out != 0))
        del out
    except jax.errors.JaxRuntimeError as e:
        assert "INVALID_ARGUMENT" in str(e) and "jax_moe.moe_matmul" in str(e), str(e)
    del ids, x, s
    _, fn, args, _ = small_cases(np.random.default_rng(0))[0]  # the device still computes right
    np.testing.assert_array_equal(bits(fn(*jax.device_put(args, cuda()))),
                                  bits(fn(*jax.device_put(args, jax.devices("cpu")[0]))))
