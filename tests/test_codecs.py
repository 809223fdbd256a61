"""GGUF codecs: decoding bit-exact with the gguf package, Q8_0 quantization bit-exact, K-quant
error within docs/contract.md §3's bounds, and the QuantizedExperts / quantize / dequantize API."""

from __future__ import annotations

import gguf
import numpy as np
import pytest

import jax_moe
from jax_moe import GGMLType, QuantizedExperts, dequantize, quantize
from jax_moe.kinds import block_bytes, block_size

from reference import BLOCKS, E8M0, FORMATS, gguf_decode, gguf_type, random_blocks

# ggml's reference quantizers (no importance matrix) on N(0,1) rows of 4096 (docs/contract.md §3).
GGML_RMS = {"Q8_0": 0.00535, "Q6_K": 0.01773, "Q5_K": 0.03611, "Q4_K": 0.07133, "Q3_K": 0.15099, "Q2_K": 0.29656}
# Formats whose quantizer gguf.quants has (and ours reproduces bit for bit).
GGUF_QUANTIZES = ("Q8_0", "MXFP4")


def _gguf_rel_rms(fmt: str, x: np.ndarray) -> float:
    """Relative RMS error of gguf.quants' own quantizer on x."""
    flat = x.reshape(-1, x.shape[-1])
    back = gguf.quants.dequantize(gguf.quants.quantize(flat, gguf_type(fmt)), gguf_type(fmt))
    return float(np.linalg.norm(back - flat) / np.linalg.norm(flat))


def _reference_rms(fmt: str, x: np.ndarray) -> float:
    """The error a format's reference quantizer reaches on N(0,1) rows: the contract's numbers
    (GGML_RMS), or (MXFP4, which it lists none for) gguf's quantizer measured on x itself."""
    return GGML_RMS[fmt] if fmt in GGML_RMS else _gguf_rel_rms(fmt, x)


@pytest.mark.parametrize("fmt", FORMATS)
def test_block_tables_match_gguf_and_cpp(fmt):
    qk, bb = gguf.GGML_QUANT_SIZES[gguf_type(fmt)]
    assert (block_size(fmt), block_bytes(fmt)) == (qk, bb) == BLOCKS[fmt][:2]
    assert (jax_moe._ext.cpu.block_elems(int(GGMLType[fmt])), jax_moe._ext.cpu.block_bytes(int(GGMLType[fmt]))) == (qk, bb)


@pytest.mark.parametrize("fmt", FORMATS)
def test_decode_bit_exact_with_gguf(rng, fmt):
    qk = BLOCKS[fmt][0]
    E, N, nb = 3, 5, 4
    data = random_blocks(rng, fmt, (E, N, nb), scale=float(rng.uniform(1e-3, 10)))
    q = QuantizedExperts(data, fmt, (E, N, nb * qk))
    ours = dequantize(q)
    oracle = gguf_decode(data, fmt, nb * qk)
    assert ours.dtype == np.float32 and ours.shape == (E, N, nb * qk)
    np.testing.assert_array_equal(ours.view(np.uint32), oracle.view(np.uint32))


@pytest.mark.parametrize("fmt", FORMATS)
def test_decode_extreme_scales_bit_exact(rng, fmt):
    """Subnormal and large finite fp16 scales decode exactly too."""
    qk, bb, offsets = BLOCKS[fmt]
    data = random_blocks(rng, fmt, (1, 4, 8)).reshape(1, 4, 8, bb)
    halves = np.array([6.0e-8, -6.0e-8, 1e-5, 65504.0, -65504.0, 0.0, -0.0, 3.1e-5], np.float16)
    for off in offsets:
        data[..., off:off + 2] = rng.choice(halves, size=(1, 4, 8)).view(np.uint8).reshape(1, 4, 8, 2)
    exponents = np.array([0, 1, 2, 3, 126, 127, 128, 252, 253, 254, 255], np.uint8)  # subnormal .. 2^127
    for off in E8M0.get(fmt, ()):
        data[..., off] = rng.choice(exponents, size=(1, 4, 8))
    data = data.reshape(1, 4, 8 * bb)
    ours = dequantize(QuantizedExperts(data, fmt, (1, 4, 8 * qk)))
    with np.errstate(over="ignore"):  # E8M0 scales up to 2^127: x 12 overflows, as in gguf
        oracle = gguf_decode(data, fmt, 8 * qk)
    finite = np.isfinite(oracle)
    np.testing.assert_array_equal(np.isfinite(ours), finite)
    np.testing.assert_array_equal(ours[finite], oracle[finite])


