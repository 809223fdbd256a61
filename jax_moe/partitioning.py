"""How ``moe_matmul`` runs on many devices: its partitioning rule under ``jax.jit``.

``jax_moe.binding`` binds the primitive through :func:`partitioned`, which wraps it in
``jax.experimental.custom_partitioning`` with a Shardy sharding rule. Under ``jax.jit`` with
sharded inputs, XLA's SPMD partitioner then asks :func:`_partition` how to split the op, and
each device runs the ordinary kernel on its shard; the expert weights are never gathered.

Factors of the sharding rule (the einsum-like notation of Shardy)::

    x [t c] or [t j c],  ids [t j],  w [e n c] (ENK) | [e c n] (EKN) | [e n q] (GGUF),
    scores [t j]  ->  out [t n] (reduce) or [t j n]

===========  =====================================================================
factor       what a device does when it is sharded
===========  =====================================================================
t  tokens    computes its tokens (passthrough; bitwise equal to one device)
n  rows      computes its output rows (passthrough; bitwise equal)
e  experts   computes the pairs routed to its local experts: ids are shifted by the
             device's expert offset (``lax.axis_index`` over the expert axes) and ids
             outside the local range become -1 (they add exactly zero); the partial
             outputs are combined with one ``psum`` (reduction factor)
c  K         dense weights only: local partial products, then a ``psum``
j  k pairs   passthrough when ``reduce=False``; a reduction when ``reduce=True``
q  bytes     GGUF block bytes: never sharded (quantized experts shard along E and N)
===========  =====================================================================

A mesh axis can shard only one factor. Weights win: an axis that shards both the tokens of
``x`` and the experts (or K) of ``w`` stays on the weights, the tokens are gathered over it
(activations only), and the combination over it becomes a reduce-scatter (``psum_scatter``)
back to the token sharding instead of a ``psum``, so the output keeps the token sharding.

Partial sums are combined in float32 (the kernel writes float32 and the result is rounded
once to the output dtype afterwards), so with E, K or k sharded the result differs from one
device's only by the order of float32 additions. ``reduce=False`` with only E sharded has a
single nonzero term per element and combines in the output dtype (exact).

Inside ``shard_map`` over all mesh axes there is nothing to partition: the kernel runs on the
local blocks as given (see ``jax_moe.parallel`` for expert parallelism written that way).
Inside a ``shard_map`` that leaves some axes automatic (``axis_names=``), XLA cannot call a
custom partitioner, so the primitive is bound directly and runs replicated over the automatic
axes (correct, but operands split over them are gathered).
Nothing here assumes one host: the rule only names mesh axes, so the same program runs on a
multi-host mesh under ``jax.distributed``.

How the op composes with ``vmap``, differentiation and eager calls is ``jax_moe.binding``'s.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.custom_partitioning import custom_partitioning
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from .kinds import MoeKind, WeightLayout
from .primitive import moe_matmul_p

__all__ = ["Params", "Plan", "local_expert_ids", "partitioned", "plan_partition", "sharding_rule"]

Axes = tuple[str, ...]


class Params(NamedTuple):
    """The primitive's parameters (hashable: one partitioned op is built per distinct value)."""

    kind: int
    wtype: int
    layout: int
    reduce: bool
    out_dtype: np.dtype

    @property
    def quantized(self) -> bool:
        """True when w is GGUF block data (SCALAR_GGUF and WMMA_GGUF kinds)."""
        return MoeKind(self.kind) != MoeKind.WMMA

    def w_dims(self) -> dict[str, int]:
        """Which dimension of w holds each factor: ``e``, ``n`` and ``c`` (None when K cannot
        be sharded: GGUF blocks run along K)."""
        if self.quantized:
            return {"e": 0, "n": 1, "c": None}
        if WeightLayout(self.layout) == WeightLayout.ENK:
            return {"e": 0, "n": 1, "c": 2}
        return {"e": 0, "n": 2, "c": 1}


