"""GGUF codecs: decoding bit-exact with the gguf package, Q8_0 quantization bit-exact, K-quant
error within docs/contract.md §3's bounds, and the QuantizedExperts / quantize / dequantize API."""

from __future__ import annotations

import gguf
import numpy as np
import pytest

import jax_moe
from jax_moe import GGMLType, QuantizedExperts, dequantize, quantize
from jax_moe.kinds import block_bytes, block_size

from reference import BLOCKS, FORMATS, gguf_decode, gguf_type, random_blocks

# ggml's reference quantizers (no importance matrix) on N(0,1) rows of 4096 (docs/contract.md §3).
GGML_RMS = {"Q8_0": 0.00535, "Q6_K": 0.01773, "Q5_K": 0.03611, "Q4_K": 0.07133, "Q3_K": 0.15099, "Q2_K": 0.29656}


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
    data = data.reshape(1, 4, 8 * bb)
    ours = dequantize(QuantizedExperts(data, fmt, (1, 4, 8 * qk)))
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


def _rel_rms(fmt: str, x: np.ndarray) -> float:
    back = gguf_decode(np.asarray(quantize(x, fmt).data), fmt, x.shape[-1])  # decoded by the oracle
    assert np.isfinite(back).all()
    return float(np.linalg.norm(back - x) / np.linalg.norm(x))


@pytest.mark.parametrize("fmt", FORMATS)
def test_quantizer_error_within_ggml_bounds_normal(rng, fmt):
    x = rng.standard_normal((1, 64, 4096)).astype(np.float32)
    err = _rel_rms(fmt, x)
    assert err <= 1.03 * GGML_RMS[fmt], f"{fmt}: relative RMS error {err:.5f} > 1.03 x {GGML_RMS[fmt]}"


@pytest.mark.parametrize("fmt", [f for f in FORMATS if f != "Q8_0"])
def test_quantizer_error_within_bounds_student_t5(rng, fmt):
    """Heavy tails raise every quantizer's relative error. docs/contract.md's numbers are for N(0,1);
    on Student-t(5) rows the bound is scaled by the heavy-tail factor of Q8_0 on the same rows
    (our Q8_0 is bit-exact with ggml's, so that factor is ggml's own)."""
    x = rng.standard_t(5, size=(1, 64, 4096)).astype(np.float32)
    tail_factor = _rel_rms("Q8_0", x) / GGML_RMS["Q8_0"]
    assert 1.0 < tail_factor < 2.0
    err = _rel_rms(fmt, x)
    bound = 1.03 * GGML_RMS[fmt] * tail_factor
    assert err <= bound, f"{fmt} student-t(5): relative RMS error {err:.5f} > {bound:.5f}"


@pytest.mark.parametrize("fmt", FORMATS)
def test_quantize_zeros_and_scale(rng, fmt):
    qk = block_size(fmt)
    x = np.zeros((1, 2, qk * 2), np.float32)
    x[0, 1] = rng.standard_normal(qk * 2) * 1e3
    back = dequantize(quantize(x, fmt))
    np.testing.assert_array_equal(back[0, 0], 0.0)
    assert np.linalg.norm(back[0, 1] - x[0, 1]) / np.linalg.norm(x[0, 1]) < 2 * GGML_RMS[fmt]


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
