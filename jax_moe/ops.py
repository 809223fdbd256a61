"""``moe_matmul``: one MoE projection over routed (token, expert) pairs (docs/contract.md §4)."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from . import batching as _batching  # noqa: F401  (registers the batching rule)
from . import binding as _binding  # binds moe_matmul_p through its rules
from . import lowering as _lowering  # noqa: F401  (registers the lowerings)
from .kinds import DENSE_DTYPES, MoeKind, WeightLayout, as_kind, as_layout, dense_wtype
from .quantized import QuantizedExperts
from .shapes import check_expert_ids, check_kind_dtypes


def _weights(w: Any, weight_layout: str | WeightLayout) -> tuple[bool, WeightLayout, tuple, Any]:
    """``(quantized, layout, shape, dtype)`` of moe_matmul's ``w``: the block data's for
    ``QuantizedExperts``; TypeError/ValueError for what moe_matmul refuses."""
    layout = as_layout(weight_layout)
    if isinstance(w, QuantizedExperts):
        if layout != WeightLayout.ENK:
            raise ValueError('quantized experts are stored [E, N, K]: weight_layout must be "enk"')
        return True, layout, tuple(w.data.shape), np.dtype(w.data.dtype)
    if isinstance(w, (tuple, list)) or not hasattr(w, "shape") or not hasattr(w, "dtype"):
        raise TypeError(f"w must be a dense array or QuantizedExperts; got {type(w).__name__}")
    return False, layout, tuple(w.shape), np.dtype(w.dtype)


def _kind(kind: MoeKind | int | str | None, quantized: bool, x_dtype, w_dtype) -> MoeKind:
    if kind is None:
        if not quantized:
            if np.dtype(x_dtype) not in DENSE_DTYPES or np.dtype(w_dtype) != np.dtype(x_dtype):
                raise TypeError(
                    "dense experts run in float16 or bfloat16 with x and w of the same dtype; got "
                    f"x {np.dtype(x_dtype).name} and w {np.dtype(w_dtype).name} (cast both, or "
                    "quantize w with jax_moe.quantize to run float32 x through SCALAR_GGUF)"
                )
            return MoeKind.WMMA
        return MoeKind.SCALAR_GGUF if np.dtype(x_dtype) == np.float32 else MoeKind.WMMA_GGUF
    kind = as_kind(kind)
    check_kind_dtypes(kind, x_dtype, quantized, w_dtype)
    return kind


def check_routing(expert_ids: Any, scores: Any, num_experts: int, *, where: str = "jax_moe") -> None:
    """``jax.experimental.checkify`` checks of a routing: every id of ``expert_ids`` (int
    ``[..., k]``) in ``[0, num_experts)`` and every value of ``scores`` (float ``[..., k]``, or
    None) finite. Under ``checkify.checkify(f)`` a failed check comes back as an error naming
    ``where``, the range and the offending values; outside checkify, traced checks are refused
    by JAX (wrap the function in ``checkify.checkify``)."""
    from jax.experimental import checkify

    ids = jnp.asarray(expert_ids)
    checkify.check(
        jnp.all((ids >= 0) & (ids < num_experts)),
        f"{where}: expert ids must lie in [0, {num_experts}) (the experts of the weights); got "
        "ids from {lo} to {hi}",
        lo=jnp.min(ids), hi=jnp.max(ids))
    if scores is not None:
        s = jnp.asarray(scores)
        checkify.check(jnp.all(jnp.isfinite(s)),
                       f"{where}: routing scores must be finite; got {{n}} NaN or Inf values",
                       n=jnp.sum(~jnp.isfinite(s)))


def moe_matmul(
    x: Any,
    expert_ids: Any,
    w: Any,
    scores: Any = None,
    *,
    kind: MoeKind | int | str | None = None,
    reduce: bool | None = None,
    out_dtype: Any = None,
    weight_layout: str | WeightLayout = "enk",
    debug_checks: bool = False,
) -> jax.Array:
    """Apply each token's routed experts to its activations.

    Args:
      x: ``[T, K]`` (every routed pair of token t reads row t: the gate/up projection) or
        ``[T, k, K]`` (pair (t, j) reads its own row: the down projection). float32 (with
        quantized w only: SCALAR_GGUF), float16 or bfloat16.
      expert_ids: int32 ``[T, k]``. An id outside ``[0, E)`` makes its pair contribute zero.
      w: dense expert weights of x's dtype, ``[E, N, K]`` (``weight_layout="enk"``, the
        default: GGUF's layout) or ``[E, K, N]`` (``"ekn"``, Flax's); or ``QuantizedExperts``
        ``[E, N, K]``.
      scores: routing weights ``[T, k]`` (float32 or x's dtype), or None for 1.
      kind: the kernel kind; None picks WMMA for dense w, WMMA_GGUF for quantized w with
        float16/bfloat16 x and SCALAR_GGUF for quantized w with float32 x. An explicit kind that
        contradicts the dtypes raises TypeError.
      reduce: True (default when scores are given) sums over the k pairs of each token:
        ``out[t] = sum_j scores[t, j] * W[ids[t, j]] @ xrow(t, j)``, ``[T, N]``. False keeps
        them apart: ``out[t, j] = scores[t, j] * W[ids[t, j]] @ xrow(t, j)``, ``[T, k, N]``.
      out_dtype: output dtype (float32, float16 or bfloat16); default x's dtype (float32 for
        SCALAR_GGUF, which always writes float32).
      weight_layout: ``"enk"`` (default) or ``"ekn"``, or a ``WeightLayout``, for dense w
        (quantized w is always ENK). Square weights (N == K) fit both: say which you hold.
      debug_checks: check at run time that every expert id lies in ``[0, E)`` and every score
        is finite, with ``jax.experimental.checkify`` checks: run the caller under
        ``checkify.checkify(f)`` and ``err.throw()`` (see :func:`check_routing`). Off by
        default: an id outside ``[0, E)`` is also how a pair is dropped on purpose.

    Accumulation is float32 and the reduction over k runs in a fixed order, so results are
    bitwise reproducible. Inference-only: differentiating through it raises an error.
    """
    x = jnp.asarray(x)
    expert_ids = jnp.asarray(expert_ids)
    check_expert_ids(expert_ids.shape, expert_ids.dtype)
    quantized, layout, _, w_dtype = _weights(w, weight_layout)
    w_data = jnp.asarray(w.data if quantized else w)
    kind = _kind(kind, quantized, x.dtype, None if quantized else w_dtype)
    if quantized and w.data.ndim != 3:
        raise ValueError(
            f"w {w} holds stacked layers {list(w.data.shape[:-3])}: moe_matmul takes one layer's "
            f"experts [E, N, Kb]; slice a layer (w[i]), or let jax.lax.scan / nnx.scan / vmap "
            f"slice the layer axis")
    if quantized and x.shape[-1:] != (w.K,):
        raise ValueError(f"x must be [..., K] with K = {w.K} to match w {w}; got shape {list(x.shape)}")
    if reduce is None:
        reduce = scores is not None
    if scores is None:
        scores = jnp.ones(expert_ids.shape, jnp.float32)
    else:
        scores = jnp.asarray(scores)
    if debug_checks:
        check_routing(expert_ids, scores, w.E if quantized else int(w_data.shape[0]),
                      where="moe_matmul")
    if out_dtype is None:
        out_dtype = np.float32 if kind == MoeKind.SCALAR_GGUF else x.dtype
    wtype = int(w.qtype) if quantized else int(dense_wtype(x.dtype))
    return _binding.bind(
        x, expert_ids, w_data, scores,
        kind=int(kind), wtype=wtype, layout=int(layout), reduce=bool(reduce),
        out_dtype=np.dtype(out_dtype),
    )
