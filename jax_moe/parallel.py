"""Expert parallelism: ``moe_ffn`` with its experts spread over one mesh axis.

A model author holds the routed experts sharded along E over an *expert* axis of the device
mesh, and the tokens sharded over a *data* axis beside it (and, by default, over the expert
axis too, as the other layers of a model use every device for data parallelism)::

    import jax
    from jax_moe.parallel import ExpertParallel

    mesh = jax.make_mesh((2, 4), ("data", "expert"))       # 8 devices: dp=2 x ep=4
    ep = ExpertParallel(mesh, expert_axis="expert", data_axis="data")
    weights = ep.shard_weights(weights)    # a jax_moe.ffn.MoEWeights: experts split along E
    step = jax.jit(lambda x, w: ep.block(x, w))          # router + experts (+ shared expert)
    y = step(x, weights)                   # x [B, ..., D], B divisible by 2 * 4

or, with routing done elsewhere, ``ep.ffn(x, expert_ids, scores, gate_up, down)`` in place of
``jax_moe.ffn.moe_ffn``. Each device runs the whole FFN (gate+up, activation, down) for the
(token, expert) pairs routed to its own ``E / ep`` experts, on every token of its data shard,
and the partial outputs are combined once: a float32 ``psum_scatter`` over the expert axis
(``tokens_over_experts=True``, after an all-gather of the activations over it) or a ``psum``
(``tokens_over_experts=False``). Expert weights never move. The shared expert, if any, runs on
each device's own tokens with replicated weights.

Compared with ``jax.jit`` over ``moe_ffn`` with E-sharded weights (which the partitioning rule
in ``jax_moe.partitioning`` also runs without moving weights), this combines once per FFN
instead of once per projection: the ``[T, k, 2F]`` hidden activations stay on their device.

Nothing here assumes one host: the mesh may span every process of a ``jax.distributed`` run
(``jax.make_mesh`` over ``jax.devices()``, which lists all processes' devices).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from .ffn import GateUp, MoEWeights, SharedExpert, Weight, moe_ffn, router_logits, shared_ffn
from .partitioning import local_expert_ids
from .kinds import WeightLayout
from .quantized import QuantizedExperts

__all__ = ["ExpertParallel", "expert_parallel_ffn"]

_EXPERT_FIELDS = ("down", "gate_up", "gate", "up", "gate_up_bias", "gate_bias", "up_bias", "down_bias")


def _is_leaf(a: Any) -> bool:
    return isinstance(a, QuantizedExperts)


def _num_experts(w: Any) -> int:
    if isinstance(w, QuantizedExperts):
        return int(w.data.shape[0])
    return int(jnp.shape(w)[0])


def _localize(w: Any) -> Any:
    """Inside shard_map: a QuantizedExperts whose data holds E/ep experts gets that shape."""
    if isinstance(w, QuantizedExperts):
        return QuantizedExperts(w.data, w.qtype, (int(w.data.shape[0]), w.N, w.K))
    if isinstance(w, (tuple, list)):
        return type(w)(_localize(v) for v in w)
    return w


@dataclasses.dataclass(frozen=True)
class ExpertParallel:
    """Expert parallelism over ``expert_axis`` of ``mesh``, data parallelism over ``data_axis``.

    Attributes:
      mesh: the device mesh (any number of hosts).
      expert_axis: the mesh axis the routed experts are split over (E must be a multiple of
        its size).
      data_axis: mesh axis (or axes) the tokens are split over besides; None for none.
      tokens_over_experts: the tokens are split over the expert axis as well (the leading
        token axis must be a multiple of the data size times the expert size). False keeps
        each data shard's tokens whole on every device of the expert axis.
    """

    mesh: Mesh
    expert_axis: str = "expert"
    data_axis: str | tuple[str, ...] | None = "data"
    tokens_over_experts: bool = True

    def __post_init__(self):
        names = tuple(self.mesh.axis_names)
        data = self._data_axes
        if self.expert_axis not in names:
            raise ValueError(f"ExpertParallel: expert_axis {self.expert_axis!r} is not an axis of "
                             f"the mesh {names}")
        for a in data:
            if a not in names or a == self.expert_axis:
                raise ValueError(f"ExpertParallel: data_axis {a!r} must be an axis of the mesh "
                                 f"{names} other than the expert axis")

    # -- specs -------------------------------------------------------------------------------
    @property
    def _data_axes(self) -> tuple[str, ...]:
        if self.data_axis is None:
            return ()
        return (self.data_axis,) if isinstance(self.data_axis, str) else tuple(self.data_axis)

    @property
    def token_axes(self) -> tuple[str, ...]:
        """Mesh axes the leading token axis is split over."""
        return self._data_axes + ((self.expert_axis,) if self.tokens_over_experts else ())

    @property
    def token_spec(self) -> P:
        """PartitionSpec of activations, expert ids and scores ``[tokens, ...]``."""
        t = self.token_axes
        return P(t if len(t) > 1 else (t[0] if t else None))

    @property
    def expert_spec(self) -> P:
        """PartitionSpec of routed expert weights ``[E, ...]`` (dense arrays, or the block data
        of ``QuantizedExperts``): split along E."""
        return P(self.expert_axis)

    @property
    def expert_sharding(self) -> tuple[str | None, None, None]:
        """The same as logical axis names for a rank-3 expert parameter, e.g. Flax's
        ``out_sharding`` variable metadata: ``(expert_axis, None, None)``."""
        return (self.expert_axis, None, None)

    @property
    def size(self) -> int:
        """Number of devices along the expert axis."""
        return int(self.mesh.shape[self.expert_axis])

    # -- placing arrays ------------------------------------------------------------------------
    def _put(self, tree: Any, spec: P) -> Any:
        """device_put (on concrete arrays) or reshard (inside jit) every leaf with ``spec``."""
        sharding = NamedSharding(self.mesh, spec)
        explicit = any(t == AxisType.Explicit for t in self.mesh.axis_types)

        def put(a: Any) -> Any:
            if isinstance(a, QuantizedExperts):
                data = put(a.data)
                return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(a), [data])
            if a is None:
                return a
            if not isinstance(a, jax.core.Tracer):
                return jax.device_put(a, sharding)
            if explicit:
                return jax.sharding.reshard(a, sharding)
            return jax.lax.with_sharding_constraint(a, sharding)

        return jax.tree_util.tree_map(put, tree, is_leaf=_is_leaf)

    def shard_experts(self, w: Any) -> Any:
        """Split routed expert weights along E over the expert axis.

        ``w``: a dense ``[E, N, K]``/``[E, K, N]`` array, a ``QuantizedExperts``, or a pytree of
        them (a ``(gate, up)`` pair). Concrete arrays are placed with ``jax.device_put``; traced
        ones (inside ``jit``) are constrained to that sharding.
        """
        leaves = jax.tree_util.tree_leaves(w, is_leaf=_is_leaf)
        for leaf in leaves:
            E = _num_experts(leaf)
            if E % self.size:
                raise ValueError(f"ExpertParallel: E = {E} experts cannot be split over the "
                                 f"{self.size} devices of mesh axis {self.expert_axis!r}")
        return self._put(w, self.expert_spec)

    def shard_tokens(self, a: Any) -> Any:
        """Split ``[tokens, ...]`` arrays (x, expert ids, scores; any pytree) over the token axes."""
        return self._put(a, self.token_spec)

    def replicate(self, a: Any) -> Any:
        """Place a pytree (router and shared-expert weights) on every device of the mesh."""
        return self._put(a, P())

    def shard_weights(self, weights: MoEWeights) -> MoEWeights:
        """A block's weights placed for expert parallelism: routed experts split along E,
        everything else (router, biases, shared expert) replicated."""
        if not isinstance(weights, MoEWeights):
            raise TypeError(f"weights must be a jax_moe.ffn.MoEWeights; got {type(weights).__name__}")
        changes = {}
        for f in dataclasses.fields(weights):
            if f.name in ("config", "activation", "weight_layout"):
                continue
            v = getattr(weights, f.name)
            if v is None:
                continue
            changes[f.name] = self.shard_experts(v) if f.name in _EXPERT_FIELDS else self.replicate(v)
        return dataclasses.replace(weights, **changes)

    # -- the computation -----------------------------------------------------------------------
    def ffn(
        self,
        x: jax.Array,
        expert_ids: jax.Array,
        scores: jax.Array,
        gate_up: GateUp,
        down: Weight,
        *,
        activation: str | Callable[[jax.Array, jax.Array], jax.Array] = "swiglu",
        weight_layout: str | WeightLayout = "enk",
        shared: SharedExpert | None = None,
        out_dtype: Any = None,
        gate_up_bias: Any = None,
        down_bias: jax.Array | None = None,
    ) -> jax.Array:
        """Expert-parallel :func:`jax_moe.ffn.moe_ffn`: same arguments, same result.

        Args:
          x: ``[B, ..., D]`` activations; B (the leading axis) is split over
            :attr:`token_axes`.
          expert_ids: int ``[B, ..., k]`` global expert ids (ids outside [0, E) add 0).
          scores: ``[B, ..., k]`` routing weights.
          gate_up, down: routed expert weights with E split over the expert axis (placed with
            :meth:`shard_experts`, or constrained here); dense or ``QuantizedExperts``.
          activation, weight_layout, out_dtype: as in ``moe_ffn``.
          shared: an optional shared expert (replicated weights).
          gate_up_bias, down_bias: optional expert biases (``[E, 2F]`` or a pair of ``[E, F]``,
            and ``[E, D]``), split along E with the experts.

        Returns:
          ``[B, ..., D]`` in ``out_dtype`` (default ``x.dtype``), split like ``x``. It equals
          ``moe_ffn`` up to the order of the float32 additions that combine the experts.
        """
        x = jnp.asarray(x)
        out_dtype = x.dtype if out_dtype is None else jnp.dtype(out_dtype)
        E = _num_experts(jax.tree_util.tree_leaves(down, is_leaf=_is_leaf)[0])
        if E % self.size:
            raise ValueError(f"ExpertParallel: E = {E} experts cannot be split over the "
                             f"{self.size} devices of mesh axis {self.expert_axis!r}")
        B = x.shape[0] if x.ndim > 1 else 0
        n_tok = 1
        for a in self.token_axes:
            n_tok *= int(self.mesh.shape[a])
        if x.ndim < 2 or B % n_tok:
            raise ValueError(f"ExpertParallel.ffn: the leading axis of x {list(x.shape)} must be "
                             f"a multiple of {n_tok}, the devices of the token axes {self.token_axes}")
        x, expert_ids, scores = self.shard_tokens((x, jnp.asarray(expert_ids), jnp.asarray(scores)))
        gate_up, down, biases = self.shard_experts((gate_up, down, (gate_up_bias, down_bias)))
        if shared is not None:
            shared = self.replicate(shared)
        ea = self.expert_axis
        gather = self.tokens_over_experts

        def body(x, ids, scores, gate_up, down, biases, shared):
            x_own = x
            if gather:  # this device computes its experts for every token of its data shard
                x, ids, scores = (jax.lax.all_gather(a, ea, axis=0, tiled=True)
                                  for a in (x, ids, scores))
            gate_up, down = _localize(gate_up), _localize(down)
            e_local = _num_experts(jax.tree_util.tree_leaves(down, is_leaf=_is_leaf)[0])
            local = local_expert_ids(ids, ea, e_local)
            y = moe_ffn(x, local, scores, gate_up, down, activation=activation,
                        weight_layout=weight_layout, out_dtype=jnp.float32,
                        gate_up_bias=biases[0], down_bias=biases[1])  # remote experts' ids add 0
            if gather:
                y = jax.lax.psum_scatter(y, ea, scatter_dimension=0, tiled=True)
            else:
                y = jax.lax.psum(y, ea)
            if shared is not None:
                y = y + shared_ffn(x_own, shared, activation=activation,
                                   weight_layout=weight_layout)
            return y.astype(out_dtype)

        w_spec = self.expert_spec
        run = jax.shard_map(
            body, mesh=self.mesh,
            in_specs=(self.token_spec, self.token_spec, self.token_spec, w_spec, w_spec, w_spec, P()),
            out_specs=self.token_spec, check_vma=True)
        return run(x, expert_ids, scores, gate_up, down, biases, shared)

    def block(self, x: jax.Array, weights: MoEWeights, *, out_dtype: Any = None,
              return_routing: bool = False):
        """Expert-parallel ``weights(x)`` (:func:`jax_moe.ffn.moe_block`): the float32 router
        runs on each device's tokens, then :meth:`ffn`.

        Returns ``[B, ..., D]`` (and ``(expert_ids, scores)`` when ``return_routing``).
        """
        if not isinstance(weights, MoEWeights):
            raise TypeError(f"weights must be a jax_moe.ffn.MoEWeights; got {type(weights).__name__}")
        x = self.shard_tokens(jnp.asarray(x))
        logits = router_logits(x, weights.router, weights.router_bias)
        ids, scores = weights.config(logits, weights.selection_bias)
        out = self.ffn(x, ids, scores, weights.experts_gate_up, weights.down,
                       activation=weights.activation, weight_layout=weights.weight_layout,
                       shared=weights.shared, out_dtype=out_dtype,
                       gate_up_bias=weights.experts_gate_up_bias, down_bias=weights.down_bias)
        return (out, (ids, scores)) if return_routing else out


def expert_parallel_ffn(
    x: jax.Array,
    expert_ids: jax.Array,
    scores: jax.Array,
    gate_up: GateUp,
    down: Weight,
    *,
    mesh: Mesh,
    expert_axis: str = "expert",
    data_axis: str | tuple[str, ...] | None = "data",
    tokens_over_experts: bool = True,
    **kwargs: Any,
) -> jax.Array:
    """Functional form of :meth:`ExpertParallel.ffn`; ``kwargs`` are ``moe_ffn``'s
    (``activation``, ``weight_layout``, ``shared``, ``out_dtype``, ``gate_up_bias``,
    ``down_bias``)."""
    ep = ExpertParallel(mesh, expert_axis=expert_axis, data_axis=data_axis,
                        tokens_over_experts=tokens_over_experts)
    return ep.ffn(x, expert_ids, scores, gate_up, down, **kwargs)
