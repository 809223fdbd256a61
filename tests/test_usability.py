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
