"""Per-kernel device time of the decode-time shapes, for ncu (tools/h200_check.sh profile):
gate+up of Qwen3-30B-A3B and Mixtral-8x7B at T = 1 (and 8) for bf16 and a few GGUF formats.
    python tools/profile_small.py [FMT,...]"""
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, "benchmarks")
from bench_moe import random_gguf, route  # noqa: E402

from jax_moe import moe_matmul  # noqa: E402

fmts = sys.argv[1].split(",") if len(sys.argv) > 1 else [None, "Q4_K", "Q8_0", "Q6_K"]
rng = np.random.default_rng(0)
key = jax.random.PRNGKey(0)
for name, E, k, K, N in [("qwen", 128, 8, 2048, 1536), ("mixtral", 8, 2, 4096, 28672)]:
    for T in (1, 8):
        for fmt in fmts:
            fmt = None if fmt in (None, "bf16") else fmt
            if T == 8 and fmt not in (None, "Q4_K"):
                continue
            w = random_gguf(key, fmt, E, N, K) if fmt else jax.random.normal(key, (E, N, K), jnp.bfloat16)
            x = jax.random.normal(key, (T, K), jnp.bfloat16)
            ids = jnp.asarray(route(rng, T, E, k))
            f = jax.jit(lambda x, ids, w: moe_matmul(x, ids, w, reduce=False))
            for _ in range(2):
                f(x, ids, w).block_until_ready()
            print(name, T, fmt or "bf16", "done", flush=True)
