"""README "Flax": the NNX module quantized in place, and the Linen module; both under jit."""

# --- README: flax
import jax, jax.numpy as jnp
from flax import nnx
import jax_moe.nnx, jax_moe.linen
from jax_moe import RouterConfig

x = jax.random.normal(jax.random.key(1), (2, 16, 512), jnp.bfloat16)   # [batch, seq, D]
moe = jax_moe.nnx.MoE(512, 1024, num_experts=8, router=RouterConfig.mixtral(k=2), rngs=nnx.Rngs(0))
moe.quantize("Q4_K_M")                  # in place: gate/up Q4_K, down Q6_K (GGUF blocks)
y = nnx.jit(lambda m, x: m(x))(moe, x)  # [2, 16, 512] -> [2, 16, 512], inference-only

lin = jax_moe.linen.MoE(512, 1024, num_experts=8, router=RouterConfig.mixtral(k=2))
variables = lin.init(jax.random.key(0), x)
lin, variables = lin.quantize(variables, "Q4_K", down_qtype="Q6_K")
y2 = jax.jit(lin.apply)(variables, x)
# --- end

import numpy as np  # noqa: E402

assert y.shape == y2.shape == x.shape and y.dtype == y2.dtype == jnp.bfloat16
assert moe.weights().formats() == {"gate_up": "Q4_K", "down": "Q6_K"}
assert dict(lin.quantization) == {"gate_up": "Q4_K", "down": "Q6_K"}
# the module is moe_block on its own weights, bit for bit
w = moe.weights()
ref = jax.jit(lambda x: jax_moe.moe_block(x, w.router, w.gate_up, w.down, router=w.config))(x)
np.testing.assert_array_equal(np.asarray(y, np.float32), np.asarray(ref, np.float32))
assert bool(jnp.all(jnp.isfinite(y2.astype(jnp.float32)))) and float(jnp.abs(y2).max()) > 0
print(f"nnx {y.shape} {y.dtype}, linen {y2.shape} {y2.dtype}: ok")
