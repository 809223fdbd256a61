"""What a new user trips on (issue 15): each test here failed before the fix it checks."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_moe
from jax_moe import RouterConfig


# -- route takes a RouterConfig (the README's call) ----------------------------------------------
def test_route_takes_a_router_config(rng):
    logits = jnp.asarray(rng.standard_normal((6, 16)), jnp.float32)
    cfg = RouterConfig.qwen3_moe(k=4)
    ids, scores = jax_moe.route(logits, cfg)
    ref_ids, ref_scores = cfg(logits)
    np.testing.assert_array_equal(np.asarray(ids), np.asarray(ref_ids))
    np.testing.assert_array_equal(np.asarray(scores), np.asarray(ref_scores))
    p = np.exp(np.asarray(logits, np.float64))
    p /= p.sum(-1, keepdims=True)
    s = np.take_along_axis(p, np.asarray(ids), -1)
    np.testing.assert_allclose(np.asarray(scores), s / s.sum(-1, keepdims=True), rtol=1e-5)
    with pytest.raises(TypeError, match="either a RouterConfig or normalize"):
        jax_moe.route(logits, cfg, normalize=True)


# -- "Q4_K_M"-style presets ----------------------------------------------------------------------
def test_q4_k_m_preset_in_module_quantize_and_a_hint_elsewhere(rng):
    nnx = pytest.importorskip("flax.nnx")
    import jax_moe.linen
    import jax_moe.nnx

    m = jax_moe.nnx.MoE(256, 256, 4, rngs=nnx.Rngs(int(rng.integers(2**31))))
    dense_dn = np.swapaxes(np.asarray(m.down[...].astype(jnp.float32)), -1, -2)
    m.quantize("Q4_K_M")
    assert m.weights().formats() == {"gate_up": "Q4_K", "down": "Q6_K"}
    np.testing.assert_array_equal(np.asarray(m.down[...]),
                                  np.asarray(jax_moe.quantize(dense_dn, "Q6_K").data))
    lm = jax_moe.linen.MoE(256, 256, 4)
    v = lm.init(jax.random.key(0), jnp.ones((2, 256), jnp.bfloat16))
    qm, _ = lm.quantize(v, "q5_k_m")
    assert dict(qm.quantization) == {"gate_up": "Q5_K", "down": "Q6_K"}
    with pytest.raises(ValueError, match="sets the down format too"):
        lm.quantize(v, "Q4_K_M", down_qtype="Q8_0")
    with pytest.raises(ValueError, match=r"'Q4_K_M' is a llama.cpp file type.*Q4_K and Q6_K"):
        jax_moe.quantize(np.ones((1, 8, 256), np.float32), "Q4_K_M")


# -- a frozen MoE inside a model that trains ----------------------------------------------------
def _nnx_model(rng, **moe_kw):
    nnx = pytest.importorskip("flax.nnx")
    import jax_moe.nnx

    class Model(nnx.Module):
        def __init__(self, rngs):
            self.dense = nnx.Linear(256, 256, rngs=rngs)
            self.moe = jax_moe.nnx.MoE(256, 256, 4, router=RouterConfig.mixtral(k=2), rngs=rngs,
                                       **moe_kw)

        def __call__(self, x):
            h = self.dense(x)
            return (h + self.moe(jax.lax.stop_gradient(h)).astype(jnp.float32)).sum()

    return Model(nnx.Rngs(int(rng.integers(2**31)))), nnx


@pytest.mark.parametrize("quantized", [False, True])
def test_nnx_grad_of_a_model_with_a_frozen_moe_just_works(rng, quantized):
    model, nnx = _nnx_model(rng)
    if quantized:
        model.moe.quantize("Q8_0")
    x = jnp.asarray(rng.standard_normal((4, 256)), jnp.float32)
    grads = nnx.grad(lambda m, x: m(x))(model, x)
    # the MoE adds a constant: d loss / d kernel[i, o] = sum_t x[t, i]
    np.testing.assert_allclose(np.asarray(grads["dense"]["kernel"][...]),
                               np.repeat(np.asarray(x).sum(0)[:, None], 256, 1), rtol=1e-5)
    assert "moe" not in grads  # nothing of the block is differentiated
    assert not jax.tree_util.tree_leaves(nnx.state(model.moe, nnx.Param))
    optax = pytest.importorskip("optax")  # a dependency of flax
    opt = nnx.Optimizer(model, optax.sgd(0.1), wrt=nnx.Param)
    before = np.asarray(model.moe.router_kernel[...])
    opt.update(model, grads)
    np.testing.assert_array_equal(np.asarray(model.moe.router_kernel[...]), before)


def test_a_gradient_through_the_block_names_the_filter(rng):
    model, nnx = _nnx_model(rng, trainable_router=True)
    x = jnp.asarray(rng.standard_normal((4, 256)), jnp.float32)
    assert isinstance(model.moe.router_kernel, nnx.Param)
    with pytest.raises(jax_moe.InferenceOnlyError, match=r"stop_gradient.*nnx\.DiffState\(0, "
                       r"nnx\.All\(nnx\.Param, nnx\.Not\(nnx\.PathContains\('moe'\)\)\)\)"):
        nnx.grad(lambda m, x: m(x))(model, x)
    # and the filter it names works
    diff = nnx.DiffState(0, nnx.All(nnx.Param, nnx.Not(nnx.PathContains("moe"))))
    grads = nnx.grad(lambda m, x: m(x), argnums=diff)(model, x)
    np.testing.assert_allclose(np.asarray(grads["dense"]["kernel"][...]),
                               np.repeat(np.asarray(x).sum(0)[:, None], 256, 1), rtol=1e-5)


def test_linen_grad_over_params_of_a_model_with_a_frozen_moe(rng):
    nn = pytest.importorskip("flax.linen")
    import jax_moe.linen

    class Model(nn.Module):
        @nn.compact
        def __call__(self, x):
            h = nn.Dense(256)(x)
            moe = jax_moe.linen.MoE(256, 256, 4, router=RouterConfig.mixtral(k=2))
            return (h + moe(jax.lax.stop_gradient(h)).astype(jnp.float32)).sum()

    x = jnp.asarray(rng.standard_normal((4, 256)), jnp.float32)
    variables = Model().init(jax.random.key(int(rng.integers(2**31))), x)
    assert set(variables["params"]) == {"Dense_0"}
    assert set(variables["experts"]["MoE_0"]) == {"gate_up", "down"}
    assert set(variables["router"]["MoE_0"]) == {"router_kernel"}
    g = jax.grad(lambda p: Model().apply({**variables, "params": p}, x))(variables["params"])
    np.testing.assert_allclose(np.asarray(g["Dense_0"]["kernel"]),
                               np.repeat(np.asarray(x).sum(0)[:, None], 256, 1), rtol=1e-5)


# -- weight layouts -----------------------------------------------------------------------------
def _routing(rng, T, k, E):
    ids = jnp.asarray(rng.integers(0, E, (T, k)), jnp.int32)
    scores = jnp.asarray(rng.random((T, k)), jnp.float32)
    return ids, scores


def test_a_layout_mistake_names_the_other_layout(rng):
    T, k, E, N, K = 4, 2, 3, 64, 32
    x = jnp.asarray(rng.standard_normal((T, K)), jnp.bfloat16)
    ids, scores = _routing(rng, T, k, E)
    w_ekn = jnp.asarray(rng.standard_normal((E, K, N)), jnp.bfloat16)
    with pytest.raises(ValueError, match=r'fit \[E, K, N\]: pass weight_layout="ekn"'):
        jax_moe.moe_matmul(x, ids, w_ekn, scores)
    with pytest.raises(ValueError, match=r'fit \[E, N, K\]: pass weight_layout="enk"'):
        jax_moe.moe_matmul(x, ids, jnp.swapaxes(w_ekn, 1, 2), scores, weight_layout="ekn")
    # moe_ffn: gate_up [E, D, 2F] and down [E, F, D] are Flax's layout
    D, F = 32, 64
    xd = jnp.asarray(rng.standard_normal((T, D)), jnp.bfloat16)
    gu = jnp.asarray(rng.standard_normal((E, D, 2 * F)) / 8, jnp.bfloat16)
    dn = jnp.asarray(rng.standard_normal((E, F, D)) / 8, jnp.bfloat16)
    with pytest.raises(ValueError, match=r'gate_up must contract.*pass weight_layout="ekn"'):
        jax_moe.moe_ffn(xd, ids, scores, gu, dn)
    # a layout is a WeightLayout or its name, everywhere
    a = jax_moe.moe_ffn(xd, ids, scores, gu, dn, weight_layout=jax_moe.WeightLayout.EKN)
    b = jax_moe.moe_ffn(xd, ids, scores, gu, dn, weight_layout="EKN")
    c = jax_moe.moe_ffn(xd, ids, scores, jnp.swapaxes(gu, 1, 2), jnp.swapaxes(dn, 1, 2))
    np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))
    np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(c, np.float32))
    fused = jax_moe.fuse_gate_up(gu[:, :, :F], gu[:, :, F:], weight_layout=jax_moe.WeightLayout.EKN)
    np.testing.assert_array_equal(np.asarray(fused, np.float32), np.asarray(gu, np.float32))
    with pytest.raises(ValueError, match=r'weight_layout must be "enk".*or a jax_moe.WeightLayout'):
        jax_moe.moe_ffn(xd, ids, scores, gu, dn, weight_layout="nke")


def test_square_weights_pin_each_entry_points_default_layout(rng):
    """Square [E, 128, 128] weights fit both layouts, so nothing can catch a wrong one: this
    pins the defaults (moe_matmul, moe_ffn, MoEWeights: "enk"; the Flax modules: "ekn")."""
    nnx = pytest.importorskip("flax.nnx")
    import inspect

    import jax_moe.linen
    import jax_moe.nnx

    T, k, E, S = 6, 2, 3, 128
    x = jnp.asarray(rng.standard_normal((T, S)), jnp.bfloat16)
    ids, scores = _routing(rng, T, k, E)
    w = jnp.asarray(rng.standard_normal((E, S, S)), jnp.bfloat16)
    xf, wf = np.asarray(x, np.float64), np.asarray(w, np.float64)
    idn, sn = np.asarray(ids), np.asarray(scores, np.float64)
    enk = np.stack([sum(sn[t, j] * wf[idn[t, j]] @ xf[t] for j in range(k)) for t in range(T)])
    ekn = np.stack([sum(sn[t, j] * xf[t] @ wf[idn[t, j]] for j in range(k)) for t in range(T)])
    assert np.abs(enk - ekn).max() > 1.0  # the two readings are far apart
    out = np.asarray(jax_moe.moe_matmul(x, ids, w, scores), np.float64)
    np.testing.assert_allclose(out, enk, rtol=2e-2, atol=2e-2 * np.abs(enk).max())
    out = np.asarray(jax_moe.moe_matmul(x, ids, w, scores, weight_layout="ekn"), np.float64)
    np.testing.assert_allclose(out, ekn, rtol=2e-2, atol=2e-2 * np.abs(ekn).max())
    # moe_ffn: the same weights as gate_up (square: 2F = D) read [E, N, K] by default
    gu = jnp.asarray(rng.standard_normal((E, S, S)) / 16, jnp.bfloat16)
    dn = jnp.asarray(rng.standard_normal((E, S, S // 2)) / 16, jnp.bfloat16)
    y = jax_moe.moe_ffn(x, ids, scores, gu, dn)
    y_enk = jax_moe.moe_ffn(x, ids, scores, gu, dn, weight_layout="enk")
    np.testing.assert_array_equal(np.asarray(y, np.float32), np.asarray(y_enk, np.float32))
    assert jax_moe.MoEWeights(router=None, down=None).weight_layout == "enk"
    # the Flax modules hold Flax's [E, D_in, D_out] kernels by default
    m = jax_moe.nnx.MoE(S, S // 2, E, rngs=nnx.Rngs(0))
    assert m.weight_layout == "ekn" and m.gate_up[...].shape == (E, S, S)
    assert inspect.signature(jax_moe.nnx.MoE.__init__).parameters["weight_layout"].default == "ekn"
    assert jax_moe.linen.MoE(S, S // 2, E).weight_layout == "ekn"
    ym = np.asarray(m(x), np.float32)
    w_ = m.weights()
    ref = jax_moe.moe_block(x, w_.router, w_.gate_up, w_.down, router=w_.config, weight_layout="ekn")
    np.testing.assert_array_equal(ym, np.asarray(ref, np.float32))
    assert jax_moe.nnx.MoE(S, S // 2, E, weight_layout=jax_moe.WeightLayout.ENK,
                           rngs=nnx.Rngs(0)).weight_layout == "enk"
