"""A thin Flax Linen wrapper of the MoE block (see :mod:`jax_moe.nnx` for the NNX module).

::

    import jax_moe.linen
    from jax_moe.routing import RouterConfig

    moe = jax_moe.linen.MoE(1024, 2048, 8, router=RouterConfig.mixtral(k=2))
    variables = moe.init(jax.random.key(0), x)
    moe, variables = moe.quantize(variables, "Q4_K", down_qtype="Q6_K")
    y = jax.jit(moe.apply)(variables, x)

Dense expert kernels live in ``"params"``; quantized ones (uint8 GGUF blocks) in the
``"quantized"`` collection, with their formats in the module's ``quantization`` field; the
selection-only routing bias in ``"buffers"``. The computation is :func:`jax_moe.ffn.moe_block`,
the same as the NNX module's. Inference-only: ``jax.grad`` through ``apply`` raises
``jax_moe.InferenceOnlyError``.

Requires ``flax`` (an optional dependency of jax_moe).
"""

from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax.core import meta, unfreeze

from . import quantized as _quantized
from .ffn import ACTIVATIONS, MoEWeights
from .kinds import GGMLType, as_qtype, expert_qtypes, row_bytes
from .routing import RouterConfig

__all__ = ["MoE", "QUANTIZED", "BUFFERS"]

#: The collection holding quantized expert data.
QUANTIZED = "quantized"
#: The collection holding the selection-only routing bias.
BUFFERS = "buffers"

_DENSE_COMPUTE = (jnp.dtype(jnp.float16), jnp.dtype(jnp.bfloat16))
_DOWN = ("down", "shared_down")


def _default_kernel_init(enk: bool) -> Callable:
    return nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal",
                                            in_axis=-1 if enk else -2, out_axis=-2 if enk else -1,
                                            batch_axis=(0,))