# -- the Shardy rule ------------------------------------------------------------------------------
def sharding_rule(params: Params, x_rank: int) -> tuple[str, dict[str, tuple[str, ...]]]:
    """The Shardy sharding rule of one call, and its special factors.

    Returns ``(rule, kwargs)`` where ``rule`` is the einsum-like string (operands
    ``x, ids, w, scores``) and ``kwargs`` holds ``reduction_factors`` and
    ``need_replication_factors`` for ``custom_partitioning.def_partition``.
    """
    x = "t c" if x_rank == 2 else "t j c"
    if params.quantized:
        w = "e n q"
    elif WeightLayout(params.layout) == WeightLayout.ENK:
        w = "e n c"
    else:
        w = "e c n"
    out = "t n" if params.reduce else "t j n"
    reduction = ["e"]
    if not params.quantized:
        reduction.append("c")
    if params.reduce:
        reduction.append("j")
    replication = ["c", "q"] if params.quantized else []
    rule = f"{x}, t j, {w}, t j -> {out}"
    # Shardy wants special factors in the order of their first appearance in the rule.
    order = [f for f in rule.replace(",", " ").split() if f != "->"]
    first = {f: order.index(f) for f in set(order)}
    return rule, dict(reduction_factors=tuple(sorted(reduction, key=first.__getitem__)),
                      need_replication_factors=tuple(sorted(replication, key=first.__getitem__)))


# -- the plan: which mesh axes shard which factor ------------------------------------------------
class Plan(NamedTuple):
    """How one call is split over a mesh.

    Attributes:
      t, j, e, n, c: mesh axes sharding tokens, k pairs, experts, output rows and K.
      psum: axes whose partial outputs are all-reduced.
      scatter_t: axes whose partial outputs are reduce-scattered along T (they shard the
        output's tokens, after ``t``), where the output is wanted sharded so.
      scatter_n: the same along N (after ``n``).
      compute_dtype: the dtype the local kernel writes (float32 when partial sums are combined).
    """

    t: Axes
    j: Axes
    e: Axes
    n: Axes
    c: Axes
    psum: Axes
    scatter_t: Axes
    scatter_n: Axes
    compute_dtype: np.dtype

    @classmethod
    def replicated(cls, params: Params) -> Plan:
        """Every operand whole on every device."""
        return cls((), (), (), (), (), (), (), (), np.dtype(params.out_dtype))

    def specs(self, params: Params, x_rank: int) -> tuple[tuple[P, P, P, P], P]:
        """PartitionSpecs of ``(x, ids, w, scores)`` and of the output."""
        def ax(a: Axes) -> Any:
            return None if not a else (a[0] if len(a) == 1 else a)

        t, j, e, n, c = (ax(a) for a in (self.t, self.j, self.e, self.n, self.c))
        x = P(t, c) if x_rank == 2 else P(t, j, c)
        dims = params.w_dims()
        w: list[Any] = [None, None, None]
        w[dims["e"]], w[dims["n"]] = e, n
        if dims["c"] is not None:
            w[dims["c"]] = c
        t_out, n_out = ax(self.t + self.scatter_t), ax(self.n + self.scatter_n)
        out = P(t_out, n_out) if params.reduce else P(t_out, j, n_out)
        return (x, P(t, j), P(*w), P(t, j)), out


def _dim(spec: P, i: int) -> Axes:
    """Mesh axes of dimension ``i`` of ``spec`` as a tuple (empty when unsharded)."""
    entries = tuple(spec)
    if i >= len(entries) or entries[i] is None:
        return ()
    a = entries[i]
    return tuple(a) if isinstance(a, (tuple, list)) else (a,)


def _fit(axes: Sequence[str], size: int, mesh_shape: dict[str, int], used: set[str]) -> Axes:
    """The longest prefix of ``axes`` (minus axes already used) whose product divides ``size``."""
    out: list[str] = []
    prod = 1
    for a in axes:
        if a in used or a not in mesh_shape:
            continue
        if size % (prod * mesh_shape[a]):
            break
        out.append(a)
        prod *= mesh_shape[a]
    used.update(out)
    return tuple(out)


