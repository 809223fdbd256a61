"""How ``moe_matmul`` binds its primitive, on one device or many.

:func:`bind` is the one entry of every call. Under a trace it applies the op
``custom_jvp(custom_vmap(partitioned))``: ``jax_moe.partitioning.partitioned`` (the primitive in
``custom_partitioning`` with its sharding rule; on one device it is the primitive itself),
``custom_vmap`` with the fold of ``jax_moe.batching`` (binding through this op again, so a
vmapped call is still partitioned), and a ``custom_jvp`` that raises the primitive's
``InferenceOnlyError``. Eager calls run one ``jax.jit`` of the same op, so sharded arrays are
partitioned outside ``jit`` too. Inside a ``shard_map`` that leaves some mesh axes automatic
(``axis_names=``) XLA cannot call a custom partitioner: the primitive is bound directly and runs
replicated over the automatic axes (correct, but it gathers what they split).
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import numpy as np
from jax.interpreters import ad

from .batching import fold_batch
from .partitioning import Params, partitioned
from .primitive import moe_matmul_p

__all__ = ["bind"]


@functools.lru_cache(maxsize=None)
def _op(params: Params, x_rank: int) -> Callable:
    """The op for one parameter set: custom_jvp(custom_vmap(custom_partitioning))."""
    part = partitioned(params, x_rank)

    @jax.custom_batching.custom_vmap
    def batchable(x, ids, w, scores):
        return part(x, ids, w, scores)

    @batchable.def_vmap
    def _vmap_rule(axis_size, in_batched, x, ids, w, scores):
        return fold_batch(bind, axis_size, in_batched, x, ids, w, scores, **params._asdict()), True

    @jax.custom_jvp
    def op(x, ids, w, scores):
        return batchable(x, ids, w, scores)

    @op.defjvp
    def _jvp(primals, tangents):
        # The primitive's own rule raises InferenceOnlyError with the remedy.
        return ad.primitive_jvps[moe_matmul_p](primals, tangents, **params._asdict())

    return op


@functools.lru_cache(maxsize=None)
def _eager(params: Params, x_rank: int) -> Callable:
    return jax.jit(_op(params, x_rank))


def _partially_manual() -> bool:
    """Inside a shard_map whose manual axes are only some of the mesh's (``axis_names=``)."""
    mesh = jax.sharding.get_abstract_mesh()
    manual = set(getattr(mesh, "manual_axes", ()))
    return bool(manual) and manual != set(mesh.axis_names)


def bind(x: jax.Array, ids: jax.Array, w: jax.Array, scores: jax.Array, *, kind: int, wtype: int,
         layout: int, reduce: bool, out_dtype: Any) -> jax.Array:
    """Bind ``moe_matmul_p`` through its rules.

    Operands and parameters are exactly the primitive's: x ``[T, K]`` or ``[T, k, K]``,
    ids int32 ``[T, k]``, w ``[E, N, K]`` / ``[E, K, N]`` / uint8 blocks, scores ``[T, k]``;
    returns ``[T, N]`` (reduce) or ``[T, k, N]``. Under ``jax.jit`` with sharded operands
    each device computes its shard (``jax_moe.partitioning``).
    """
    params = Params(int(kind), int(wtype), int(layout), bool(reduce), np.dtype(out_dtype))
    x_rank = len(np.shape(x))
    if x_rank not in (2, 3) or _partially_manual():
        # Bad ranks: the primitive's checks name the problem.
        return moe_matmul_p.bind(x, ids, w, scores, **params._asdict())
    if any(isinstance(a, jax.core.Tracer) for a in (x, ids, w, scores)):
        return _op(params, x_rank)(x, ids, w, scores)
    return _eager(params, x_rank)(x, ids, w, scores)
