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


def _profile_decode():
    import importlib.util
    path = os.path.join(os.path.dirname(__file__), "..", "tools", "profile_decode.py")
    spec = importlib.util.spec_from_file_location("profile_decode", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


NCU_HEADER = ('"ID","Process ID","Process Name","Host Name","Kernel Name","Context","Stream","Block Size",'
              '"Grid Size","Device","CC","Section Name","Metric Name","Metric Unit","Metric Value",'
              '"Rule Name","Rule Type","Rule Description"\n')


def _ncu_rows(lid: int, kernel: str, us: float, dram: float) -> str:
    base = f'"{lid}","77","python3","h","{kernel}","1","7","(256, 1, 1)","(96, 2, 1)","0","9.0"'
    return (f'{base},"GPU Speed Of Light Throughput","Duration","usecond","{us:,.2f}","","",""\n'
            f'{base},"GPU Speed Of Light Throughput","DRAM Throughput","%","{dram}","","",""\n'
            f'{base},"Occupancy","Achieved Occupancy","%","23.5","","",""\n'
            f'{base},"Launch Statistics","Registers Per Thread","register/thread","127","","",""\n'
            f'{base},"WarpStateStats","","","","SOLBottleneck","WRN","a rule row without a metric"\n'
            f'{base},"Command line profiler metrics","smsp__average_warps_issue_stalled_long_scoreboard_per_issue_active.ratio","","{dram / 10}","","",""\n'
            f'{base},"Command line profiler metrics","smsp__average_warps_issue_stalled_wait_per_issue_active.ratio","","1.5","","",""\n'
            f'{base},"Command line profiler metrics","smsp__average_warps_issue_stalled_barrier_per_issue_active.ratio","","0.25","","",""\n'
            f'{base},"Command line profiler metrics","smsp__average_warps_issue_stalled_selected_per_issue_active.ratio","","0.1","","",""\n')


def test_profile_decode_table_takes_each_rows_warm_launch_and_checks_its_kernel():
    pd = _profile_decode()
    mma = "void jax_moe::mma_gemv_kernel<jax_moe::KQuantTile<(jax_moe::GGMLType)12>>(jax_moe::MmaGemvArgs)"
    tok = "void jax_moe::token_gemv_kernel<(jax_moe::DType)2>(jax_moe::GemvArgs)"
    text = ("==PROF== Connected to process 77\n" + NCU_HEADER + _ncu_rows(0, mma, 1500.0, 10) +
            _ncu_rows(1, mma, 94.6, 30.5) + _ncu_rows(2, tok, 130.0, 70) + _ncu_rows(3, tok, 128.0, 80.25))
    rows = [dict(tag="mixtral/gate_up/1/WMMA_GGUF/Q4_K", plan="mma_gemv", floor_us=30.7),
            dict(tag="mixtral/gate_up/1/WMMA/bf16", plan="token_gemv", floor_us=109.0)]
    md = pd.table(text, rows).splitlines()
    assert len(md) == 4
    cells = [c.strip() for c in md[2].split("|")[1:-1]]
    assert cells[:5] == ["mixtral/gate_up/1/WMMA_GGUF/Q4_K", "mma_gemv", "94.6", "30.7", f"{100 * 30.7 / 94.6:.1f}"]
    assert cells[5] == "30.5" and cells[7] == "23.5" and cells[8] == "127"
    assert cells[10] == "long_scoreboard 3.05, wait 1.50, barrier 0.25"  # the three largest, largest first
    assert [c.strip() for c in md[3].split("|")[1:-1]][2] == "128.0"  # the warm (second) launch
    with pytest.raises(ValueError, match="profiled kernel"):
        pd.table(text, rows[::-1])  # a plan that does not match the launched kernel
    with pytest.raises(ValueError, match="4 profiled launches for 1 rows"):
        pd.table(text, rows[:1])


def test_profile_decode_kernel_names():
    pd = _profile_decode()
    assert pd.launched("grouped_wgmma 128x256", "void jax_moe::(anonymous namespace)::grouped_wgmma_ws_kernel<2>(x)")
    assert not pd.launched("grouped_wgmma 64x256", "void jax_moe::grouped_wgmma_gguf_kernel<F, D, C>(x)")
    assert pd.launched("grouped_wgmma_gguf 256x128", "void jax_moe::grouped_wgmma_gguf_kernel<F, D, C>(x)")
