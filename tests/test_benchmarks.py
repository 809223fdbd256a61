"""The benchmark's own pieces run on the CPU: its random GGUF experts decode (with gguf-py) to
finite weights in the scale ranges it documents, for every format it times, and its row plan
covers what the issues ask for. A benchmark that fails on the device wastes the lent machine."""

from __future__ import annotations

import os
import sys

import gguf
import jax
import numpy as np
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
import bench_moe  # noqa: E402

from jax_moe import MoeKind  # noqa: E402


@pytest.mark.parametrize("fmt", bench_moe.FORMATS)
def test_random_gguf_decodes_finite_in_its_scale_range(fmt):
    E, N, K = 2, 3, 512
    q = bench_moe.random_gguf(jax.random.PRNGKey(7), fmt, E, N, K)
    raw = np.asarray(q.data).reshape(E * N, -1)
    w = gguf.quants.dequantize(raw, gguf.GGMLQuantizationType[fmt]).reshape(E, N, K)
    assert w.shape == (E, N, K) and np.isfinite(w).all()
    assert np.abs(w).max() > 0
    bb, qk = bench_moe.block_bytes(fmt), bench_moe.block_size(fmt)
    blocks = raw.reshape(-1, bb)
    for off in bench_moe.SCALE_OFFSETS.get(fmt, ()):  # fp16 scales in [1e-3, 1e-2]
        h = blocks[:, off:off + 2].copy().view(np.float16).astype(np.float32)
        assert (h >= 1e-3 * 0.999).all() and (h <= 1e-2 * 1.001).all(), (fmt, off)
    if fmt in bench_moe.E8M0_OFFSETS:  # E8M0 scales 2^-9 .. 2^-1
        e = blocks[:, bench_moe.E8M0_OFFSETS[fmt]].astype(int)
        assert (e >= 118).all() and (e <= 126).all()
    assert blocks.shape[0] == E * N * K // qk


def test_plan_has_every_format_at_decode_time_and_both_sides_of_the_crossover():
    rows = bench_moe.plan(False)
    tags = {(m, p, T, kind, fmt) for m, p, T, kind, fmt, _ in rows}
    for model in ("qwen3", "mixtral"):
        for proj in ("gate_up", "down"):
            for T in bench_moe.DECODE_TS:
                for fmt in bench_moe.FORMATS:
                    assert (model, proj, T, MoeKind.WMMA_GGUF, fmt) in tags
                    assert (model, proj, T, MoeKind.SCALAR_GGUF, fmt) in tags
            for T in bench_moe.DECODE_TS + (64, 512, 4096):
                assert (model, proj, T, MoeKind.WMMA, "bf16") in tags
        for T in bench_moe.CROSSOVER_TS[model]:
            assert (model, "gate_up", T, MoeKind.WMMA_GGUF, "Q4_K") in tags
    assert "MXFP4" in bench_moe.FORMATS
    assert len(tags) == len(rows), "no row planned twice"