def _first(*candidates: Axes) -> Axes:
    return next((c for c in candidates if c), ())


def plan_partition(
    params: Params,
    mesh_shape: dict[str, int],
    shapes: Sequence[Sequence[int]],
    specs: Sequence[P],
    out_spec: P | None,
) -> Plan:
    """Decide how one call is split, from the shardings XLA proposes.

    Args:
      params: the primitive's parameters.
      mesh_shape: mesh axis name -> size.
      shapes: global shapes of ``x, ids, w, scores``.
      specs: their proposed PartitionSpecs.
      out_spec: the proposed PartitionSpec of the output (None if unknown).

    The weights' own sharding (E, N, and K for dense weights) is kept; the token and pair
    factors take what is left, so expert weights are never moved.
    """
    x_shape, ids_shape, w_shape, _ = shapes
    xs, ids_s, ws, ss = specs
    out_s = out_spec if out_spec is not None else P()
    x_rank = len(x_shape)
    T, k = int(ids_shape[0]), int(ids_shape[1])
    dims = params.w_dims()
    used: set[str] = set()
    out_rank = 2 if params.reduce else 3
    # The weights keep their own sharding; only then may the output (N) or x (K) add axes.
    e = _fit(_dim(ws, dims["e"]), int(w_shape[dims["e"]]), mesh_shape, used)
    n_size = int(w_shape[dims["n"]])
    n = _fit(_dim(ws, dims["n"]), n_size, mesh_shape, used)
    c_w = dims["c"] is not None
    c = _fit(_dim(ws, dims["c"]), int(x_shape[-1]), mesh_shape, used) if c_w else ()
    if not n:
        n = _fit(_dim(out_s, out_rank - 1), n_size, mesh_shape, used)
    if c_w and not c:
        c = _fit(_dim(xs, x_rank - 1), int(x_shape[-1]), mesh_shape, used)
    t_want = _first(_dim(out_s, 0), _dim(xs, 0), _dim(ids_s, 0), _dim(ss, 0))
    t = _fit(t_want, T, mesh_shape, used)
    j_cands = [_dim(ids_s, 1), _dim(ss, 1)]
    if x_rank == 3:
        j_cands.append(_dim(xs, 1))
    if not params.reduce:
        j_cands.append(_dim(out_s, 1))
    j = _fit(_first(*j_cands), k, mesh_shape, used)

    reduced = e + c + (j if params.reduce else ())

    def scatter(want: Axes, size: int, taken: Axes, claimed: Sequence[str]) -> Axes:
        """Reduced axes that the output wants on a dimension of ``size`` (``taken`` shards it)."""
        local = size // math.prod(mesh_shape[a] for a in taken)
        out: list[str] = []
        for a in want:
            if (a in reduced and a not in claimed
                    and local % (math.prod(mesh_shape[s] for s in out) * mesh_shape[a]) == 0):
                out.append(a)
        return tuple(out)

    scatter_t = scatter(t_want, T, t, ())
    scatter_n = scatter(_dim(out_s, out_rank - 1), n_size, n, scatter_t)
    psum = tuple(a for a in reduced if a not in scatter_t + scatter_n)
    out_dtype = np.dtype(params.out_dtype)
    sums = bool(c) or (params.reduce and bool(e or j))
    compute = np.dtype(np.float32) if sums else out_dtype
    return Plan(t, j, e, n, c, psum, scatter_t, scatter_n, compute)


def local_expert_ids(ids: jax.Array, axes, e_local: int) -> jax.Array:
    """Global expert ids -> ids of this device's ``e_local`` experts along mesh ``axes`` (inside
    a mapped computation); ids of other devices' experts (and invalid ids) become -1, which
    contributes zero. int32 ``[..., k]`` in and out."""
    shifted = ids.astype(jnp.int32) - jax.lax.axis_index(axes).astype(jnp.int32) * e_local
    return jnp.where((shifted >= 0) & (shifted < e_local), shifted, jnp.int32(-1))


