"""One WMMA_GGUF gate+up call of a benchmark shape, for ncu (tools/dev_check.sh profile):
    ncu --clock-control none --kernel-name regex:grouped_wgmma_gguf --launch-skip 1 --launch-count 1 \
        --section WarpStateStats --section SchedulerStats --section Occupancy python3 tools/profile_gguf.py mixtral 64 Q4_K
"""
from __future__ import annotations

import sys

import jax
import jax.numpy as jnp
import numpy as np

from jax_moe import QuantizedExperts, moe_matmul

SHAPES = {"mixtral": (8, 2, 2 * 14336, 4096), "qwen3": (128, 8, 2 * 768, 2048)}
BLOCK = {"Q4_K": (256, 144), "Q8_0": (32, 34), "Q6_K": (256, 210)}


def main() -> None:
    model, T, fmt = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    E, k, N, K = SHAPES[model]
    qk, bb = BLOCK[fmt]
    rng = np.random.default_rng(0)
    # Random bytes with small finite fp16 scales: a timing input, not a numerics one.
    data = rng.integers(0, 256, size=(E, N, K // qk * bb), dtype=np.uint8)
    scale_bytes = {"Q4_K": [0, 1, 2, 3], "Q8_0": [0, 1], "Q6_K": [208, 209]}[fmt]
    blocks = data.reshape(E, N, K // qk, bb)
    blocks[..., scale_bytes[1::2]] = 0x1c  # fp16 exponent of about 2^-8: finite scales
    w = QuantizedExperts(jnp.asarray(blocks.reshape(E, N, -1)), fmt, (E, N, K))
    x = jnp.asarray(rng.standard_normal((T, K)), jnp.bfloat16)
    ids = jnp.asarray(np.argsort(rng.random((T, E)), axis=1)[:, :k], jnp.int32)
    scores = jnp.asarray(rng.random((T, k)), jnp.float32)
    f = jax.jit(moe_matmul)
    for _ in range(2):
        f(x, ids, w, scores).block_until_ready()
    print("done")


if __name__ == "__main__":
    main()
