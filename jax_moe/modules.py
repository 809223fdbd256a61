"""What the Flax NNX and Linen MoE modules share, framework-free (no flax import here).

``router_config`` turns a module's ``router`` argument into a :class:`RouterConfig`,
``default_kernel_init`` is the expert kernels' default initializer, ``check_options``
validates the options both modules take; ``EXPERT_NAMES`` / ``DOWN_NAMES`` (from ``ffn``) name
the expert weights in the order every module walks them.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from .ffn import ACTIVATIONS, DOWN_NAMES, EXPERT_NAMES  # noqa: F401  (the modules' names)
from .kinds import DENSE_DTYPES, WeightLayout, as_layout
from .routing import RouterConfig



def router_config(router: RouterConfig | int) -> RouterConfig:
    """A module's ``router`` argument (a RouterConfig, or an int k) as a RouterConfig."""
    if isinstance(router, RouterConfig):
        return router
    if isinstance(router, (int, np.integer)) and not isinstance(router, bool):
        return RouterConfig(k=int(router))
    raise TypeError(f"router must be a jax_moe.routing.RouterConfig or an int k; got {router!r}")


def default_kernel_init(weight_layout: str | WeightLayout) -> Callable:
    """LeCun-normal (truncated) per expert: fan-in is K, the contracting dimension, of each
    ``[E, N, K]`` (``"enk"``) or ``[E, K, N]`` (``"ekn"``) kernel; E is a batch axis."""
    enk = as_layout(weight_layout) == WeightLayout.ENK
    return jax.nn.initializers.variance_scaling(
        1.0, "fan_in", "truncated_normal", in_axis=-1 if enk else -2, out_axis=-2 if enk else -1,
        batch_axis=(0,))


def check_options(weight_layout: Any, activation: Any, dtype: Any) -> str:
    """Validate the options both modules take; returns the layout as ``"enk"``/``"ekn"``."""
    layout = as_layout(weight_layout, "MoE: weight_layout").name.lower()
    if not callable(activation) and activation not in ACTIVATIONS:
        raise ValueError(f"MoE: activation must be one of {tuple(ACTIVATIONS)} or a callable "
                         f"act(gate, up); got {activation!r}")
    if jnp.dtype(dtype) not in (jnp.dtype(jnp.float32),) + DENSE_DTYPES:
        raise TypeError(f"MoE: dtype must be bfloat16, float16 or float32; got {jnp.dtype(dtype)}")
    return layout


def dense_compute_error(dtype: Any) -> TypeError:
    """The error for dense experts asked to compute in float32."""
    return TypeError(
        f"MoE(dtype={jnp.dtype(dtype)}): dense experts run in bfloat16 or float16; set "
        f"dtype=jnp.bfloat16, or quantize the experts (module.quantize(...)) to run float32 "
        f"activations through SCALAR_GGUF")