# -- the partitioning callbacks ------------------------------------------------------------------
def _local_fn(params: Params, plan: Plan) -> Callable:
    """The per-device computation of a plan (traced with the mesh axes bound)."""

    def local(x, ids, w, scores):
        if plan.e:
            ids = local_expert_ids(ids, plan.e, w.shape[params.w_dims()["e"]])
        y = moe_matmul_p.bind(x, ids, w, scores, kind=params.kind, wtype=params.wtype,
                              layout=params.layout, reduce=params.reduce,
                              out_dtype=plan.compute_dtype)
        if plan.psum:
            y = jax.lax.psum(y, plan.psum)
        if plan.scatter_t:
            y = jax.lax.psum_scatter(y, plan.scatter_t, scatter_dimension=0, tiled=True)
        if plan.scatter_n:
            y = jax.lax.psum_scatter(y, plan.scatter_n, scatter_dimension=y.ndim - 1, tiled=True)
        return y.astype(params.out_dtype)

    return local


def _named(shape_struct: Any) -> NamedSharding | None:
    s = getattr(shape_struct, "sharding", None)
    return s if isinstance(s, NamedSharding) else None


def _plan_from(params: Params, mesh: Mesh, arg_shapes: Sequence[Any], result_shape: Any) -> Plan | None:
    shardings = [_named(a) for a in arg_shapes]
    if any(s is None for s in shardings) or mesh.empty:
        return None
    out = _named(result_shape) if result_shape is not None else None
    return plan_partition(params, dict(mesh.shape), [a.shape for a in arg_shapes],
                          [s.spec for s in shardings], None if out is None else out.spec)


def _replicated_mesh(mesh: Mesh, arg_shapes: Sequence[Any]) -> Mesh:
    """A mesh to run replicated on when XLA gives shardings that name no mesh axes."""
    if not mesh.empty:
        return mesh
    devices = arg_shapes[0].sharding._device_assignment
    return Mesh(np.asarray(devices), ("_jax_moe_replicated",))


def _partition(params: Params, x_rank: int, mesh: Mesh, arg_shapes: Sequence[Any], result_shape: Any):
    plan = _plan_from(params, mesh, arg_shapes, result_shape)
    if plan is None:  # shardings that name no mesh axes: run replicated
        mesh = _replicated_mesh(mesh, arg_shapes)
        plan = Plan.replicated(params)
    in_specs, out_spec = plan.specs(params, x_rank)
    arg_sh = tuple(NamedSharding(mesh, s) for s in in_specs)
    return mesh, _local_fn(params, plan), NamedSharding(mesh, out_spec), arg_sh


def _infer(params: Params, x_rank: int, mesh: Mesh, arg_shapes: Sequence[Any], result_shape: Any):
    """Output sharding for the GSPMD propagation path (``jax_use_shardy_partitioner=False``)."""
    plan = _plan_from(params, mesh, arg_shapes, None)
    if plan is None:
        mesh = _replicated_mesh(mesh, arg_shapes)
        plan = Plan.replicated(params)
    return NamedSharding(mesh, plan.specs(params, x_rank)[1])


# -- the partitioned primitive ---------------------------------------------------------------------
def partitioned(params: Params, x_rank: int) -> Callable:
    """``moe_matmul_p`` for one parameter set wrapped in ``custom_partitioning`` with its rule:
    ``f(x, ids, w, scores)``, which XLA splits over the mesh of sharded operands."""

    def local(x, ids, w, scores):
        return moe_matmul_p.bind(x, ids, w, scores, **params._asdict())

    op = custom_partitioning(local)
    rule, special = sharding_rule(params, x_rank)
    op.def_partition(
        partition=functools.partial(_partition, params, x_rank),
        infer_sharding_from_operands=functools.partial(_infer, params, x_rank),
        sharding_rule=rule,
        **special,
    )
    return op
