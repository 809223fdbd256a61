"""The CUDA plan (csrc/cuda/plan.h): which kernel and tile a call runs, and the scratch it needs.
These ask the CUDA module's host functions and need no GPU (they skip only where the module was
not built)."""

from __future__ import annotations

import pytest

from jax_moe import GGMLType, MoeKind, _ext

pytestmark = pytest.mark.skipif(_ext.cuda is None, reason="built without the CUDA module")

ENK, EKN = 0, 1
BF16 = int(GGMLType.BF16)
Q4_K = int(GGMLType.Q4_K)
MIXTRAL = dict(E=8, k=2, N=2 * 14336, K=4096)
QWEN3 = dict(E=128, k=8, N=2 * 768, K=2048)


def plan(kind: MoeKind, wtype: int, T: int, *, E: int, k: int, N: int, K: int, layout: int = ENK,
         reduce: bool = True, x_per_pair: bool = False, device: str) -> str:
    x_rows = T * k if x_per_pair else T
    return _ext.cuda.plan_description(int(kind), wtype, layout, T, k, E, N, K, x_rows, reduce, device)


def scratch(kind: MoeKind, wtype: int, T: int, *, E: int, k: int, N: int, K: int, layout: int = ENK,
            reduce: bool = True) -> int:
    return int(_ext.cuda.scratch_bytes(int(kind), wtype, layout, T, k, E, N, K, T, reduce))


@pytest.mark.parametrize("device", ["hopper", "generic"])
@pytest.mark.parametrize("shape", [MIXTRAL, QWEN3])
def test_decode_time_calls_run_a_gemv(device, shape):
    for kind, wtype, gemv in [(MoeKind.WMMA, BF16, "token_gemv"), (MoeKind.WMMA_GGUF, Q4_K, "mma_gemv"),
                              (MoeKind.SCALAR_GGUF, Q4_K, "token_gemv")]:
        for T in (1, 2, 4):
            assert plan(kind, wtype, T, device=device, **shape) == gemv
    # SCALAR_GGUF has no tensor-core kernel: the GEMV at every size.
    assert plan(MoeKind.SCALAR_GGUF, Q4_K, 4096, device=device, **shape) == "token_gemv"


def test_hopper_runs_wgmma_and_decodes_gguf_inside_the_gemm():
    assert plan(MoeKind.WMMA, BF16, 4096, device="hopper", **MIXTRAL) == "grouped_wgmma 128x256"
    assert plan(MoeKind.WMMA, BF16, 64, device="hopper", **MIXTRAL) == "grouped_wgmma 64x256"
    assert plan(MoeKind.WMMA_GGUF, Q4_K, 80, device="hopper", **MIXTRAL) == "grouped_wgmma_gguf 64x128"
    assert plan(MoeKind.WMMA_GGUF, Q4_K, 512, device="hopper", **MIXTRAL) == "grouped_wgmma_gguf 128x128"
    # From 256 pairs per expert the 256-row tile (each weight decoded once per 256 pairs), for every
    # format (Q6_K and Q8_0 with 3 x stages, their raw stages being larger).
    assert plan(MoeKind.WMMA_GGUF, Q4_K, 4096, device="hopper", **MIXTRAL) == "grouped_wgmma_gguf 256x128"
    assert plan(MoeKind.WMMA_GGUF, Q4_K, 4096, device="hopper", **QWEN3) == "grouped_wgmma_gguf 256x128"
    assert plan(MoeKind.WMMA_GGUF, Q4_K, 4095, device="hopper", **QWEN3) == "grouped_wgmma_gguf 128x128"
    for name in ("Q2_K", "Q3_K", "Q5_K", "Q6_K", "Q8_0", "MXFP4"):
        assert plan(MoeKind.WMMA_GGUF, int(GGMLType[name]), 4096, device="hopper", **MIXTRAL) == "grouped_wgmma_gguf 256x128"
    # Few blocks of 64 x 256: the 64 x 128 tile keeps every SM busy.
    assert plan(MoeKind.WMMA, BF16, 16, device="hopper", E=16, k=2, N=512, K=1024) == "grouped_wgmma 64x128"
    # [E, K, N] weights have no wgmma kernel: the portable WMMA GEMM, at every T.
    assert plan(MoeKind.WMMA, BF16, 2, device="hopper", layout=EKN, **MIXTRAL).startswith("grouped_wmma ")


def test_other_gpus_run_the_wmma_gemm():
    assert plan(MoeKind.WMMA, BF16, 4096, device="generic", **MIXTRAL) == "grouped_wmma 128x128"
    assert plan(MoeKind.WMMA_GGUF, Q4_K, 80, device="generic", **MIXTRAL) == "grouped_wmma 32x256"
    # Up to 2 pairs per expert the token GEMV serves dense experts there (1 on Hopper).
    assert plan(MoeKind.WMMA, BF16, 8, device="generic", **MIXTRAL) == "token_gemv"
    assert plan(MoeKind.WMMA, BF16, 8, device="hopper", **MIXTRAL).startswith("grouped_wgmma")


