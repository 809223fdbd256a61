"""The README's example: one MoE projection with dense and with Q4_K experts, checked against NumPy.

Run: python examples/quickstart.py

The lines between the ``README`` markers are the README's "Use" snippet, verbatim
(tests/test_readme.py checks that they are and runs this file).
"""

# --- README: use
import jax, jax.numpy as jnp, numpy as np
from jax_moe import moe_matmul, quantize

T, k, E, N, K = 8, 2, 4, 256, 512
rng = np.random.default_rng(0)
x = jnp.asarray(rng.standard_normal((T, K)), jnp.bfloat16)            # activations [T, K]
w = rng.standard_normal((E, N, K)).astype(np.float32) / np.sqrt(K)     # experts [E, N, K]
ids = jnp.asarray(rng.integers(0, E, (T, k)), jnp.int32)               # routed experts [T, k]
scores = jax.nn.softmax(jnp.asarray(rng.standard_normal((T, k)), jnp.float32))  # weights [T, k]
y = jax.jit(moe_matmul)(x, ids, jnp.asarray(w, jnp.bfloat16), scores)  # [T, N], kind WMMA
y4 = jax.jit(moe_matmul)(x, ids, quantize(w, "Q4_K"), scores)          # [T, N], kind WMMA_GGUF
# --- end

xf, idn, sn = np.asarray(x, np.float64), np.asarray(ids), np.asarray(scores, np.float64)
ref = np.stack([sum(sn[t, j] * w[idn[t, j]] @ xf[t] for j in range(k)) for t in range(T)])
for name, out in [("dense bf16", y), ("Q4_K", y4)]:
    err = np.linalg.norm(np.asarray(out, np.float64) - ref) / np.linalg.norm(ref)
    print(f"{name:10s} {out.shape} {out.dtype}  relative error vs float64: {err:.4f}")
