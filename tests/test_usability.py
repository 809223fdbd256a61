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
