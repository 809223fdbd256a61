"""The vmap rule of ``moe_matmul``: batch axes fold into the op, never a Python loop.

One rule serves both places a batch meets the op: the primitive's batching rule
(``batching.primitive_batchers``) and the public wrapper's ``custom_vmap`` (``jax_moe.binding``),
which binds through the partitioning rule again.

Batch axes of x, expert_ids and scores fold into T; batched weights fold into E, with valid
ids offset to the folded experts (ids outside ``[0, E)`` stay outside, so they still contribute
zero). A fold is M-major (``[M, B]``: tokens or experts of all batches side by side) unless only
the batch axis is sharded in the operand's type, when it is batch-major: either way a sharded T
or E stays one contiguous block per device, so the fold moves no data between devices and never
gathers the weights.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
from jax.interpreters import batching

from .primitive import moe_matmul_p


def _batch_major(a: Any) -> bool:
    """Fold ``[B, M, ...]`` batch-major when only B is sharded in ``a``'s type (explicit mesh
    axes); otherwise M-major, which keeps a sharded M (tokens, experts) one block per device."""
    spec = tuple(getattr(getattr(jax.typeof(a), "sharding", None), "spec", ()) or ())
    b, m = (spec + (None, None))[:2]
    return bool(b) and not m


def _fold(a: jax.Array, batch_major: bool) -> jax.Array:
    """``[B, M, ...] -> [B * M, ...]`` (index ``b * M + m``) or ``[M * B, ...]`` (``m * B + b``)."""
    if not batch_major:
        a = jnp.swapaxes(a, 0, 1)
    return a.reshape((a.shape[0] * a.shape[1],) + a.shape[2:])


def fold_batch(bind: Callable[..., jax.Array], size: int, batched: Sequence[bool], x, ids, w,
               scores, **params: Any) -> jax.Array:
    """Run ``bind(x, ids, w, scores, **params)`` once on operands whose batched ones carry a
    leading batch axis of ``size`` (``batched``: per operand); returns ``[B, ...]``.

    x, ids and scores fold into T (unbatched ones are broadcast), w into E.
    """
    xb, ib, wb, sb = batched
    first = next((a for a, b in ((x, xb), (ids, ib), (scores, sb)) if b), None)

    def front(a, b):
        return a if b else jnp.broadcast_to(a, (size,) + a.shape)

    x, ids, scores = front(x, xb), front(ids, ib), front(scores, sb)
    B, T, k = ids.shape
    if wb:  # batch b's expert e becomes b * E + e (batch-major) or e * B + b
        E = w.shape[1]
        w_major = _batch_major(w)
        w = _fold(w, w_major)
        batch = jnp.arange(B, dtype=jnp.int32)[:, None, None]
        new = batch * E + ids if w_major else ids * B + batch
        ids = jnp.where((ids >= 0) & (ids < E), new, jnp.int32(-1))
    t_major = first is not None and _batch_major(first)
    out = bind(_fold(x, t_major), _fold(ids, t_major), w, _fold(scores, t_major), **params)
    if t_major:
        return out.reshape((B, T) + out.shape[1:])
    return jnp.swapaxes(out.reshape((T, B) + out.shape[1:]), 0, 1)


def _batch_rule(args, dims, **params):
    size = next(a.shape[d] for a, d in zip(args, dims) if d is not None)
    moved = [a if d is None else jnp.moveaxis(a, d, 0) for a, d in zip(args, dims)]
    batched = [d is not None for d in dims]
    return fold_batch(moe_matmul_p.bind, size, batched, *moved, **params), 0


batching.primitive_batchers[moe_matmul_p] = _batch_rule
