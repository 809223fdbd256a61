"""jax_moe.gguf: synthetic GGUF files written with gguf.GGUFWriter, loaded back."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

gguf = pytest.importorskip("gguf")
pytest.importorskip("flax")

import jax_moe  # noqa: E402
import jax_moe.gguf as jg  # noqa: E402
from jax_moe.ffn import MoEWeights  # noqa: E402
from jax_moe.routing import RouterConfig  # noqa: E402

QT = gguf.GGMLQuantizationType
BF16 = np.dtype(ml_dtypes.bfloat16)
D, F, FS = 256, 256, 512



def qbytes(w, qtype: str):
    """(uint8 bytes, raw dtype) of w [.., N, K] quantized by jax_moe (K-quants) for the file."""
    a = w if w.ndim == 3 else w[None]
    q = jax_moe.quantize(a, qtype)
    data = np.asarray(q.data)
    return (data if w.ndim == 3 else data[0]), QT[qtype]


def write(path, arch, tensors: dict, meta: dict):
    """tensors: name -> np.ndarray (F32/F16) or (uint8 bytes, GGMLQuantizationType)."""
    w = gguf.GGUFWriter(str(path), arch)
    for key, value in meta.items():
        key = key.format(arch=arch)
        if isinstance(value, bool):
            w.add_bool(key, value)
        elif isinstance(value, float):
            w.add_float32(key, value)
        elif isinstance(value, list):
            w.add_array(key, value)
        else:
            w.add_uint32(key, value)
    for name, t in tensors.items():
        if isinstance(t, tuple):
            w.add_tensor(name, t[0], raw_dtype=t[1])
        else:
            w.add_tensor(name, t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return str(path)


def experts(rng, E, n, k):
    return (rng.standard_normal((E, n, k)) / np.sqrt(k)).astype(np.float32)


def q(data_qt, shape):
    data, qt = data_qt
    return jax_moe.QuantizedExperts(data, int(qt), shape)


def ref_block(x, ids, scores, gate, up, down, shared=None):
    """float64 expert FFN of bfloat16 x with quantized weights (WMMA_GGUF): weights decoded with
    gguf.quants and rounded to bfloat16, gate/up and h rounded to bfloat16, float32 output
    rounding left out (compared at half a bfloat16 ulp of the output scale)."""
    def w64(t):
        data, qt = t
        return gguf.quants.dequantize(data, qt).astype(np.float32).astype(BF16).astype(np.float64)

    def r(a):
        return np.asarray(a, np.float32).astype(BF16).astype(np.float64)

    x = np.asarray(x.astype(jnp.float32), np.float64)
    g, u, d = w64(gate), w64(up), w64(down)
    y = np.zeros(x.shape)
    for t in range(x.shape[0]):
        for j in range(ids.shape[1]):
            e = ids[t, j]
            gg, uu = r(g[e] @ x[t]), r(u[e] @ x[t])
            y[t] += scores[t, j] * (d[e] @ r(gg / (1 + np.exp(-gg)) * uu))
    return y


def qwen3moe_file(tmp_path, rng, E=4):
    """Block 0 dense, blocks 1 and 2 MoE: gate/up Q4_K, down Q6_K, router F32."""
    tensors, orig = {}, {}
    tensors["blk.0.ffn_gate.weight"] = (rng.standard_normal((F, D)) / 16).astype(np.float32)
    for b in (1, 2):
        orig[b] = dict(gate=qbytes(experts(rng, E, F, D), "Q4_K"), up=qbytes(experts(rng, E, F, D), "Q4_K"),
                       down=qbytes(experts(rng, E, D, F), "Q6_K"),
                       router=(rng.standard_normal((E, D)) / 4).astype(np.float32))
        tensors[f"blk.{b}.ffn_gate_inp.weight"] = orig[b]["router"]
        for name in ("gate", "up", "down"):
            tensors[f"blk.{b}.ffn_{name}_exps.weight"] = orig[b][name]
    meta = {"{arch}.block_count": 3, "{arch}.embedding_length": D, "{arch}.expert_count": E,
            "{arch}.expert_used_count": 2, "{arch}.expert_feed_forward_length": F}
    return write(tmp_path / "qwen3moe.gguf", "qwen3moe", tensors, meta), orig


def test_qwen3moe_config_and_block(tmp_path, rng):
    path, orig = qwen3moe_file(tmp_path, rng)
    cfg = jg.read_moe_config(path)
    assert (cfg.arch, cfg.expert_count, cfg.expert_used_count, cfg.moe_blocks) == ("qwen3moe", 4, 2, (1, 2))
    assert (cfg.block_count, cfg.embedding_length, cfg.expert_feed_forward_length) == (3, D, F)
    assert cfg.router == RouterConfig.qwen3_moe(k=2)

    w = jg.load_block_weights(path, 1)
    o = orig[1]
    assert w.formats() == {"gate_up": "Q4_K", "down": "Q6_K"}
    assert w.gate_up.shape == (4, 2 * F, D) and w.down.shape == (4, D, F)
    # the file's bytes, as stored: gate rows then up rows
    np.testing.assert_array_equal(np.asarray(w.gate_up.data), np.concatenate([o["gate"][0], o["up"][0]], 1))
    np.testing.assert_array_equal(np.asarray(w.down.data), o["down"][0])
    np.testing.assert_array_equal(np.asarray(w.router), o["router"].T)
    assert w.router_bias is None and w.selection_bias is None and w.shared is None

    x = jnp.asarray(rng.standard_normal((9, D)), jnp.bfloat16)
    out, (ids, scores) = jax.jit(lambda w, x: w(x, return_routing=True))(w, x)
    ref = ref_block(x, np.asarray(ids), np.asarray(scores, np.float64), o["gate"], o["up"], o["down"])
    scale = np.abs(ref).max()
    np.testing.assert_allclose(np.asarray(out.astype(jnp.float32), np.float64), ref,
                               rtol=2.0**-8, atol=2.0**-8 * scale)

    # the NNX module holds the same weights and computes the same thing
    from flax import nnx
    from jax_moe.nnx import MoE
    moe = MoE.from_gguf(path, 1)
    out_nnx = nnx.jit(lambda m, x: m(x))(moe, x)
    np.testing.assert_array_equal(np.asarray(out_nnx, np.float32), np.asarray(out, np.float32))

    with pytest.raises(ValueError, match=r"block 0 has no expert tensors.*\[1, 2\]"):
        jg.load_block_weights(path, 0)


def test_deepseek_style_groups_bias_shared_unfusable(tmp_path, rng):
    """sigmoid + exp_probs_b + groups + scale from metadata; gate Q4_K / up Q5_K kept apart;
    shared expert Q8_0 (fused) with a Q5_K down."""
    E = 8
    gate, up = qbytes(experts(rng, E, F, D), "Q4_K"), qbytes(experts(rng, E, F, D), "Q5_K")
    down = qbytes(experts(rng, E, D, F), "Q6_K")
    sg, su = qbytes(experts(rng, 1, FS, D)[0], "Q8_0"), qbytes(experts(rng, 1, FS, D)[0], "Q8_0")
    sd = qbytes(experts(rng, 1, D, FS)[0], "Q5_K")
    router = (rng.standard_normal((E, D)) / 4).astype(np.float32)
    bias = (rng.standard_normal(E) / 10).astype(np.float32)
    tensors = {"blk.0.ffn_gate_inp.weight": router, "blk.0.exp_probs_b.bias": bias,
               "blk.0.ffn_gate_exps.weight": gate, "blk.0.ffn_up_exps.weight": up,
               "blk.0.ffn_down_exps.weight": down, "blk.0.ffn_gate_shexp.weight": sg,
               "blk.0.ffn_up_shexp.weight": su, "blk.0.ffn_down_shexp.weight": sd}
    meta = {"{arch}.block_count": 1, "{arch}.expert_count": E, "{arch}.expert_used_count": 2,
            "{arch}.expert_shared_count": 1, "{arch}.expert_gating_func": 2,
            "{arch}.expert_weights_norm": True, "{arch}.expert_weights_scale": 2.5,
            "{arch}.expert_group_count": 4, "{arch}.expert_group_used_count": 2}
    path = write(tmp_path / "ds.gguf", "deepseek2", tensors, meta)

    cfg = jg.read_moe_config(path)
    assert cfg.router == RouterConfig(k=2, gating="sigmoid", normalize=True, scale=2.5,
                                      n_groups=4, n_groups_used=2)
    assert cfg.expert_shared_count == 1
    w = jg.load_block_weights(path, 0)
    assert w.formats() == {"gate": "Q4_K", "up": "Q5_K", "down": "Q6_K",
                           "shared_gate_up": "Q8_0", "shared_down": "Q5_K"}
    np.testing.assert_array_equal(np.asarray(w.selection_bias), bias)
    np.testing.assert_array_equal(np.asarray(w.shared_gate_up.data)[0], np.concatenate([sg[0], su[0]], 0))
    assert w.shared_gate_up.shape == (1, 2 * FS, D) and w.shared_down.shape == (1, D, FS)
    assert w.shared_expert_gate is None

    # the same block built by hand from the original bytes computes the same thing
    hand = MoEWeights(router=jnp.asarray(router.T), gate=q(gate, (E, F, D)), up=q(up, (E, F, D)),
                      down=q(down, (E, D, F)), selection_bias=jnp.asarray(bias),
                      shared_gate=q((sg[0][None], sg[1]), (1, FS, D)),
                      shared_up=q((su[0][None], su[1]), (1, FS, D)),
                      shared_down=q((sd[0][None], sd[1]), (1, D, FS)), config=cfg.router)
    x = jnp.asarray(rng.standard_normal((7, D)), jnp.bfloat16)
    run = jax.jit(lambda w, x: w(x, return_routing=True))
    (out, (ids, _)), (out_h, (ids_h, _)) = run(w, x), run(hand, x)
    np.testing.assert_array_equal(np.asarray(ids), np.asarray(ids_h))
    per = E // 4
    assert all(len({int(e) // per for e in row}) <= 2 for row in np.asarray(ids))
    np.testing.assert_array_equal(np.asarray(out, np.float32), np.asarray(out_h, np.float32))


def test_qwen2moe_dense_f16_bf16_shared_gate_and_linen(tmp_path, rng):
    E = 4
    g16, u16 = experts(rng, E, F, D).astype(np.float16), experts(rng, E, F, D).astype(np.float16)
    d16 = experts(rng, E, D, F).astype(np.float16)
    sg = experts(rng, 1, FS, D)[0].astype(BF16)
    su = experts(rng, 1, FS, D)[0].astype(BF16)
    sd = experts(rng, 1, D, FS)[0].astype(BF16)
    gate_shexp = (rng.standard_normal(D) / 16).astype(np.float32)
    router = (rng.standard_normal((E, D)) / 4).astype(np.float32)
    as_bf16 = lambda a: (a.view(np.uint8), QT.BF16)  # noqa: E731
    tensors = {"blk.0.ffn_gate_inp.weight": router, "blk.0.ffn_gate_exps.weight": g16,
               "blk.0.ffn_up_exps.weight": u16, "blk.0.ffn_down_exps.weight": d16,
               "blk.0.ffn_gate_shexp.weight": as_bf16(sg), "blk.0.ffn_up_shexp.weight": as_bf16(su),
               "blk.0.ffn_down_shexp.weight": as_bf16(sd),
               "blk.0.ffn_gate_inp_shexp.weight": gate_shexp}
    meta = {"{arch}.block_count": 1, "{arch}.expert_count": E, "{arch}.expert_used_count": 2}
    path = write(tmp_path / "q2.gguf", "qwen2moe", tensors, meta)
    assert jg.read_moe_config(path).router == RouterConfig.qwen2_moe(k=2)

    w = jg.load_block_weights(path, 0)
    assert w.formats() == {"gate_up": "bfloat16", "down": "bfloat16", "shared_gate_up": "bfloat16",
                           "shared_down": "bfloat16"}
    np.testing.assert_array_equal(np.asarray(w.gate_up, np.float32),
                                  np.concatenate([g16, u16], 1).astype(BF16).astype(np.float32))
    np.testing.assert_array_equal(np.asarray(w.shared_down, np.float32)[0], sd.astype(np.float32))
    np.testing.assert_array_equal(np.asarray(w.shared_expert_gate), gate_shexp)

    x = jnp.asarray(rng.standard_normal((2, 5, D)), jnp.bfloat16)
    expected = jax.jit(lambda w, x: w(x))(w, x)
    from jax_moe.linen import MoE as LinenMoE
    module, variables = LinenMoE.from_gguf(path, 0)
    assert set(variables) == {"experts", "router"}  # nothing trainable (issue 15: frozen by default)
    out = jax.jit(module.apply)(variables, x)
    np.testing.assert_array_equal(np.asarray(out, np.float32), np.asarray(expected, np.float32))
    # F16 kept as float16 when asked
    w16 = jg.load_block_weights(path, 0, dense_dtype=jnp.float16)
    np.testing.assert_array_equal(np.asarray(w16.down), d16)


def test_unsupported_format_is_decoded_with_a_warning(tmp_path, rng):
    E = 2
    g = experts(rng, E, F, D)
    g_q40 = gguf.quants.quantize(g, QT.Q4_0)
    up, down = qbytes(experts(rng, E, F, D), "Q4_K"), qbytes(experts(rng, E, D, F), "Q6_K")
    tensors = {"blk.0.ffn_gate_inp.weight": rng.standard_normal((E, D)).astype(np.float32),
               "blk.0.ffn_gate_exps.weight": (g_q40, QT.Q4_0), "blk.0.ffn_up_exps.weight": up,
               "blk.0.ffn_down_exps.weight": down}
    path = write(tmp_path / "q40.gguf", "qwen3moe", tensors,
                 {"{arch}.expert_count": E, "{arch}.expert_used_count": 1})
    with pytest.warns(UserWarning, match=r"blk\.0\.ffn_gate_exps\.weight is Q4_0.*bfloat16"):
        w = jg.load_block_weights(path, 0)
    assert w.formats() == {"gate": "bfloat16", "up": "Q4_K", "down": "Q6_K"}
    np.testing.assert_array_equal(np.asarray(w.gate, np.float32),
                                  gguf.quants.dequantize(g_q40, QT.Q4_0).astype(BF16).astype(np.float32))
    x = jnp.asarray(rng.standard_normal((3, D)), jnp.bfloat16)
    assert w(x).shape == (3, D)


def test_undecodable_format_is_a_clear_error(tmp_path, rng):
    E = 2
    q8k = rng.integers(0, 256, (E, F, D // 256 * 292), dtype=np.uint8)  # Q8_K: 292 bytes / 256
    tensors = {"blk.0.ffn_gate_inp.weight": rng.standard_normal((E, D)).astype(np.float32),
               "blk.0.ffn_gate_exps.weight": (q8k, QT.Q8_K),
               "blk.0.ffn_up_exps.weight": qbytes(experts(rng, E, F, D), "Q4_K"),
               "blk.0.ffn_down_exps.weight": qbytes(experts(rng, E, D, F), "Q6_K")}
    path = write(tmp_path / "q8k.gguf", "qwen3moe", tensors,
                 {"{arch}.expert_count": E, "{arch}.expert_used_count": 1})
    with pytest.raises(ValueError, match=r"blk\.0\.ffn_gate_exps\.weight.*Q8_K.*cannot decode"):
        jg.load_block_weights(path, 0)


def test_bad_files(tmp_path, rng):
    with pytest.raises(ValueError, match="not found"):
        jg.read_moe_config(tmp_path / "missing.gguf")
    dense = write(tmp_path / "dense.gguf", "llama",
                  {"blk.0.ffn_gate.weight": rng.standard_normal((F, D)).astype(np.float32)},
                  {"{arch}.block_count": 1})
    with pytest.raises(ValueError, match="expert_count"):
        jg.read_moe_config(dense)
    E = 2
    tensors = {"blk.0.ffn_gate_inp.weight": rng.standard_normal((E, D)).astype(np.float32),
               "blk.0.ffn_gate_exps.weight": qbytes(experts(rng, E, F, D), "Q4_K"),
               "blk.0.ffn_up_exps.weight": qbytes(experts(rng, E, F, D), "Q4_K"),
               "blk.0.ffn_down_exps.weight": qbytes(experts(rng, E, D, F), "Q6_K"),
               "blk.0.ffn_down_exps.scale": rng.standard_normal((E, D)).astype(np.float32)}
    scaled = write(tmp_path / "scaled.gguf", "llama", tensors,
                   {"{arch}.expert_count": E, "{arch}.expert_used_count": 1})
    assert jg.read_moe_config(scaled).router == RouterConfig.mixtral(k=1)  # llama = Mixtral
    with pytest.raises(ValueError, match=r"ffn_down_exps\.scale"):
        jg.load_block_weights(scaled, 0)
    del tensors["blk.0.ffn_down_exps.scale"]
    tensors["blk.0.ffn_down_exps.bias"] = rng.standard_normal((E, D + 1)).astype(np.float32)
    with pytest.raises(ValueError, match=r"ffn_down_exps\.bias: expected \[2, 256\]"):
        jg.load_block_weights(write(tmp_path / "bad_bias.gguf", "llama", tensors,
                                    {"{arch}.expert_count": E, "{arch}.expert_used_count": 1}), 0)
    del tensors["blk.0.ffn_down_exps.bias"]
    tensors["blk.0.ffn_down_shexp.bias"] = rng.standard_normal(D).astype(np.float32)
    with pytest.raises(ValueError, match=r"ffn_down_shexp\.bias"):
        jg.load_block_weights(write(tmp_path / "shexp_bias.gguf", "llama", tensors,
                                    {"{arch}.expert_count": E, "{arch}.expert_used_count": 1}), 0)
    del tensors["blk.0.ffn_down_shexp.bias"]
    with pytest.warns(UserWarning, match="no routing defaults"):
        other = write(tmp_path / "other.gguf", "newarch", tensors,
                      {"{arch}.expert_count": E, "{arch}.expert_used_count": 1})
        jg.read_moe_config(other)


def test_load_blocks_progress_bar(tmp_path, rng, capsys):
    path, orig = qwen3moe_file(tmp_path, rng)
    import jax_moe.linen
    import jax_moe.nnx

    mods = jax_moe.nnx.load_blocks(path)
    err = capsys.readouterr().err
    assert "loading qwen3moe MoE blocks" in err and "2/2" in err
    assert sorted(mods) == [1, 2]
    assert all(isinstance(m, jax_moe.nnx.MoE) for m in mods.values())
    weights = jg.load_blocks(path, [2], progress=False)
    assert capsys.readouterr().err == ""
    assert all(isinstance(w, jax_moe.MoEWeights) for w in weights.values())
    np.testing.assert_array_equal(np.asarray(weights[2].down.data), orig[2]["down"][0])
    linen_blocks = jax_moe.linen.load_blocks(path, [1], progress=False)
    module, variables = linen_blocks[1]
    assert isinstance(module, jax_moe.linen.MoE) and set(variables) == {"quantized", "router"}  # nothing trainable


def test_legacy_per_expert_mixtral_tensors(tmp_path, rng):
    """Early Mixtral files: one tensor per expert (blk.N.ffn_gate.E.weight), arch llama."""
    E = 3
    parts = {name: [qbytes(experts(rng, 1, *shape)[0], qt) for _ in range(E)]
             for name, shape, qt in (("gate", (F, D), "Q4_K"), ("up", (F, D), "Q4_K"),
                                     ("down", (D, F), "Q6_K"))}
    router = (rng.standard_normal((E, D)) / 4).astype(np.float32)
    tensors = {"blk.0.ffn_gate_inp.weight": router}
    for name, ts in parts.items():
        for e, t in enumerate(ts):
            tensors[f"blk.0.ffn_{name}.{e}.weight"] = t
    path = write(tmp_path / "mixtral.gguf", "llama", tensors,
                 {"{arch}.expert_count": E, "{arch}.expert_used_count": 2})
    cfg = jg.read_moe_config(path)
    assert cfg.moe_blocks == (0,) and cfg.router == RouterConfig.mixtral(k=2)
    w = jg.load_block_weights(path, 0)
    assert w.formats() == {"gate_up": "Q4_K", "down": "Q6_K"}
    stack = lambda name: np.stack([t[0] for t in parts[name]])  # noqa: E731
    np.testing.assert_array_equal(np.asarray(w.gate_up.data), np.concatenate([stack("gate"), stack("up")], 1))
    np.testing.assert_array_equal(np.asarray(w.down.data), stack("down"))
    del tensors["blk.0.ffn_up.2.weight"]
    broken = write(tmp_path / "broken.gguf", "llama", tensors,
                   {"{arch}.expert_count": E, "{arch}.expert_used_count": 2})
    with pytest.raises(ValueError, match=r"blk\.0\.ffn_up\.2\.weight is missing"):
        jg.load_block_weights(broken, 0)


@pytest.mark.parametrize("arch,reason", [("llama4", "before the FFN")])
def test_architectures_that_moe_ffn_does_not_implement(tmp_path, rng, arch, reason):
    E = 2
    tensors = {"blk.0.ffn_gate_inp.weight": rng.standard_normal((E, D)).astype(np.float32),
               "blk.0.ffn_gate_up_exps.weight": qbytes(experts(rng, E, 2 * F, D), "Q8_0"),
               "blk.0.ffn_down_exps.weight": qbytes(experts(rng, E, D, F), "Q8_0")}
    path = write(tmp_path / f"{arch}.gguf", arch, tensors,
                 {"{arch}.expert_count": E, "{arch}.expert_used_count": 1})
    with pytest.raises(ValueError, match=reason):
        jg.load_block_weights(path, 0)
