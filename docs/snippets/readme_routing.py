"""README "MoE blocks": route, then the expert FFN, checked against NumPy float64."""

# --- README: routing
import jax, jax.numpy as jnp, numpy as np
import jax_moe
from jax_moe import RouterConfig, quantize

T, D, F, E = 16, 256, 512, 8
rng = np.random.default_rng(0)
x = jnp.asarray(rng.standard_normal((T, D)), jnp.bfloat16)                  # [T, D]
router = jnp.asarray(rng.standard_normal((D, E)) / np.sqrt(D), jnp.float32)  # [D, E]
gate_up = quantize(rng.standard_normal((E, 2 * F, D)) / np.sqrt(D), "Q4_K")  # [E, 2F, D]
down = quantize(rng.standard_normal((E, D, F)) / np.sqrt(F), "Q6_K")         # [E, D, F]
logits = x.astype(jnp.float32) @ router                                      # [T, E]
ids, scores = jax_moe.route(logits, RouterConfig.qwen3_moe(k=2))             # [T, k] each
y = jax_moe.moe_ffn(x, ids, scores, gate_up, down, activation="swiglu")     # [T, D]
# --- end

lg = np.asarray(logits, np.float64)
p = np.exp(lg - lg.max(-1, keepdims=True))
p /= p.sum(-1, keepdims=True)
top = np.argsort(-p, -1, kind="stable")[:, :2]
margin = np.take_along_axis(p, top, -1)[:, 1] - np.sort(p, -1)[:, -3]
keep = margin > 1e-6  # tokens whose second and third experts are not tied in float32
assert np.array_equal(np.asarray(ids)[keep], top[keep]), (np.asarray(ids), top)
s = np.take_along_axis(p, np.asarray(ids), -1)
np.testing.assert_allclose(np.asarray(scores), s / s.sum(-1, keepdims=True), rtol=1e-5, atol=1e-6)
gu, dn = jax_moe.dequantize(gate_up).astype(np.float64), jax_moe.dequantize(down).astype(np.float64)
xf, idn, sn = np.asarray(x, np.float64), np.asarray(ids), np.asarray(scores, np.float64)
ref = np.zeros((T, D))
for t in range(T):
    for j in range(2):
        h = gu[idn[t, j]] @ xf[t]
        ref[t] += sn[t, j] * (dn[idn[t, j]] @ (h[:F] / (1 + np.exp(-h[:F])) * h[F:]))
err = np.linalg.norm(np.asarray(y, np.float64) - ref) / np.linalg.norm(ref)
print(f"route + moe_ffn {y.shape} {y.dtype}: relative error vs float64 {err:.4f}")
assert y.shape == (T, D) and err < 2e-2, err  # bfloat16 roundings of the hidden state and output
