"""jax_moe.ffn (moe_ffn, moe_block, MoEWeights) against a compact NumPy float64 reference."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

import jax_moe
from jax_moe.ffn import MoEWeights, SharedExpert, fuse_gate_up, moe_block, moe_ffn
from jax_moe.routing import RouterConfig
from reference import ffn_reference as ref_ffn, gpt_oss_act

BF16, F16, F32 = np.dtype(ml_dtypes.bfloat16), np.dtype(np.float16), np.dtype(np.float32)
# Half an ulp at 1.0: the one rounding of the output. Intermediate roundings (gate/up, h) may
# land one ulp apart from the float64 reference's; their effect on an output element is a small
# fraction of that element, so it is bounded by the same half ulp of the output's scale.
HALF_ULP = {BF16: 2.0**-8, F16: 2.0**-11, F32: 2.0**-23}
# SCALAR_GGUF stages activations as q8_1: the reference reproduces it; float32 x / d and the
# float32 activation may sit one float32 ulp from the reference's, moving a q8 value by one step
# in rare cases, so the bound there is half a q8 step (1/254) of the output scale.
Q8_TOL = 1.0 / 254


def assert_close(out, ref, out_dtype, *, scalar=False):
    out = np.asarray(jnp.asarray(out).astype(jnp.float32), np.float64)
    scale = np.abs(ref).max()
    assert scale > 0
    tol = HALF_ULP[np.dtype(out_dtype)] + (Q8_TOL if scalar else 0.0)
    np.testing.assert_allclose(out, ref, rtol=HALF_ULP[np.dtype(out_dtype)], atol=tol * scale)


def split_enk(w_enk, layout):
    return w_enk if layout == "enk" else jnp.swapaxes(w_enk, 1, 2)


def make(rng, E=4, k=2, D=256, F=256, T=8, dtype=jnp.bfloat16):
    x = jnp.asarray(rng.standard_normal((T, D)), dtype)
    ids = jnp.asarray(np.stack([rng.choice(E, k, replace=False) for _ in range(T)]), jnp.int32)
    scores = jnp.asarray(rng.uniform(0.1, 1.0, (T, k)), jnp.float32)
    wg = rng.standard_normal((E, F, D)).astype(np.float32) / np.sqrt(D)
    wu = rng.standard_normal((E, F, D)).astype(np.float32) / np.sqrt(D)
    wd = rng.standard_normal((E, D, F)).astype(np.float32) / np.sqrt(F)
    return x, ids, scores, wg, wu, wd



def count_moe_matmuls(fn, *args) -> int:
    """moe_matmul calls in fn's jaxpr (including nested jaxprs such as jit's)."""
    def walk(jaxpr) -> int:
        n = 0
        for eqn in jaxpr.eqns:
            n += eqn.primitive is jax_moe.moe_matmul_p
            for p in eqn.params.values():
                inner = getattr(p, "jaxpr", p)
                if hasattr(inner, "eqns"):
                    n += walk(inner)
        return n
    return walk(jax.make_jaxpr(fn)(*args).jaxpr)


@pytest.mark.parametrize("dtype,layout,act", [
    (jnp.bfloat16, "enk", "swiglu"),
    (jnp.float16, "ekn", "geglu"),
    (jnp.bfloat16, "ekn", "swiglu"),
])
def test_dense_fused(rng, dtype, layout, act):
    x, ids, scores, wg, wu, wd = make(rng, dtype=dtype)
    gu = split_enk(jnp.asarray(np.concatenate([wg, wu], 1), dtype), layout)
    dn = split_enk(jnp.asarray(wd, dtype), layout)
    out = jax.jit(lambda x, ids, s, gu, dn: moe_ffn(x, ids, s, gu, dn, activation=act,
                                                    weight_layout=layout))(x, ids, scores, gu, dn)
    assert out.shape == x.shape and out.dtype == dtype
    F = wg.shape[1]
    g, u = (gu[:, :F], gu[:, F:]) if layout == "enk" else (gu[:, :, :F], gu[:, :, F:])
    ref, od = ref_ffn(x, ids, scores, g, u, dn, act=act, layout=layout)
    assert_close(out, ref, od)
    # one moe_matmul for gate+up, one for down
    assert count_moe_matmuls(lambda x: moe_ffn(x, ids, scores, gu, dn, activation=act,
                                               weight_layout=layout), x) == 2


def test_quantized_mixed_formats_wmma_gguf(rng):
    """gate Q4_K, up Q5_K (separate), down Q6_K, bfloat16 activations: WMMA_GGUF."""
    x, ids, scores, wg, wu, wd = make(rng)
    qg, qu, qd = jax_moe.quantize(wg, "Q4_K"), jax_moe.quantize(wu, "Q5_K"), jax_moe.quantize(wd, "Q6_K")
    out = moe_ffn(x, ids, scores, (qg, qu), qd)
    assert out.dtype == jnp.bfloat16
    assert count_moe_matmuls(lambda x: moe_ffn(x, ids, scores, (qg, qu), qd), x) == 3
    ref, od = ref_ffn(x, ids, scores, qg, qu, qd)
    assert_close(out, ref, od)


def test_quantized_fused_q4k_down_q6k(rng):
    """The Q4_K_M layout: fused gate+up in Q4_K, down in Q6_K; one call each."""
    x, ids, scores, wg, wu, wd = make(rng, E=6, k=3)
    qgu = jax_moe.quantize(np.concatenate([wg, wu], 1), "Q4_K")
    qd = jax_moe.quantize(wd, "Q6_K")
    out = jax.jit(moe_ffn)(x, ids, scores, qgu, qd)
    F = wg.shape[1]
    qg = jax_moe.QuantizedExperts(np.asarray(qgu.data)[:, :F], qgu.qtype, (6, F, 256))
    qu = jax_moe.QuantizedExperts(np.asarray(qgu.data)[:, F:], qgu.qtype, (6, F, 256))
    ref, od = ref_ffn(x, ids, scores, qg, qu, qd)
    assert_close(out, ref, od)
    assert count_moe_matmuls(lambda x: moe_ffn(x, ids, scores, qgu, qd), x) == 2


def test_scalar_gguf_float32(rng):
    """float32 activations with quantized experts run SCALAR_GGUF (q8_1 activations)."""
    x, ids, scores, wg, wu, wd = make(rng, dtype=jnp.float32)
    qgu = jax_moe.quantize(np.concatenate([wg, wu], 1), "Q8_0")
    qd = jax_moe.quantize(wd, "Q4_K")
    out = moe_ffn(x, ids, scores, qgu, qd)
    assert out.dtype == jnp.float32
    F = wg.shape[1]
    qg = jax_moe.QuantizedExperts(np.asarray(qgu.data)[:, :F], qgu.qtype, (4, F, 256))
    qu = jax_moe.QuantizedExperts(np.asarray(qgu.data)[:, F:], qgu.qtype, (4, F, 256))
    ref, od = ref_ffn(x, ids, scores, qg, qu, qd)
    assert_close(out, ref, od, scalar=True)


def test_dense_gate_up_quantized_down(rng):
    """Per-tensor choice: dense bf16 gate/up with a Q6_K down projection."""
    x, ids, scores, wg, wu, wd = make(rng)
    g, u = jnp.asarray(wg, jnp.bfloat16), jnp.asarray(wu, jnp.bfloat16)
    qd = jax_moe.quantize(wd, "Q6_K")
    out = moe_ffn(x, ids, scores, (g, u), qd, out_dtype=jnp.float32)
    assert out.dtype == jnp.float32
    ref, _ = ref_ffn(x, ids, scores, g, u, qd)
    assert_close(out, ref, BF16)  # the down projection's input is bfloat16; f32 output


@pytest.mark.parametrize("quantized", [False, True])
def test_shared_expert_with_gate(rng, quantized):
    x, ids, scores, wg, wu, wd = make(rng)
    Fs = 512
    sg = rng.standard_normal((1, Fs, 256)).astype(np.float32) / 16
    su = rng.standard_normal((1, Fs, 256)).astype(np.float32) / 16
    sd = rng.standard_normal((1, 256, Fs)).astype(np.float32) / np.sqrt(Fs)
    gate_w = jnp.asarray(rng.standard_normal(256) / 16, jnp.float32)
    if quantized:
        s_gu = jax_moe.quantize(np.concatenate([sg, su], 1), "Q8_0")
        s_dn = jax_moe.quantize(sd, "Q5_K")
        s_g = jax_moe.QuantizedExperts(np.asarray(s_gu.data)[:, :Fs], s_gu.qtype, (1, Fs, 256))
        s_u = jax_moe.QuantizedExperts(np.asarray(s_gu.data)[:, Fs:], s_gu.qtype, (1, Fs, 256))
    else:  # dense, 2-d
        s_gu = jnp.asarray(np.concatenate([sg, su], 1)[0], jnp.bfloat16)
        s_dn = jnp.asarray(sd[0], jnp.bfloat16)
        s_g, s_u, s_dn3 = s_gu[None, :Fs], s_gu[None, Fs:], s_dn[None]
    gu = jnp.asarray(np.concatenate([wg, wu], 1), jnp.bfloat16)
    dn = jnp.asarray(wd, jnp.bfloat16)
    shared = SharedExpert(s_gu, s_dn, gate_w)
    out = jax.jit(lambda x, sh: moe_ffn(x, ids, scores, gu, dn, shared=sh))(x, shared)
    F = wg.shape[1]
    ref, od = ref_ffn(x, ids, scores, gu[:, :F], gu[:, F:], dn,
                      shared=(s_g, s_u, s_dn if quantized else s_dn3, np.asarray(gate_w)))
    assert_close(out, ref, od)
    # without the gate, the shared output is added as is
    out2 = moe_ffn(x, ids, scores, gu, dn, shared=SharedExpert(s_gu, s_dn))
    ref2, _ = ref_ffn(x, ids, scores, gu[:, :F], gu[:, F:], dn,
                      shared=(s_g, s_u, s_dn if quantized else s_dn3, None))
    assert_close(out2, ref2, od)


def test_leading_dims_and_out_of_range_ids(rng):
    x, ids, scores, wg, wu, wd = make(rng, T=6)
    ids = ids.at[1, 0].set(-1).at[4, 1].set(4)  # E = 4: both pairs contribute zero
    gu = jnp.asarray(np.concatenate([wg, wu], 1), jnp.bfloat16)
    dn = jnp.asarray(wd, jnp.bfloat16)
    out = moe_ffn(x.reshape(2, 3, -1), ids.reshape(2, 3, 2), scores.reshape(2, 3, 2), gu, dn)
    assert out.shape == (2, 3, 256)
    F = wg.shape[1]
    ids_np = np.asarray(ids)
    keep = (ids_np >= 0) & (ids_np < 4)
    ref, od = ref_ffn(x, np.where(keep, ids_np, 0), np.where(keep, np.asarray(scores), 0.0),
                      gu[:, :F], gu[:, F:], dn)
    assert_close(out.reshape(6, -1), ref, od)


def test_fuse_gate_up(rng):
    x, ids, scores, wg, wu, wd = make(rng)
    qg, qu = jax_moe.quantize(wg, "Q4_K"), jax_moe.quantize(wu, "Q4_K")
    fused = fuse_gate_up(qg, qu)
    assert fused.shape == (4, 512, 256) and fused.qtype == jax_moe.GGMLType.Q4_K
    np.testing.assert_array_equal(jax_moe.dequantize(fused), np.concatenate(
        [jax_moe.dequantize(qg), jax_moe.dequantize(qu)], 1))
    qd = jax_moe.quantize(wd, "Q6_K")
    np.testing.assert_array_equal(np.asarray(moe_ffn(x, ids, scores, fused, qd), np.float32),
                                  np.asarray(moe_ffn(x, ids, scores, (qg, qu), qd), np.float32))
    g, u = jnp.asarray(wg, jnp.bfloat16), jnp.asarray(wu, jnp.bfloat16)
    dense = fuse_gate_up(jnp.swapaxes(g, 1, 2), jnp.swapaxes(u, 1, 2), weight_layout="ekn")
    assert dense.shape == (4, 256, 512)
    np.testing.assert_array_equal(np.asarray(dense[:, :, 256:], np.float32),
                                  np.asarray(jnp.swapaxes(u, 1, 2), np.float32))
    with pytest.raises(TypeError, match="Q4_K.*Q6_K|one format"):
        fuse_gate_up(qg, jax_moe.quantize(wu, "Q6_K"))


def test_moe_block_and_weights_pytree(rng):
    """Router (float32) + routing + FFN, through MoEWeights as a jitted pytree."""
    x, _, _, wg, wu, wd = make(rng, E=8, T=12)
    router = jnp.asarray(rng.standard_normal((256, 8)) / 4, jnp.float32)
    cfg = RouterConfig.mixtral(k=2)
    weights = MoEWeights(router=router, gate_up=jax_moe.quantize(np.concatenate([wg, wu], 1), "Q4_K"),
                         down=jax_moe.quantize(wd, "Q6_K"), config=cfg)
    assert weights.num_experts == 8 and weights.features == 256 and weights.hidden_features == 256
    assert weights.formats() == {"gate_up": "Q4_K", "down": "Q6_K"}
    out, (ids, scores) = jax.jit(lambda w, x: w(x, return_routing=True))(weights, x)
    # float64 routing reference (Mixtral: softmax, top-2, renormalized)
    logits = np.asarray(x.astype(jnp.float32), np.float64) @ np.asarray(router, np.float64)
    top = np.argsort(-logits, axis=-1, kind="stable")[:, :2]
    gap = np.take_along_axis(logits, top, -1)[:, 1] - np.sort(logits, -1)[:, -3]
    if gap.min() > 1e-4:  # unambiguous choice
        np.testing.assert_array_equal(np.asarray(ids), top)
    p = np.exp(np.take_along_axis(logits, np.asarray(ids), -1))
    np.testing.assert_allclose(np.asarray(scores), p / p.sum(-1, keepdims=True), rtol=1e-5, atol=1e-6)
    F = wg.shape[1]
    qg = jax_moe.QuantizedExperts(np.asarray(weights.gate_up.data)[:, :F], "Q4_K", (8, F, 256))
    qu = jax_moe.QuantizedExperts(np.asarray(weights.gate_up.data)[:, F:], "Q4_K", (8, F, 256))
    ref, od = ref_ffn(x, ids, scores, qg, qu, weights.down)
    assert_close(out, ref, od)
    # the same as the parts
    np.testing.assert_array_equal(
        np.asarray(out, np.float32),
        np.asarray(moe_block(x, router, weights.gate_up, weights.down, router=cfg), np.float32))


def test_grad_is_an_inference_only_error(rng):
    x, ids, scores, wg, wu, wd = make(rng)
    gu = jnp.asarray(np.concatenate([wg, wu], 1), jnp.bfloat16)
    dn = jnp.asarray(wd, jnp.bfloat16)
    with pytest.raises(Exception, match="stop_gradient"):
        jax.grad(lambda s: moe_ffn(x, ids, s, gu, dn).astype(jnp.float32).sum())(scores)


def test_bad_inputs(rng):
    x, ids, scores, wg, wu, wd = make(rng)
    gu = jnp.asarray(np.concatenate([wg, wu], 1), jnp.bfloat16)
    dn = jnp.asarray(wd, jnp.bfloat16)
    with pytest.raises(ValueError, match="activation"):
        moe_ffn(x, ids, scores, gu, dn, activation="tanh")
    with pytest.raises(ValueError, match="weight_layout"):
        moe_ffn(x, ids, scores, gu, dn, weight_layout="nke")
    with pytest.raises(TypeError, match="expert_ids"):
        moe_ffn(x, ids.astype(jnp.float32), scores, gu, dn)
    with pytest.raises(ValueError, match="scores"):
        moe_ffn(x, ids, scores[:, :1], gu, dn)
    with pytest.raises(ValueError, match="expert_ids"):
        moe_ffn(x, ids[:4], scores[:4], gu, dn)
    with pytest.raises(TypeError, match="gate_up.*float16 or bfloat16"):
        moe_ffn(x, ids, scores, gu.astype(jnp.float32), dn)
    with pytest.raises(ValueError, match="down must be logically"):
        moe_ffn(x, ids, scores, gu, dn[:, :, :128])
    with pytest.raises(ValueError, match="odd N"):
        moe_ffn(x, ids, scores, gu[:, :-1], dn)
    with pytest.raises(ValueError, match="contract over D"):
        moe_ffn(x[:, :128], ids, scores, gu, dn)
    with pytest.raises(TypeError, match="x must be"):
        moe_ffn(x.astype(jnp.int32), ids, scores, gu, dn)
    with pytest.raises(TypeError, match="SharedExpert"):
        moe_ffn(x, ids, scores, gu, dn, shared=(gu, dn))


# -- gpt-oss: expert biases and the clamped SwiGLU -------------------------------------------------

def gpt_oss_case(rng, E=4, k=2, D=256, F=256, T=9, dtype=jnp.bfloat16):
    """Inputs whose gate/up values reach past the clamp (|gate + bias| > 7 happens), biases
    of the size gpt-oss has, and two pairs with out-of-range ids."""
    x, ids, scores, wg, wu, wd = make(rng, E=E, k=k, D=D, F=F, T=T, dtype=dtype)
    wg, wu = wg * 4, wu * 4
    ids = ids.at[0, 0].set(-1).at[1, 1].set(E)
    gb = (rng.standard_normal((E, F)) * 3).astype(np.float32)
    ub = (rng.standard_normal((E, F)) * 3).astype(np.float32)
    db = rng.standard_normal((E, D)).astype(np.float32)
    return x, ids, scores, wg, wu, wd, gb, ub, db


@pytest.mark.parametrize("weights", ["bf16_enk", "bf16_ekn", "mxfp4", "mxfp4_f32", "q8_0_pair"])
def test_gpt_oss_ffn_with_biases(rng, weights):
    """moe_ffn with gate/up and down biases and the gpt_oss activation against the float64
    reference: dense (both layouts), MXFP4 experts (WMMA_GGUF with bf16 x, SCALAR_GGUF with
    f32 x), and separate gate/up weights with a (gate_bias, up_bias) pair."""
    x_dtype = jnp.float32 if weights == "mxfp4_f32" else jnp.bfloat16
    x, ids, scores, wg, wu, wd, gb, ub, db = gpt_oss_case(rng, dtype=x_dtype)
    F = wg.shape[1]
    layout = "ekn" if weights == "bf16_ekn" else "enk"
    if weights.startswith("bf16"):
        gu = split_enk(jnp.asarray(np.concatenate([wg, wu], 1), jnp.bfloat16), layout)
        dn = split_enk(jnp.asarray(wd, jnp.bfloat16), layout)
        g, u = (gu[:, :F], gu[:, F:]) if layout == "enk" else (gu[:, :, :F], gu[:, :, F:])
        gate_up, bias = gu, np.concatenate([gb, ub], 1)
    elif weights.startswith("mxfp4"):
        gu = jax_moe.quantize(np.concatenate([wg, wu], 1), "MXFP4")
        dn = jax_moe.quantize(wd, "MXFP4")
        g = jax_moe.QuantizedExperts(np.asarray(gu.data)[:, :F], "MXFP4", (4, F, 256))
        u = jax_moe.QuantizedExperts(np.asarray(gu.data)[:, F:], "MXFP4", (4, F, 256))
        gate_up, bias = gu, np.concatenate([gb, ub], 1)
    else:
        g, u, dn = jax_moe.quantize(wg, "Q8_0"), jax_moe.quantize(wu, "Q8_0"), jax_moe.quantize(wd, "Q8_0")
        gate_up, bias = (g, u), (gb, ub)
    fn = jax.jit(lambda x, b, d: moe_ffn(x, ids, scores, gate_up, dn, activation="gpt_oss",
                                         weight_layout=layout, gate_up_bias=b, down_bias=d))
    out = fn(x, bias, db)
    assert out.dtype == x_dtype
    ref, od = ref_ffn(x, ids, scores, g, u, dn, act="gpt_oss", layout=layout,
                      gate_bias=gb, up_bias=ub, down_bias=db)
    assert_close(out, ref, od, scalar=x_dtype == jnp.float32)
    # the biases matter, and the clamp is reached (a SwiGLU on the same values differs)
    no_bias, _ = ref_ffn(x, ids, scores, g, u, dn, act="gpt_oss", layout=layout)
    assert np.abs(no_bias - ref).max() > 0.1 * np.abs(ref).max()
    unclamped, _ = ref_ffn(x, ids, scores, g, u, dn, act=lambda a, b: gpt_oss_act(a, b, limit=np.inf),
                           layout=layout, gate_bias=gb, up_bias=ub, down_bias=db)
    assert np.abs(unclamped - ref).max() > 0.1 * np.abs(ref).max()


def test_gpt_oss_activation(rng):
    """The activation alone, its parameters, and their validation."""
    from jax_moe.ffn import ACTIVATIONS, GptOssActivation

    g = (rng.standard_normal(1000) * 6).astype(np.float32)
    u = (rng.standard_normal(1000) * 6).astype(np.float32)
    assert ACTIVATIONS["gpt_oss"] == GptOssActivation() == GptOssActivation(1.702, 7.0)
    got = np.asarray(ACTIVATIONS["gpt_oss"](jnp.asarray(g), jnp.asarray(u)), np.float64)
    np.testing.assert_allclose(got, gpt_oss_act(g.astype(np.float64), u.astype(np.float64)), rtol=2e-6, atol=2e-6)
    act = GptOssActivation(alpha=1.0, limit=3.0)
    got = np.asarray(act(jnp.asarray(g), jnp.asarray(u)), np.float64)
    np.testing.assert_allclose(got, gpt_oss_act(g.astype(np.float64), u.astype(np.float64), 1.0, 3.0),
                               rtol=2e-6, atol=2e-6)
    assert hash(act) == hash(GptOssActivation(alpha=1.0, limit=3.0))
    for bad in (dict(limit=0.0), dict(limit=-1.0), dict(alpha=float("nan")), dict(limit="7")):
        with pytest.raises(ValueError, match="GptOssActivation"):
            GptOssActivation(**bad)


def test_deinterleave_gate_up(rng):
    """Hugging Face's interleaved gpt-oss gate_up_proj [E, D, 2F] (+ bias [E, 2F]), computed
    the way Hugging Face does (gate = h[..., ::2], up = h[..., 1::2]), equals moe_ffn on the
    de-interleaved weights."""
    from jax_moe.ffn import deinterleave_gate_up

    E, D, F, T, k = 4, 64, 32, 6, 2
    hf = (rng.standard_normal((E, D, 2 * F)) / 4).astype(np.float32)
    hf_b = rng.standard_normal((E, 2 * F)).astype(np.float32)
    down = (rng.standard_normal((E, F, D)) / 4).astype(np.float32)
    down_b = rng.standard_normal((E, D)).astype(np.float32)
    gu, b = deinterleave_gate_up(hf, hf_b)
    assert isinstance(gu, np.ndarray) and gu.shape == (E, D, 2 * F)
    np.testing.assert_array_equal(gu[..., :F], hf[..., 0::2])
    np.testing.assert_array_equal(b[:, F:], hf_b[:, 1::2])
    gu_j = deinterleave_gate_up(jnp.asarray(hf))
    assert isinstance(gu_j, jax.Array)
    np.testing.assert_array_equal(np.asarray(gu_j), gu)
    enk = deinterleave_gate_up(np.swapaxes(hf, 1, 2), weight_layout="enk")
    np.testing.assert_array_equal(enk, np.swapaxes(gu, 1, 2))

    x = rng.standard_normal((T, D)).astype(np.float32)
    ids = np.stack([rng.choice(E, k, replace=False) for _ in range(T)]).astype(np.int32)
    scores = rng.uniform(0.1, 1.0, (T, k)).astype(np.float32)
    w16 = lambda a: jnp.asarray(a, jnp.bfloat16)  # noqa: E731
    out = moe_ffn(jnp.asarray(x, jnp.bfloat16), ids, scores, w16(gu), w16(down), activation="gpt_oss",
                  weight_layout="ekn", gate_up_bias=b, down_bias=down_b, out_dtype=jnp.float32)
    # Hugging Face's GptOssExperts, in float64 on the bfloat16-rounded weights and inputs
    r = lambda a: np.asarray(a, np.float32).astype(BF16).astype(np.float64)  # noqa: E731
    ref = np.zeros((T, D))
    for t in range(T):
        for j in range(k):
            e = ids[t, j]
            h = r(r(x[t]) @ r(hf[e])) + hf_b[e]
            act = gpt_oss_act(h[0::2], h[1::2])
            ref[t] += scores[t, j] * (r(act) @ r(down[e]) + down_b[e])
    np.testing.assert_allclose(np.asarray(out), ref, rtol=2**-8, atol=2**-8 * np.abs(ref).max())
    with pytest.raises(ValueError, match="even 2F"):
        deinterleave_gate_up(hf[..., :-1])
    with pytest.raises(ValueError, match=r"bias must be \[E, 2F\]"):
        deinterleave_gate_up(hf, hf_b[:, :-1])
    with pytest.raises(TypeError, match="dense"):
        deinterleave_gate_up(jax_moe.quantize(np.swapaxes(hf, 1, 2), "Q8_0"))


def test_bias_arguments_are_checked(rng):
    x, ids, scores, wg, wu, wd = make(rng)
    gu = jnp.asarray(np.concatenate([wg, wu], 1), jnp.bfloat16)
    dn = jnp.asarray(wd, jnp.bfloat16)
    E, F, D = 4, 256, 256
    with pytest.raises(ValueError, match=r"gate_up_bias must be \[E, 2F\] = \[4, 512\]"):
        moe_ffn(x, ids, scores, gu, dn, gate_up_bias=np.zeros((E, F), np.float32))
    with pytest.raises(ValueError, match=r"down_bias must be \[E, D\] = \[4, 256\]"):
        moe_ffn(x, ids, scores, gu, dn, down_bias=np.zeros((E, D + 1), np.float32))
    with pytest.raises(TypeError, match="down_bias must be a float array"):
        moe_ffn(x, ids, scores, gu, dn, down_bias=np.zeros((E, D), np.int32))
    with pytest.raises(ValueError, match=r"gate_up_bias\[1\] \(up\) must be \[E, F\]"):
        moe_ffn(x, ids, scores, gu, dn, gate_up_bias=(None, np.zeros((E, 2 * F), np.float32)))
    with pytest.raises(ValueError, match="pair"):
        moe_ffn(x, ids, scores, gu, dn, gate_up_bias=(None, None, None))
    # a pair with one None: only the up bias
    ub = rng.standard_normal((E, F)).astype(np.float32)
    out = moe_ffn(x, ids, scores, gu, dn, gate_up_bias=(None, ub))
    ref, od = ref_ffn(x, ids, scores, gu[:, :F], gu[:, F:], dn, up_bias=ub)
    assert_close(out, ref, od)
    w = MoEWeights(router=np.zeros((D, E), np.float32), gate_up=gu, down=dn,
                   gate_up_bias=np.zeros((E, 2 * F), np.float32), up_bias=ub)
    with pytest.raises(ValueError, match="not both"):
        w(x)


def test_moe_weights_with_biases_is_a_pytree(rng):
    """MoEWeights carries the biases through jit (as leaves) into moe_block."""
    x, ids, scores, wg, wu, wd, gb, ub, db = gpt_oss_case(rng, E=8, T=12)
    router = jnp.asarray(rng.standard_normal((256, 8)) / 4, jnp.float32)
    rb = jnp.asarray(rng.standard_normal(8), jnp.float32)
    w = MoEWeights(router=router, router_bias=rb, gate_up=jax_moe.quantize(np.concatenate([wg, wu], 1), "MXFP4"),
                   down=jax_moe.quantize(wd, "MXFP4"), gate_up_bias=np.concatenate([gb, ub], 1),
                   down_bias=db, config=RouterConfig.gpt_oss(k=2), activation="gpt_oss")
    leaves = jax.tree_util.tree_leaves(w)
    assert sum(leaf.shape == (8, 512) for leaf in leaves) == 1 and sum(leaf.shape == (8, 256) for leaf in leaves) == 1
    out, (ids, scores) = jax.jit(lambda w, x: w(x, return_routing=True))(w, x)
    direct = jax.jit(lambda x: moe_block(x, router, w.gate_up, w.down, router=w.config, router_bias=rb,
                                         activation="gpt_oss", gate_up_bias=w.gate_up_bias, down_bias=db))(x)
    np.testing.assert_array_equal(np.asarray(out, np.float32), np.asarray(direct, np.float32))
    F = 256
    g = jax_moe.QuantizedExperts(np.asarray(w.gate_up.data)[:, :F], "MXFP4", (8, F, 256))
    u = jax_moe.QuantizedExperts(np.asarray(w.gate_up.data)[:, F:], "MXFP4", (8, F, 256))
    ref, od = ref_ffn(x, ids, scores, g, u, w.down, act="gpt_oss", gate_bias=gb, up_bias=ub, down_bias=db)
    assert_close(out, ref, od)


def test_biases_fuse_into_the_elementwise_work(rng):
    """The gate/up bias adds no kernel (it is part of the activation's fusion between the two
    moe_matmul calls); the down bias adds one elementwise fusion (the add after the down
    projection), not a materialized [T, k, D] gather or a separate reduction."""
    x, ids, scores, wg, wu, wd = make(rng, T=16)
    gu = jnp.asarray(np.concatenate([wg, wu], 1), jnp.bfloat16)
    dn = jnp.asarray(wd, jnp.bfloat16)
    gub = jnp.asarray(rng.standard_normal((4, 512)), jnp.float32)
    db = jnp.asarray(rng.standard_normal((4, 256)), jnp.float32)

    def ops(**kw) -> list[str]:
        f = jax.jit(lambda x, ids, s, **kw: moe_ffn(x, ids, s, gu, dn, activation="gpt_oss", **kw))
        text = f.lower(x, ids, scores, **kw).compile().as_text()
        entry = text[text.index("ENTRY"):].split("\n}")[0]
        return [line for line in entry.splitlines() if " fusion(" in line or "custom-call(" in line
                or " gather(" in line or " reduce(" in line]

    plain = ops()
    assert len(ops(gate_up_bias=gub)) == len(plain)
    assert len(ops(gate_up_bias=gub, down_bias=db)) == len(plain) + 1
