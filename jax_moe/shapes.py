"""Shape and dtype rules of moe_matmul: what each argument must be, and the output it gives.

These rules run at trace time (in the public wrapper and in the primitive's abstract eval),
so a bad argument fails with a message that names it before anything is compiled.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from .kinds import DENSE_DTYPES, GGMLType, MoeKind, WeightLayout, block_size, row_bytes

_F16_BF16 = tuple(d.name for d in DENSE_DTYPES)

#: Routed (token, expert) pairs one call takes: the CUDA grouping indexes pairs with int32.
MAX_PAIRS = 2**31 - 1


def _dt(dtype) -> str:
    return np.dtype(dtype).name


def check_expert_ids(shape: Sequence[int], dtype) -> tuple[int, int]:
    """expert_ids must be int32 ``[T, k]`` with k >= 1; returns (T, k)."""
    if len(shape) != 2:
        raise ValueError(f"expert_ids must be [T, k]; got shape {list(shape)}")
    if _dt(dtype) != "int32":
        raise TypeError(f"expert_ids must be int32; got {_dt(dtype)} (use ids.astype(jnp.int32))")
    if shape[1] < 1:
        raise ValueError(f"expert_ids must have k >= 1 routed experts per token; got {list(shape)}")
    if int(shape[0]) * int(shape[1]) > MAX_PAIRS:
        raise ValueError(
            f"expert_ids {list(shape)} holds {int(shape[0]) * int(shape[1])} pairs, more than the "
            f"{MAX_PAIRS} (2^31 - 1) one call takes; split the tokens into several calls"
        )
    return int(shape[0]), int(shape[1])


def layout_hint(layout: WeightLayout, w_shape: Sequence[int], K: int) -> str:
    """A hint for dense weights ``w_shape`` that do not contract over ``K`` in ``layout`` but
    would in the other layout (empty when they would not either)."""
    if len(w_shape) != 3:
        return ""
    other = WeightLayout.EKN if layout == WeightLayout.ENK else WeightLayout.ENK
    k_other = int(w_shape[1]) if other == WeightLayout.EKN else int(w_shape[2])
    if k_other != K:
        return ""
    name = "[E, K, N]" if other == WeightLayout.EKN else "[E, N, K]"
    return f'; these weights fit {name}: pass weight_layout="{other.name.lower()}"'


def check_kind_dtypes(kind: MoeKind, x_dtype, quantized: bool, w_dtype=None) -> None:
    """The dtype rules of docs/contract.md §2: TypeError saying which rule an explicit kind breaks."""
    x = _dt(x_dtype)
    if kind == MoeKind.WMMA:
        if quantized:
            raise TypeError(
                "kind=WMMA runs dense float16/bfloat16 experts, but w is QuantizedExperts: use "
                "kind=WMMA_GGUF (float16/bfloat16 x) or SCALAR_GGUF (float32 x), or kind=None"
            )
        if x not in _F16_BF16:
            raise TypeError(f"kind=WMMA takes float16 or bfloat16 x; got x {x}")
        if _dt(w_dtype) != x:
            raise TypeError(f"kind=WMMA needs w of x's dtype {x}; got w {_dt(w_dtype)}")
    else:
        if not quantized:
            raise TypeError(
                f"kind={kind.name} runs GGUF-quantized experts, but w is a dense "
                f"{_dt(w_dtype)} array: pass QuantizedExperts (see jax_moe.quantize) or use kind=WMMA"
            )
        if kind == MoeKind.SCALAR_GGUF and x != "float32":
            raise TypeError(f"kind=SCALAR_GGUF takes float32 x; got x {x} (WMMA_GGUF takes {x})")
        if kind == MoeKind.WMMA_GGUF and x not in _F16_BF16:
            raise TypeError(
                f"kind=WMMA_GGUF takes float16 or bfloat16 x; got x {x} "
                "(SCALAR_GGUF takes float32 x)"
            )


def output_shape(
    x_shape: Sequence[int],
    x_dtype,
    ids_shape: Sequence[int],
    ids_dtype,
    w_shape: Sequence[int],
    w_dtype,
    scores_shape: Sequence[int],
    scores_dtype,
    *,
    kind: int,
    wtype: int,
    layout: int,
    reduce: bool,
    out_dtype,
) -> tuple[int, ...]:
    """Check every operand of the primitive and return the output shape.

    Shapes: x ``[T, K]`` or ``[T, k, K]``; expert_ids int32 ``[T, k]``; w dense ``[E, N, K]``
    (layout ENK) or ``[E, K, N]`` (EKN) of x's dtype, or uint8 GGUF blocks
    ``[E, N, K // QK * block_bytes]``; scores ``[T, k]`` float32 or x's dtype. The output is
    ``[T, N]`` when reduce else ``[T, k, N]``.
    """
    kind = MoeKind(kind)
    T, k = check_expert_ids(ids_shape, ids_dtype)
    quantized = kind != MoeKind.WMMA
    check_kind_dtypes(kind, x_dtype, quantized, w_dtype)
    if len(x_shape) == 2 and x_shape[0] == T:
        pass
    elif len(x_shape) == 3 and tuple(x_shape[:2]) == (T, k):
        pass
    else:
        raise ValueError(
            f"x must be [T, K] or [T, k, K] with [T, k] = {[T, k]} from expert_ids; "
            f"got shape {list(x_shape)}"
        )
    K = int(x_shape[-1])
    if len(w_shape) != 3:
        raise ValueError(f"w must be rank 3; got shape {list(w_shape)}")
    if quantized:
        qtype = GGMLType(wtype)
        if _dt(w_dtype) != "uint8":
            raise TypeError(f"quantized w data must be uint8; got {_dt(w_dtype)}")
        if K % block_size(qtype) != 0:
            raise ValueError(
                f"K = {K} (the last dimension of x) must be a multiple of the {qtype.name} "
                f"block size {block_size(qtype)}"
            )
        if int(w_shape[2]) != row_bytes(qtype, K):
            raise ValueError(
                f"w holds rows of K = {int(w_shape[2]) // row_bytes(qtype, block_size(qtype)) * block_size(qtype)} "
                f"{qtype.name} elements but x has K = {K} (x must be [..., K] with K = w.shape[2])"
            )
        N = int(w_shape[1])
    else:
        if WeightLayout(layout) == WeightLayout.ENK:
            N, wk = int(w_shape[1]), int(w_shape[2])
            expect = "[E, N, K]"
        else:
            wk, N = int(w_shape[1]), int(w_shape[2])
            expect = "[E, K, N]"
        if wk != K:
            raise ValueError(
                f"w must be {expect} with K = {K} (the last dimension of x; weight_layout="
                f"\"{WeightLayout(layout).name.lower()}\"); got shape {list(w_shape)}"
                f"{layout_hint(WeightLayout(layout), w_shape, K)}"
            )
    if tuple(scores_shape) != (T, k):
        raise ValueError(f"scores must be [T, k] = {[T, k]} like expert_ids; got shape {list(scores_shape)}")
    if _dt(scores_dtype) not in ("float32", _dt(x_dtype)):
        raise TypeError(f"scores must be float32 or x's dtype {_dt(x_dtype)}; got {_dt(scores_dtype)}")
    od = _dt(out_dtype)
    if kind == MoeKind.SCALAR_GGUF and od != "float32":
        raise TypeError(f"SCALAR_GGUF writes float32 output; got out_dtype={od}")
    if od not in ("float32", "float16", "bfloat16"):
        raise TypeError(f"out_dtype must be float32, float16 or bfloat16; got {od}")
    return (T, N) if reduce else (T, k, N)
