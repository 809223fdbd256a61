"""The Flax NNX module and the Linen wrapper."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

pytest.importorskip("flax")
from flax import nnx  # noqa: E402

import jax_moe  # noqa: E402
import jax_moe.linen  # noqa: E402
import jax_moe.nnx  # noqa: E402
from jax_moe.ffn import SharedExpert, moe_block  # noqa: E402
from jax_moe.routing import RouterConfig  # noqa: E402

BF16 = np.dtype(ml_dtypes.bfloat16)
D, F, E = 256, 256, 8



def seed(rng) -> int:
    return int(rng.integers(0, 2**31))


def r16(a):
    return np.asarray(a, np.float32).astype(BF16).astype(np.float64)


def run(m, x, **kw):
    return nnx.jit(lambda m, x: m(x, **kw))(m, x)


def test_nnx_dense_against_float64(rng):
    """Dense bfloat16 experts in Flax's [E, D_in, D_out] layout, Mixtral routing, nnx.jit."""
    m = jax_moe.nnx.MoE(D, F, E, router=RouterConfig.mixtral(k=2), rngs=nnx.Rngs(seed(rng)))
    assert m.gate_up[...].shape == (E, D, 2 * F) and m.down[...].shape == (E, F, D)
    x = jnp.asarray(rng.standard_normal((3, 4, D)), jnp.bfloat16)
    out, (ids, scores) = run(m, x, return_routing=True)
    assert out.shape == (3, 4, D) and out.dtype == jnp.bfloat16
    assert ids.shape == (3, 4, 2)
    # float64 reference from the module's parameters
    xs = np.asarray(x.astype(jnp.float32), np.float64).reshape(-1, D)
    ids, scores = np.asarray(ids).reshape(-1, 2), np.asarray(scores, np.float64).reshape(-1, 2)
    router = np.asarray(m.router_kernel[...], np.float64)
    logits = xs @ router
    top = np.argsort(-logits, -1, kind="stable")[:, :2]
    if (np.take_along_axis(logits, top, -1)[:, 1] - np.sort(logits, -1)[:, -3]).min() > 1e-4:
        np.testing.assert_array_equal(ids, top)
    p = np.exp(np.take_along_axis(logits, ids, -1))
    np.testing.assert_allclose(scores, p / p.sum(-1, keepdims=True), rtol=1e-5, atol=1e-6)
    gu = np.asarray(m.gate_up[...].astype(jnp.float32), np.float64)  # [E, D, 2F]
    dn = np.asarray(m.down[...].astype(jnp.float32), np.float64)     # [E, F, D]
    ref = np.zeros_like(xs)
    for t in range(xs.shape[0]):
        for j in range(2):
            e = ids[t, j]
            h = r16(xs[t] @ gu[e])
            g, u = h[:F], h[F:]
            ref[t] += scores[t, j] * (r16(g / (1 + np.exp(-g)) * u) @ dn[e])
    got = np.asarray(out.astype(jnp.float32), np.float64).reshape(-1, D)
    np.testing.assert_allclose(got, ref, rtol=2.0**-8, atol=2.0**-8 * np.abs(ref).max())


def test_nnx_quantize_in_place(rng):
    m = jax_moe.nnx.MoE(D, F, E, router=RouterConfig.qwen3_moe(k=3), rngs=nnx.Rngs(seed(rng)))
    gu_dense, dn_dense = np.asarray(m.gate_up[...].astype(jnp.float32)), np.asarray(m.down[...].astype(jnp.float32))
    assert m.quantize("Q4_K", down_qtype="Q6_K") is m
    assert isinstance(m.gate_up, jax_moe.nnx.QuantizedWeight) and isinstance(m.down, jax_moe.nnx.QuantizedWeight)
    assert m.gate_up.qtype == jax_moe.GGMLType.Q4_K and m.gate_up.logical_shape == (E, 2 * F, D)
    assert m.down.qtype == jax_moe.GGMLType.Q6_K
    # not trainable: nothing of the block is an nnx.Param (issue 15: frozen by default)
    assert not jax.tree_util.tree_leaves(nnx.state(m, nnx.Param))
    assert isinstance(m.router_kernel, jax_moe.nnx.RouterWeight)
    # quantized from the [E, N, K] transpose of the dense kernels
    q_gu = jax_moe.quantize(np.swapaxes(gu_dense, 1, 2), "Q4_K")
    q_dn = jax_moe.quantize(np.swapaxes(dn_dense, 1, 2), "Q6_K")
    np.testing.assert_array_equal(np.asarray(m.gate_up[...]), np.asarray(q_gu.data))
    np.testing.assert_array_equal(np.asarray(m.down[...]), np.asarray(q_dn.data))

    x = jnp.asarray(rng.standard_normal((10, D)), jnp.bfloat16)
    out = run(m, x)
    expected = jax.jit(lambda x: moe_block(x, m.router_kernel[...], q_gu, q_dn,
                                           router=RouterConfig.qwen3_moe(k=3)))(x)
    np.testing.assert_array_equal(np.asarray(out, np.float32), np.asarray(expected, np.float32))

    # float32 activations run SCALAR_GGUF on the same module
    m.dtype = jnp.dtype(jnp.float32)
    out32 = run(m, x.astype(jnp.float32))
    assert out32.dtype == jnp.float32
    expected32 = jax.jit(lambda x: moe_block(x, m.router_kernel[...], q_gu, q_dn,
                                             router=RouterConfig.qwen3_moe(k=3)))(x.astype(jnp.float32))
    np.testing.assert_array_equal(np.asarray(out32), np.asarray(expected32))


