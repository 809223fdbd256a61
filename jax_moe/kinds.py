"""Kernel kinds, GGUF formats and weight layouts (DESIGN.md §2; the enum values are ABI)."""

from __future__ import annotations

import enum

import numpy as np


class MoeKind(enum.IntEnum):
    """Which kernel computes a call; each kind names a numerical contract (DESIGN.md §4)."""

    SCALAR_GGUF = 0  #: f32 activations staged as q8_1, GGUF weights, f32 output
    WMMA = 1  #: f16/bf16 activations and dense experts of the same dtype
    WMMA_GGUF = 2  #: f16/bf16 activations, GGUF weights decoded to the activation dtype


class GGMLType(enum.IntEnum):
    """ggml's tensor type ids (the values GGUF files store)."""

    F32 = 0
    F16 = 1
    Q8_0 = 8
    Q2_K = 10
    Q3_K = 11
    Q4_K = 12
    Q5_K = 13
    Q6_K = 14
    BF16 = 30


class WeightLayout(enum.IntEnum):
    """Layout of dense expert weights: ``ENK`` is ``[E, N, K]`` (GGUF's), ``EKN`` is ``[E, K, N]``."""

    ENK = 0
    EKN = 1


#: (elements per block, bytes per block) of the GGUF formats this library runs.
_BLOCKS: dict[GGMLType, tuple[int, int]] = {
    GGMLType.Q8_0: (32, 34),
    GGMLType.Q2_K: (256, 84),
    GGMLType.Q3_K: (256, 110),
    GGMLType.Q4_K: (256, 144),
    GGMLType.Q5_K: (256, 176),
    GGMLType.Q6_K: (256, 210),
}

#: The quantized formats, in ggml id order.
QUANTIZED_TYPES: tuple[GGMLType, ...] = tuple(_BLOCKS)


def as_qtype(qtype: GGMLType | int | str, name: str = "qtype") -> GGMLType:
    """Normalize ``qtype`` (a GGMLType, its int id or its name such as ``"Q4_K"``) to a
    quantized GGMLType, or raise ValueError naming ``name``."""
    try:
        if isinstance(qtype, str):
            t = GGMLType[qtype.upper()]
        elif isinstance(qtype, (int, np.integer)) and not isinstance(qtype, (bool, np.bool_)):
            t = GGMLType(int(qtype))
        else:  # a float such as 12.7 is not an id (int() would truncate it to Q4_K)
            t = None
    except (KeyError, ValueError, TypeError):
        t = None
    if t is None or t not in _BLOCKS:
        supported = ", ".join(q.name for q in QUANTIZED_TYPES)
        raise ValueError(f"{name} must be one of {supported}; got {qtype!r}")
    return t


def block_size(qtype: GGMLType | int | str) -> int:
    """Elements per block of a quantized format (32 for Q8_0, 256 for the K-quants)."""
    return _BLOCKS[as_qtype(qtype)][0]


def block_bytes(qtype: GGMLType | int | str) -> int:
    """Bytes per block of a quantized format."""
    return _BLOCKS[as_qtype(qtype)][1]


def row_bytes(qtype: GGMLType | int | str, k: int) -> int:
    """Bytes of one quantized row of ``k`` elements (``k`` a multiple of the block size)."""
    qk, bb = _BLOCKS[as_qtype(qtype)]
    return k // qk * bb


def dense_wtype(dtype: np.dtype) -> GGMLType:
    """The GGMLType id that the FFI handlers use for dense weights of ``dtype``."""
    return GGMLType.F16 if np.dtype(dtype) == np.float16 else GGMLType.BF16