def test_q8_0_quantize_bit_exact_with_gguf(rng):
    x = rng.standard_normal((2, 7, 32 * 9)).astype(np.float32) * rng.uniform(0.01, 100)
    x[0, 0, :32] = 0.0  # an all-zero block
    x[0, 1, :32] = rng.integers(-4, 5, 32) / 2.0  # exact ties at .5
    x[1, 2, 32:64] *= 1e-30  # tiny values
    x[1, 3] = rng.standard_t(5, size=x.shape[-1])  # heavy tails
    ours = quantize(x, GGMLType.Q8_0)
    oracle = gguf.quants.quantize(x.reshape(-1, x.shape[-1]), gguf.GGMLQuantizationType.Q8_0)
    np.testing.assert_array_equal(np.asarray(ours.data).reshape(oracle.shape), oracle)


def test_mxfp4_decode_every_exponent_and_code(rng):
    """Every E8M0 byte (0..255) with every byte of codes, bit-exact with gguf (Inf where the
    scale times 12 overflows f32, as gguf has it), and the element order: low nibbles are
    elements 0..15, high nibbles 16..31."""
    e = np.repeat(np.arange(256, dtype=np.uint8), 16)  # 16 blocks per exponent ...
    qs = np.stack([rng.permutation(256) for _ in range(256)]).astype(np.uint8).reshape(256 * 16, 16)
    data = np.concatenate([e[:, None], qs], axis=1).reshape(16, 16, 16 * 17)  # ... holding every code byte
    ours = dequantize(QuantizedExperts(data, "MXFP4", (16, 16, 16 * 32)))
    with np.errstate(over="ignore"):
        oracle = gguf_decode(data, "MXFP4", 16 * 32)
    assert np.isinf(oracle).any() and (oracle == 0).any()
    np.testing.assert_array_equal(ours.view(np.uint32), oracle.view(np.uint32))
    # One block by hand: e = 128 (scale 2^1 = value 1 * kvalue), code c at element j.
    kvalues = np.array([0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12], np.float32)
    codes = rng.integers(0, 16, 32)
    block = np.concatenate([[128], codes[:16] | (codes[16:] << 4)]).astype(np.uint8)
    got = dequantize(QuantizedExperts(block.reshape(1, 1, 17), "MXFP4", (1, 1, 32)))[0, 0]
    np.testing.assert_array_equal(got, kvalues[codes])


