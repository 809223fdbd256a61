"""gpt-oss end to end: GGUF files written with gguf-py's writer in llama.cpp's naming (MXFP4
experts as gguf-py quantizes them, or dense F32 experts; expert and router biases), loaded with
``jax_moe.nnx.MoE.from_gguf`` and run under ``nnx.jit``, against a float64 NumPy reference of
gpt-oss's MoE block written here (router with bias, top-k of the logits then softmax over the k,
gate/up/down biases, the clamped SwiGLU, the down bias weighted by the routing score)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

gguf = pytest.importorskip("gguf")
pytest.importorskip("flax")

from flax import nnx  # noqa: E402

import jax_moe  # noqa: E402
import jax_moe.gguf as jg  # noqa: E402
import jax_moe.nnx  # noqa: E402
from jax_moe.ffn import GptOssActivation  # noqa: E402
from jax_moe.routing import RouterConfig  # noqa: E402

QT = gguf.GGMLQuantizationType
BF16 = np.dtype(ml_dtypes.bfloat16)
E, K_USED, D, F = 8, 4, 128, 96
ALPHA = 1.702


def write_gpt_oss(path, rng, experts: str, clamp: list[float] | None = None):
    """A two-block gpt-oss file as llama.cpp's converter names it; returns (path, blocks) with
    each block's float32 weights as the file holds them (MXFP4 ones decoded by gguf-py)."""
    w = gguf.GGUFWriter(str(path), "gpt-oss")
    w.add_block_count(2)
    w.add_embedding_length(D)
    w.add_expert_count(E)
    w.add_expert_used_count(K_USED)
    w.add_expert_feed_forward_length(F)
    if clamp is not None:
        w.add_swiglu_clamp_exp(clamp)
    w.add_tensor("token_embd.weight", rng.standard_normal((16, D)).astype(np.float32))
    blocks = {}
    for b in range(2):
        t = dict(router=(rng.standard_normal((E, D)) / 4).astype(np.float32),
                 router_b=rng.standard_normal(E).astype(np.float32),
                 gate=(rng.standard_normal((E, F, D)) * 0.5).astype(np.float32),  # gate ~ N(0, 5.7): clamped often
                 up=(rng.standard_normal((E, F, D)) * 0.5).astype(np.float32),
                 down=(rng.standard_normal((E, D, F)) / 40).astype(np.float32),
                 gate_b=rng.standard_normal((E, F)).astype(np.float32),
                 up_b=rng.standard_normal((E, F)).astype(np.float32),
                 down_b=rng.standard_normal((E, D)).astype(np.float32))
        w.add_tensor(f"blk.{b}.attn_sinks.weight", rng.standard_normal(4).astype(np.float32))
        w.add_tensor(f"blk.{b}.ffn_gate_inp.weight", t["router"])
        w.add_tensor(f"blk.{b}.ffn_gate_inp.bias", t["router_b"])
        t["stored"] = {}
        for name in ("gate", "up", "down"):
            if experts == "mxfp4":
                raw = gguf.quants.quantize(t[name], QT.MXFP4)
                t["stored"][name] = raw
                w.add_tensor(f"blk.{b}.ffn_{name}_exps.weight", raw, raw_dtype=QT.MXFP4)
                t[name] = gguf.quants.dequantize(raw, QT.MXFP4).reshape(t[name].shape)
            else:
                w.add_tensor(f"blk.{b}.ffn_{name}_exps.weight", t[name])
            w.add_tensor(f"blk.{b}.ffn_{name}_exps.bias", t[f"{name}_b"])
        blocks[b] = t
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return str(path), blocks


def gpt_oss_block_ref(x, t, limit: float = 7.0) -> np.ndarray:
    """float64 gpt-oss MoE block of bfloat16 x: the expert weights rounded to bfloat16 (the
    kernels' operands), the gate/up outputs and h rounded to bfloat16 where the kernels write
    them; the output's own rounding is left to the comparison's tolerance."""
    r = lambda a: np.asarray(a, np.float32).astype(BF16).astype(np.float64)  # noqa: E731
    x = np.asarray(jnp.asarray(x).astype(jnp.float32), np.float64)
    g_w, u_w, d_w = (r(t[n]) for n in ("gate", "up", "down"))
    logits = x @ np.asarray(t["router"], np.float64).T + np.asarray(t["router_b"], np.float64)
    y = np.zeros(x.shape)
    for i in range(x.shape[0]):
        top = np.argsort(-logits[i], kind="stable")[:K_USED]
        p = np.exp(logits[i, top] - logits[i, top].max())
        p /= p.sum()
        for j, e in enumerate(top):
            g = r(g_w[e] @ x[i]) + t["gate_b"][e]
            u = r(u_w[e] @ x[i]) + t["up_b"][e]
            g = np.minimum(g, limit)
            u = np.clip(u, -limit, limit)
            h = (u + 1) * g / (1 + np.exp(-ALPHA * g))
            y[i] += p[j] * (d_w[e] @ r(h) + t["down_b"][e])
    return y


def tokens(rng, t, T=7):
    """bfloat16 tokens whose top-k choice is unambiguous (a float32 router cannot flip it)."""
    while True:
        x = jnp.asarray(rng.standard_normal((T, D)), jnp.bfloat16)
        xf = np.asarray(x.astype(jnp.float32), np.float64)
        logits = np.sort(xf @ t["router"].T.astype(np.float64) + t["router_b"], axis=-1)[:, ::-1]
        if (logits[:, K_USED - 1] - logits[:, K_USED]).min() > 1e-3:
            return x


