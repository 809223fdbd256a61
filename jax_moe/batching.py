"""Batching rule of ``moe_matmul`` (vmap): batch axes fold into the op, never a Python loop.

Batch axes of x, expert_ids and scores fold into T. Batched weights fold into E: batch b's
experts become experts b*E .. b*E+E-1, and valid ids are offset to match (ids outside [0, E)
stay outside, so they still contribute zero).
"""

from __future__ import annotations

import jax.numpy as jnp
from jax.interpreters import batching

from .primitive import moe_matmul_p


def _to_front(a, axis, size):
    if axis is None:
        return jnp.broadcast_to(a, (size,) + a.shape)
    return jnp.moveaxis(a, axis, 0)


def _batch_rule(args, dims, **params):
    x, ids, w, scores = args
    xd, idd, wd, sd = dims
    size = next(a.shape[d] for a, d in zip(args, dims) if d is not None)
    x = _to_front(x, xd, size)
    ids = _to_front(ids, idd, size)
    scores = _to_front(scores, sd, size)
    B, T, k = ids.shape
    if wd is not None:
        w = jnp.moveaxis(w, wd, 0)
        E = w.shape[1]
        w = w.reshape((B * E,) + w.shape[2:])
        offset = (jnp.arange(B, dtype=jnp.int32) * E)[:, None, None]
        ids = jnp.where((ids >= 0) & (ids < E), ids + offset, jnp.int32(-1))
    out = moe_matmul_p.bind(
        x.reshape((B * T,) + x.shape[2:]),
        ids.reshape(B * T, k),
        w,
        scores.reshape(B * T, k),
        **params,
    )
    return out.reshape((B, T) + out.shape[1:]), 0


batching.primitive_batchers[moe_matmul_p] = _batch_rule