class MoE(nn.Module):
    """Router + experts (+ shared expert) of one MoE block; ``[..., D] -> [..., D]``.

    Fields mirror :class:`jax_moe.nnx.MoE`: ``features`` (D), ``hidden_features`` (F),
    ``num_experts`` (E), ``router`` (a RouterConfig or an int k), ``activation``,
    ``shared_hidden_features``, ``shared_expert_gate``, ``use_router_bias``,
    ``use_selection_bias``, ``weight_layout`` (``"ekn"`` default, or ``"enk"``), ``dtype``,
    ``param_dtype``, ``kernel_init``, ``router_init``; plus:

    - ``fused_gate_up``: one ``gate_up`` kernel (default) or separate ``gate`` and ``up``;
      ``fused_shared_gate_up`` the same for the shared expert (None: as ``fused_gate_up``).
    - ``quantization``: ``((name, qtype), ...)`` for the kernels held quantized in the
      ``"quantized"`` collection (set by :meth:`quantize` / :meth:`from_weights`).
    """

    features: int
    hidden_features: int
    num_experts: int
    router: RouterConfig | int = 2
    activation: str = "swiglu"
    shared_hidden_features: int | None = None
    shared_expert_gate: bool = False
    use_router_bias: bool = False
    use_selection_bias: bool = False
    weight_layout: str = "ekn"
    dtype: Any = jnp.bfloat16
    param_dtype: Any = jnp.bfloat16
    fused_gate_up: bool = True
    fused_shared_gate_up: bool | None = None
    quantization: tuple[tuple[str, str], ...] | None = None
    kernel_init: Callable | None = None
    router_init: Callable = nn.initializers.lecun_normal()

    def _router_config(self) -> RouterConfig:
        if isinstance(self.router, RouterConfig):
            return self.router
        if isinstance(self.router, (int, np.integer)) and not isinstance(self.router, bool):
            return RouterConfig(k=int(self.router))
        raise TypeError(f"router must be a jax_moe.routing.RouterConfig or an int k; got {self.router!r}")

    def _check(self) -> None:
        if self.weight_layout not in ("enk", "ekn"):
            raise ValueError(f'MoE: weight_layout must be "enk" or "ekn"; got {self.weight_layout!r}')
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"MoE: activation must be one of {tuple(ACTIVATIONS)}; got {self.activation!r}")
        if jnp.dtype(self.dtype) not in (jnp.dtype(jnp.float32),) + _DENSE_COMPUTE:
            raise TypeError(f"MoE: dtype must be bfloat16, float16 or float32; got {self.dtype}")
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
        enk = self.weight_layout == "enk"
        shape = (E, n, k) if enk else (E, k, n)
        init = self.kernel_init or _default_kernel_init(enk)
        if e is None:
            w = self.param(name, lambda key, s, d: init(key, (1,) + s, d)[0], shape[1:], self.param_dtype)
        else:
            w = self.param(name, init, shape, self.param_dtype)
        if jnp.dtype(self.dtype) not in _DENSE_COMPUTE:
            raise TypeError(
                f"MoE(dtype={jnp.dtype(self.dtype)}): dense experts run in bfloat16 or float16; set "
                f"dtype=jnp.bfloat16, or quantize the experts (MoE.quantize) to run float32 "
                f"activations through SCALAR_GGUF")
        return jnp.asarray(w).astype(self.dtype)

    @nn.compact
    def weights(self) -> MoEWeights:
        """This module's weights as a :class:`jax_moe.ffn.MoEWeights`; inside ``apply``, or
        ``module.apply(variables, method=module.weights)``."""
        self._check()
        D, F, E = self.features, self.hidden_features, self.num_experts
        router = self.param("router_kernel", self.router_init, (D, E), jnp.float32)
        router_bias = (self.param("router_bias", nn.initializers.zeros, (E,), jnp.float32)
                       if self.use_router_bias else None)
        selection_bias = (self.variable(BUFFERS, "selection_bias", jnp.zeros, (E,), jnp.float32).value
                          if self.use_selection_bias else None)
        if self.fused_gate_up:
            gate_up, gate, up = self._expert("gate_up", 2 * F, D, E), None, None
        else:
            gate_up, gate, up = None, self._expert("gate", F, D, E), self._expert("up", F, D, E)
        down = self._expert("down", D, F, E)
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
                s["shared_expert_gate"] = self.param(
                    "shared_expert_gate", lambda key, shape, d: nn.initializers.lecun_normal()(
                        key, shape + (1,), d)[..., 0], (D,), jnp.float32)
        return MoEWeights(router=router, down=down, gate_up=gate_up, gate=gate, up=up,
                          router_bias=router_bias, selection_bias=selection_bias,
                          config=self._router_config(), activation=self.activation,
                          weight_layout=self.weight_layout, **s)

    def __call__(self, x: jax.Array, *, return_routing: bool = False):
        """``x [..., D]`` -> ``[..., D]`` in ``dtype`` (and ``(expert_ids, scores)`` if asked)."""
        x = jnp.asarray(x)
        if x.shape[-1:] != (self.features,):
            raise ValueError(f"MoE: x must be [..., {self.features}]; got shape {list(x.shape)}")
        return self.weights()(x.astype(self.dtype), return_routing=return_routing)

    # -- conversion (on unbound modules) -------------------------------------------------------
    def quantize(self, variables: Any, qtype: GGMLType | str, *,
                 down_qtype: GGMLType | str | None = None) -> tuple[MoE, dict]:
        """Quantize the dense expert kernels of ``variables`` on the host.

        Returns ``(module, variables)``: a clone of this module whose ``quantization`` names
        the quantized kernels, and variables with those kernels moved from ``"params"`` to
        ``"quantized"``. ``down_qtype`` (default ``qtype``) is the format of the down kernels;
        a preset such as ``"Q4_K_M"`` (gate/up Q4_K, down Q6_K) sets both (``jax_moe.kinds.PRESETS``).
        """
        qt, dqt = expert_qtypes(qtype, down_qtype)
        variables = unfreeze(variables)
        params = dict(variables.get("params", {}))
        quantized_vars = dict(variables.get(QUANTIZED, {}))
        quant = dict(self.quantization or ())
        todo = []
        for name in ("gate_up", "gate", "up", "down", "shared_gate_up", "shared_gate", "shared_up",
                     "shared_down"):
            if name not in params:
                continue
            t = dqt if name in _DOWN else qt
            a = _quantized.experts_enk(jnp.asarray(meta.unbox(params[name])).astype(jnp.float32), self.weight_layout, name, t)
            todo.append((name, a, t))
        for name, a, t in todo:
            q = _quantized.quantize(a, t)
            quantized_vars[name] = jax.device_put(np.asarray(q.data), may_alias=True)
            quant[name] = t.name
            del params[name]
        variables["params"] = params
        variables[QUANTIZED] = quantized_vars
        return self.clone(quantization=tuple(sorted(quant.items()))), variables

    @classmethod
    def from_weights(cls, weights: MoEWeights, *, dtype: Any = jnp.bfloat16) -> tuple[MoE, dict]:
        """``(module, variables)`` holding ``weights`` (a :class:`jax_moe.ffn.MoEWeights`), e.g.
        from ``jax_moe.gguf.load_block_weights``; quantized weights are kept as they are."""
        if not isinstance(weights, MoEWeights):
            raise TypeError(f"weights must be a jax_moe.ffn.MoEWeights; got {type(weights).__name__}")
        params: dict[str, Any] = {"router_kernel": jnp.asarray(weights.router, jnp.float32)}
        quantized_vars: dict[str, Any] = {}
        buffers: dict[str, Any] = {}
        quant: dict[str, str] = {}
        param_dtype: Any = jnp.bfloat16
        for name in ("gate_up", "gate", "up", "down", "shared_gate_up", "shared_gate", "shared_up",
                     "shared_down"):
            w = getattr(weights, name)
            if w is None:
                continue
            if isinstance(w, _quantized.QuantizedExperts):
                data = w.data if isinstance(w.data, jax.Array) else jax.device_put(np.asarray(w.data), may_alias=True)
                quantized_vars[name] = data
                quant[name] = GGMLType(w.qtype).name
            else:
                w = jnp.asarray(w)
                params[name] = w[0] if name.startswith("shared") and w.ndim == 3 else w
                param_dtype = w.dtype
        if weights.router_bias is not None:
            params["router_bias"] = jnp.asarray(weights.router_bias, jnp.float32)
        if weights.shared_expert_gate is not None:
            params["shared_expert_gate"] = jnp.asarray(weights.shared_expert_gate, jnp.float32).reshape(-1)
        if weights.selection_bias is not None:
            buffers["selection_bias"] = jnp.asarray(weights.selection_bias, jnp.float32)
        module = cls(
            features=weights.features, hidden_features=weights.hidden_features,
            num_experts=weights.num_experts, router=weights.config, activation=weights.activation,
            shared_hidden_features=weights.shared_hidden_features,
            shared_expert_gate=weights.shared_expert_gate is not None,
            use_router_bias=weights.router_bias is not None,
            use_selection_bias=weights.selection_bias is not None,
            weight_layout=weights.weight_layout, dtype=dtype, param_dtype=param_dtype,
            fused_gate_up=weights.gate_up is not None,
            fused_shared_gate_up=weights.shared_gate_up is not None if weights.shared_down is not None else None,
            quantization=tuple(sorted(quant.items())) or None)
        variables: dict[str, Any] = {"params": params}
        if quantized_vars:
            variables[QUANTIZED] = quantized_vars
        if buffers:
            variables[BUFFERS] = buffers
        return module, variables
