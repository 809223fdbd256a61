"""Kernel kinds, GGUF formats and weight layouts (docs/contract.md §2; the enum values are ABI)."""

from __future__ import annotations

import enum

import ml_dtypes
import numpy as np


class MoeKind(enum.IntEnum):
    """Which kernel computes a call; each kind names a numerical contract (docs/contract.md §4)."""

    SCALAR_GGUF = 0  #: f32 activations staged as q8_1, GGUF weights, f32 output
    WMMA = 1  #: f16/bf16 activations and dense experts of the same dtype
    WMMA_GGUF = 2  #: f16/bf16 activations, GGUF weights decoded to the activation dtype


def as_kind(kind: MoeKind | int | str | None, name: str = "kind") -> MoeKind | None:
    """Normalize ``kind`` (a MoeKind, its int value or its name; None: chosen from the dtypes)
    to a MoeKind or None, or raise ValueError naming ``name``."""
    if kind is None:
        return None
    try:
        return MoeKind[kind.upper()] if isinstance(kind, str) else MoeKind(kind)
    except (KeyError, ValueError, TypeError):
        raise ValueError(f"{name} must be a MoeKind (SCALAR_GGUF, WMMA, WMMA_GGUF) or None; "
                         f"got {kind!r}") from None


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
    MXFP4 = 39  #: 32 E2M1 values with one E8M0 scale (gpt-oss's expert format)


class WeightLayout(enum.IntEnum):
    """Layout of dense expert weights: ``ENK`` is ``[E, N, K]`` (GGUF's), ``EKN`` is ``[E, K, N]``."""

    ENK = 0
    EKN = 1


def as_layout(weight_layout: WeightLayout | str, name: str = "weight_layout") -> WeightLayout:
    """Normalize a ``WeightLayout`` or its name (``"enk"``/``"ekn"``, any case) to a WeightLayout,
    or raise ValueError naming ``name``."""
    if isinstance(weight_layout, WeightLayout):
        return weight_layout
    if isinstance(weight_layout, str) and weight_layout.upper() in WeightLayout.__members__:
        return WeightLayout[weight_layout.upper()]
    raise ValueError(f'{name} must be "enk" ([E, N, K]) or "ekn" ([E, K, N]), or a '
                     f"jax_moe.WeightLayout; got {weight_layout!r}")


#: The dtypes of dense experts (and of the activations of the WMMA kinds).
DENSE_DTYPES: tuple[np.dtype, ...] = (np.dtype(np.float16), np.dtype(ml_dtypes.bfloat16))


#: (elements per block, bytes per block) of the GGUF formats this library runs.
_BLOCKS: dict[GGMLType, tuple[int, int]] = {
    GGMLType.Q8_0: (32, 34),
    GGMLType.Q2_K: (256, 84),
    GGMLType.Q3_K: (256, 110),
    GGMLType.Q4_K: (256, 144),
    GGMLType.Q5_K: (256, 176),
    GGMLType.Q6_K: (256, 210),
    GGMLType.MXFP4: (32, 17),
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
        hint = ""
        if isinstance(qtype, str) and qtype.upper() in PRESETS:
            g, d = PRESETS[qtype.upper()]
            hint = (f" ({qtype!r} is a llama.cpp file type, a mix of formats: the modules' "
                    f"quantize({qtype!r}) takes it, here pass {g.name} and {d.name} for the down "
                    f"projection)")
        raise ValueError(f"{name} must be one of {supported}; got {qtype!r}{hint}")
    return t


#: llama.cpp file types named like formats: (gate/up format, down format). llama.cpp picks the
#: higher format for some layers' down projections only; here every down projection gets it.
PRESETS: dict[str, tuple[GGMLType, GGMLType]] = {
    "Q3_K_M": (GGMLType.Q3_K, GGMLType.Q4_K),
    "Q4_K_M": (GGMLType.Q4_K, GGMLType.Q6_K),
    "Q5_K_M": (GGMLType.Q5_K, GGMLType.Q6_K),
}


def expert_qtypes(qtype: GGMLType | int | str, down_qtype: GGMLType | int | str | None = None
                  ) -> tuple[GGMLType, GGMLType]:
    """``(gate/up format, down format)`` of a module's ``quantize(qtype, down_qtype=...)``.

    ``qtype`` is one format (``down_qtype`` defaults to it) or a preset of :data:`PRESETS`
    such as ``"Q4_K_M"`` (gate/up Q4_K, down Q6_K), which sets both."""
    if isinstance(qtype, str) and qtype.upper() in PRESETS:
        if down_qtype is not None:
            raise ValueError(f"qtype={qtype!r} sets the down format too; pass down_qtype only "
                             f"with a single format such as 'Q4_K'")
        return PRESETS[qtype.upper()]
    qt = as_qtype(qtype, "qtype")
    return qt, (qt if down_qtype is None else as_qtype(down_qtype, "down_qtype"))


def block_size(qtype: GGMLType | int | str) -> int:
    """Elements per block of a quantized format (32 for Q8_0 and MXFP4, 256 for the K-quants)."""
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
