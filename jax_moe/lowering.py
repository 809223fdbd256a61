"""Lowering of ``moe_matmul`` to the XLA FFI custom call ``jax_moe_matmul``, per platform.

The CUDA handler needs device scratch space (token counts, offsets and the permutation that
groups tokens by expert, and per-pair partial results). It gets it as an extra output buffer
that XLA allocates; the primitive has one output, so the lowering adds the scratch result to
the custom call and hides it.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.core import ShapedArray
from jax.interpreters import mlir

from . import _ext
from .primitive import moe_matmul_p

_ffi_rule = jax.ffi.ffi_lowering(_ext.TARGET)


def cuda_scratch_bytes(kind: int, wtype: int, layout: int, T: int, k: int, E: int, N: int, K: int,
                       x_rows: int, reduce: bool) -> int:
    """Bytes of device scratch the CUDA handler needs on any GPU (the handler checks its plan's
    layout against it): O(T·k·N) plus O(E), never a copy of the experts."""
    return int(_ext.cuda.scratch_bytes(kind, wtype, layout, T, k, E, N, K, x_rows, reduce))


def _attrs(kind, wtype, layout, reduce):
    return dict(kind=np.int32(kind), wtype=np.int32(wtype), layout=np.int32(layout),
                reduce=bool(reduce))


def _lower_cpu(ctx, x, ids, w, scores, *, kind, wtype, layout, reduce, out_dtype):
    return _ffi_rule(ctx, x, ids, w, scores, **_attrs(kind, wtype, layout, reduce))


def _lower_cuda(ctx, x, ids, w, scores, *, kind, wtype, layout, reduce, out_dtype):
    if _ext.cuda is None:
        raise RuntimeError(
            "jax_moe was built without its CUDA module, so moe_matmul cannot run on a GPU. "
            "Reinstall with a CUDA compiler on PATH (pip install . -Ccmake.define.JAX_MOE_CUDA=ON), "
            "or run on the CPU (jax.default_device(jax.devices('cpu')[0]))."
        )
    x_aval, ids_aval, w_aval = ctx.avals_in[:3]
    T, k = ids_aval.shape
    K = x_aval.shape[-1]
    x_rows = T * k if len(x_aval.shape) == 3 else T
    N = ctx.avals_out[0].shape[-1]
    nbytes = cuda_scratch_bytes(kind, wtype, layout, T, k, w_aval.shape[0], N, K, x_rows, reduce)
    scratch = ShapedArray((max(nbytes, 1),), np.uint8)
    ctx = ctx.replace(avals_out=[*ctx.avals_out, scratch])
    return _ffi_rule(ctx, x, ids, w, scores, **_attrs(kind, wtype, layout, reduce))[:1]


mlir.register_lowering(moe_matmul_p, _lower_cpu, platform="cpu")
mlir.register_lowering(moe_matmul_p, _lower_cuda, platform="cuda")
