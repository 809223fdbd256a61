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


# -- checked mode, kind= on the modules, explain --------------------------------------------------
def _ffn(rng, E=8, D=256, F=256):
    gu = jax_moe.quantize(rng.standard_normal((E, 2 * F, D)) / 16, "Q8_0")
    dn = jax_moe.quantize(rng.standard_normal((E, D, F)) / 16, "Q8_0")
    return gu, dn


def test_router_over_more_experts_than_the_weights_is_an_error(rng):
    gu, dn = _ffn(rng)
    x = jnp.asarray(rng.standard_normal((8, 256)), jnp.bfloat16)
    router16 = jnp.asarray(rng.standard_normal((256, 16)), jnp.float32)
    with pytest.raises(ValueError, match=r"router scores E = 16 experts.*gate_up holds 8"):
        jax_moe.moe_block(x, router16, gu, dn, router=RouterConfig.mixtral(k=2))


def test_checked_mode_reports_bad_ids_and_non_finite_scores(rng):
    from jax.experimental import checkify

    gu, dn = _ffn(rng)
    x = jnp.asarray(rng.standard_normal((8, 256)), jnp.bfloat16)
    ids, scores = jax_moe.route(jnp.asarray(rng.standard_normal((8, 16)), jnp.float32),
                                RouterConfig.mixtral(k=2))  # 16 experts' ids into 8 experts
    ffn = jax.jit(checkify.checkify(
        lambda ids, s: jax_moe.moe_ffn(x, ids, s, gu, dn, debug_checks=True)))
    err, _ = ffn(ids, scores)
    lo, hi = int(ids.min()), int(ids.max())
    assert hi >= 8, "the routing must reach past the 8 experts for this test"
    assert f"moe_ffn: expert ids must lie in [0, 8) (the experts of the weights); got ids from {lo} to {hi}" \
        in err.get()
    with pytest.raises(checkify.JaxRuntimeError,
                       match=r"expert ids must lie in \[0, 8\)"):
        err.throw()
    ok_ids = ids % 8
    err, y = ffn(ok_ids, scores)
    assert err.get() is None
    np.testing.assert_array_equal(np.asarray(y, np.float32),
                                  np.asarray(jax_moe.moe_ffn(x, ok_ids, scores, gu, dn), np.float32))
    err, _ = ffn(ok_ids, scores.at[3, 1].set(jnp.nan).at[5, 0].set(jnp.inf))
    assert "moe_ffn: routing scores must be finite; got 2 NaN or Inf values" in err.get()
    # moe_matmul itself
    w = jnp.asarray(rng.standard_normal((8, 64, 256)), jnp.bfloat16)
    err, _ = checkify.checkify(lambda i: jax_moe.moe_matmul(x, i, w, scores, debug_checks=True))(ids)
    assert "moe_matmul: expert ids must lie in [0, 8)" in err.get()


def test_modules_take_kind_and_debug_checks(rng):
    nnx = pytest.importorskip("flax.nnx")
    from jax.experimental import checkify

    import jax_moe.linen
    import jax_moe.nnx

    x = jnp.asarray(rng.standard_normal((6, 256)), jnp.bfloat16)
    m = jax_moe.nnx.MoE(256, 256, 8, router=2, rngs=nnx.Rngs(int(rng.integers(2**31))))
    m.quantize("Q8_0")
    y = m(x)
    m.kind = jax_moe.MoeKind.WMMA_GGUF
    np.testing.assert_array_equal(np.asarray(m(x), np.float32), np.asarray(y, np.float32))
    m.kind = jax_moe.MoeKind.WMMA
    with pytest.raises(TypeError, match="kind=WMMA runs dense"):
        m(x)
    with pytest.raises(TypeError, match="kind=WMMA runs dense"):
        jax_moe.nnx.MoE(256, 256, 8, kind="WMMA", rngs=nnx.Rngs(0)).quantize("Q8_0")(x)
    with pytest.raises(ValueError, match="MoE: kind must be a MoeKind"):
        jax_moe.nnx.MoE(256, 256, 8, kind="TENSOR", rngs=nnx.Rngs(0))
    m.kind, m.debug_checks = None, True
    err, y2 = checkify.checkify(lambda x: m(x))(x)
    assert err.get() is None
    np.testing.assert_array_equal(np.asarray(y2, np.float32), np.asarray(y, np.float32))
    lm = jax_moe.linen.MoE(256, 256, 8, router=2, kind="SCALAR_GGUF")
    v = lm.clone(kind=None).init(jax.random.key(0), x)
    with pytest.raises(TypeError, match="kind=SCALAR_GGUF runs GGUF-quantized experts"):
        lm.apply(v, x)
    qm, qv = lm.quantize(v, "Q8_0")
    with pytest.raises(TypeError, match="kind=SCALAR_GGUF takes float32 x"):
        qm.apply(qv, x)
    y32 = qm.clone(dtype=jnp.float32).apply(qv, x)
    ref = qm.clone(dtype=jnp.float32, kind=None).apply(qv, x)
    np.testing.assert_array_equal(np.asarray(y32), np.asarray(ref))


