"""A jitted Flax NNX transformer block whose feed-forward layer is a jax_moe MoE block.

    python examples/flax_block.py [--batch 2] [--seq 16] [--qtype Q4_K] [--down-qtype Q6_K]

RMSNorm -> causal self-attention -> residual -> RMSNorm -> MoE (Qwen3-MoE routing, SwiGLU
experts) -> residual, under ``nnx.jit``; first with dense bfloat16 experts, then with the
experts quantized in place to GGUF formats (``moe.quantize``), which keeps the same jitted
step. Runs on the CPU as well as on a GPU.
"""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

import jax_moe.nnx
from jax_moe.routing import RouterConfig


class TransformerBlock(nnx.Module):
    """Pre-norm transformer block with an MoE feed-forward layer; ``[B, S, D] -> [B, S, D]``."""

    def __init__(self, d_model: int, num_heads: int, d_expert: int, num_experts: int, k: int, *,
                 rngs: nnx.Rngs):
        self.attn_norm = nnx.RMSNorm(d_model, rngs=rngs)
        self.attn = nnx.MultiHeadAttention(num_heads=num_heads, in_features=d_model, decode=False,
                                           rngs=rngs)
        self.ffn_norm = nnx.RMSNorm(d_model, rngs=rngs)
        self.moe = jax_moe.nnx.MoE(d_model, d_expert, num_experts, router=RouterConfig.qwen3_moe(k=k),
                                   dtype=jnp.bfloat16, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        mask = nnx.make_causal_mask(x[..., 0])
        h = x + self.attn(self.attn_norm(x), mask=mask)
        return h + self.moe(self.ffn_norm(h)).astype(h.dtype)


@nnx.jit
def forward(block: TransformerBlock, x: jax.Array) -> jax.Array:
    return block(x)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq", type=int, default=16)
    p.add_argument("--qtype", default="Q4_K")
    p.add_argument("--down-qtype", default="Q6_K")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    d_model, heads, d_expert, experts, k = 256, 4, 512, 8, 2
    block = TransformerBlock(d_model, heads, d_expert, experts, k, rngs=nnx.Rngs(args.seed))
    x = jax.random.normal(jax.random.key(args.seed + 1), (args.batch, args.seq, d_model), jnp.float32)

    y_dense = forward(block, x)
    block.moe.quantize(args.qtype, down_qtype=args.down_qtype)  # in place
    y_quant = forward(block, x)

    delta = y_quant - x  # what the block adds to the residual stream
    rel = float(jnp.linalg.norm(y_quant - y_dense) / jnp.linalg.norm(y_dense - x))
    print(f"TransformerBlock(d_model={d_model}, heads={heads}, experts={experts}, k={k}) on "
          f"{jax.devices()[0].platform}: {tuple(x.shape)} -> {tuple(y_quant.shape)} {y_quant.dtype}")
    print(f"experts {args.qtype}/{args.down_qtype} vs bfloat16: relative change of the block's "
          f"update {rel:.3f}")
    ok = bool(jnp.all(jnp.isfinite(y_quant))) and float(jnp.abs(delta).max()) > 0 and rel < 0.2
    print("ok" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