def test_mxfp4_quantize_bit_exact_with_gguf(rng):
    """Both ways with gguf.quants: random rows at many scales, all-zero blocks, exact ties between
    two levels, block maxima at and just below powers of two (where floor(log2) is decided),
    tiny (subnormal) and huge values; NaN and Inf through the C++ codec (quantize itself rejects
    them)."""
    x = rng.standard_normal((3, 40, 32 * 8)).astype(np.float32)
    x *= (10.0 ** rng.uniform(-30, 30, size=(3, 40, 1))).astype(np.float32)
    blocks = x.reshape(-1, 32)
    blocks[0] = 0.0
    d = np.float32(2.0) ** rng.integers(-20, 20, size=(40, 1)).astype(np.float32)
    levels = np.array([0, 1, 2, 3, 4, 6, 8, 12], np.float32)
    mids = (levels[:-1] + levels[1:]) / 2
    blocks[1:41] = d * rng.choice(np.concatenate([mids, -mids]), size=(40, 32)).astype(np.float32)
    blocks[1:41, 0] = d[:, 0] * 8  # a maximum at a power of two: the scale is d, every other x a tie
    p = np.float32(2.0) ** rng.integers(-149, 128, size=60).astype(np.float32)
    blocks[41:101] = rng.standard_normal((60, 32)).astype(np.float32) * (p[:, None] / 8)
    blocks[41:101, 5] = np.nextafter(p, np.float32(0))  # a maximum just below a power of two
    blocks[101:111] = rng.standard_normal((10, 32)).astype(np.float32) * np.float32(1e-40)
    blocks[111:121] = rng.standard_normal((10, 32)).astype(np.float32) * np.float32(3e37)
    blocks[124, int(rng.integers(0, 32))] = np.finfo(np.float32).max
    ours = np.asarray(quantize(x, "MXFP4").data).reshape(-1, 17)
    with np.errstate(all="ignore"):
        oracle = gguf.quants.quantize(blocks, gguf.GGMLQuantizationType.MXFP4)
    np.testing.assert_array_equal(ours, oracle)
    special = x.copy()
    for v, row in ((np.nan, 121), (np.inf, 122), (-np.inf, 123)):
        special.reshape(-1, 32)[row, int(rng.integers(0, 32))] = v
    with pytest.raises(ValueError, match="finite values only"):
        quantize(special, "MXFP4")
    codec = jax_moe._ext.cpu.quantize(special.reshape(-1, special.shape[-1]), int(GGMLType.MXFP4))
    with np.errstate(all="ignore"):
        oracle_special = gguf.quants.quantize(special.reshape(-1, 32), gguf.GGMLQuantizationType.MXFP4)
    np.testing.assert_array_equal(codec.reshape(-1, 17), oracle_special)
    back = dequantize(QuantizedExperts(ours.reshape(3, 40, 8 * 17), "MXFP4", x.shape))
    np.testing.assert_array_equal(back.view(np.uint32), gguf_decode(oracle.reshape(3, 40, 8 * 17), "MXFP4", 256).view(np.uint32))


def _rel_rms(fmt: str, x: np.ndarray) -> float:
    back = gguf_decode(np.asarray(quantize(x, fmt).data), fmt, x.shape[-1])  # decoded by the oracle
    assert np.isfinite(back).all()
    return float(np.linalg.norm(back - x) / np.linalg.norm(x))


@pytest.mark.parametrize("fmt", FORMATS)
def test_quantizer_error_within_ggml_bounds_normal(rng, fmt):
    x = rng.standard_normal((1, 64, 4096)).astype(np.float32)
    err, ref = _rel_rms(fmt, x), _reference_rms(fmt, x)
    assert err <= 1.03 * ref, f"{fmt}: relative RMS error {err:.5f} > 1.03 x {ref:.5f}"
    if fmt in GGUF_QUANTIZES:  # bit-exact with gguf: the very same error
        assert err == pytest.approx(_gguf_rel_rms(fmt, x), rel=1e-6)


@pytest.mark.parametrize("fmt", [f for f in FORMATS if f != "Q8_0"])
def test_quantizer_error_within_bounds_student_t5(rng, fmt):
    """Heavy tails raise every quantizer's relative error. docs/contract.md's numbers are for N(0,1);
    on Student-t(5) rows the bound is scaled by the heavy-tail factor of Q8_0 on the same rows
    (our Q8_0 is bit-exact with ggml's, so that factor is ggml's own)."""
    x = rng.standard_t(5, size=(1, 64, 4096)).astype(np.float32)
    tail_factor = _rel_rms("Q8_0", x) / GGML_RMS["Q8_0"]
    assert 1.0 < tail_factor < 2.0
    err = _rel_rms(fmt, x)
    # MXFP4: gguf's own quantizer on these very rows (no tail factor needed)
    bound = 1.03 * (GGML_RMS[fmt] * tail_factor if fmt in GGML_RMS else _gguf_rel_rms(fmt, x))
    assert err <= bound, f"{fmt} student-t(5): relative RMS error {err:.5f} > {bound:.5f}"