def close(out, ref):
    out = np.asarray(jnp.asarray(out).astype(jnp.float32), np.float64)
    scale = np.abs(ref).max()
    np.testing.assert_allclose(out, ref, rtol=2.0**-8, atol=2.0**-8 * scale)


@pytest.mark.parametrize("experts,T", [
    ("mxfp4", 7), ("dense", 7),
    # on the GPU (marker gpu): the small-T kernels and the tensor-core GEMMs
    pytest.param("mxfp4", 7, marks=pytest.mark.gpu, id="gpu-mxfp4-7"),
    pytest.param("mxfp4", 300, marks=pytest.mark.gpu, id="gpu-mxfp4-300"),
    pytest.param("dense", 7, marks=pytest.mark.gpu, id="gpu-dense-7"),
    pytest.param("dense", 300, marks=pytest.mark.gpu, id="gpu-dense-300"),
])
def test_gpt_oss_gguf_block_from_gguf_under_nnx_jit(tmp_path, rng, experts, T):
    path, blocks = write_gpt_oss(tmp_path / f"gpt-oss-{experts}.gguf", rng, experts)
    cfg = jg.read_moe_config(path)
    assert (cfg.arch, cfg.expert_count, cfg.expert_used_count, cfg.moe_blocks) == ("gpt-oss", E, K_USED, (0, 1))
    assert cfg.router == RouterConfig.gpt_oss(k=K_USED) and cfg.activation == "gpt_oss"

    for b in (0, 1):
        t = blocks[b]
        moe = jax_moe.nnx.MoE.from_gguf(path, b)
        w = moe.weights()
        if experts == "mxfp4":  # kept as stored: the file's bytes, gate rows then up rows
            assert w.formats() == {"gate_up": "MXFP4", "down": "MXFP4"}
            np.testing.assert_array_equal(np.asarray(w.gate_up.data),
                                          np.concatenate([t["stored"]["gate"], t["stored"]["up"]], 1))
            np.testing.assert_array_equal(np.asarray(w.down.data), t["stored"]["down"])
        else:
            assert w.formats() == {"gate_up": "bfloat16", "down": "bfloat16"}
        np.testing.assert_array_equal(np.asarray(w.gate_up_bias), np.concatenate([t["gate_b"], t["up_b"]], 1))
        np.testing.assert_array_equal(np.asarray(w.down_bias), t["down_b"])
        np.testing.assert_array_equal(np.asarray(w.router_bias), t["router_b"])
        assert w.activation == "gpt_oss"

        x = tokens(rng, t, T)
        out = nnx.jit(lambda m, x: m(x))(moe, x)
        assert out.shape == x.shape and out.dtype == jnp.bfloat16
        assert out.devices() == jnp.zeros(()).devices()  # the device the test runs on
        ref = gpt_oss_block_ref(x, t)
        close(out, ref)
        # everything gpt-oss adds is exercised: without the clamp, the biases or the router
        # bias the block is another function of x
        assert np.abs(gpt_oss_block_ref(x, t, limit=np.inf) - ref).max() > 0.05 * np.abs(ref).max()
        for name in ("gate_b", "up_b", "down_b", "router_b"):
            zeroed = dict(t, **{name: np.zeros_like(t[name])})
            assert np.abs(gpt_oss_block_ref(x, zeroed) - ref).max() > 0.05 * np.abs(ref).max(), name

    # the Linen module from the same file computes the same
    from jax_moe.linen import MoE as LinenMoE
    module, variables = LinenMoE.from_gguf(path, 1)
    out_linen = jax.jit(module.apply)(variables, x)
    np.testing.assert_array_equal(np.asarray(out_linen, np.float32), np.asarray(out, np.float32))


def test_gpt_oss_clamp_from_metadata(tmp_path, rng):
    """``gpt-oss.swiglu_clamp_exp`` (one value per block) sets each block's limit; 0 turns the
    clamp off, as in llama.cpp; an explicit activation overrides the file."""
    path, blocks = write_gpt_oss(tmp_path / "clamp.gguf", rng, "mxfp4", clamp=[3.0, 0.0])
    moe0 = jax_moe.nnx.MoE.from_gguf(path, 0)
    assert moe0.weights().activation == GptOssActivation(limit=3.0)
    x = tokens(rng, blocks[0])
    out = nnx.jit(lambda m, x: m(x))(moe0, x)
    close(out, gpt_oss_block_ref(x, blocks[0], limit=3.0))
    moe1 = jax_moe.nnx.MoE.from_gguf(path, 1)
    assert moe1.weights().activation == GptOssActivation(limit=float("inf"))
    x = tokens(rng, blocks[1])
    close(nnx.jit(lambda m, x: m(x))(moe1, x), gpt_oss_block_ref(x, blocks[1], limit=np.inf))
    mine = jg.load_block_weights(path, 0, activation=GptOssActivation(limit=5.0))
    assert mine.activation == GptOssActivation(limit=5.0)
    bad, _ = write_gpt_oss(tmp_path / "bad_clamp.gguf", rng, "mxfp4", clamp=[7.0, -1.0])
    with pytest.raises(ValueError, match="swiglu_clamp_exp must hold finite numbers >= 0"):
        jg.load_block_weights(bad, 1)
    short, _ = write_gpt_oss(tmp_path / "short_clamp.gguf", rng, "mxfp4", clamp=[7.0, 7.0, 7.0][:2])
    jg.load_block_weights(short, 1)  # one value per block: fine