def test_explain_says_kind_platform_and_path(rng, monkeypatch):
    x = jnp.asarray(rng.standard_normal((8, 512)), jnp.bfloat16)
    ids = jnp.asarray(rng.integers(0, 4, (8, 2)), jnp.int32)
    q = jax_moe.quantize(rng.standard_normal((4, 256, 512)), "Q4_K")
    text = jax_moe.explain(x, ids, q, jnp.ones((8, 2)))
    assert "T=8 k=2 E=4 N=256 K=512" in text and "-> [8, 256] bfloat16" in text
    assert "kind: WMMA_GGUF (quantized w with bfloat16 x)" in text
    assert "platform: cpu" in text and "C++ CPU implementation" in text
    spec = jax.ShapeDtypeStruct((8, 2, 512), jnp.float32)
    assert "kind: SCALAR_GGUF" in jax_moe.explain(spec, ids, q, reduce=False)
    w = jax.ShapeDtypeStruct((4, 512, 256), jnp.float16)
    assert "kind: WMMA (dense w)" in jax_moe.explain(x.astype(jnp.float16), ids, w,
                                                       weight_layout="ekn")
    with pytest.raises(ValueError, match='pass weight_layout="ekn"'):
        jax_moe.explain(x.astype(jnp.float16), ids, w)  # the same errors as moe_matmul
    with pytest.raises(TypeError, match="kind=WMMA runs dense"):
        jax_moe.explain(x, ids, q, kind="WMMA")

    class FakeCuda:
        calls = []

        def plan_description(self, *args, device):
            self.calls.append((args, device))
            return f"kernel wmma_gguf_grouped ({device}), tile 128x128x32"

        def scratch_bytes(self, *args):
            return 4096

    import sys

    fake = FakeCuda()
    monkeypatch.setattr(jax_moe._ext, "cuda", fake)
    monkeypatch.setattr(sys.modules["jax_moe.explain"], "_has_gpu", lambda: False)
    text = jax_moe.explain(x, ids, q, jnp.ones((8, 2)), platform="gpu")
    assert "platform: cuda" in text and "scratch: 4096 bytes" in text
    # no GPU here: the plan on Hopper and on the other tensor-core GPUs
    assert "path on Hopper (sm_90a): kernel wmma_gguf_grouped (hopper), tile 128x128x32" in text
    assert "path on other tensor-core GPUs: kernel wmma_gguf_grouped (generic)" in text
    args = (int(jax_moe.MoeKind.WMMA_GGUF), int(jax_moe.GGMLType.Q4_K), 0, 8, 2, 4, 256, 512, 8, True)
    assert fake.calls == [(args, "hopper"), (args, "generic")]
    monkeypatch.setattr(sys.modules["jax_moe.explain"], "_has_gpu", lambda: True)
    assert "path: kernel wmma_gguf_grouped (current)" in jax_moe.explain(x, ids, q, platform="cuda")
    del FakeCuda.plan_description
    assert "does not describe its plan" in jax_moe.explain(x, ids, q, platform="cuda")
    monkeypatch.setattr(jax_moe._ext, "cuda", None)
    assert "no CUDA module" in jax_moe.explain(x, ids, q, platform="cuda")


