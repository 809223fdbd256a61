"""The peers jax_moe is measured against, each given the same work (docs/contract.md §8).

- ``ragged_dot``: ``jax.lax.ragged_dot`` on the pairs' rows sorted by expert, weights [E, K, N].
- ``gather_einsum``: gather each pair's expert weights, then one einsum.
- ``torch_grouped_mm``: ``torch._grouped_mm`` on rows sorted by expert (when torch imports).
- ``decode_q4k`` / ``decode_q8_0``: GGUF blocks decoded to bf16 in plain JAX (the "decode, then
  the fastest dense path" peer for quantized experts).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def sort_pairs(x_rows: np.ndarray, ids: np.ndarray, E: int):
    """Rows of x for every (token, j) pair sorted by expert, and the group sizes [E].

    x_rows: [T*k, K] host array (the row each pair reads); ids [T, k]."""
    flat = ids.reshape(-1)
    order = np.argsort(flat, kind="stable")
    return x_rows[order], np.bincount(flat, minlength=E).astype(np.int32), order


def ragged_dot(x_sorted, w_ekn, group_sizes):
    """[P, K] x [E, K, N] -> [P, N] (f32 accumulation, output in x's dtype)."""
    return jax.lax.ragged_dot(x_sorted, w_ekn, group_sizes)


def gather_einsum(x, ids, w_enk):
    """x [T, K] or [T, k, K]; w [E, N, K] -> [T, k, N] by gathering each pair's expert."""
    wg = w_enk[ids]  # [T, k, N, K]
    if x.ndim == 2:
        return jnp.einsum("tc,tjnc->tjn", x, wg, preferred_element_type=jnp.float32).astype(x.dtype)
    return jnp.einsum("tjc,tjnc->tjn", x, wg, preferred_element_type=jnp.float32).astype(x.dtype)


def _f16(b_lo, b_hi):
    return jax.lax.bitcast_convert_type((b_hi.astype(jnp.uint16) << 8) | b_lo.astype(jnp.uint16),
                                        jnp.float16).astype(jnp.float32)


def decode_q8_0(data, E: int, N: int, K: int, dtype=jnp.bfloat16):
    """Q8_0 bytes [E, N, K/32*34] -> [E, N, K] in dtype, in plain JAX."""
    b = data.reshape(E, N, K // 32, 34)
    d = _f16(b[..., 0], b[..., 1])[..., None]
    q = jax.lax.bitcast_convert_type(b[..., 2:], jnp.int8).astype(jnp.float32)
    return (d * q).astype(dtype).reshape(E, N, K)


def decode_q4k(data, E: int, N: int, K: int, dtype=jnp.bfloat16):
    """Q4_K bytes [E, N, K/256*144] -> [E, N, K] in dtype, in plain JAX (ggml's formulas)."""
    b = data.reshape(E, N, K // 256, 144)
    d = _f16(b[..., 0], b[..., 1])[..., None]
    dmin = _f16(b[..., 2], b[..., 3])[..., None]
    s = b[..., 4:16].astype(jnp.int32)
    lo = jnp.concatenate([s[..., 0:4] & 63, (s[..., 8:12] & 0xF) | ((s[..., 0:4] >> 6) << 4)], axis=-1)
    mn = jnp.concatenate([s[..., 4:8] & 63, (s[..., 8:12] >> 4) | ((s[..., 4:8] >> 6) << 4)], axis=-1)
    qs = b[..., 16:].reshape(E, N, K // 256, 4, 32).astype(jnp.int32)
    q = jnp.stack([qs & 0xF, qs >> 4], axis=-2).reshape(E, N, K // 256, 8, 32).astype(jnp.float32)
    scale = (d * lo.astype(jnp.float32))[..., None]
    minv = (dmin * mn.astype(jnp.float32))[..., None]
    return (scale * q - minv).astype(dtype).reshape(E, N, K)


DECODERS = {"Q4_K": decode_q4k, "Q8_0": decode_q8_0}


def torch_grouped_mm():
    """torch._grouped_mm if torch with CUDA imports, else None."""
    try:
        import torch
    except ImportError:
        return None
    if not torch.cuda.is_available() or not hasattr(torch, "_grouped_mm"):
        return None
    return torch
