"""A thin Flax Linen wrapper of the MoE block (see :mod:`jax_moe.nnx` for the NNX module).

::

    import jax_moe.linen
    from jax_moe.routing import RouterConfig

    moe = jax_moe.linen.MoE(1024, 2048, 8, router=RouterConfig.mixtral(k=2))
    variables = moe.init(jax.random.key(0), x)
    moe, variables = moe.quantize(variables, "Q4_K", down_qtype="Q6_K")
    y = jax.jit(moe.apply)(variables, x)

Nothing of the block is in ``"params"``, so ``jax.grad`` over a model's ``"params"`` leaves it
alone (wrap the block's input in ``jax.lax.stop_gradient``): dense expert kernels (and the
shared expert's gate) live in the ``"experts"`` collection, quantized ones (uint8 GGUF blocks)
in ``"quantized"`` with their formats in the module's ``quantization`` field, the router kernel
and bias in ``"router"`` (``"params"`` with ``trainable_router=True``), the selection-only
routing bias in ``"buffers"``. The computation is :func:`jax_moe.ffn.moe_block`, the same as
the NNX module's. Inference-only: a gradient through ``apply`` raises
``jax_moe.InferenceOnlyError``.

Requires ``flax`` (an optional dependency of jax_moe).
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from ._extras import require

nn = require("flax.linen", "flax", "jax_moe.linen")

from flax.core import meta, unfreeze  # noqa: E402

from . import modules as _modules  # noqa: E402
from . import quantized as _quantized  # noqa: E402
from .ffn import MoEWeights, expert_bias_arrays  # noqa: E402
from .kinds import (DENSE_DTYPES, GGMLType, WeightLayout, as_kind, as_qtype,  # noqa: E402
                    expert_qtypes, row_bytes)
from .routing import RouterConfig  # noqa: E402

__all__ = ["MoE", "BUFFERS", "EXPERTS", "QUANTIZED", "ROUTER", "load_blocks"]

#: The collection holding dense expert kernels (and the shared expert's gate).
EXPERTS = "experts"
#: The collection holding quantized expert data.
QUANTIZED = "quantized"
#: The collection holding the router kernel and bias (unless ``trainable_router``).
ROUTER = "router"
#: The collection holding the selection-only routing bias.
BUFFERS = "buffers"


class MoE(nn.Module):
    """Router + experts (+ shared expert) of one MoE block; ``[..., D] -> [..., D]``.

    Fields mirror :class:`jax_moe.nnx.MoE`: ``features`` (D), ``hidden_features`` (F),
    ``num_experts`` (E), ``router`` (a RouterConfig or an int k), ``activation``,
    ``shared_hidden_features``, ``shared_expert_gate``, ``use_router_bias``,
    ``use_selection_bias``, ``use_expert_bias`` (``gate_up_bias [E, 2F]``, or ``gate_bias``/
    ``up_bias [E, F]`` when not fused, and ``down_bias [E, D]``, float32, in ``"experts"``),
    ``weight_layout`` (``"ekn"`` default as in NNX, where ``moe_matmul``
    and ``moe_ffn`` default to ``"enk"``; or ``"enk"``, or a ``WeightLayout``), ``dtype``,
    ``param_dtype``, ``kernel_init``, ``router_init``, ``trainable_router``, ``kind``,
    ``debug_checks``; plus:

    - ``fused_gate_up``: one ``gate_up`` kernel (default) or separate ``gate`` and ``up``;
      ``fused_shared_gate_up`` the same for the shared expert (None: as ``fused_gate_up``).
    - ``quantization``: ``((name, qtype), ...)`` for the kernels held quantized in the
      ``"quantized"`` collection (set by :meth:`quantize` / :meth:`from_weights`).
    """

    features: int
    hidden_features: int
    num_experts: int
    router: RouterConfig | int = 2
    activation: str | Callable = "swiglu"
    shared_hidden_features: int | None = None
    shared_expert_gate: bool = False
    use_router_bias: bool = False
    use_selection_bias: bool = False
    use_expert_bias: bool = False
    weight_layout: str | WeightLayout = "ekn"
    dtype: Any = jnp.bfloat16
    param_dtype: Any = jnp.bfloat16
    fused_gate_up: bool = True
    fused_shared_gate_up: bool | None = None
    quantization: tuple[tuple[str, str], ...] | None = None
    kernel_init: Callable | None = None
    router_init: Callable = nn.initializers.lecun_normal()
    trainable_router: bool = False
    kind: Any = None
    debug_checks: bool = False

    def _layout(self) -> str:
        return _modules.check_options(self.weight_layout, self.activation, self.dtype)

    def _frozen(self, collection: str, name: str, init: Callable, *args: Any) -> Any:
        """A variable of ``collection`` initialized like a param (``init(rng, *args)``)."""
        if collection == "params":
            return self.param(name, init, *args)
        return self.variable(collection, name, lambda: init(self.make_rng("params"), *args)).value

    def _check(self) -> None:
        self._layout()
        if self.shared_expert_gate and self.shared_hidden_features is None:
            raise ValueError("MoE: shared_expert_gate needs a shared expert (shared_hidden_features)")

    def _expert(self, name: str, n: int, k: int, e: int | None) -> Any:
        """A dense kernel param or a QuantizedExperts; ``e`` None: shared (2-d when dense)."""
        quant = dict(self.quantization or ())
        E = 1 if e is None else e
        if name in quant:
            qt = as_qtype(quant[name], f"quantization[{name!r}]")
            var = self.variable(QUANTIZED, name, jnp.zeros, (E, n, row_bytes(qt, k)), jnp.uint8)
            return _quantized.QuantizedExperts(var.value, qt, (E, n, k))
        layout = self._layout()
        shape = (E, n, k) if layout == "enk" else (E, k, n)
        init = self.kernel_init or _modules.default_kernel_init(layout)
        if e is None:
            w = self._frozen(EXPERTS, name, lambda key, s, d: init(key, (1,) + s, d)[0], shape[1:],
                             self.param_dtype)
        else:
            w = self._frozen(EXPERTS, name, init, shape, self.param_dtype)
        if jnp.dtype(self.dtype) not in DENSE_DTYPES:
            raise _modules.dense_compute_error(self.dtype)
        return jnp.asarray(w).astype(self.dtype)

    @nn.compact
    def weights(self) -> MoEWeights:
        """This module's weights as a :class:`jax_moe.ffn.MoEWeights`; inside ``apply``, or
        ``module.apply(variables, method=module.weights)``."""
        self._check()
        D, F, E = self.features, self.hidden_features, self.num_experts
        rc = "params" if self.trainable_router else ROUTER
        router = self._frozen(rc, "router_kernel", self.router_init, (D, E), jnp.float32)
        router_bias = (self._frozen(rc, "router_bias", nn.initializers.zeros, (E,), jnp.float32)
                       if self.use_router_bias else None)
        selection_bias = (self.variable(BUFFERS, "selection_bias", jnp.zeros, (E,), jnp.float32).value
                          if self.use_selection_bias else None)
        if self.fused_gate_up:
            gate_up, gate, up = self._expert("gate_up", 2 * F, D, E), None, None
        else:
            gate_up, gate, up = None, self._expert("gate", F, D, E), self._expert("up", F, D, E)
        down = self._expert("down", D, F, E)
        biases: dict[str, Any] = {}
        if self.use_expert_bias:
            zeros = nn.initializers.zeros
            if self.fused_gate_up:
                biases["gate_up_bias"] = self._frozen(EXPERTS, "gate_up_bias", zeros, (E, 2 * F), jnp.float32)
            else:
                biases["gate_bias"] = self._frozen(EXPERTS, "gate_bias", zeros, (E, F), jnp.float32)
                biases["up_bias"] = self._frozen(EXPERTS, "up_bias", zeros, (E, F), jnp.float32)
            biases["down_bias"] = self._frozen(EXPERTS, "down_bias", zeros, (E, D), jnp.float32)
        s = dict.fromkeys(("shared_gate_up", "shared_gate", "shared_up", "shared_down", "shared_expert_gate"))
        if self.shared_hidden_features is not None:
            Fs = self.shared_hidden_features
            fused = self.fused_gate_up if self.fused_shared_gate_up is None else self.fused_shared_gate_up
            if fused:
                s["shared_gate_up"] = self._expert("shared_gate_up", 2 * Fs, D, None)
            else:
                s["shared_gate"] = self._expert("shared_gate", Fs, D, None)
                s["shared_up"] = self._expert("shared_up", Fs, D, None)
            s["shared_down"] = self._expert("shared_down", D, Fs, None)
            if self.shared_expert_gate:
                s["shared_expert_gate"] = self._frozen(
                    EXPERTS, "shared_expert_gate", lambda key, shape, d: nn.initializers.lecun_normal()(
                        key, shape + (1,), d)[..., 0], (D,), jnp.float32)
        return MoEWeights(router=router, down=down, gate_up=gate_up, gate=gate, up=up,
                          router_bias=router_bias, selection_bias=selection_bias,
                          config=_modules.router_config(self.router), activation=self.activation,
                          weight_layout=self._layout(), **s, **biases)

    def __call__(self, x: jax.Array, *, return_routing: bool = False):
        """``x [..., D]`` -> ``[..., D]`` in ``dtype`` (and ``(expert_ids, scores)`` if asked)."""
        x = jnp.asarray(x)
        if x.shape[-1:] != (self.features,):
            raise ValueError(f"MoE: x must be [..., {self.features}]; got shape {list(x.shape)}")
        return self.weights()(x.astype(self.dtype), return_routing=return_routing,
                              kind=as_kind(self.kind, "MoE: kind"), debug_checks=self.debug_checks)

    # -- conversion (on unbound modules) -------------------------------------------------------
    def quantize(self, variables: Any, qtype: GGMLType | str, *,
                 down_qtype: GGMLType | str | None = None) -> tuple[MoE, dict]:
        """Quantize the dense expert kernels of ``variables`` on the host.

        Returns ``(module, variables)``: a clone of this module whose ``quantization`` names
        the quantized kernels, and variables with those kernels moved from ``"experts"`` to
        ``"quantized"``. ``down_qtype`` (default ``qtype``) is the format of the down kernels;
        a preset such as ``"Q4_K_M"`` (gate/up Q4_K, down Q6_K) sets both
        (``jax_moe.kinds.PRESETS``). Each kernel's sharding and partitioning metadata
        (``nn.Partitioned`` names) carry over to its blocks: E and N keep their axes, an axis on
        K is dropped (GGUF blocks are never split).
        """
        qt, dqt = expert_qtypes(qtype, down_qtype)
        variables = unfreeze(variables)
        experts = dict(variables.get(EXPERTS, {}))
        quantized_vars = dict(variables.get(QUANTIZED, {}))
        quant = dict(self.quantization or ())
        layout = self._layout()
        todo = []
        for name in _modules.EXPERT_NAMES:
            if name not in experts:
                continue
            t = dqt if name in _modules.DOWN_NAMES else qt
            value = meta.unbox(experts[name])
            a = _quantized.experts_enk(jnp.asarray(value).astype(jnp.float32), layout, name, t)
            todo.append((name, a, t, experts[name], value))
        for name, a, t, boxed, value in todo:
            q = _quantized.quantize(a, t)
            shared = name.startswith("shared")
            sharding = _quantized.quantized_sharding(value, layout, shared=shared)
            data = jax.device_put(np.asarray(q.data), sharding, may_alias=True)
            if isinstance(boxed, nn.Partitioned):  # keep the logical axis names, moved like the data
                data = boxed.replace_boxed(data).replace(
                    names=_quantized.quantized_spec(boxed.names, value.ndim, layout, shared=shared))
            quantized_vars[name] = data
            quant[name] = t.name
            del experts[name]
        variables[EXPERTS] = experts
        variables[QUANTIZED] = quantized_vars
        return self.clone(quantization=tuple(sorted(quant.items()))), variables

    @classmethod
    def from_weights(cls, weights: MoEWeights, *, dtype: Any = jnp.bfloat16,
                     trainable_router: bool = False) -> tuple[MoE, dict]:
        """``(module, variables)`` holding ``weights`` (a :class:`jax_moe.ffn.MoEWeights`), e.g.
        from ``jax_moe.gguf.load_block_weights``; quantized weights are kept as they are."""
        if not isinstance(weights, MoEWeights):
            raise TypeError(f"weights must be a jax_moe.ffn.MoEWeights; got {type(weights).__name__}")
        router: dict[str, Any] = {"router_kernel": jnp.asarray(weights.router, jnp.float32)}
        experts: dict[str, Any] = {}
        quantized_vars: dict[str, Any] = {}
        buffers: dict[str, Any] = {}
        quant: dict[str, str] = {}
        param_dtype: Any = jnp.bfloat16
        for name in _modules.EXPERT_NAMES:
            w = getattr(weights, name)
            if w is None:
                continue
            if isinstance(w, _quantized.QuantizedExperts):
                data = w.data if isinstance(w.data, jax.Array) else jax.device_put(np.asarray(w.data), may_alias=True)
                quantized_vars[name] = data
                quant[name] = GGMLType(w.qtype).name
            else:
                w = jnp.asarray(w)
                experts[name] = w[0] if name.startswith("shared") and w.ndim == 3 else w
                param_dtype = w.dtype
        if weights.router_bias is not None:
            router["router_bias"] = jnp.asarray(weights.router_bias, jnp.float32)
        if weights.shared_expert_gate is not None:
            experts["shared_expert_gate"] = jnp.asarray(weights.shared_expert_gate, jnp.float32).reshape(-1)
        if weights.selection_bias is not None:
            buffers["selection_bias"] = jnp.asarray(weights.selection_bias, jnp.float32)
        expert_biases = expert_bias_arrays(weights)  # all or none
        experts.update(expert_biases)
        module = cls(
            features=weights.features, hidden_features=weights.hidden_features,
            num_experts=weights.num_experts, router=weights.config, activation=weights.activation,
            shared_hidden_features=weights.shared_hidden_features,
            shared_expert_gate=weights.shared_expert_gate is not None,
            use_router_bias=weights.router_bias is not None,
            use_selection_bias=weights.selection_bias is not None,
            use_expert_bias=bool(expert_biases), weight_layout=weights.weight_layout, dtype=dtype, param_dtype=param_dtype,
            fused_gate_up=weights.gate_up is not None,
            fused_shared_gate_up=weights.shared_gate_up is not None if weights.shared_down is not None else None,
            quantization=tuple(sorted(quant.items())) or None, trainable_router=trainable_router)
        variables: dict[str, Any] = {"params" if trainable_router else ROUTER: router}
        if experts:
            variables[EXPERTS] = experts
        if quantized_vars:
            variables[QUANTIZED] = quantized_vars
        if buffers:
            variables[BUFFERS] = buffers
        return module, variables

    @classmethod
    def from_gguf(cls, path: str, block: int, *, dtype: Any = jnp.bfloat16,
                  **kwargs: Any) -> tuple[MoE, dict]:
        """``(module, variables)`` of block ``block`` of a GGUF checkpoint (see
        ``jax_moe.gguf.load_block_weights`` for ``kwargs``). Requires the ``gguf`` package."""
        from . import gguf as _gguf

        return cls.from_weights(_gguf.load_block_weights(path, block, **kwargs), dtype=dtype)


def load_blocks(path: str, blocks: Any = None, *, dtype: Any = jnp.bfloat16, progress: bool | None = None,
                **kwargs: Any) -> dict[int, tuple[MoE, dict]]:
    """Many MoE blocks of a GGUF checkpoint as ``{block: (module, variables)}``
    (``jax_moe.gguf.load_blocks``, whose ``kwargs`` these are). Requires the ``gguf`` package."""
    from . import gguf as _gguf

    return {b: MoE.from_weights(w, dtype=dtype)
            for b, w in _gguf.load_blocks(path, blocks, progress=progress, **kwargs).items()}
