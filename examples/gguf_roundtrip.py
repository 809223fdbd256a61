"""Write a small synthetic ``qwen3moe`` GGUF file with ``gguf.GGUFWriter`` and load it back.

    python examples/gguf_roundtrip.py [--out model.gguf] [--blocks 3]
    python -m jax_moe --gguf model.gguf --block 1      # the main job on the written file

The experts are quantized by jax_moe (gate/up Q4_K, down Q6_K: llama.cpp's Q4_K_M recipe) and
stored in GGUF's own layout (``ffn_gate_exps [E, F, D]``, ``ffn_down_exps [E, D, F]``); the router
``ffn_gate_inp [E, D]`` is F32. Loading maps the file, reads the MoE metadata, and builds one
``jax_moe.nnx.MoE`` per block (with a progress bar). Each block then runs under ``nnx.jit`` and
is checked against a float64 reference computed from the file's bytes decoded by
``gguf.quants`` (independently of jax_moe).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from typing import Sequence

import gguf
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx

import jax_moe
import jax_moe.gguf
import jax_moe.nnx

ARCH = "qwen3moe"


def write_qwen3moe(path: str, *, blocks: int = 3, experts: int = 8, k: int = 2, d_model: int = 256,
                   d_expert: int = 512, seed: int = 0) -> None:
    """A qwen3moe checkpoint holding only what an MoE block needs (plus the norms)."""
    rng = np.random.default_rng(seed)
    w = gguf.GGUFWriter(path, ARCH)
    w.add_block_count(blocks)
    w.add_context_length(4096)
    w.add_embedding_length(d_model)
    w.add_feed_forward_length(d_expert * k)
    w.add_expert_feed_forward_length(d_expert)
    w.add_expert_count(experts)
    w.add_expert_used_count(k)
    w.add_head_count(4)
    w.add_head_count_kv(4)
    w.add_layer_norm_rms_eps(1e-6)

    def quantized(shape: tuple[int, ...], qtype: str) -> tuple[np.ndarray, gguf.GGMLQuantizationType]:
        a = rng.standard_normal(shape, np.float32) / np.float32(np.sqrt(shape[-1]))
        return np.asarray(jax_moe.quantize(a, qtype).data), gguf.GGMLQuantizationType[qtype]

    for b in range(blocks):
        w.add_tensor(f"blk.{b}.ffn_norm.weight", np.ones(d_model, np.float32))
        w.add_tensor(f"blk.{b}.ffn_gate_inp.weight",
                     rng.standard_normal((experts, d_model), np.float32) / np.float32(np.sqrt(d_model)))
        for name, shape, qtype in (("gate", (experts, d_expert, d_model), "Q4_K"),
                                   ("up", (experts, d_expert, d_model), "Q4_K"),
                                   ("down", (experts, d_model, d_expert), "Q6_K")):
            data, raw = quantized(shape, qtype)
            w.add_tensor(f"blk.{b}.ffn_{name}_exps.weight", data, raw_dtype=raw)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def reference(reader: gguf.GGUFReader, block: int, x: np.ndarray, ids: np.ndarray,
              scores: np.ndarray) -> np.ndarray:
    """float64 expert FFN of one block from the file's tensors, decoded by gguf.quants; the
    weights are rounded to bfloat16 as the WMMA_GGUF kind uses them."""
    t = {tensor.name: tensor for tensor in reader.tensors}

    def experts(name: str) -> np.ndarray:
        tensor = t[f"blk.{block}.ffn_{name}_exps.weight"]
        dec = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
        return dec.astype(ml_dtypes.bfloat16).astype(np.float64)

    gate, up, down = experts("gate"), experts("up"), experts("down")
    y = np.zeros(x.shape)
    for i in range(x.shape[0]):
        for j in range(ids.shape[1]):
            e = ids[i, j]
            g, u = gate[e] @ x[i], up[e] @ x[i]
            y[i] += scores[i, j] * (down[e] @ (g / (1 + np.exp(-g)) * u))
    return y


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", help="where to write the file (default: a temporary directory)")
    p.add_argument("--blocks", type=int, default=3)
    p.add_argument("--tokens", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        path = args.out or os.path.join(tmp, "tiny-qwen3moe.gguf")
        write_qwen3moe(path, blocks=args.blocks, seed=args.seed)
        cfg = jax_moe.gguf.read_moe_config(path)
        print(f"wrote {path} ({os.path.getsize(path) / 2**20:.1f} MiB): {cfg.arch}, "
              f"{cfg.expert_count} experts, k={cfg.expert_used_count}, router {cfg.router}")

        blocks = jax_moe.nnx.load_blocks(path)  # {block: jax_moe.nnx.MoE}, progress bar
        reader = gguf.GGUFReader(path)
        x = jax.random.normal(jax.random.key(args.seed), (args.tokens, cfg.embedding_length))
        x = x.astype(jnp.bfloat16)
        step = nnx.jit(lambda moe, x: moe(x, return_routing=True))
        worst = 0.0
        for b, moe in blocks.items():
            y, (ids, scores) = step(moe, x)
            ref = reference(reader, b, np.asarray(x.astype(jnp.float32), np.float64),
                            np.asarray(ids), np.asarray(scores, np.float64))
            err = float(np.abs(np.asarray(y.astype(jnp.float32)) - ref).max() / np.abs(ref).max())
            worst = max(worst, err)
            fmt = "/".join(moe.weights().formats().values())
            print(f"block {b}: {fmt} experts, output {tuple(y.shape)} {y.dtype}, "
                  f"max err vs float64 {err:.2e}")
        del reader
    ok = worst < 2.0**-6  # bfloat16 roundings of the hidden state and output: a few 1e-3
    print("ok" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
