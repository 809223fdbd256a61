"""README "Flax": train the layers around a frozen MoE block with nnx.grad."""

import numpy as np

# --- README: frozen
import jax, jax.numpy as jnp
from flax import nnx
import jax_moe.nnx

class Model(nnx.Module):
    def __init__(self, rngs):
        self.dense = nnx.Linear(256, 256, rngs=rngs)
        self.moe = jax_moe.nnx.MoE(256, 512, num_experts=8, router=2, rngs=rngs)

    def __call__(self, x):
        h = self.dense(x)
        return h + self.moe(jax.lax.stop_gradient(h))   # no gradient through the experts

model = Model(nnx.Rngs(0))
x = jax.random.normal(jax.random.key(1), (4, 256))
grads = nnx.grad(lambda m, x: m(x).astype(jnp.float32).sum())(model, x)   # dense's only
# --- end

assert set(grads) == {"dense"}  # the MoE's weights are not nnx.Param
expected = np.repeat(np.asarray(x, np.float64).sum(0)[:, None], 256, 1)
np.testing.assert_allclose(np.asarray(grads["dense"]["kernel"][...]), expected, rtol=1e-5)
print("nnx.grad around a frozen MoE block: ok")
