"""The expert FFN of an MoE block on top of ``moe_matmul``, and the whole block (router + FFN).

``moe_ffn`` runs the routed experts of each token::

    gate, up = W_gate[e] @ x + b_gate[e], W_up[e] @ x + b_up[e]   (one moe_matmul for the fused gate+up)
    h        = act(gate, up)                        (SwiGLU: silu(gate) * up, GeGLU, gpt-oss, ...)
    out      = sum_j scores[t, j] * (W_down[e_j] @ h_j + b_down[e_j])   (one moe_matmul, reduced over the k)
    out     += sigmoid(x @ g) * shared_ffn(x)      (optional shared expert, optional gate g)

The expert biases (gpt-oss has them; every ``b`` is optional) are applied around the kernels, in
float32: the gate/up bias is gathered per routed pair inside the activation's elementwise work
(XLA fuses the gather, the add and the activation into one pass over the gate/up output), and the
down bias, weighted by the routing scores, is added to the reduced output before its one rounding.

Every weight is, independently, dense (float16/bfloat16, ``[E, N, K]`` or ``[E, K, N]``) or a
``QuantizedExperts`` in any GGUF format: a gate+up in Q4_K with a down projection in Q6_K (as
in llama.cpp's Q4_K_M files) just works. ``moe_block`` adds the router in front
(``jax_moe.routing``) and ``MoEWeights`` bundles a block's weights as one pytree.

Dtypes. A dense projection computes in its weight's dtype (its input is cast to it); a
quantized projection computes in the dtype of ``x``: float32 ``x`` runs SCALAR_GGUF,
float16/bfloat16 ``x`` runs WMMA_GGUF. The activation function runs in float32 and its result
is cast to the down projection's compute dtype. With a shared expert the routed and shared
outputs are added in float32 and rounded once to the output dtype.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, NamedTuple, Union

import jax
import jax.numpy as jnp
import numpy as np

from . import ops as _ops
from . import quantized as _quantized
from .kinds import DENSE_DTYPES, WeightLayout, as_layout
from .routing import RouterConfig
from .shapes import layout_hint

QuantizedExperts = _quantized.QuantizedExperts

__all__ = [
    "ACTIVATIONS",
    "GptOssActivation",
    "MoEWeights",
    "SharedExpert",
    "deinterleave_gate_up",
    "fuse_gate_up",
    "moe_block",
    "moe_ffn",
]

#: A dense ``jax.Array`` (float16/bfloat16) or a ``QuantizedExperts``.
Weight = Union[jax.Array, QuantizedExperts]
#: Fused gate+up weights (gate rows first, then up rows), or a ``(gate, up)`` pair.
GateUp = Union[Weight, "tuple[Weight, Weight]"]

#: The expert kernels of a block (routed, then shared), as ``MoEWeights`` and the modules name them.
EXPERT_NAMES = ("gate_up", "gate", "up", "down", "shared_gate_up", "shared_gate", "shared_up",
                "shared_down")
#: The down projections among them (``quantize``'s ``down_qtype`` applies to these).
DOWN_NAMES = ("down", "shared_down")

_DENSE_DTYPES = DENSE_DTYPES
_ACT_DTYPES = (jnp.dtype(jnp.float32),) + _DENSE_DTYPES


def _swiglu(gate: jax.Array, up: jax.Array) -> jax.Array:
    return jax.nn.silu(gate) * up


def _geglu(gate: jax.Array, up: jax.Array) -> jax.Array:
    return jax.nn.gelu(gate, approximate=True) * up


def _geglu_erf(gate: jax.Array, up: jax.Array) -> jax.Array:
    return jax.nn.gelu(gate, approximate=False) * up


def _reglu(gate: jax.Array, up: jax.Array) -> jax.Array:
    return jax.nn.relu(gate) * up


@dataclasses.dataclass(frozen=True)
class GptOssActivation:
    """gpt-oss's clamped SwiGLU: ``g = min(gate, limit)``, ``u = clip(up, -limit, limit)``,
    ``(u + 1) * g * sigmoid(alpha * g)`` (Hugging Face's ``GptOssExperts``, llama.cpp's
    ``swiglu_oai``). Hashable, so it can stand where an activation name does (``MoEWeights``, the
    Flax modules' ``activation``); ``"gpt_oss"`` is ``GptOssActivation()``.

    Attributes:
      alpha: the sigmoid's slope (1.702 in gpt-oss).
      limit: the clamp (7.0 in gpt-oss; ``inf`` turns the clamps off).
    """

    alpha: float = 1.702
    limit: float = 7.0

    def __post_init__(self) -> None:
        for name in ("alpha", "limit"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float, np.floating, np.integer)) or np.isnan(v):
                raise ValueError(f"GptOssActivation: {name} must be a number; got {v!r}")
            object.__setattr__(self, name, float(v))
        if not self.limit > 0:
            raise ValueError(f"GptOssActivation: limit must be > 0; got {self.limit!r}")

    def __call__(self, gate: jax.Array, up: jax.Array) -> jax.Array:
        """``gate``, ``up``: float ``[..., F]``; returns ``[..., F]`` in their dtype."""
        g = jnp.minimum(gate, self.limit)
        u = jnp.clip(up, -self.limit, self.limit)
        return (u + 1) * (g * jax.nn.sigmoid(self.alpha * g))


#: Gated activations by name: ``act(gate, up)``. ``"geglu"`` is GELU's tanh approximation
#: (ggml's and Gemma's GELU), ``"geglu_erf"`` the exact one; ``"gpt_oss"`` is gpt-oss's clamped
#: SwiGLU with its defaults (:class:`GptOssActivation` for another alpha or limit).
ACTIVATIONS: dict[str, Callable[[jax.Array, jax.Array], jax.Array]] = {
    "swiglu": _swiglu,
    "geglu": _geglu,
    "geglu_erf": _geglu_erf,
    "reglu": _reglu,
    "gpt_oss": GptOssActivation(),
}


class SharedExpert(NamedTuple):
    """A shared expert (one dense FFN every token goes through), held as experts with E = 1.

    Attributes:
      gate_up: fused ``[1, 2*Fs, D]`` (or a ``(gate, up)`` pair of ``[1, Fs, D]``); dense
        weights may drop the leading 1 and follow the same ``weight_layout`` as the routed ones.
      down: ``[1, D, Fs]``.
      gate: optional ``[D]`` weight of a per-token sigmoid gate on the shared output
        (Qwen2-MoE's ``shared_expert_gate``, GGUF ``ffn_gate_inp_shexp``).
    """

    gate_up: Any
    down: Any
    gate: Any = None


@dataclasses.dataclass(frozen=True)
class _W:
    """A validated projection weight: the value to pass to moe_matmul and its logical dims."""

    w: Any
    quantized: bool
    E: int
    N: int
    K: int
    layout: str


def _check_layout(weight_layout: str | WeightLayout) -> str:
    """A WeightLayout or its name as the name ``"enk"``/``"ekn"`` (ValueError otherwise)."""
    return as_layout(weight_layout).name.lower()


def _hint(w: _W, d: int) -> str:
    """The other-layout hint for a dense weight that should contract over ``d``."""
    return "" if w.quantized else layout_hint(as_layout(w.layout), w.w.shape, d)


def _weight(w: Any, name: str, layout: str, *, allow_2d: bool = False) -> _W:
    if isinstance(w, QuantizedExperts):
        return _W(w, True, w.E, w.N, w.K, "enk")
    if isinstance(w, (tuple, list)) or not hasattr(w, "shape") or not hasattr(w, "dtype"):
        raise TypeError(f"{name} must be a dense array or a QuantizedExperts; got {type(w).__name__}")
    w = jnp.asarray(w)
    if allow_2d and w.ndim == 2:
        w = w[None]
    if w.ndim != 3:
        want = "[E, N, K]" if layout == "enk" else "[E, K, N]"
        raise ValueError(f"{name} must be a 3-d array {want} (weight_layout={layout!r}); "
                         f"got shape {list(w.shape)}")
    if w.dtype not in _DENSE_DTYPES:
        raise TypeError(f"{name}: dense expert weights must be float16 or bfloat16; got {w.dtype} "
                        f"(cast them, or quantize them with jax_moe.quantize)")
    if layout == "enk":
        E, N, K = w.shape
    else:
        E, K, N = w.shape
    return _W(w, False, int(E), int(N), int(K), layout)


def _project(x: jax.Array, ids: jax.Array, w: _W, scores: jax.Array | None, *,
             reduce: bool, out_dtype: Any = None, kind: Any = None) -> jax.Array:
    """One moe_matmul call; the input is cast to the dtype this weight computes in."""
    if w.quantized:
        xin = x  # float32 -> SCALAR_GGUF, float16/bfloat16 -> WMMA_GGUF
        if xin.dtype == jnp.float32:
            out_dtype = None  # SCALAR_GGUF always writes float32
    else:
        xin = x.astype(w.w.dtype)
    return _ops.moe_matmul(xin, ids, w.w, scores, reduce=reduce, out_dtype=out_dtype,
                           weight_layout=w.layout, kind=kind)


def _gate_up_weights(gate_up: Any, name: str, layout: str, *, allow_2d: bool = False
                     ) -> tuple[_W, ...]:
    if isinstance(gate_up, (tuple, list)):
        if len(gate_up) != 2:
            raise ValueError(f"{name} must be one fused weight or a (gate, up) pair; "
                             f"got a sequence of {len(gate_up)}")
        g = _weight(gate_up[0], f"{name}[0] (gate)", layout, allow_2d=allow_2d)
        u = _weight(gate_up[1], f"{name}[1] (up)", layout, allow_2d=allow_2d)
        if (g.E, g.N, g.K) != (u.E, u.N, u.K):
            raise ValueError(f"{name}: gate and up must have the same logical shape [E, F, D]; "
                             f"got {[g.E, g.N, g.K]} and {[u.E, u.N, u.K]}")
        return g, u
    gu = _weight(gate_up, name, layout, allow_2d=allow_2d)
    if gu.N % 2:
        raise ValueError(f"{name}: a fused gate+up weight has 2*F output rows (gate rows, then "
                         f"up rows); got an odd N = {gu.N}")
    return (gu,)


def _pair_rows(table: jax.Array, ids: jax.Array) -> jax.Array:
    """Rows ``table[ids]`` of a per-expert ``[E, n]`` table: ``[*ids.shape, n]``, zero for ids
    outside [0, E) (those pairs contribute nothing, as in moe_matmul)."""
    E = table.shape[0]
    rows = jnp.take(table, jnp.clip(ids, 0, E - 1), axis=0)  # jnp.take would wrap negative ids
    return jnp.where(((ids >= 0) & (ids < E))[..., None], rows, jnp.zeros((), table.dtype))


def _ffn_hidden(x2: jax.Array, ids: jax.Array, gate_up: tuple[_W, ...], act: Callable,
                kind: Any = None, bias: tuple[jax.Array | None, jax.Array | None] = (None, None)
                ) -> jax.Array:
    """Gate/up projections (+ their float32 ``[E, F]`` biases) and the activation: float32
    ``[T, k, F]``."""
    if len(gate_up) == 1:
        gu = _project(x2, ids, gate_up[0], None, reduce=False, kind=kind).astype(jnp.float32)
        f = gate_up[0].N // 2
        gate, up = gu[..., :f], gu[..., f:]
    else:
        gate = _project(x2, ids, gate_up[0], None, reduce=False, kind=kind).astype(jnp.float32)
        up = _project(x2, ids, gate_up[1], None, reduce=False, kind=kind).astype(jnp.float32)
    gate_bias, up_bias = bias
    if gate_bias is not None:
        gate = gate + _pair_rows(gate_bias, ids)
    if up_bias is not None:
        up = up + _pair_rows(up_bias, ids)
    return act(gate, up)


def _bias(b: Any, name: str, shape: tuple[int, int], dims: str) -> jax.Array | None:
    """A float ``[E, n]`` expert bias (``dims`` names the axes) as float32, or None;
    ValueError/TypeError naming it."""
    if b is None:
        return None
    if not hasattr(b, "shape") or not hasattr(b, "dtype"):
        raise TypeError(f"{name} must be a float array {list(shape)}; got {type(b).__name__}")
    b = jnp.asarray(b)
    if not jnp.issubdtype(b.dtype, jnp.floating):
        raise TypeError(f"{name} must be a float array {list(shape)}; got dtype {b.dtype}")
    if tuple(b.shape) != tuple(shape):
        raise ValueError(f"{name} must be {dims} = {list(shape)}; got shape {list(b.shape)}")
    return b.astype(jnp.float32)


def _gate_up_biases(gate_up_bias: Any, E: int, f: int) -> tuple[jax.Array | None, jax.Array | None]:
    """``gate_up_bias`` ([E, 2F], gate entries first, or a (gate [E, F], up [E, F]) pair with
    None allowed) as float32 (gate, up) biases."""
    if gate_up_bias is None:
        return None, None
    if isinstance(gate_up_bias, (tuple, list)):
        if len(gate_up_bias) != 2:
            raise ValueError(f"gate_up_bias must be one [E, 2F] array or a (gate_bias, up_bias) pair; "
                             f"got a sequence of {len(gate_up_bias)}")
        return (_bias(gate_up_bias[0], "gate_up_bias[0] (gate)", (E, f), "[E, F]"),
                _bias(gate_up_bias[1], "gate_up_bias[1] (up)", (E, f), "[E, F]"))
    b = _bias(gate_up_bias, "gate_up_bias", (E, 2 * f), "[E, 2F]")
    return b[:, :f], b[:, f:]


def _down_input(h: jax.Array, down: _W, x_dtype: Any) -> jax.Array:
    return h.astype(x_dtype if down.quantized else down.w.dtype)


def _activation(activation: str | Callable) -> Callable:
    if callable(activation):
        return activation
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {tuple(ACTIVATIONS)} or a callable "
                         f"act(gate, up); got {activation!r}")
    return ACTIVATIONS[activation]


def moe_ffn(
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
    kind: Any = None,
    debug_checks: bool = False,
    gate_up_bias: Any = None,
    down_bias: jax.Array | None = None,
) -> jax.Array:
    """The routed expert FFN (plus an optional shared expert) of an MoE block.

    Args:
      x: ``[..., D]`` activations: float32 (quantized weights only), float16 or bfloat16.
      expert_ids: int ``[..., k]`` routed experts of each token (ids outside [0, E) add 0).
      scores: float ``[..., k]`` routing weights.
      gate_up: fused gate+up weights, ``[E, 2F, D]`` (``"enk"``) or ``[E, D, 2F]``
        (``"ekn"``), gate rows first (llama.cpp's ``ffn_gate_up_exps``); or a ``(gate, up)``
        pair of ``[E, F, D]`` weights. A pair costs two moe_matmul calls instead of one: fuse
        weights of the same format once with :func:`fuse_gate_up`.
      down: ``[E, D, F]`` (``"enk"``) or ``[E, F, D]`` (``"ekn"``).
      activation: ``"swiglu"``, ``"geglu"`` (tanh GELU), ``"geglu_erf"``, ``"reglu"``,
        ``"gpt_oss"`` (:class:`GptOssActivation`), or a callable ``act(gate, up)`` on float32
        ``[..., k, F]`` arrays.
      weight_layout: layout of the dense weights, ``"enk"`` (default, GGUF's ``[E, N, K]``) or
        ``"ekn"`` (Flax's ``[E, K, N]``), or a ``WeightLayout``; quantized weights are always
        ``[E, N, K]``.
      shared: optional :class:`SharedExpert`.
      out_dtype: output dtype (default: ``x.dtype``).
      kind: the ``MoeKind`` of every projection (default: chosen per weight, see
        ``moe_matmul``); one that contradicts a weight's dtype raises TypeError.
      debug_checks: checkify-check that the ids lie in ``[0, E)`` and the scores are finite
        (see :func:`jax_moe.check_routing`; run under ``checkify.checkify``).
      gate_up_bias: optional expert bias of the gate/up projection: float ``[E, 2F]`` (gate
        entries first, like the fused rows), or a ``(gate_bias, up_bias)`` pair of ``[E, F]``
        (either may be None). Added in float32 before the activation.
      down_bias: optional float ``[E, D]`` bias of the down projection; pair (t, j) adds
        ``scores[t, j] * down_bias[e_j]``, like the rest of its output (gpt-oss).

    Returns:
      ``[..., D]`` in ``out_dtype``.
    """
    weight_layout = _check_layout(weight_layout)
    act = _activation(activation)
    x = jnp.asarray(x)
    if x.ndim < 2:
        raise ValueError(f"x must be [..., D] with at least one token axis; got shape {list(x.shape)}")
    if x.dtype not in _ACT_DTYPES:
        raise TypeError(f"x must be float32, float16 or bfloat16; got {x.dtype}")
    expert_ids = jnp.asarray(expert_ids)
    if not jnp.issubdtype(expert_ids.dtype, jnp.integer):
        raise TypeError(f"expert_ids must be an int array [..., k]; got dtype {expert_ids.dtype}")
    if expert_ids.ndim != x.ndim or expert_ids.shape[:-1] != x.shape[:-1]:
        raise ValueError(f"expert_ids must be [..., k] with the token axes of x {list(x.shape[:-1])}; "
                         f"got shape {list(expert_ids.shape)}")
    scores = jnp.asarray(scores)
    if scores.shape != expert_ids.shape:
        raise ValueError(f"scores must have the shape of expert_ids {list(expert_ids.shape)}; "
                         f"got {list(scores.shape)}")
    if not jnp.issubdtype(scores.dtype, jnp.floating):
        raise TypeError(f"scores must be a float array [..., k]; got dtype {scores.dtype}")
    out_dtype = x.dtype if out_dtype is None else jnp.dtype(out_dtype)
    if out_dtype not in _ACT_DTYPES:
        raise TypeError(f"out_dtype must be float32, float16 or bfloat16; got {out_dtype}")

    gu = _gate_up_weights(gate_up, "gate_up", weight_layout)
    dn = _weight(down, "down", weight_layout)
    d_model, f = x.shape[-1], gu[0].N // (2 if len(gu) == 1 else 1)
    if gu[0].K != d_model:
        raise ValueError(f"gate_up must contract over D = {d_model} (the last axis of x); "
                         f"it has K = {gu[0].K} in weight_layout={weight_layout!r}"
                         f"{_hint(gu[0], d_model)}")
    if (dn.E, dn.N, dn.K) != (gu[0].E, d_model, f):
        raise ValueError(f"down must be logically [E, D, F] = {[gu[0].E, d_model, f]} to match "
                         f"gate_up and x; got {[dn.E, dn.N, dn.K]} in weight_layout="
                         f"{weight_layout!r}{_hint(dn, f)}")

    if debug_checks:
        _ops.check_routing(expert_ids, scores, gu[0].E, where="moe_ffn")
    biases = _gate_up_biases(gate_up_bias, dn.E, f)
    down_bias = _bias(down_bias, "down_bias", (dn.E, d_model), "[E, D]")

    lead = x.shape[:-1]
    k = expert_ids.shape[-1]
    tokens = math.prod(lead)
    x2 = x.reshape(tokens, d_model)
    ids2 = expert_ids.reshape(tokens, k).astype(jnp.int32)
    scores2 = scores.reshape(tokens, k).astype(jnp.float32)

    h = _ffn_hidden(x2, ids2, gu, act, kind, biases)  # [T, k, F] float32
    f32_sum = shared is not None or down_bias is not None  # more terms: add in f32, round once
    routed_dtype = jnp.float32 if f32_sum else out_dtype
    y = _project(_down_input(h, dn, x.dtype), ids2, dn, scores2, reduce=True, out_dtype=routed_dtype,
                 kind=kind)
    if down_bias is not None:
        # y + sum_j scores[:, j] * down_bias[ids[:, j]], unrolled over the k: elementwise work and
        # gathers only (no reduce), so XLA makes it one loop fusion with the final add and cast
        # (and with whatever elementwise op consumes the block's output, e.g. a residual add).
        y = y.astype(jnp.float32)
        for j in range(k):
            y = y + scores2[:, j:j + 1] * _pair_rows(down_bias, ids2[:, j])
    if shared is not None:
        y = y.astype(jnp.float32) + _shared_ffn(x2, shared, weight_layout, act, d_model, kind)
    return y.astype(out_dtype).reshape(*lead, d_model)


def _shared_ffn(x2: jax.Array, shared: SharedExpert, layout: str, act: Callable,
                d_model: int, kind: Any = None) -> jax.Array:
    """The shared expert on ``x2 [T, D]``: float32 ``[T, D]``."""
    if not isinstance(shared, SharedExpert):
        raise TypeError(f"shared must be a jax_moe.ffn.SharedExpert; got {type(shared).__name__}")
    gu = _gate_up_weights(shared.gate_up, "shared.gate_up", layout, allow_2d=True)
    dn = _weight(shared.down, "shared.down", layout, allow_2d=True)
    fs = gu[0].N // (2 if len(gu) == 1 else 1)
    if gu[0].E != 1 or gu[0].K != d_model:
        raise ValueError(f"shared.gate_up must be logically [1, 2*Fs, D] with D = {d_model}; "
                         f"got {[gu[0].E, gu[0].N, gu[0].K]}")
    if (dn.E, dn.N, dn.K) != (1, d_model, fs):
        raise ValueError(f"shared.down must be logically [1, D, Fs] = {[1, d_model, fs]}; "
                         f"got {[dn.E, dn.N, dn.K]}")
    ids = jnp.zeros((x2.shape[0], 1), jnp.int32)
    h = _ffn_hidden(x2, ids, gu, act, kind)
    y = _project(_down_input(h, dn, x2.dtype), ids, dn, None, reduce=False, out_dtype=jnp.float32,
                 kind=kind)
    y = y[:, 0, :].astype(jnp.float32)
    if shared.gate is not None:
        g = jnp.asarray(shared.gate)
        if g.shape not in ((d_model,), (d_model, 1), (1, d_model)):
            raise ValueError(f"shared.gate must be a [D] = [{d_model}] weight; got shape {list(g.shape)}")
        logit = x2.astype(jnp.float32) @ g.reshape(d_model).astype(jnp.float32)
        y = y * jax.nn.sigmoid(logit)[:, None]
    return y


def shared_ffn(x: jax.Array, shared: SharedExpert, *,
               activation: str | Callable[[jax.Array, jax.Array], jax.Array] = "swiglu",
               weight_layout: str | WeightLayout = "enk", kind: Any = None) -> jax.Array:
    """The shared expert alone on ``x [..., D]``: float32 ``[..., D]``, times its optional
    sigmoid gate (what :func:`moe_ffn` adds to the routed output)."""
    x = jnp.asarray(x)
    d_model = x.shape[-1]
    y = _shared_ffn(x.reshape(-1, d_model), shared, _check_layout(weight_layout),
                    _activation(activation), d_model, kind)
    return y.reshape(x.shape)


def fuse_gate_up(gate: Weight, up: Weight, *, weight_layout: str | WeightLayout = "enk") -> Weight:
    """Concatenate gate ``[E, F, D]`` and up ``[E, F, D]`` into one gate+up weight ``[E, 2F, D]``.

    Dense weights are concatenated along N (axis 1 for ``"enk"``, axis 2 for ``"ekn"``); quantized
    weights must share their format and are concatenated along their rows (numpy data stays
    numpy, on the host). Do it once, when loading, not inside the jitted step.
    """
    weight_layout = _check_layout(weight_layout)
    g = _weight(gate, "gate", weight_layout)
    u = _weight(up, "up", weight_layout)
    if (g.E, g.N, g.K) != (u.E, u.N, u.K):
        raise ValueError(f"gate and up must have the same logical shape; got {[g.E, g.N, g.K]} "
                         f"and {[u.E, u.N, u.K]}")
    if g.quantized != u.quantized:
        raise TypeError("fuse_gate_up: gate and up must both be dense or both be quantized")
    if g.quantized:
        if gate.qtype != up.qtype:
            raise TypeError(f"fuse_gate_up: gate is {gate.qtype.name} and up is {up.qtype.name}; "
                            f"only weights of one format can be fused")
        if isinstance(gate.data, np.ndarray) and isinstance(up.data, np.ndarray):
            data = np.concatenate([gate.data, up.data], axis=-2)
        else:
            data = jnp.concatenate([jnp.asarray(gate.data), jnp.asarray(up.data)], axis=-2)
        return QuantizedExperts(data, gate.qtype, (g.E, 2 * g.N, g.K))
    if g.w.dtype != u.w.dtype:
        raise TypeError(f"fuse_gate_up: gate is {g.w.dtype} and up is {u.w.dtype}")
    return jnp.concatenate([g.w, u.w], axis=-2 if weight_layout == "enk" else -1)


def deinterleave_gate_up(gate_up: Any, bias: Any = None, *, weight_layout: str = "ekn") -> Any:
    """Hugging Face's gpt-oss ``gate_up_proj`` to jax_moe's fused gate+up layout, once, on load.

    Hugging Face stores gpt-oss's gate and up projections interleaved along their output axis
    (gate, up, gate, up, ...): ``gate_up_proj`` is ``[E, D, 2F]`` (``weight_layout="ekn"``, the
    default) with ``gate = gate_up[..., ::2]`` and ``up = gate_up[..., 1::2]``, and
    ``gate_up_proj_bias [E, 2F]`` alike. jax_moe's fused weights hold all gate outputs first,
    then all up outputs. ::

        gate_up, gate_up_bias = deinterleave_gate_up(hf["gate_up_proj"], hf["gate_up_proj_bias"])
        weights = MoEWeights(router=hf["router.weight"].T, router_bias=hf["router.bias"],
                             gate_up=gate_up, gate_up_bias=gate_up_bias,
                             down=hf["down_proj"], down_bias=hf["down_proj_bias"],
                             config=RouterConfig.gpt_oss(k=4), activation="gpt_oss",
                             weight_layout="ekn")

    (``down_proj`` is ``[E, F, D]``, already ``"ekn"``.) ``"enk"`` de-interleaves ``[E, 2F, D]``
    along axis 1. numpy inputs give numpy outputs (one copy, on the host); jax arrays give jax
    arrays. Returns ``gate_up`` alone when ``bias`` is None, else ``(gate_up, bias)``.
    """
    _check_layout(weight_layout)
    if isinstance(gate_up, QuantizedExperts) or not hasattr(gate_up, "shape"):
        raise TypeError(f"deinterleave_gate_up: gate_up must be a dense [E, D, 2F] array; got "
                        f"{type(gate_up).__name__} (de-interleave before quantizing)")
    axis = 2 if weight_layout == "ekn" else 1
    if len(gate_up.shape) != 3 or gate_up.shape[axis] % 2:
        want = "[E, D, 2F]" if weight_layout == "ekn" else "[E, 2F, D]"
        raise ValueError(f"deinterleave_gate_up: gate_up must be {want} with an even 2F; got shape "
                         f"{list(gate_up.shape)}")

    def split(a: Any, ax: int) -> Any:
        xp = np if isinstance(a, np.ndarray) else jnp
        idx = [slice(None)] * a.ndim
        even, odd = list(idx), list(idx)
        even[ax], odd[ax] = slice(0, None, 2), slice(1, None, 2)
        return xp.concatenate([a[tuple(even)], a[tuple(odd)]], axis=ax)

    out = split(gate_up, axis)
    if bias is None:
        return out
    E, two_f = gate_up.shape[0], gate_up.shape[axis]
    if tuple(bias.shape) != (E, two_f):
        raise ValueError(f"deinterleave_gate_up: bias must be [E, 2F] = {[E, two_f]}; got shape "
                         f"{list(bias.shape)}")
    return out, split(bias, 1)


def router_logits(x: jax.Array, kernel: jax.Array, bias: jax.Array | None = None) -> jax.Array:
    """Router logits in float32: ``x [..., D] @ kernel [D, E] (+ bias [E])``."""
    kernel = jnp.asarray(kernel)
    if kernel.ndim != 2 or kernel.shape[0] != x.shape[-1]:
        raise ValueError(f"router kernel must be [D, E] with D = {x.shape[-1]}; got shape "
                         f"{list(kernel.shape)}")
    logits = jnp.matmul(x.astype(jnp.float32), kernel.astype(jnp.float32),
                        precision=jax.lax.Precision.HIGHEST)
    if bias is not None:
        logits = logits + jnp.asarray(bias).astype(jnp.float32)
    return logits


def moe_block(
    x: jax.Array,
    router_kernel: jax.Array,
    gate_up: GateUp,
    down: Weight,
    *,
    router: RouterConfig,
    router_bias: jax.Array | None = None,
    selection_bias: jax.Array | None = None,
    activation: str | Callable[[jax.Array, jax.Array], jax.Array] = "swiglu",
    weight_layout: str | WeightLayout = "enk",
    shared: SharedExpert | None = None,
    out_dtype: Any = None,
    gate_up_bias: Any = None,
    down_bias: jax.Array | None = None,
    return_routing: bool = False,
    kind: Any = None,
    debug_checks: bool = False,
) -> jax.Array | tuple[jax.Array, tuple[jax.Array, jax.Array]]:
    """A whole MoE block: float32 router, top-k routing, expert FFN (+ shared expert).

    Args:
      x: ``[..., D]`` activations (float32 with quantized experts, float16 or bfloat16).
      router_kernel: ``[D, E]`` router weights (the logits are computed in float32).
      gate_up, down, activation, weight_layout, shared, out_dtype: as in :func:`moe_ffn`.
      router: a :class:`jax_moe.routing.RouterConfig`.
      router_bias: optional ``[E]`` bias added to the logits (gpt-oss).
      selection_bias: optional ``[E]`` selection-only bias (DeepSeek-V3's ``exp_probs_b``).
      gate_up_bias, down_bias: optional expert biases, as in :func:`moe_ffn` (gpt-oss).
      return_routing: also return ``(expert_ids, scores)``.
      kind, debug_checks: as in :func:`moe_ffn`. The router's E must be the experts' E.

    Returns:
      ``[..., D]``, and ``(expert_ids int32 [..., k], scores f32 [..., k])`` if ``return_routing``.
    """
    if not isinstance(router, RouterConfig):
        raise TypeError(f"router must be a jax_moe.routing.RouterConfig; got {type(router).__name__}")
    x = jnp.asarray(x)
    logits = router_logits(x, router_kernel, router_bias)
    gu = _gate_up_weights(gate_up, "gate_up", _check_layout(weight_layout))
    if logits.shape[-1] != gu[0].E:
        raise ValueError(f"the router scores E = {logits.shape[-1]} experts (router_kernel "
                         f"{list(jnp.shape(router_kernel))}) but gate_up holds {gu[0].E}: ids "
                         f">= {gu[0].E} would add nothing")
    ids, scores = router(logits, selection_bias)
    out = moe_ffn(x, ids, scores, gate_up, down, activation=activation, weight_layout=weight_layout,
                  shared=shared, out_dtype=out_dtype, kind=kind, debug_checks=debug_checks,
                  gate_up_bias=gate_up_bias, down_bias=down_bias)
    return (out, (ids, scores)) if return_routing else out


@dataclasses.dataclass
class MoEWeights:
    """All weights of one MoE block, framework-free; a pytree (the config fields are static).

    Expert weights are dense ``[E, N, K]``/``[E, K, N]`` arrays (``weight_layout``) or
    ``QuantizedExperts``; the shared expert's are ``[1, N, K]``. Call it like a function:
    ``weights(x)`` runs :func:`moe_block`. Build one by hand from your own checkpoint, or with
    ``jax_moe.gguf.load_block_weights``; ``jax_moe.nnx.MoE.from_weights`` and
    ``jax_moe.linen.MoE.from_weights`` turn it into Flax modules.

    Attributes:
      router: ``[D, E]`` router kernel (float32).
      down: ``[E, D, F]``.
      gate_up: fused ``[E, 2F, D]``, or None when ``gate`` and ``up`` are given separately.
      gate, up: ``[E, F, D]`` each (when their formats differ and they cannot be fused).
      router_bias: ``[E]`` bias of the logits, or None.
      selection_bias: ``[E]`` selection-only bias, or None.
      gate_up_bias: ``[E, 2F]`` expert bias of the fused gate+up (gate entries first), or None;
      gate_bias, up_bias: ``[E, F]`` each instead (beside separate ``gate``/``up``, or either one).
      down_bias: ``[E, D]`` expert bias of the down projection, weighted by the routing score.
      shared_gate_up / shared_gate / shared_up / shared_down: the shared expert, or None.
      shared_expert_gate: ``[D]`` sigmoid-gate weight of the shared expert, or None.
      config: the :class:`RouterConfig`.
      activation: a name from :data:`ACTIVATIONS`, or a hashable callable such as
        :class:`GptOssActivation` ``(limit=...)``.
      weight_layout: layout of the dense expert weights, ``"enk"`` (default) or ``"ekn"`` (a
        ``WeightLayout`` is accepted and stored by name).
    """

    router: Any
    down: Any
    gate_up: Any = None
    gate: Any = None
    up: Any = None
    router_bias: Any = None
    selection_bias: Any = None
    shared_gate_up: Any = None
    shared_gate: Any = None
    shared_up: Any = None
    shared_down: Any = None
    shared_expert_gate: Any = None
    gate_up_bias: Any = None
    gate_bias: Any = None
    up_bias: Any = None
    down_bias: Any = None
    config: RouterConfig = dataclasses.field(default_factory=lambda: RouterConfig(k=2))
    activation: str | Callable[[jax.Array, jax.Array], jax.Array] = "swiglu"
    weight_layout: str = "enk"

    def __post_init__(self) -> None:
        self.weight_layout = _check_layout(self.weight_layout)  # "enk" / "ekn" from either spelling

    @property
    def experts_gate_up(self) -> GateUp:
        """The gate+up argument of :func:`moe_ffn`: the fused weight or the (gate, up) pair."""
        if self.gate_up is not None:
            return self.gate_up
        if self.gate is None or self.up is None:
            raise ValueError("MoEWeights needs gate_up, or both gate and up")
        return (self.gate, self.up)

    @property
    def experts_gate_up_bias(self) -> Any:
        """The ``gate_up_bias`` argument of :func:`moe_ffn`: the fused bias, the
        ``(gate_bias, up_bias)`` pair, or None."""
        if self.gate_up_bias is not None:
            if self.gate_bias is not None or self.up_bias is not None:
                raise ValueError("MoEWeights: give gate_up_bias or gate_bias/up_bias, not both")
            return self.gate_up_bias
        if self.gate_bias is None and self.up_bias is None:
            return None
        return (self.gate_bias, self.up_bias)

    @property
    def shared(self) -> SharedExpert | None:
        """The shared expert as a :class:`SharedExpert`, or None."""
        if self.shared_down is None:
            return None
        gu = self.shared_gate_up if self.shared_gate_up is not None else (self.shared_gate, self.shared_up)
        return SharedExpert(gu, self.shared_down, self.shared_expert_gate)

    @property
    def num_experts(self) -> int:
        """E."""
        return int(self.router.shape[1])

    @property
    def features(self) -> int:
        """D, the model dimension."""
        return int(self.router.shape[0])

    @property
    def hidden_features(self) -> int:
        """F, the hidden size of one expert."""
        return _weight(self.down, "down", self.weight_layout).K

    @property
    def shared_hidden_features(self) -> int | None:
        """Fs, the hidden size of the shared expert, or None."""
        if self.shared_down is None:
            return None
        return _weight(self.shared_down, "shared_down", self.weight_layout, allow_2d=True).K

    def explain(self, x: Any, *, kind: Any = None, platform: str | None = None) -> str:
        """What running this block on ``x [..., D]`` (an array or ``jax.ShapeDtypeStruct``)
        calls: :func:`jax_moe.explain` of each routed projection (gate/up, then down), as
        :func:`moe_ffn` makes them. Nothing runs."""
        from .explain import explain

        x_dtype = jnp.dtype(x.dtype)
        T, k = math.prod(x.shape[:-1]), self.config.k
        ids = jax.ShapeDtypeStruct((T, k), jnp.int32)
        scores = jax.ShapeDtypeStruct((T, k), jnp.float32)
        gu = _gate_up_weights(self.experts_gate_up, "gate_up", self.weight_layout)
        dn = _weight(self.down, "down", self.weight_layout)
        names = ["gate_up"] if len(gu) == 1 else ["gate", "up"]
        projections = [(n, g, (T, self.features), None) for n, g in zip(names, gu)]
        projections.append(("down", dn, (T, k, dn.K), scores))
        out = []
        for name, w, rows, s in projections:
            xin = jax.ShapeDtypeStruct(rows, x_dtype if w.quantized else w.w.dtype)
            text = explain(xin, ids, w.w, s, kind=kind, reduce=s is not None,
                           out_dtype=None if w.quantized else w.w.dtype,
                           weight_layout=w.layout, platform=platform)
            out.append(f"[{name}]\n{text}")
        return "\n".join(out)

    def formats(self) -> dict[str, str]:
        """The storage format of each expert weight, e.g. ``{"gate_up": "Q4_K", "down": "Q6_K"}``."""
        out = {}
        for name in EXPERT_NAMES:
            w = getattr(self, name)
            if w is not None:
                out[name] = w.qtype.name if isinstance(w, QuantizedExperts) else jnp.dtype(w.dtype).name
        return out

    def __call__(self, x: jax.Array, *, out_dtype: Any = None, return_routing: bool = False,
                 kind: Any = None, debug_checks: bool = False):
        """Run the block on ``x [..., D]`` (see :func:`moe_block`)."""
        return moe_block(x, self.router, self.experts_gate_up, self.down, router=self.config,
                         router_bias=self.router_bias, selection_bias=self.selection_bias,
                         activation=self.activation, weight_layout=self.weight_layout,
                         shared=self.shared, out_dtype=out_dtype, return_routing=return_routing,
                         kind=kind, debug_checks=debug_checks,
                         gate_up_bias=self.experts_gate_up_bias, down_bias=self.down_bias)


def expert_bias_arrays(weights: MoEWeights) -> dict[str, Any]:
    """The expert biases of ``weights`` as float32 arrays in the layout of its gate/up weights,
    for modules that hold all of them or none: ``{"gate_up_bias": [E, 2F], "down_bias": [E, D]}``
    beside a fused gate+up, ``{"gate_bias", "up_bias", "down_bias"}`` beside separate ones;
    absent biases of a biased block are zeros (adding them changes nothing). ``{}`` when
    ``weights`` has no expert bias."""
    given = weights.experts_gate_up_bias
    if given is None and weights.down_bias is None:
        return {}
    E, D, F = weights.num_experts, weights.features, weights.hidden_features
    gate_b, up_b = _gate_up_biases(given, E, F)
    zeros = jnp.zeros((E, F), jnp.float32)
    gate_b = zeros if gate_b is None else gate_b
    up_b = zeros if up_b is None else up_b
    down_b = _bias(weights.down_bias, "down_bias", (E, D), "[E, D]")
    out = {"down_bias": jnp.zeros((E, D), jnp.float32) if down_b is None else down_b}
    if weights.gate_up is not None:
        out["gate_up_bias"] = jnp.concatenate([gate_b, up_b], axis=1)
    else:
        out["gate_bias"], out["up_bias"] = gate_b, up_b
    return out


jax.tree_util.register_dataclass(
    MoEWeights,
    data_fields=["router", "down", "gate_up", "gate", "up", "router_bias", "selection_bias",
                 "shared_gate_up", "shared_gate", "shared_up", "shared_down", "shared_expert_gate",
                 "gate_up_bias", "gate_bias", "up_bias", "down_bias"],
    meta_fields=["config", "activation", "weight_layout"],
)
