"""README "GGUF checkpoints": load one block and all blocks of a (tiny, synthetic) checkpoint."""

import os
import runpy
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
from flax import nnx

ROOT = Path(__file__).resolve().parents[2]
write_qwen3moe = runpy.run_path(str(ROOT / "examples" / "gguf_roundtrip.py"))["write_qwen3moe"]
os.chdir(tempfile.mkdtemp())
write_qwen3moe("Qwen3-30B-A3B-Q4_K_M.gguf", blocks=2)  # a tiny file of the real one's kind
x = jax.random.normal(jax.random.key(0), (8, 256), jnp.bfloat16)

# --- README: gguf
import jax_moe.nnx
moe = jax_moe.nnx.MoE.from_gguf("Qwen3-30B-A3B-Q4_K_M.gguf", 0)     # routing read from the file
blocks = jax_moe.nnx.load_blocks("Qwen3-30B-A3B-Q4_K_M.gguf")       # {block: MoE}, with a progress bar
y = nnx.jit(lambda m, x: m(x))(moe, x)                               # [T, D] -> [T, D]
# --- end

import numpy as np  # noqa: E402

assert sorted(blocks) == [0, 1] and y.shape == x.shape
assert moe.weights().formats() == {"gate_up": "Q4_K", "down": "Q6_K"}
y0 = nnx.jit(lambda m, x: m(x))(blocks[0], x)
np.testing.assert_array_equal(np.asarray(y, np.float32), np.asarray(y0, np.float32))
assert moe.router_config.k == 2 and moe.router_config.normalize  # qwen3moe: renormalized top-k
print(f"gguf: blocks {sorted(blocks)}, {y.shape} {y.dtype}: ok")