def test_nnx_enk_shared_biases_split_merge_jit(rng):
    cfg = RouterConfig.deepseek_v3(k=2, n_groups=4, n_groups_used=2, scale=2.0)
    m = jax_moe.nnx.MoE(D, F, E, router=cfg, weight_layout="enk", shared_hidden_features=512,
                        shared_expert_gate=True, router_bias=True, selection_bias=True,
                        activation="geglu", rngs=nnx.Rngs(seed(rng)))
    assert m.gate_up[...].shape == (E, 2 * F, D) and m.shared_gate_up[...].shape == (1024, D)
    assert isinstance(m.selection_bias, jax_moe.nnx.RoutingBias)
    m.selection_bias[...] = jnp.asarray(rng.standard_normal(E) / 10, jnp.float32)
    m.router_bias[...] = jnp.asarray(rng.standard_normal(E) / 10, jnp.float32)
    x = jnp.asarray(rng.standard_normal((6, D)), jnp.bfloat16)
    out = run(m, x)
    graphdef, state = nnx.split(m)
    out2 = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x))(state, x)
    np.testing.assert_array_equal(np.asarray(out, np.float32), np.asarray(out2, np.float32))
    shared = SharedExpert(m.shared_gate_up[...], m.shared_down[...], m.shared_expert_gate[...])
    expected = jax.jit(lambda x: moe_block(
        x, m.router_kernel[...], m.gate_up[...], m.down[...], router=cfg,
        router_bias=m.router_bias[...], selection_bias=m.selection_bias[...], activation="geglu",
        weight_layout="enk", shared=shared))(x)
    np.testing.assert_array_equal(np.asarray(out, np.float32), np.asarray(expected, np.float32))
    # from_weights rebuilds an equal module (quantized too)
    m.quantize("Q8_0")
    m2 = jax_moe.nnx.MoE.from_weights(m.weights())
    np.testing.assert_array_equal(np.asarray(run(m, x), np.float32), np.asarray(run(m2, x), np.float32))


def test_nnx_grad_is_inference_only(rng):
    # issue 15: the weights are frozen by default, so a gradient reaches the block only
    # through its input (or a router made trainable)
    m = jax_moe.nnx.MoE(D, F, E, router=2, rngs=nnx.Rngs(seed(rng)))
    x = jnp.asarray(rng.standard_normal((4, D)), jnp.float32)
    loss = lambda m, x: m(x).astype(jnp.float32).sum()  # noqa: E731
    with pytest.raises(jax_moe.InferenceOnlyError, match="stop_gradient"):
        nnx.grad(loss, argnums=1)(m, x)
    m.quantize("Q4_K")
    with pytest.raises(jax_moe.InferenceOnlyError, match="stop_gradient"):
        nnx.grad(loss, argnums=1)(m, x)
    trainable = jax_moe.nnx.MoE(D, F, E, router=2, trainable_router=True, rngs=nnx.Rngs(0))
    with pytest.raises(jax_moe.InferenceOnlyError, match="stop_gradient"):
        nnx.grad(loss)(trainable, x)
    # the remedy: a trainable layer around a frozen MoE block
    lin = nnx.Linear(D, D, rngs=nnx.Rngs(seed(rng)))

    def loss2(lin, x):
        h = lin(x)
        return (h + m(jax.lax.stop_gradient(h)).astype(jnp.float32)).sum()
    grads = nnx.grad(loss2)(lin, x)
    np.testing.assert_allclose(np.asarray(grads["kernel"][...]),
                               np.repeat(np.asarray(x).sum(0)[:, None], D, 1), rtol=1e-5)


