"""Per-kernel device time of a few benchmark shapes, for ncu (tools/h200_check.sh profile)."""
import sys
import jax, jax.numpy as jnp, numpy as np
sys.path.insert(0, "benchmarks")
from bench_moe import random_gguf, route  # noqa: E402
from jax_moe import moe_matmul  # noqa: E402

rng = np.random.default_rng(0)
key = jax.random.PRNGKey(0)
for name, E, k, K, N, T, fmt in [("qwen", 128, 8, 2048, 1536, 1, None), ("qwen", 128, 8, 2048, 1536, 1, "Q4_K"),
                                  ("mixtral", 8, 2, 4096, 28672, 1, None), ("qwen", 128, 8, 2048, 1536, 64, None),
                                  ("mixtral", 8, 2, 4096, 28672, 4096, None)]:
    w = random_gguf(key, fmt, E, N, K) if fmt else jax.random.normal(key, (E, N, K), jnp.bfloat16)
    x = jax.random.normal(key, (T, K), jnp.bfloat16)
    ids = jnp.asarray(route(rng, T, E, k))
    f = jax.jit(lambda x, ids, w: moe_matmul(x, ids, w, reduce=False))
    for _ in range(3):
        f(x, ids, w).block_until_ready()
    print(name, T, fmt, "done", flush=True)
