"""``jax_moe.explain``: which kind, platform and kernel path a ``moe_matmul`` call will take.

It resolves the call exactly as :func:`jax_moe.moe_matmul` does (the same kind choice and the
same shape checks, so a bad argument raises the same error) and describes what runs: on the CPU
the C++ implementation, on a GPU the plan of the CUDA module (kernel and tile, from its
``plan_description`` where this build has it). Nothing is compiled or run.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np

from . import _ext
from .kinds import MoeKind, WeightLayout, dense_wtype
from .lowering import cuda_scratch_bytes
from .shapes import check_expert_ids, output_shape

__all__ = ["explain"]

#: One line per kind: its numerical contract (docs/contract.md §4).
_CONTRACT = {
    MoeKind.SCALAR_GGUF: "x staged per 32 values as q8_1, integer dot products with the GGUF "
                         "blocks, float32 accumulation, float32 output",
    MoeKind.WMMA: "products of x and w as stored, float32 accumulation, one rounding to the "
                  "output dtype",
    MoeKind.WMMA_GGUF: "w decoded exactly and rounded once to x's dtype, then as WMMA",
}

_CPU_PATH = ("the C++ CPU implementation (csrc/cpu/moe_cpu.cc): one multi-threaded pass over the "
             "routed pairs, the same numerical contract as the CUDA kernels")


def _platform(x: Any, platform: str | None) -> str:
    if platform is None:
        devices = getattr(x, "devices", None)
        if isinstance(x, jax.Array) and not isinstance(x, jax.core.Tracer) and callable(devices):
            platform = next(iter(devices())).platform
        else:
            platform = jax.default_backend()
    platform = platform.lower()
    return "cuda" if platform == "gpu" else platform


def _has_gpu() -> bool:
    try:
        return bool(jax.devices("cuda"))
    except RuntimeError:
        return False


def explain(
    x: Any,
    expert_ids: Any,
    w: Any,
    scores: Any = None,
    *,
    kind: MoeKind | int | str | None = None,
    reduce: bool | None = None,
    out_dtype: Any = None,
    weight_layout: str | WeightLayout = "enk",
    platform: str | None = None,
) -> str:
    """Describe what ``moe_matmul(x, expert_ids, w, scores, ...)`` runs, without running it.

    Args:
      x, expert_ids, w, scores, kind, reduce, out_dtype, weight_layout: as in
        :func:`jax_moe.moe_matmul`; arrays or anything with ``shape`` and ``dtype``
        (``jax.ShapeDtypeStruct``), and ``QuantizedExperts`` for quantized w.
      platform: ``"cpu"`` or ``"cuda"``/``"gpu"`` (default: where ``x`` lives, else JAX's
        default backend).

    Returns:
      Lines: the call's shapes and dtypes, the kind and why, the platform, and the kernel path
      (for CUDA the module's plan description of kernel and tile when the build provides it,
      and the scratch buffer the call needs).
    """
    from .ops import _kind, _weights

    ids_shape = tuple(int(s) for s in np.shape(expert_ids))
    ids_dtype = np.dtype(getattr(expert_ids, "dtype", np.int32))
    T, k = check_expert_ids(ids_shape, ids_dtype)
    quantized, layout, w_shape, w_dtype = _weights(w, weight_layout)
    x_shape, x_dtype = tuple(int(s) for s in np.shape(x)), np.dtype(x.dtype)
    chosen = kind is None
    kind = _kind(kind, quantized, x_dtype, None if quantized else w_dtype)
    if reduce is None:
        reduce = scores is not None
    s_dtype = np.dtype(np.float32) if scores is None else np.dtype(scores.dtype)
    s_shape = ids_shape if scores is None else tuple(np.shape(scores))
    if out_dtype is None:
        out_dtype = np.float32 if kind == MoeKind.SCALAR_GGUF else x_dtype
    wtype = int(w.qtype) if quantized else int(dense_wtype(x_dtype))
    out_shape = output_shape(x_shape, x_dtype, ids_shape, ids_dtype, w_shape, w_dtype, s_shape,
                             s_dtype, kind=int(kind), wtype=wtype, layout=int(layout),
                             reduce=bool(reduce), out_dtype=np.dtype(out_dtype))
    E = int(w_shape[0])
    K = x_shape[-1]
    N = out_shape[-1]
    x_rows = T * k if len(x_shape) == 3 else T
    w_desc = (f"{w.qtype.name} blocks [E, N, K]" if quantized else
              f"{w_dtype.name} {'[E, N, K]' if layout == WeightLayout.ENK else '[E, K, N]'}")
    why = ""
    if chosen:
        why = (" (dense w)" if kind == MoeKind.WMMA else
               f" (quantized w with {x_dtype.name} x)")
    plat = _platform(x, platform)
    lines = [
        f"moe_matmul: T={T} k={k} E={E} N={N} K={K}; x {list(x_shape)} {x_dtype.name}, "
        f"w {w_desc}, scores {s_dtype.name}, reduce={bool(reduce)} -> {list(out_shape)} "
        f"{np.dtype(out_dtype).name}",
        f"kind: {kind.name}{why}: {_CONTRACT[kind]}",
        f"platform: {plat}",
    ]
    if plat == "cpu":
        lines.append(f"path: {_CPU_PATH}")
    elif plat == "cuda":
        cuda = _ext.cuda
        if cuda is None:
            lines.append("path: none: this build has no CUDA module (build_info()['cuda'] is "
                         "False), so the call fails on a GPU; reinstall with nvcc on PATH")
        else:
            args = (int(kind), wtype, int(layout), T, k, E, N, K, x_rows, bool(reduce))
            if not hasattr(cuda, "plan_description"):
                lines.append("path: chosen by the CUDA handler at run time from the device's "
                             "compute capability (this build's CUDA module does not describe "
                             "its plan)")
            elif _has_gpu():
                lines.append(f"path: {cuda.plan_description(*args, device='current')}")
            else:  # no GPU here: the plan on each kind of GPU the build serves
                hopper = cuda.plan_description(*args, device="hopper")
                lines.append(f"path on Hopper (sm_90a): {hopper}")
                lines.append(f"path on other tensor-core GPUs: "
                             f"{cuda.plan_description(*args, device='generic')}")
            nbytes = cuda_scratch_bytes(*args)
            lines.append(f"scratch: {nbytes} bytes of device memory (an extra output buffer, "
                         f"freed after the call)")
    else:
        lines.append(f"path: none: jax_moe has no lowering for platform {plat!r} (cpu, cuda)")
    lines.append("sharded operands under jax.jit: each device runs this on its shard "
                 "(jax_moe.partitioning)")
    return "\n".join(lines)
