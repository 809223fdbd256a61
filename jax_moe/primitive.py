"""The ``moe_matmul`` primitive: definition, abstract evaluation and the inference-only JVP.

Operands: ``x, expert_ids, w_data, scores`` (see ``shapes.output_shape``). Parameters:
``kind`` (MoeKind int), ``wtype`` (GGMLType int of w: F16/BF16 for dense experts),
``layout`` (WeightLayout int), ``reduce`` (bool), ``out_dtype`` (numpy dtype).
Lowering lives in ``lowering.py`` and batching in ``batching.py``.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import numpy as np
from jax.extend.core import Primitive
from jax.interpreters import ad
from jax.sharding import NamedSharding, PartitionSpec as P

from .shapes import output_shape

moe_matmul_p = Primitive("jax_moe_matmul")


class InferenceOnlyError(TypeError):
    """Raised when something differentiates through moe_matmul, which has no derivative."""


def _out_sharding(x_aval, ndim: int):
    """Output sharding: tokens keep x's sharding of T, the other dimensions are unsharded."""
    sh = getattr(x_aval, "sharding", None)
    if not isinstance(sh, NamedSharding):
        return sh
    spec = tuple(sh.spec)
    first = spec[0] if spec else None
    return NamedSharding(sh.mesh, P(first, *([None] * (ndim - 1))))


def _abstract_eval(x, ids, w, scores, *, kind, wtype, layout, reduce, out_dtype):
    shape = output_shape(
        x.shape, x.dtype, ids.shape, ids.dtype, w.shape, w.dtype, scores.shape, scores.dtype,
        kind=kind, wtype=wtype, layout=layout, reduce=reduce, out_dtype=out_dtype,
    )
    # update() keeps x's manual axis type (shard_map) and memory space; the output varies over
    # the manual axes that any operand varies over (check_vma=True).
    kwargs = {}
    mat = getattr(x, "manual_axis_type", None)
    if mat is not None:
        varying = frozenset().union(*(getattr(getattr(a, "manual_axis_type", None), "varying", ())
                                      for a in (x, ids, w, scores)))
        if varying != mat.varying:
            kwargs["manual_axis_type"] = mat.update(varying=varying, unreduced=mat.unreduced - varying,
                                                    reduced=mat.reduced - varying)
    return x.update(shape=shape, dtype=np.dtype(out_dtype), weak_type=False,
                    sharding=_out_sharding(x, len(shape)), **kwargs)


def _jvp(primals, tangents, **params):
    raise InferenceOnlyError(
        "jax_moe.moe_matmul is inference-only: it has no derivative (no JVP or VJP). "
        "If the gradient is not needed through the MoE experts, wrap their inputs in "
        "jax.lax.stop_gradient(...) so that nothing is differentiated through moe_matmul. "
        "The jax_moe Flax modules' weights are not trainable by default (jax_moe.nnx: "
        "ExpertWeight/RouterWeight variables, not nnx.Param; jax_moe.linen: the 'experts', "
        "'quantized' and 'router' collections, not 'params'). If the gradient reaches the "
        "block's weights (trainable_router=True, or nnx.Param experts of your own), leave "
        "them out of the differentiated state: nnx.grad(loss, argnums=nnx.DiffState(0, "
        "nnx.All(nnx.Param, nnx.Not(nnx.PathContains('moe'))))) with 'moe' the block's "
        "attribute name, or jax.grad over the other parameters only."
    )


moe_matmul_p.def_abstract_eval(_abstract_eval)
@functools.lru_cache(maxsize=None)
def _compiled(params: tuple) -> Any:
    """One jitted bind per parameter set: eager calls compile once per signature."""
    kwargs = dict(params)
    return jax.jit(lambda *args: moe_matmul_p.bind(*args, **kwargs))


def _impl(*args, **params):
    return _compiled(tuple(sorted(params.items())))(*args)


moe_matmul_p.def_impl(_impl)
ad.primitive_jvps[moe_matmul_p] = _jvp