# -- stacked layers ------------------------------------------------------------------------------
def test_quantized_experts_with_a_layer_axis(rng):
    L, E, N, K = 3, 4, 32, 64
    w = rng.standard_normal((L, E, N, K)).astype(np.float32)
    q = jax_moe.quantize(w, "Q8_0")
    assert q.shape == (E, N, K) and q.stack_shape == (L,) and q.data.shape == (L, E, N, 68)
    assert "stacked=[3]" in repr(q)
    np.testing.assert_array_equal(jax_moe.dequantize(q)[1], jax_moe.dequantize(q[1]))
    np.testing.assert_array_equal(np.asarray(q[2].data), np.asarray(jax_moe.quantize(w[2], "Q8_0").data))
    assert jax_moe.QuantizedExperts(q.data, "Q8_0", (L, E, N, K)).shape == (E, N, K)
    with pytest.raises(ValueError, match=r"names stacked layers \[2\] but data holds \(3,\)"):
        jax_moe.QuantizedExperts(q.data, "Q8_0", (2, E, N, K))
    with pytest.raises(IndexError, match="no layer axis"):
        q[0][0]
    T, k = 5, 2
    x = jnp.asarray(rng.standard_normal((T, K)), jnp.bfloat16)
    ids = jnp.asarray(rng.integers(0, E, (T, k)), jnp.int32)
    scores = jnp.asarray(rng.random((T, k)), jnp.float32)
    with pytest.raises(ValueError, match=r"holds stacked layers \[3\].*jax.lax.scan"):
        jax_moe.moe_matmul(x, ids, q, scores)
    one = [np.asarray(jax_moe.moe_matmul(x, ids, q[i], scores), np.float32) for i in range(L)]
    scanned = jax.lax.scan(lambda c, ql: (c, jax_moe.moe_matmul(x, ids, ql, scores)), 0, q)[1]
    vmapped = jax.vmap(lambda ql: jax_moe.moe_matmul(x, ids, ql, scores))(q)
    np.testing.assert_array_equal(np.asarray(scanned, np.float32), np.stack(one))
    np.testing.assert_array_equal(np.asarray(vmapped, np.float32), np.stack(one))
    # against float64: layer 1 decoded, rounded to bfloat16 as WMMA_GGUF uses it
    import ml_dtypes
    wd = jax_moe.dequantize(q)[1].astype(ml_dtypes.bfloat16).astype(np.float64)
    xf, idn, sn = np.asarray(x, np.float64), np.asarray(ids), np.asarray(scores, np.float64)
    ref = np.stack([sum(sn[t, j] * wd[idn[t, j]] @ xf[t] for j in range(k)) for t in range(T)])
    np.testing.assert_allclose(one[1], ref, rtol=2e-2, atol=2e-2 * np.abs(ref).max())


def test_quantize_a_stacked_nnx_module(rng):
    nnx = pytest.importorskip("flax.nnx")
    import jax_moe.nnx

    L = 2

    @nnx.split_rngs(splits=L)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def create(rngs):
        return jax_moe.nnx.MoE(256, 256, 4, router=2, shared_hidden_features=256, rngs=rngs)

    stack = create(nnx.Rngs(int(rng.integers(2**31))))
    dense = [np.swapaxes(np.asarray(stack.gate_up[...][i].astype(jnp.float32)), -1, -2)
             for i in range(L)]
    stack.quantize("Q4_K")  # before: a misleading "K = 4 is not a multiple" error
    assert stack.gate_up[...].shape == (L, 4, 512, 144)
    assert stack.gate_up.logical_shape == (4, 512, 256)
    assert stack.shared_gate_up[...].shape == (L, 1, 512, 144)
    for i in range(L):
        np.testing.assert_array_equal(np.asarray(stack.gate_up[...][i]),
                                      np.asarray(jax_moe.quantize(dense[i], "Q4_K").data))
    x = jnp.asarray(rng.standard_normal((4, 256)), jnp.bfloat16)

    @nnx.scan(in_axes=(0, nnx.Carry), out_axes=nnx.Carry)
    def run(moe, x):
        return x + moe(x)

    y = nnx.jit(run)(stack, x)
    w = stack.weights()
    y_loop = x
    for i in range(L):
        layer = jax_moe.MoEWeights(
            router=w.router[i], gate_up=w.gate_up[i], down=w.down[i], shared_gate_up=w.shared_gate_up[i],
            shared_down=w.shared_down[i], config=w.config)
        y_loop = y_loop + jax.jit(lambda w, x: w(x))(layer, y_loop)
    np.testing.assert_array_equal(np.asarray(y, np.float32), np.asarray(y_loop, np.float32))