def test_nnx_bad_inputs(rng):
    with pytest.raises(ValueError, match="qtype"):
        jax_moe.nnx.MoE(D, F, E, rngs=nnx.Rngs(0)).quantize("Q4_0")
    m = jax_moe.nnx.MoE(D, 96, E, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"'down' as Q4_K.*K = 96"):
        m.quantize("Q4_K")
    assert type(m.gate_up) is jax_moe.nnx.ExpertWeight  # nothing changed (still dense)
    m.quantize("Q8_0")  # 96 is a multiple of 32
    with pytest.raises(TypeError, match="float32.*quantize"):
        jax_moe.nnx.MoE(D, F, E, dtype=jnp.float32, rngs=nnx.Rngs(0))(jnp.ones((2, D)))
    with pytest.raises(ValueError, match=r"x must be \[..., 256\]"):
        jax_moe.nnx.MoE(D, F, E, rngs=nnx.Rngs(0))(jnp.ones((2, 128)))
    with pytest.raises(ValueError, match="weight_layout"):
        jax_moe.nnx.MoE(D, F, E, weight_layout="kne", rngs=nnx.Rngs(0))
    with pytest.raises(TypeError, match="router"):
        jax_moe.nnx.MoE(D, F, E, router="mixtral", rngs=nnx.Rngs(0))


def test_linen_matches_nnx_and_quantizes(rng):
    cfg = RouterConfig.mixtral(k=2)
    lm = jax_moe.linen.MoE(D, F, E, router=cfg, shared_hidden_features=256, shared_expert_gate=True)
    x = jnp.asarray(rng.standard_normal((2, 3, D)), jnp.bfloat16)
    variables = lm.init(jax.random.key(seed(rng)), x)
    assert variables["experts"]["gate_up"].shape == (E, D, 2 * F)
    out = jax.jit(lm.apply)(variables, x)
    p = {**variables["experts"], **variables["router"]}
    shared = SharedExpert(p["shared_gate_up"], p["shared_down"], p["shared_expert_gate"])
    expected = jax.jit(lambda x: moe_block(x, p["router_kernel"], p["gate_up"], p["down"], router=cfg,
                                           weight_layout="ekn", shared=shared))(x)
    np.testing.assert_array_equal(np.asarray(out, np.float32), np.asarray(expected, np.float32))

    qm, qv = lm.quantize(variables, "Q4_K", down_qtype="Q6_K")
    assert dict(qm.quantization) == {"gate_up": "Q4_K", "down": "Q6_K", "shared_gate_up": "Q4_K",
                                     "shared_down": "Q6_K"}
    assert set(qv["experts"]) == {"shared_expert_gate"} and set(qv["router"]) == {"router_kernel"}
    assert "params" not in qv
    assert qv["quantized"]["gate_up"].dtype == jnp.uint8
    qout = jax.jit(qm.apply)(qv, x)
    # the NNX module with the same quantized weights gives the same output
    nm = jax_moe.nnx.MoE.from_weights(qm.apply(qv, method=qm.weights))
    np.testing.assert_array_equal(np.asarray(qout, np.float32), np.asarray(run(nm, x), np.float32))
    with pytest.raises(jax_moe.InferenceOnlyError, match="stop_gradient"):
        jax.grad(lambda prm: qm.apply({**qv, "router": prm}, x).astype(jnp.float32).sum())(qv["router"])
    # and back: from_weights
    lm2, lv2 = jax_moe.linen.MoE.from_weights(nm.weights())
    np.testing.assert_array_equal(np.asarray(jax.jit(lm2.apply)(lv2, x), np.float32),
                                  np.asarray(qout, np.float32))


