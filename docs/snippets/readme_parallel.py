"""README "Multiple devices": ExpertParallel over a (2, 4) mesh of 8 CPU devices."""

import jax

jax.config.update("jax_num_cpu_devices", 8)  # before JAX starts its CPU backend

# --- README: parallel
import jax, jax.numpy as jnp, numpy as np
from jax_moe import ExpertParallel, MoEWeights, RouterConfig, quantize

D, F, E = 256, 512, 8
rng = np.random.default_rng(0)
weights = MoEWeights(                                   # one MoE block, framework-free
    router=jnp.asarray(rng.standard_normal((D, E)) / np.sqrt(D), jnp.float32),    # [D, E]
    gate_up=quantize(rng.standard_normal((E, 2 * F, D)) / np.sqrt(D), "Q4_K"),   # [E, 2F, D]
    down=quantize(rng.standard_normal((E, D, F)) / np.sqrt(F), "Q6_K"),          # [E, D, F]
    config=RouterConfig.mixtral(k=2))
x = jnp.asarray(rng.standard_normal((16, D)), jnp.bfloat16)   # [B, D], B a multiple of 2 * 4

mesh = jax.make_mesh((2, 4), ("data", "expert"))
ep = ExpertParallel(mesh, expert_axis="expert", data_axis="data")
weights = ep.shard_weights(weights)   # experts split along E, the rest replicated
y = jax.jit(ep.block)(x, weights)     # or ep.ffn(x, ids, scores, gate_up, down)
# --- end

from jax.sharding import PartitionSpec as P  # noqa: E402

assert len(jax.devices()) == 8 and weights.gate_up.data.sharding.spec == P("expert")
one = jax.jit(lambda w, x: w(x))(jax.device_put(weights, jax.devices()[0]), x)
y64, one64 = np.asarray(y, np.float64), np.asarray(one, np.float64)
err = float(np.abs(y64 - one64).max() / np.abs(one64).max())
print(f"ExpertParallel on {mesh.shape}: {y.shape} {y.dtype}, max error vs one device {err:.2e}")
assert y.shape == x.shape and err < 2e-2, err  # the order of float32 additions, bf16 rounding
