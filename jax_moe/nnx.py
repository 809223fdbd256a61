"""A Flax NNX MoE block: router + routed experts (+ shared expert) on ``moe_matmul``.

::

    from flax import nnx
    import jax_moe.nnx
    from jax_moe.routing import RouterConfig

    moe = jax_moe.nnx.MoE(1024, 2048, num_experts=8, router=RouterConfig.mixtral(k=2),
                          rngs=nnx.Rngs(0))
    moe.quantize("Q4_K", down_qtype="Q6_K")      # in place: experts become GGUF blocks
    y = nnx.jit(lambda m, x: m(x))(moe, x)        # x [..., 1024] -> y [..., 1024]

The module is inference-only, and its weights are not ``nnx.Param``: dense expert kernels are
:class:`ExpertWeight` variables, quantized ones :class:`QuantizedWeight` (an ExpertWeight whose
value is the uint8 block data and whose metadata holds the GGUF format and logical shape), the
router kernel and bias :class:`RouterWeight` (``nnx.Param`` with ``trainable_router=True``), the
selection-only routing bias :class:`RoutingBias`. So ``nnx.grad`` and optimizers (which take
``nnx.Param`` by default) leave the block alone, and a model holding a frozen MoE block trains
its other layers with the MoE's input wrapped in ``jax.lax.stop_gradient``::

    def loss(model, x):
        h = model.dense(x)
        return (h + model.moe(jax.lax.stop_gradient(h))).sum()   # the MoE adds no gradient
    grads = nnx.grad(loss)(model, x)

A gradient that would flow through the block (a trainable router, or a missing
``stop_gradient``) raises ``jax_moe.InferenceOnlyError``; to leave parameters of your own out
of the differentiated state, filter them: ``nnx.grad(loss, argnums=nnx.DiffState(0,
nnx.All(nnx.Param, nnx.Not(nnx.PathContains("moe")))))``.

Requires ``flax`` (an optional dependency of jax_moe).
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from ._extras import require

nnx = require("flax.nnx", "flax", "jax_moe.nnx")

from . import modules as _modules  # noqa: E402
from . import quantized as _quantized  # noqa: E402
from .ffn import MoEWeights, expert_bias_arrays  # noqa: E402
from .kinds import DENSE_DTYPES, GGMLType, WeightLayout, as_kind, expert_qtypes  # noqa: E402
from .routing import RouterConfig  # noqa: E402

__all__ = ["ExpertWeight", "MoE", "QuantizedWeight", "RouterWeight", "RoutingBias", "load_blocks"]

_SHARED_NAMES = ("shared_gate_up", "shared_gate", "shared_up", "shared_down")


class ExpertWeight(nnx.Variable):
    """Dense expert kernels (and the shared expert's gate): inference-only state, not an
    ``nnx.Param``, so ``nnx.grad`` and ``nnx.Optimizer`` (``wrt=nnx.Param``) leave it alone."""


class RouterWeight(nnx.Variable):
    """The router kernel ``[D, E]`` and bias ``[E]`` of a frozen block (not an ``nnx.Param``;
    ``MoE(trainable_router=True)`` makes them ``nnx.Param``)."""


class QuantizedWeight(ExpertWeight):
    """GGUF-quantized expert weights (not trainable).

    The value is the uint8 block data ``[E, N, K // QK * block_bytes]``; the metadata
    ``qtype`` (a ``GGMLType``) and ``logical_shape`` ``(E, N, K)`` complete a
    ``QuantizedExperts``.
    """

    def experts(self) -> _quantized.QuantizedExperts:
        """This variable as a ``QuantizedExperts`` (works on traced values under jit)."""
        return _quantized.QuantizedExperts(self[...], self.qtype, self.logical_shape)


class RoutingBias(nnx.Variable):
    """A selection-only routing bias ``[E]`` (DeepSeek-V3's ``e_score_correction_bias``).

    Not trainable by gradient: aux-loss-free balancing updates it outside the optimizer.
    """


def _quantized_variable(q: _quantized.QuantizedExperts, sharding: Any = None,
                        **metadata: Any) -> QuantizedWeight:
    if isinstance(q.data, jax.Array) and sharding is None:
        data = q.data
    else:
        data = jax.device_put(np.asarray(q.data), sharding, may_alias=True)
    var = QuantizedWeight(data, qtype=GGMLType(q.qtype), logical_shape=tuple(q.shape))
    if metadata:  # after construction: the data is placed already (no eager resharding)
        var.set_metadata(**metadata)
    return var


def _quantized_placement(var: nnx.Variable, value: Any, layout: str, shared: bool
                         ) -> tuple[Any, dict]:
    """The sharding and metadata a dense expert variable's quantized blocks keep: E and N stay
    where they were (on the same mesh), K's axis is dropped (blocks are never split)."""
    metadata = {k: v for k, v in var.get_metadata().items()
                if k not in ("qtype", "logical_shape")}
    for key in ("out_sharding", "sharding"):  # Flax's partitioning metadata (logical names)
        if metadata.get(key) is not None:
            metadata[key] = _quantized.quantized_spec(metadata[key], value.ndim, layout, shared=shared)
    return _quantized.quantized_sharding(value, layout, shared=shared), metadata


class MoE(nnx.Module):
    """Router + experts (+ shared expert) of one MoE block; ``[..., D] -> [..., D]``.

    Args:
      features: D, the model dimension.
      hidden_features: F, the hidden size of each expert.
      num_experts: E.
      router: a :class:`RouterConfig` (``RouterConfig.mixtral(k=2)``, ...) or an int k
        (softmax, top-k, not renormalized).
      activation: ``"swiglu"``, ``"geglu"``, ``"geglu_erf"``, ``"reglu"``, ``"gpt_oss"``, or a
        hashable callable ``act(gate, up)`` such as ``jax_moe.ffn.GptOssActivation(limit=...)``.
      shared_hidden_features: Fs, to add a shared expert (None: no shared expert).
      shared_expert_gate: gate the shared expert with ``sigmoid(x @ g)`` (Qwen2-MoE).
      router_bias: add an ``[E]`` bias to the router logits (gpt-oss), held like the router kernel.
      expert_bias: give the experts biases (gpt-oss): ``gate_up_bias [E, 2F]`` (gate entries
        first) and ``down_bias [E, D]``, float32 :class:`ExpertWeight` s, zeros at init.
      selection_bias: add a :class:`RoutingBias` ``[E]`` used for selection only (DeepSeek-V3).
      weight_layout: ``"ekn"`` (Flax's kernel layout ``[E, D_in, D_out]``, the default here;
        ``moe_matmul``/``moe_ffn`` default to ``"enk"``) or ``"enk"`` (GGUF's
        ``[E, D_out, D_in]``), or a ``WeightLayout``, for the dense expert kernels.
      dtype: computation dtype of the experts: bfloat16/float16 (WMMA and WMMA_GGUF kinds) or
        float32 (quantized experts only: SCALAR_GGUF). The output has this dtype.
      param_dtype: dtype of the dense expert kernels (the router kernel is float32).
      kernel_init: initializer of the expert kernels (default: LeCun normal per expert).
      router_init: initializer of the router kernel ``[D, E]``.
      trainable_router: hold the router kernel and bias as ``nnx.Param`` (default: as
        :class:`RouterWeight`, frozen like the experts). The block's output depends on the
        router only through the routing scores, which moe_matmul cannot differentiate, so only
        gradients that reach the router by another path (an auxiliary loss on its logits) work.
      kind: the ``MoeKind`` every projection runs (default None: WMMA for dense experts,
        WMMA_GGUF for quantized ones with bfloat16/float16 ``dtype``, SCALAR_GGUF with float32);
        ``jax_moe.explain`` says what a kind runs on a platform.
      debug_checks: checkify-check the routing (ids in ``[0, E)``, finite scores): call the
        module under ``jax.experimental.checkify.checkify``.
      rngs: ``nnx.Rngs``.

    Variables: ``router_kernel [D, E]``; ``gate_up`` (``[E, D, 2F]`` in ``"ekn"``, gate columns
    first) or ``gate``/``up``; ``down`` (``[E, F, D]`` in ``"ekn"``); optionally
    ``router_bias``, ``selection_bias``, ``gate_up_bias [E, 2F]`` (or ``gate_bias``/``up_bias``
    ``[E, F]``) and ``down_bias [E, D]``, ``shared_gate_up [D, 2Fs]``, ``shared_down [Fs, D]``,
    ``shared_expert_gate [D]``. Quantized experts are always ``[E, N, K]`` blocks.
    """

    def __init__(
        self,
        features: int,
        hidden_features: int,
        num_experts: int,
        *,
        router: RouterConfig | int = 2,
        activation: str | Callable = "swiglu",
        shared_hidden_features: int | None = None,
        shared_expert_gate: bool = False,
        router_bias: bool = False,
        selection_bias: bool = False,
        expert_bias: bool = False,
        weight_layout: str | WeightLayout = "ekn",
        dtype: Any = jnp.bfloat16,
        param_dtype: Any = jnp.bfloat16,
        kernel_init: Callable | None = None,
        router_init: Callable | None = None,
        trainable_router: bool = False,
        kind: Any = None,
        debug_checks: bool = False,
        rngs: nnx.Rngs,
    ):
        for name, v in (("features", features), ("hidden_features", hidden_features),
                        ("num_experts", num_experts)):
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
                raise ValueError(f"MoE: {name} must be a positive int; got {v!r}")
        weight_layout = _modules.check_options(weight_layout, activation, dtype)
        dtype = jnp.dtype(dtype)
        self.features = int(features)
        self.hidden_features = int(hidden_features)
        self.num_experts = int(num_experts)
        self.router_config = _modules.router_config(router)
        if self.router_config.k > self.num_experts:
            raise ValueError(f"MoE: router k={self.router_config.k} exceeds num_experts={num_experts}")
        self.activation = activation
        self.weight_layout = weight_layout
        self.dtype = dtype
        self.param_dtype = jnp.dtype(param_dtype)
        self.trainable_router = bool(trainable_router)
        self.kind = as_kind(kind, "MoE: kind")
        self.debug_checks = bool(debug_checks)
        router_var = nnx.Param if self.trainable_router else RouterWeight

        D, F, E = self.features, self.hidden_features, self.num_experts
        enk = weight_layout == "enk"
        if kernel_init is None:
            kernel_init = _modules.default_kernel_init(weight_layout)
        if router_init is None:
            router_init = nnx.initializers.lecun_normal()

        def expert_shape(n: int, k: int, e: int = E) -> tuple[int, ...]:
            return (e, n, k) if enk else (e, k, n)

        self.router_kernel = router_var(router_init(rngs.params(), (D, E), jnp.float32))
        self.router_bias = nnx.data(router_var(jnp.zeros((E,), jnp.float32)) if router_bias else None)
        self.selection_bias = nnx.data(RoutingBias(jnp.zeros((E,), jnp.float32)) if selection_bias else None)
        self.gate_up = ExpertWeight(kernel_init(rngs.params(), expert_shape(2 * F, D), self.param_dtype))
        self.gate = nnx.data(None)
        self.up = nnx.data(None)
        self.down = ExpertWeight(kernel_init(rngs.params(), expert_shape(D, F), self.param_dtype))
        self.gate_up_bias = nnx.data(ExpertWeight(jnp.zeros((E, 2 * F), jnp.float32)) if expert_bias else None)
        self.gate_bias = nnx.data(None)
        self.up_bias = nnx.data(None)
        self.down_bias = nnx.data(ExpertWeight(jnp.zeros((E, D), jnp.float32)) if expert_bias else None)

        self.shared_hidden_features = None if shared_hidden_features is None else int(shared_hidden_features)
        for name in _SHARED_NAMES + ("shared_expert_gate",):
            setattr(self, name, nnx.data(None))
        if self.shared_hidden_features is not None:
            Fs = self.shared_hidden_features
            self.shared_gate_up = ExpertWeight(kernel_init(rngs.params(), expert_shape(2 * Fs, D, 1),
                                                        self.param_dtype)[0])
            self.shared_down = ExpertWeight(kernel_init(rngs.params(), expert_shape(D, Fs, 1),
                                                     self.param_dtype)[0])
            if shared_expert_gate:
                self.shared_expert_gate = ExpertWeight(
                    nnx.initializers.lecun_normal()(rngs.params(), (D, 1), jnp.float32)[:, 0])
        elif shared_expert_gate:
            raise ValueError("MoE: shared_expert_gate needs a shared expert (shared_hidden_features)")

    # -- forward -------------------------------------------------------------------------------
    def weights(self) -> MoEWeights:
        """The current weights as a :class:`jax_moe.ffn.MoEWeights` (dense kernels in ``dtype``)."""

        def get(var: Any) -> Any:
            if var is None:
                return None
            if isinstance(var, QuantizedWeight):
                return var.experts()
            return jnp.asarray(var[...])

        def expert(var: Any) -> Any:
            w = get(var)
            if w is None or isinstance(w, _quantized.QuantizedExperts):
                return w
            if self.dtype not in DENSE_DTYPES:
                raise _modules.dense_compute_error(self.dtype)
            return w.astype(self.dtype)

        return MoEWeights(
            router=get(self.router_kernel), down=expert(self.down), gate_up=expert(self.gate_up),
            gate=expert(self.gate), up=expert(self.up), router_bias=get(self.router_bias),
            selection_bias=get(self.selection_bias), shared_gate_up=expert(self.shared_gate_up),
            shared_gate=expert(self.shared_gate), shared_up=expert(self.shared_up),
            shared_down=expert(self.shared_down), shared_expert_gate=get(self.shared_expert_gate),
            gate_up_bias=get(self.gate_up_bias), gate_bias=get(self.gate_bias),
            up_bias=get(self.up_bias), down_bias=get(self.down_bias), config=self.router_config,
            activation=self.activation, weight_layout=self.weight_layout)

    def __call__(self, x: jax.Array, *, return_routing: bool = False):
        """``x [..., D]`` -> ``[..., D]`` in ``dtype`` (and ``(expert_ids, scores)`` if asked)."""
        x = jnp.asarray(x)
        if x.shape[-1:] != (self.features,):
            raise ValueError(f"MoE: x must be [..., {self.features}]; got shape {list(x.shape)}")
        return self.weights()(x.astype(self.dtype), return_routing=return_routing,
                              kind=self.kind, debug_checks=self.debug_checks)

    def explain(self, x: Any, *, platform: str | None = None) -> str:
        """Which kind, platform and kernel path each projection of ``self(x)`` takes
        (``x [..., D]``: an array or ``jax.ShapeDtypeStruct``); see :func:`jax_moe.explain`."""
        return self.weights().explain(jax.ShapeDtypeStruct(x.shape, self.dtype), kind=self.kind,
                                      platform=platform)

    # -- conversion ----------------------------------------------------------------------------
    def quantize(self, qtype: GGMLType | str, *, down_qtype: GGMLType | str | None = None) -> MoE:
        """Quantize the dense expert kernels in place (on the host); returns ``self``.

        Args:
          qtype: GGUF format of the gate/up kernels (``"Q4_K"``, ``GGMLType.Q8_0``, ...), or
            a llama.cpp preset that sets both formats: ``"Q4_K_M"`` (gate/up Q4_K, down Q6_K),
            ``"Q5_K_M"``, ``"Q3_K_M"`` (see ``jax_moe.kinds.PRESETS``).
          down_qtype: format of the down kernels (default ``qtype``).

        The shared expert's kernels get the same formats. The router stays float32. Each kernel's
        contracting dimension must be a multiple of the format's block size (32 or 256). Each
        kernel's sharding and partitioning metadata (``out_sharding``) carry over to its blocks:
        E and N keep their mesh axes, an axis on K is dropped (GGUF blocks are never split).
        """
        qt, dqt = expert_qtypes(qtype, down_qtype)
        plan = {name: dqt if name in _modules.DOWN_NAMES else qt for name in _modules.EXPERT_NAMES}
        todo = []
        for name, t in plan.items():
            var = getattr(self, name)
            if not isinstance(var, (ExpertWeight, nnx.Param)) or isinstance(var, QuantizedWeight):
                continue
            value = var[...]
            a = _quantized.experts_enk(jnp.asarray(value).astype(jnp.float32), self.weight_layout, name, t)
            placement = _quantized_placement(var, value, self.weight_layout, name.startswith("shared"))
            todo.append((name, a, t, placement))
        for name, a, t, (sharding, metadata) in todo:  # all checked before anything changes
            setattr(self, name, _quantized_variable(_quantized.quantize(a, t), sharding, **metadata))
        return self

    @classmethod
    def from_weights(cls, weights: MoEWeights, *, dtype: Any = jnp.bfloat16,
                     trainable_router: bool = False) -> MoE:
        """Build a module holding ``weights`` (a :class:`jax_moe.ffn.MoEWeights`), e.g. from
        ``jax_moe.gguf.load_block_weights``; quantized weights are kept as they are."""
        if not isinstance(weights, MoEWeights):
            raise TypeError(f"weights must be a jax_moe.ffn.MoEWeights; got {type(weights).__name__}")
        D, E, F = weights.features, weights.num_experts, weights.hidden_features
        Fs = weights.shared_hidden_features
        param_dtype = jnp.bfloat16
        for w in (weights.gate_up, weights.gate, weights.down):
            if w is not None and not isinstance(w, _quantized.QuantizedExperts):
                param_dtype = w.dtype
        kwargs = dict(
            router=weights.config, activation=weights.activation, shared_hidden_features=Fs,
            shared_expert_gate=weights.shared_expert_gate is not None,
            router_bias=weights.router_bias is not None,
            selection_bias=weights.selection_bias is not None, weight_layout=weights.weight_layout,
            dtype=dtype, param_dtype=param_dtype, trainable_router=trainable_router)
        # Abstract construction: no random initialization of weights that are replaced anyway.
        module = nnx.eval_shape(lambda: cls(D, F, E, rngs=nnx.Rngs(0), **kwargs))

        def var(w: Any, kind: type = ExpertWeight, squeeze: bool = False) -> Any:
            if w is None:
                return None
            if isinstance(w, _quantized.QuantizedExperts):
                return _quantized_variable(w)
            w = jnp.asarray(w)
            if squeeze and w.ndim == 3:
                w = w[0]
            return kind(w)

        def put(name: str, value: Any) -> None:
            setattr(module, name, nnx.data(value))

        router_var = nnx.Param if trainable_router else RouterWeight
        put("router_kernel", var(jnp.asarray(weights.router, jnp.float32), router_var))
        put("router_bias", var(weights.router_bias, router_var))
        put("selection_bias", var(weights.selection_bias, RoutingBias))
        put("gate_up", var(weights.gate_up))
        put("gate", var(weights.gate))
        put("up", var(weights.up))
        put("down", var(weights.down))
        put("shared_gate_up", var(weights.shared_gate_up, squeeze=True))
        put("shared_gate", var(weights.shared_gate, squeeze=True))
        put("shared_up", var(weights.shared_up, squeeze=True))
        put("shared_down", var(weights.shared_down, squeeze=True))
        put("shared_expert_gate", var(weights.shared_expert_gate))
        for name, value in expert_bias_arrays(weights).items():  # all or none
            put(name, var(value))
        for path, leaf in jax.tree_util.tree_leaves_with_path(nnx.state(module)):
            if isinstance(leaf, jax.ShapeDtypeStruct):  # pragma: no cover - a bug if reached
                raise AssertionError(f"MoE.from_weights left {path} uninitialized")
        return module

    @classmethod
    def from_gguf(cls, path: str, block: int, *, dtype: Any = jnp.bfloat16, **kwargs: Any) -> MoE:
        """Load block ``block`` of a GGUF checkpoint (see ``jax_moe.gguf.load_block_weights``
        for ``kwargs``). Requires the ``gguf`` package."""
        from . import gguf as _gguf

        return cls.from_weights(_gguf.load_block_weights(path, block, **kwargs), dtype=dtype)


def load_blocks(path: str, blocks: Any = None, *, dtype: Any = jnp.bfloat16, progress: bool | None = None,
                **kwargs: Any) -> dict[int, MoE]:
    """Many MoE blocks of a GGUF checkpoint as ``{block: MoE}`` (``jax_moe.gguf.load_blocks``,
    whose ``kwargs`` these are: every block with expert tensors by default, a progress bar when
    loading more than one). Requires the ``gguf`` package."""
    from . import gguf as _gguf

    return {b: MoE.from_weights(w, dtype=dtype)
            for b, w in _gguf.load_blocks(path, blocks, progress=progress, **kwargs).items()}