@pytest.mark.parametrize("fmt", FORMATS)
def test_quantize_zeros_and_scale(rng, fmt):
    qk = block_size(fmt)
    x = np.zeros((1, 2, qk * 2), np.float32)
    x[0, 1] = rng.standard_normal(qk * 2) * 1e3
    back = dequantize(quantize(x, fmt))
    np.testing.assert_array_equal(back[0, 0], 0.0)
    assert np.linalg.norm(back[0, 1] - x[0, 1]) / np.linalg.norm(x[0, 1]) < 2 * _reference_rms(fmt, x[0, 1] / 1e3)


def test_quantize_accepts_bf16_and_jax_arrays(rng):
    import jax.numpy as jnp

    x = rng.standard_normal((2, 3, 256)).astype(np.float32)
    a = quantize(jnp.asarray(x, jnp.bfloat16), "Q4_K")
    b = quantize(np.asarray(jnp.asarray(x, jnp.bfloat16).astype(jnp.float32)), GGMLType.Q4_K)
    np.testing.assert_array_equal(np.asarray(a.data), np.asarray(b.data))
    assert a.shape == (2, 3, 256) and a.qtype == GGMLType.Q4_K


def test_quantized_experts_validation(rng):
    data = random_blocks(rng, "Q4_K", (2, 3, 2))
    q = QuantizedExperts(data, "Q4_K", (2, 3, 512))
    assert (q.E, q.N, q.K) == (2, 3, 512) and q.nbytes == data.size
    with pytest.raises(ValueError, match="multiple of the Q4_K block size 256"):
        QuantizedExperts(data, "Q4_K", (2, 3, 500))
    with pytest.raises(ValueError, match=r"data must be uint8 \[2, 3, 288\]"):
        QuantizedExperts(data[:, :, :-1], "Q4_K", (2, 3, 512))
    with pytest.raises(ValueError, match="qtype must be one of"):
        QuantizedExperts(data, "Q4_0", (2, 3, 512))
    with pytest.raises(ValueError, match=r"shape must be \(E, N, K\)"):
        QuantizedExperts(data, "Q4_K", (6, 512))
    with pytest.raises(ValueError, match="multiple of the Q8_0 block size 32"):
        quantize(np.ones((1, 2, 33), np.float32), "Q8_0")
    with pytest.raises(ValueError, match=r"must be \[E, N, K\]"):
        quantize(np.ones((2, 32), np.float32), "Q8_0")
    with pytest.raises(TypeError, match="QuantizedExperts"):
        dequantize(np.ones((1, 1, 34), np.uint8))


def test_quantized_experts_is_a_pytree(rng):
    import jax

    q = quantize(rng.standard_normal((2, 4, 64)).astype(np.float32), "Q8_0")
    leaves, tree = jax.tree_util.tree_flatten(q)
    assert len(leaves) == 1 and leaves[0] is q.data
    q2 = jax.tree_util.tree_unflatten(tree, leaves)
    assert q2.qtype == q.qtype and q2.shape == q.shape
    moved = jax.device_put(q)
    assert isinstance(moved, QuantizedExperts) and isinstance(moved.data, jax.Array)


def test_cpp_codec_entry_points_validate_sizes():
    cpu = jax_moe._ext.cpu
    with pytest.raises(ValueError, match="multiple of 256"):
        cpu.quantize(np.ones((2, 300), np.float32), int(GGMLType.Q4_K))
    with pytest.raises(ValueError, match="multiple of 144"):
        cpu.dequantize(np.ones((2, 143), np.uint8), int(GGMLType.Q4_K))
    with pytest.raises(ValueError, match="qtype must be one of"):
        cpu.dequantize(np.ones((2, 144), np.uint8), 2)