def test_expert_biases_in_nnx_and_linen(rng):
    """expert_bias=True (NNX) / use_expert_bias=True (Linen): [E, 2F] and [E, D] float32 biases,
    zeros at init, kept as float32 by quantize (MXFP4 experts), and applied as moe_block applies
    them; from_weights fills a biased block's missing biases with zeros."""
    from jax_moe.ffn import GptOssActivation

    act = GptOssActivation(limit=5.0)
    m = jax_moe.nnx.MoE(D, F, E, router=RouterConfig.gpt_oss(k=2), activation=act, router_bias=True,
                        expert_bias=True, rngs=nnx.Rngs(seed(rng)))
    assert m.gate_up_bias[...].shape == (E, 2 * F) and m.down_bias[...].shape == (E, D)
    assert not np.asarray(m.gate_up_bias[...]).any() and m.gate_bias is None
    gub = jnp.asarray(rng.standard_normal((E, 2 * F)), jnp.float32)
    db = jnp.asarray(rng.standard_normal((E, D)), jnp.float32)
    m.gate_up_bias[...] = gub
    m.down_bias[...] = db
    m.quantize("MXFP4")
    assert m.weights().formats() == {"gate_up": "MXFP4", "down": "MXFP4"}
    assert m.gate_up_bias[...].dtype == jnp.float32
    x = jnp.asarray(rng.standard_normal((5, D)), jnp.bfloat16)
    out = run(m, x)
    w = m.weights()
    # under jit too: XLA's fused elementwise math may differ from op-by-op execution in an ulp
    direct = jax.jit(lambda x: moe_block(x, w.router, w.gate_up, w.down, router=w.config,
                                         router_bias=w.router_bias, activation=act, gate_up_bias=gub,
                                         down_bias=db))(x)
    np.testing.assert_array_equal(np.asarray(out, np.float32), np.asarray(direct, np.float32))
    no_bias = moe_block(x, w.router, w.gate_up, w.down, router=w.config, router_bias=w.router_bias,
                        activation=act)
    assert np.abs(np.asarray(no_bias, np.float32) - np.asarray(out, np.float32)).max() > 0.1

    # Linen from the same weights, and a biased block given only its down bias
    lin, variables = jax_moe.linen.MoE.from_weights(w)
    assert lin.use_expert_bias and variables["experts"]["gate_up_bias"].shape == (E, 2 * F)
    np.testing.assert_array_equal(np.asarray(jax.jit(lin.apply)(variables, x), np.float32),
                                  np.asarray(out, np.float32))
    import dataclasses
    only_down = dataclasses.replace(w, gate_up_bias=None)
    m2 = jax_moe.nnx.MoE.from_weights(only_down)
    assert not np.asarray(m2.gate_up_bias[...]).any()
    direct2 = jax.jit(lambda x: moe_block(x, w.router, w.gate_up, w.down, router=w.config,
                                          router_bias=w.router_bias, activation=act, down_bias=db))(x)
    np.testing.assert_array_equal(np.asarray(run(m2, x), np.float32), np.asarray(direct2, np.float32))

    # Linen init with separate gate/up kernels
    lm = jax_moe.linen.MoE(D, F, E, router=2, use_expert_bias=True, fused_gate_up=False)
    variables = lm.init(jax.random.key(seed(rng)), x)
    params = variables["experts"]  # inference-only state beside the expert kernels
    assert params["gate_bias"].shape == (E, F) and params["up_bias"].shape == (E, F)
    assert params["down_bias"].shape == (E, D) and "gate_up_bias" not in params
    assert "params" not in variables
    # quantize moves the kernels and keeps the biases (float32)
    params = dict(params, down_bias=jnp.asarray(rng.standard_normal((E, D)), jnp.float32))
    qm, qv = lm.quantize(dict(variables, experts=params), "MXFP4")
    assert set(qv["experts"]) >= {"gate_bias", "up_bias", "down_bias"} and "down" not in qv["experts"]
    np.testing.assert_array_equal(np.asarray(qv["experts"]["down_bias"]), np.asarray(params["down_bias"]))
    qw = qm.apply(qv, method=qm.weights)
    assert qw.formats() == {"gate": "MXFP4", "up": "MXFP4", "down": "MXFP4"}
    direct3 = jax.jit(lambda x: moe_block(x, qw.router, (qw.gate, qw.up), qw.down, router=qw.config,
                                          gate_up_bias=(qw.gate_bias, qw.up_bias), down_bias=qw.down_bias))(x)
    np.testing.assert_array_equal(np.asarray(jax.jit(qm.apply)(qv, x), np.float32), np.asarray(direct3, np.float32))