def test_quantize_a_linen_module_scanned_over_layers(rng):
    nn = pytest.importorskip("flax.linen")
    import jax_moe.linen

    L = 3

    class Layer(nn.Module):
        quantization: tuple | None = None

        @nn.compact
        def __call__(self, x, _):
            moe = jax_moe.linen.MoE(256, 256, 4, router=2, quantization=self.quantization, name="moe")
            return x + moe(x), None

    class Stack(nn.Module):
        quantization: tuple | None = None

        @nn.compact
        def __call__(self, x):
            scanned = nn.scan(Layer, variable_axes={"experts": 0, "router": 0, "quantized": 0},
                              split_rngs={"params": True}, length=L)
            return scanned(quantization=self.quantization, name="layers")(x, None)[0]

    x = jnp.asarray(rng.standard_normal((4, 256)), jnp.bfloat16)
    v = Stack().init(jax.random.key(int(rng.integers(2**31))), x)
    inner = {c: v[c]["layers"]["moe"] for c in v}  # one MoE's variables, with a layer axis
    assert inner["experts"]["gate_up"].shape == (L, 4, 256, 512)
    qm, qv = jax_moe.linen.MoE(256, 256, 4, router=2).quantize(inner, "Q8_0")
    assert qv["quantized"]["gate_up"].shape == (L, 4, 512, 272)
    y = jax.jit(Stack(quantization=qm.quantization).apply)(
        {c: {"layers": {"moe": qv[c]}} for c in qv}, x)
    y_loop = x
    for i in range(L):
        layer_vars = jax.tree_util.tree_map(lambda a: a[i], qv)
        y_loop = y_loop + jax.jit(qm.apply)(layer_vars, y_loop)
    np.testing.assert_array_equal(np.asarray(y, np.float32), np.asarray(y_loop, np.float32))


def test_a_module_explains_its_projections(rng):
    nnx = pytest.importorskip("flax.nnx")
    import jax_moe.nnx

    m = jax_moe.nnx.MoE(256, 256, 8, router=RouterConfig.mixtral(k=2), rngs=nnx.Rngs(0))
    x = jnp.ones((3, 4, 256), jnp.float32)
    text = m.explain(x)
    gate_up, down = text.split("[down]")
    assert gate_up.startswith("[gate_up]") and "T=12 k=2 E=8 N=512 K=256" in gate_up
    assert "x [12, 256] bfloat16, w bfloat16 [E, K, N]" in gate_up and "kind: WMMA (dense w)" in gate_up
    assert "x [12, 2, 256] bfloat16" in down and "reduce=True -> [12, 256]" in down
    m.quantize("Q4_K_M")
    m.dtype = jnp.dtype(jnp.float32)
    text = m.explain(x)
    assert text.count("kind: SCALAR_GGUF") == 2 and "Q4_K blocks" in text and "Q6_K blocks" in text
    m.dtype, m.kind = jnp.dtype(jnp.bfloat16), jax_moe.MoeKind.WMMA
    with pytest.raises(TypeError, match="kind=WMMA runs dense"):
        m.explain(x)  # the error the call itself raises