@pytest.mark.parametrize("device", ["hopper", "generic"])
def test_gguf_gemv_crossover(device):
    """GGUF experts: the tensor-core GEMV (K % 256 == 0, MXFP4 K % 64 == 0; <= 1024 pairs) serves up
    to 11 pairs per expert on average where the format's tile runs passes of 16, else 10; the GEMM
    from there (benchmarks/NOTES.md); elsewhere the token GEMV's rule,
    up to 1 pair per expert on Hopper, 2 on other GPUs."""
    kind, wtype = MoeKind.WMMA_GGUF, Q4_K
    assert plan(kind, wtype, 44, device=device, **MIXTRAL) == "mma_gemv"  # 88 pairs over 8 experts
    assert plan(kind, wtype, 45, device=device, **MIXTRAL).startswith("grouped_")
    for name in ("Q3_K", "Q5_K", "Q6_K"):  # passes of 8 only: the measured crossover of 10
        assert plan(kind, int(GGMLType[name]), 40, device=device, **MIXTRAL) == "mma_gemv"
        assert plan(kind, int(GGMLType[name]), 41, device=device, **MIXTRAL).startswith("grouped_")
    assert plan(kind, wtype, 128, device=device, **QWEN3) == "mma_gemv"  # 1024 pairs over 128
    assert plan(kind, wtype, 129, device=device, **QWEN3).startswith("grouped_")  # over 1024 pairs
    odd_k = {**MIXTRAL, "K": 4096 + 32}  # K % 256 != 0: the token GEMV's rule
    per_expert = 1 if device == "hopper" else 2
    assert plan(kind, wtype, 4 * per_expert, device=device, **odd_k) == "token_gemv"
    assert plan(kind, wtype, 4 * per_expert + 1, device=device, **odd_k).startswith("grouped_")


@pytest.mark.parametrize("device", ["hopper", "generic"])
def test_mxfp4_gemv_takes_k_a_multiple_of_64(device):
    """MXFP4's GEMV tile reads rows on any 2-byte boundary and a partial last chunk, so gpt-oss
    (K = 2880, not a multiple of 256) decodes in the tensor-core GEMV; K % 64 != 0 (a lane's share
    of a chunk) and the other formats at K % 256 != 0 keep the token GEMV."""
    mxfp4 = int(GGMLType.MXFP4)
    gpt_oss = dict(E=32, k=4, N=2 * 2880, K=2880)
    for T in (1, 2, 8, 64):
        assert plan(MoeKind.WMMA_GGUF, mxfp4, T, device=device, **gpt_oss) == "mma_gemv"
    assert plan(MoeKind.WMMA_GGUF, mxfp4, 1, device=device, **{**gpt_oss, "K": 2880 + 32}) == "token_gemv"
    assert plan(MoeKind.WMMA_GGUF, int(GGMLType.Q8_0), 1, device=device, **gpt_oss) == "token_gemv"
    assert plan(MoeKind.WMMA_GGUF, mxfp4, 1, device=device, **{**gpt_oss, "K": 64}) == "mma_gemv"


@pytest.mark.parametrize("shape", [MIXTRAL, QWEN3, dict(E=256, k=8, N=2 * 2048, K=7168)])
@pytest.mark.parametrize("T", [8, 64, 512, 4096])
@pytest.mark.parametrize("reduce", [True, False])
def test_gguf_scratch_holds_no_copy_of_the_experts(shape, T, reduce):
    E, k, N, K = shape["E"], shape["k"], shape["N"], shape["K"]
    got = scratch(MoeKind.WMMA_GGUF, Q4_K, T, reduce=reduce, **shape)
    pairs = T * k
    bookkeeping = 4 * (4 * E + 2 + pairs) + 5 * 256  # counts, offsets, tile starts, cursors, perm (+ alignment)
    assert got <= (4 * pairs * N if reduce else 0) + bookkeeping
    # It does not grow with K at all (a bf16 copy of the experts would: 15 GB for DeepSeek-V3).
    assert scratch(MoeKind.WMMA_GGUF, Q4_K, T, reduce=reduce, **{**shape, "K": 4 * K}) == got
    # GGUF experts need no more scratch than dense ones: GGUF adds nothing (the same where both
    # take the GEMM; less where GGUF takes the tensor-core GEMV on some devices and dense the GEMM).
    assert got <= scratch(MoeKind.WMMA, BF16, T, reduce=reduce, **shape)


def test_token_gemv_needs_no_scratch():
    assert scratch(MoeKind.WMMA, BF16, 1, **MIXTRAL) == 0
    assert scratch(MoeKind.WMMA_GGUF, Q4_K, 4, **QWEN3) == 0


def test_unknown_device_class_is_refused():
    with pytest.raises(ValueError, match="device must be"):
        plan(MoeKind.WMMA, BF16, 8, device="volta", **MIXTRAL)
